"""LightningDataModule: config -> SampleSources -> the chosen backend's loaders, plus the
caching layers of the evaluation splits (all in the main process):

    backend loader -> MapFiller (load_maps: targets from the map store)
                   -> CachedLoader (cache_transformed_tensors: record once, replay after)

and preloading (images as encoded bytes or decoded arrays) before any worker starts.
Every memory-consuming feature is sized against free memory first (``ocr.data.memory``)
and degrades with one warning instead of running out of memory.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from ocr.data.annotations import load_annotations
from ocr.data.backends import build_loader, choose_backend
from ocr.data.batch import attach_targets, batch_to, needs_targets
from ocr.data.cache import BatchCache, CachedLoader, estimate_batches_bytes, num_batches_for
from ocr.data.cache_key import FORMAT_VERSION, CacheKey, annotations_component, dataset_component, stat_digest
from ocr.data.geometry import TrainAugment
from ocr.data.maps import MapFiller, MapStore, maps_key
from ocr.data.memory import STORES, MemoryProbe, choose_store, gb, host_store_name
from ocr.data.preload import fits_in_host, preload_source
from ocr.data.source import SampleSource
from ocr.data.targets import TARGETS_VERSION
from ocr.data.transforms import ColorJitter, TransformParams

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Splits whose transforms are deterministic (no random augmentation): the only ones
# whose batches may be cached or whose targets may be precomputed.
EVAL_SPLITS = ("val", "test")


class DataConfigError(ValueError):
    pass


def transform_params(data_cfg: DictConfig, train: bool) -> TransformParams:
    aug = data_cfg.augment
    return TransformParams(
        image_size=int(data_cfg.image_size),
        train=train,
        crop_size=int(data_cfg.train_crop_size),
        augment=TrainAugment(aug.scale_min, aug.scale_max, aug.max_rotation, aug.hflip_prob, aug.text_crop_prob),
        jitter=ColorJitter(aug.brightness, aug.contrast, aug.saturation),
        mean=tuple(float(x) for x in data_cfg.mean),
        std=tuple(float(x) for x in data_cfg.std),
        reduced_decode=bool(data_cfg.reduced_decode),
    )


def target_kwargs(data_cfg: DictConfig) -> dict:
    t = data_cfg.targets
    return dict(shrink_ratio=t.shrink_ratio, thresh_min=t.thresh_min, thresh_max=t.thresh_max, min_text_size=t.min_text_size)


def ensure_builtin_dataset(data_cfg: DictConfig) -> None:
    """Generate the synthetic receipts when ``data.root`` is the built-in location."""
    root, builtin = Path(data_cfg.root).resolve(), Path(data_cfg.synthetic.root).resolve()
    if root != builtin:
        return
    from ocr.data.synthetic import ensure_dataset

    syn = data_cfg.synthetic
    ensure_dataset(root, num_train=syn.num_train, num_val=syn.num_val, num_test=syn.num_test, seed=syn.seed)


def split_config(cfg: DictConfig, split: str) -> DictConfig:
    return cfg.datasets[f"{split}_dataset"].config


def is_augmented(split: str) -> bool:
    return split not in EVAL_SPLITS


def load_split_source(cfg: DictConfig, split: str) -> SampleSource:
    """The split's samples (nothing preloaded: see ``OCRDataModule`` for that)."""
    dcfg = split_config(cfg, split)
    json_path, image_dir = Path(dcfg.annotation_path), Path(dcfg.image_path)
    if not json_path.is_file():
        raise DataConfigError(
            f"{split} split: annotation file {json_path} not found "
            f"(datasets.{split}_dataset.config.annotation_path; expected <data.root>/jsons/{split}.json)"
        )
    if not image_dir.is_dir():
        raise DataConfigError(f"{split} split: image folder {image_dir} not found (datasets.{split}_dataset.config.image_path)")
    samples = load_annotations(json_path, image_dir, on_error=dcfg.on_error)
    if not samples:
        raise DataConfigError(f"{split} split: {json_path} holds no usable images")
    source = SampleSource(samples, preload=False, split=split, on_error=dcfg.on_error,
                          max_pixels=cfg.data.max_image_pixels)
    skipped = len(samples) - len(source)  # images the checks dropped (on_error=skip; listed above)
    log.info("%s split: %d images from %s%s", split, len(source), image_dir, f" ({skipped} skipped)" if skipped else "")
    return source


def check_cache_config(cfg: DictConfig, splits: tuple[str, ...]) -> None:
    """Refuse what cannot be right: caching the batches (or precomputing the targets) of
    a split with random augmentation, unknown stores, nonsense fractions."""
    for split in splits:
        dcfg = split_config(cfg, split)
        cc = dcfg.cache_config
        prefix = f"datasets.{split}_dataset.config"
        if cc.store not in STORES:
            raise DataConfigError(f"{prefix}.cache_config.store={cc.store}: not one of {', '.join(STORES)}")
        if not 0.0 < float(cc.max_memory_fraction) <= 1.0:
            raise DataConfigError(f"{prefix}.cache_config.max_memory_fraction={cc.max_memory_fraction}: must be in (0, 1]")
        if is_augmented(split):
            if cc.cache_transformed_tensors:
                raise DataConfigError(
                    f"{prefix}.cache_config.cache_transformed_tensors=true is refused: the {split} split has random "
                    f"augmentation, and replaying its first epoch would train on the same augmented samples every "
                    f"epoch. Remove the override {prefix}.cache_config.cache_transformed_tensors=true (tensor caching "
                    f"is for the val and test splits)"
                )
            if dcfg.load_maps:
                raise DataConfigError(
                    f"{prefix}.load_maps=true is refused: the {split} split's geometry is random, so precomputed "
                    f"target maps cannot match it. Remove the override {prefix}.load_maps=true"
                )


def _features(dcfg: DictConfig) -> str:
    cc = dcfg.cache_config
    parts = []
    if dcfg.preload_decoded:
        parts.append("decoded images in RAM")
    elif dcfg.preload_images or cc.cache_images:
        parts.append("images in RAM")
    if cc.cache_transformed_tensors:
        parts.append(f"tensor cache store={cc.store}")
    if dcfg.load_maps:
        parts.append("precomputed maps" + (" preloaded" if dcfg.preload_maps else " cached" if cc.cache_maps else ""))
    return ", ".join(parts) or "nothing cached"


def describe_preset(cfg: DictConfig, splits: tuple[str, ...], probe: MemoryProbe, device: str = "cpu") -> str:
    """``device``: where the model and the data path run ("gpu" | "cpu", the backend choice)."""
    preset = cfg.data.get("performance_preset", "none")
    per_split = "; ".join(f"{s}: {_features(split_config(cfg, s))}" for s in splits)
    line = f"Performance preset {preset} -> {per_split}"
    if preset == "auto":
        available, _ = probe.host()
        # GPU memory is measured when the cache is built (CUDA is not initialised yet here)
        on_gpu = device == "gpu"
        mem = f"{gb(available)} host RAM available" + (", training on the GPU" if on_gpu else ", training on the CPU")
        chain = f"gpu -> {host_store_name(torch.device('cuda'))}" if on_gpu else host_store_name(torch.device("cpu"))
        line += (f" (auto: eval splits validation_optimized, train balanced; each cache is sized against free "
                 f"memory at run time: {mem}; stores fall back {chain} -> off)")
    return line


def _libraries(backend: str) -> dict:
    import cv2

    libs = {"torch": torch.__version__.split("+")[0], "opencv": cv2.__version__}
    if backend == "dali":
        try:
            import nvidia.dali as dali

            libs["dali"] = dali.__version__
        except ImportError:
            libs["dali"] = None
    return libs


class BatchHooks(L.LightningDataModule):
    """The batch-transfer hooks every loader of ours needs (``data_cfg``: the run's ``data``
    group, for deferred targets)."""

    def __init__(self, data_cfg: DictConfig):
        super().__init__()
        self.data_cfg = data_cfg

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Move the Batch's tensors; its lists (polygons, names, ...) stay on the host, as the
        Batch contract says. Lightning's default walks every polygon of every list (~2 ms
        per batch of receipts), which would be most of what a replayed validation pass costs."""
        if isinstance(batch, dict):
            return batch_to(batch, device, non_blocking=torch.device(device).type == "cuda")
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Deferred targets: computed here, on the model's device, for the whole batch
        (replayed batches already have theirs)."""
        if needs_targets(batch):
            attach_targets(batch, target_kwargs(self.data_cfg))
        return batch


class LoaderWhenAsked(BatchHooks):
    """Hands Lightning ``build()``'s loader when it asks for it (``trainer.test`` /
    ``trainer.predict``): under DDP that is after the process group is up, and the loaders
    shard by the rank they see when built (a loader built before would run the whole split
    on every rank)."""

    def __init__(self, data_cfg: DictConfig, build):
        super().__init__(data_cfg)
        self._build = build

    def test_dataloader(self):
        return self._build()

    def predict_dataloader(self):
        return self._build()


class OCRDataModule(BatchHooks):
    """Sources per split, the backend choice (logged once), the loaders and their caches."""

    def __init__(self, cfg: DictConfig, splits: tuple[str, ...] = ("train", "val"), memory_probe: MemoryProbe | None = None):
        super().__init__(cfg.data)
        self.cfg = cfg
        self.splits = splits
        self.sources: dict[str, SampleSource] = {}
        self.probe = memory_probe or MemoryProbe()
        check_cache_config(cfg, splits)
        self.choice = choose_backend(cfg.loader, trainer_cfg=cfg.get("trainer"))
        log.info("Data backend: %s on %s, %s targets (%s)", self.choice.backend, self.choice.device,
                 self.choice.targets, self.choice.reason)
        log.info("%s", describe_preset(cfg, splits, self.probe, self.choice.device))
        self.stage: str | None = None
        self._annotations: dict[str, tuple[dict, dict]] = {}
        self._preload: dict[str, dict] = {}
        self._tensor_caches: dict[str, BatchCache | None] = {}
        self._tensor_notes: dict[str, dict] = {}
        self._maps: dict[str, dict] = {}
        self._passes: dict[str, int] = {}

    # ------------------------------------------------------------------ setup

    def prepare_data(self) -> None:
        ensure_builtin_dataset(self.cfg.data)

    def setup(self, stage: str | None = None) -> None:
        self.stage = stage or self.stage
        for split in self.splits:
            if split not in self.sources:
                self.sources[split] = self._load_source(split)

    def _load_source(self, split: str) -> SampleSource:
        source = load_split_source(self.cfg, split)
        dcfg = split_config(self.cfg, split)
        self._annotations[split] = annotations_component(dcfg.annotation_path, dcfg.on_error)
        want_bytes = bool(dcfg.preload_images or dcfg.cache_config.cache_images)
        want_decoded = bool(dcfg.preload_decoded)
        if want_decoded and self.choice.backend != "cpu":
            log.info("%s split: preload_decoded applies to the CPU backend (%s decodes on the %s); keeping the encoded "
                     "bytes in RAM instead", split, self.choice.backend, self.choice.device)
            want_decoded, want_bytes = False, True
        if want_bytes or want_decoded:
            self._preload[split] = preload_source(source, split, want_bytes, want_decoded,
                                                  transform_params(self.cfg.data, train=split == "train"), self.probe,
                                                  float(dcfg.cache_config.max_memory_fraction))
        return source

    def transcriptions(self, split: str) -> dict[str, tuple[str, ...]] | None:
        """``{image name: its GT transcriptions}`` of a loaded split, in the order of the polygons
        its batches carry (``"###"`` = don't care): what CLEval needs to score the split as
        ``python -m ocr.metrics`` does. None for a split this datamodule has not loaded."""
        source = self.sources.get(split)
        if source is None:
            return None
        return {sample.name: sample.transcriptions for sample in source.samples}

    def backend_description(self) -> dict:
        return self.choice.to_dict()

    # ------------------------------------------------------------------ trainer facts

    def _trainer(self):
        return getattr(self, "trainer", None)

    def _device(self) -> torch.device:
        trainer = self._trainer()
        if trainer is not None:
            try:
                return torch.device(trainer.strategy.root_device)
            except Exception:  # noqa: BLE001 - a trainer without a strategy yet
                pass
        return torch.device("cpu")

    def _limit(self, split: str):
        trainer = self._trainer()
        if trainer is None:
            return 1.0
        # trainer.test() (stage "test") takes limit_test_batches whichever split it evaluates
        testing = trainer.testing or self.stage == "test"
        return trainer.limit_test_batches if testing else trainer.limit_val_batches

    def _pass_info(self, split: str, length: int, advance: bool = True) -> tuple[int, bool, int | None]:
        """(batches this pass takes, counted, epoch): the trainer's limits; sanity-check
        passes are not counted (nor recorded). Without a trainer every pass is a full one
        and ``advance`` numbers them (only the outermost wrapper advances)."""
        trainer = self._trainer()
        if trainer is None:
            epoch = self._passes.get(split, 0)
            if advance:
                self._passes[split] = epoch + 1
            return length, True, epoch
        n = num_batches_for(length, self._limit(split))
        if trainer.sanity_checking:
            return int(min(n, trainer.num_sanity_val_steps)), False, None
        return n, True, int(trainer.current_epoch)

    # ------------------------------------------------------------------ loaders

    def _rank(self) -> tuple[int, int]:
        trainer = self._trainer()
        if trainer is not None:
            return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _batch_size(self, split: str) -> int:
        return int(self.cfg.loader.batch_size if split == "train" else self.cfg.loader.eval_batch_size)

    def _backend_loader(self, split: str, with_targets: bool):
        train = split == "train"
        source = self.sources[split]
        batch_size = self._batch_size(split)
        return build_loader(self.choice, source, transform_params(self.cfg.data, train), target_kwargs(self.cfg.data),
                            batch_size=batch_size, shuffle=train, drop_last=train and len(source) > batch_size,
                            seed=self.cfg.seed, with_targets=with_targets)

    def split_loader(self, split: str):
        if split == "train" or split not in EVAL_SPLITS:
            return self._backend_loader(split, with_targets=True)
        maps = self._map_state(split)
        store = maps.get("store")
        loader = self._backend_loader(split, with_targets=store is None)
        if store is not None:
            loader = MapFiller(loader, store, split, self.choice.targets, target_kwargs(self.cfg.data), maps["memory"],
                               partial(self._pass_info, split, advance=False))
            maps["filler"] = loader
        if split_config(self.cfg, split).cache_config.cache_transformed_tensors:
            cache = self._tensor_cache(split, len(loader), maps_from_store=store is not None)
            if cache is not None:
                loader = CachedLoader(loader, cache, partial(self._pass_info, split))
        return loader

    def train_dataloader(self):
        return self.split_loader("train")

    def val_dataloader(self):
        return self.split_loader("val")

    def test_dataloader(self):
        return self.split_loader("test")

    # ------------------------------------------------------------------ keys

    def _dataset_component(self, split: str) -> tuple[dict, dict]:
        source = self.sources[split]
        dcfg = split_config(self.cfg, split)
        return dataset_component(dcfg.image_path, [s.name for s in source.samples], bool(dcfg.cache_config.content_hash),
                                 source.encoded if source.preloaded else None)

    def tensor_key(self, split: str, num_batches: int, maps_from_store: bool = False) -> CacheKey:
        """Everything that decides the batches of an eval split's pass."""
        source = self.sources[split]
        dataset, dataset_info = self._dataset_component(split)
        annotations, annotations_info = self._annotations[split]
        loader = {
            "backend": self.choice.backend, "device": self.choice.device, "targets": self.choice.targets,
            "cpu_loader": getattr(self.choice, "cpu_loader", None) if self.choice.backend == "cpu" else None,
            "batch_size": self._batch_size(split), "shuffle": False, "drop_last": False,
            "num_batches": int(num_batches), "maps": "store" if maps_from_store else "computed",
            "rank": self._rank()[0], "world_size": self._rank()[1],  # each rank evaluates its own shard
            "decoded": source.has_decoded, "libraries": _libraries(self.choice.backend),
        }
        return CacheKey(
            kind="tensors", split=split,
            components={
                "dataset": dataset,
                "annotations": annotations,
                "transforms": transform_params(self.cfg.data, train=False).describe(),
                "targets": {**{k: float(v) for k, v in target_kwargs(self.cfg.data).items()},
                            "targets_version": TARGETS_VERSION},
                "loader": loader,
                "format": {"format_version": FORMAT_VERSION, "kind": "tensors"},
            },
            info={"dataset": dataset_info, "annotations": annotations_info},
        )

    # ------------------------------------------------------------------ tensor cache

    def _tensor_cache(self, split: str, length: int, maps_from_store: bool) -> BatchCache | None:
        if split in self._tensor_caches:
            return self._tensor_caches[split]
        cache = self._make_tensor_cache(split, length, maps_from_store)
        self._tensor_caches[split] = cache
        return cache

    def _make_tensor_cache(self, split: str, length: int, maps_from_store: bool) -> BatchCache | None:
        dcfg = split_config(self.cfg, split)
        cc = dcfg.cache_config
        if self.stage in ("test", "validate", "predict") and cc.store != "disk":
            why = (f"a single {self.stage} pass: an in-memory tensor cache would never be replayed "
                   f"(cache_config.store=disk keeps it for later runs)")
            log.info("%s split: tensor cache skipped, %s", split, why)
            self._tensor_notes[split] = {"enabled": False, "reason": why}
            return None
        source = self.sources[split]
        batch_size = self._batch_size(split)
        n = num_batches_for(length, self._limit(split))
        if n <= 0:
            return None
        num_samples = min(len(source), n * batch_size)
        points = sum(len(p) for s in source.samples[:num_samples] for p in s.polygons)
        size = transform_params(self.cfg.data, train=False).output_size
        estimate = estimate_batches_bytes(num_samples, size, points)
        device = self._device()
        decision = choose_store(cc.store, device, estimate, self.probe, cc.cache_dir, float(cc.max_memory_fraction),
                                what=f"{split} tensor cache")
        if decision.warning:
            log.warning("%s", decision.warning)
        if decision.store == "off":
            self._tensor_notes[split] = {"enabled": False, "reason": decision.warning or decision.reason,
                                         "estimated_bytes": estimate}
            return None
        key = self.tensor_key(split, n, maps_from_store)
        rekey = None
        if not source.preloaded and not source.has_decoded:
            # the loader reads the files every pass: notice edits between passes (a stat per file)
            names = [s.name for s in source.samples]
            folder = Path(dcfg.image_path)
            state = {"stat": stat_digest(folder, names)}

            def rekey() -> CacheKey:
                now = stat_digest(folder, names)
                if now == state["stat"]:
                    return cache.key
                state["stat"] = now
                return self.tensor_key(split, n, maps_from_store)

        log.info("Tensor caching enabled (store=%s, estimated %s) for the %s split: %d batches of %d, key %s (%s)",
                 decision.store, gb(estimate), split, n, batch_size, key.short, decision.reason)
        cache = BatchCache(split, key, decision, n, device, cc.cache_dir, target_kwargs(self.cfg.data),
                           int(cc.log_statistics_every_n), rekey=rekey)
        return cache

    # ------------------------------------------------------------------ maps

    def _map_state(self, split: str) -> dict:
        if split in self._maps:
            return self._maps[split]
        dcfg = split_config(self.cfg, split)
        cc = dcfg.cache_config
        state: dict = {"store": None, "memory": None, "filler": None, "reason": None}
        self._maps[split] = state
        if not dcfg.load_maps:
            if dcfg.preload_maps or cc.cache_maps:
                log.info("%s split: preload_maps/cache_maps have no effect without load_maps=true", split)
            return state
        source = self.sources[split]
        image_size = transform_params(self.cfg.data, train=False).output_size
        key = maps_key(split, self._dataset_component(split), self._annotations[split], image_size,
                       target_kwargs(self.cfg.data), self.choice.targets)
        store, why = MapStore.open(cc.cache_dir, key)
        state["key"] = key.short
        if store is None:
            n = len(source)
            state["reason"] = why
            state["fallback"] = n
            # Normal until someone precomputes maps (the targets are then computed as usual): info, not a warning.
            log.info("Fallback to on-the-fly generation: %d/%d samples (100.0%%) of the %s split: %s. Precompute "
                     "them with: uv run python scripts/preprocess_data.py maps --split %s [the run's data overrides]",
                     n, n, split, why, split)
            return state
        state["store"] = store
        names = [s.name for s in source.samples]
        if dcfg.preload_maps:
            ok, detail = fits_in_host(store.estimated_bytes(), self.probe, float(cc.max_memory_fraction))
            if ok:
                state["memory"] = store.load_all(names)
            else:
                log.warning("Not preloading the %s split's maps: %s", split, detail)
        if state["memory"] is None and cc.cache_maps:
            state["memory"] = {}
        log.info("%s split: DB targets from precomputed maps %s (%d samples, %s)", split, store.path, len(store),
                 "in RAM" if dcfg.preload_maps and state["memory"] else "kept in RAM once read" if cc.cache_maps
                 else "read from disk every pass")
        return state

    # ------------------------------------------------------------------ statistics

    def cache_stats(self) -> dict:
        """What each split cached and how it went (for the run summary JSON)."""
        out = {}
        for split in self.splits:
            entry: dict = {}
            if split in self._preload:
                entry["preload"] = dict(self._preload[split])
            cache = self._tensor_caches.get(split)
            if cache is not None:
                entry["tensors"] = {"enabled": True, **cache.to_dict()}
            elif split in self._tensor_notes:
                entry["tensors"] = dict(self._tensor_notes[split])
            maps = self._maps.get(split)
            if maps is not None and (maps.get("store") is not None or maps.get("reason")):
                info = {"key": maps.get("key"), "reason": maps.get("reason")}
                if maps.get("filler") is not None:
                    info.update(maps["filler"].to_dict())
                elif maps.get("fallback") is not None:
                    info["fallback_samples"] = maps["fallback"]
                entry["maps"] = info
            if entry:
                out[split] = entry
        return out
