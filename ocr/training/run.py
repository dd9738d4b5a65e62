"""What the runners do: build data, model, loggers and trainer from the config and run
fit / test / predict. The runners themselves stay thin @hydra.main wrappers."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ocr import faults
from ocr.config import ConfigError  # noqa: F401 - raised here; callers import it from here too
from ocr.data.backends import CUDA_ACCELERATORS
from ocr.data.datamodule import LoaderWhenAsked, OCRDataModule
from ocr.hardware import probe
from ocr.training.callbacks import CacheStatistics, EpochTimer, RunSummary
from ocr.training.module import DBNetModule
from ocr.training.plots import CurvesPlot
from ocr.versions import stack

log = logging.getLogger(__name__)


PRECISION_NAMES = {
    "32-true": "32bit True Precision (FP32)",
    "32": "32bit True Precision (FP32)",
    "16-mixed": "16bit Automatic Mixed Precision (AMP)",
    "bf16-mixed": "bf16 Automatic Mixed Precision (AMP)",
    "16-true": "16bit True Precision (FP16)",
    "bf16-true": "bf16 True Precision",
}


def resolve_precision(requested: str, cuda: bool) -> tuple[str, str]:
    """(precision, why). ``auto``: 16-mixed on CUDA, 32-true on CPU; anything else wins."""
    if requested != "auto":
        return requested, "set explicitly"
    if cuda:
        return "16-mixed", "auto: CUDA available"
    return "32-true", "auto: no CUDA, CPU training in fp32"


#: The Batch entries a ``*-true`` precision casts: the model's input. The float64 ``matrices``
#: map detections back to the original image (cast to fp16 / bf16 they move a box on a
#: 2000 x 1500 receipt by 0.2-0.4 / 2-5 px) and the float32 DB targets are read in float32 by
#: the loss: Lightning's HalfPrecision would cast every floating tensor of the batch.
CAST_KEYS = ("images",)


class BatchHalfPrecision(HalfPrecision):
    """``16-true`` / ``bf16-true`` that casts only :data:`CAST_KEYS` of a Batch dict (anything
    else that reaches it is cast as Lightning's HalfPrecision does)."""

    def convert_input(self, data):
        if isinstance(data, dict) and "images" in data:
            return {k: super(BatchHalfPrecision, self).convert_input(v) if k in CAST_KEYS else v for k, v in data.items()}
        return super().convert_input(data)


def precision_args(precision: str) -> dict:
    """The Trainer's ``precision=`` / ``plugins=`` for ``precision``."""
    if precision in ("16-true", "bf16-true"):
        return {"precision": None, "plugins": [BatchHalfPrecision(precision)]}
    return {"precision": precision, "plugins": None}


def ballast_bytes(free: int, total: int, fraction: float) -> int:
    """Bytes to hold so that only ``fraction`` of the device's ``total`` stays free (0 when
    less than that is free already)."""
    return max(0, int(free) - int(fraction * total))


def torch_fraction(ballast: int, total: int, fraction: float) -> float:
    """torch's per-process fraction beside a ballast: the ballast is torch memory, so torch
    may hold it plus the cap."""
    return min(1.0, (ballast + fraction * total) / total)


class GpuMemoryFraction(Callback):
    """``trainer.gpu_memory_fraction`` on the device this process trains on, set in ``setup``:
    Lightning has chosen the rank's device by then (under DDP each rank caps its own GPU;
    capping before the trainer starts would cap device 0 in every rank, or only in the
    launching process of a spawn).

    ``torch.cuda.set_per_process_memory_fraction`` caps torch's allocator only; DALI's pools and
    nvJPEG allocate beside it. So the rest of the device's free memory is held by a ballast
    (a uint8 tensor, allocated before the loaders build their DALI pipelines, released in
    ``teardown``) and torch's fraction covers the ballast plus the cap: torch and DALI together
    get what a card of the capped size would have free."""

    def __init__(self, fraction: float):
        self.fraction = float(fraction)
        self.ballast: torch.Tensor | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        device = torch.device(trainer.strategy.root_device)
        if device.type != "cuda":
            return
        if self.ballast is None:
            free, total = torch.cuda.mem_get_info(device)
            self.ballast = torch.empty(ballast_bytes(free, total, self.fraction), dtype=torch.uint8, device=device)
            torch.cuda.set_per_process_memory_fraction(torch_fraction(self.ballast.numel(), total, self.fraction), device)
            log.info("GPU memory capped at %.0f%% of %s (trainer.gpu_memory_fraction, rank %d): ballast of %.2f GB "
                     "holds the rest of the free memory (%.2f GB free before)", 100 * self.fraction, device,
                     trainer.global_rank, self.ballast.numel() / 2**30, free / 2**30)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.ballast is not None:
            device = self.ballast.device
            self.ballast = None
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)


def build_loggers(cfg: DictConfig, output_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = []
    if cfg.logger.csv.enabled:
        loggers.append(CSVLogger(save_dir=str(output_dir), name="csv", version=""))
    if cfg.logger.tensorboard.enabled:
        loggers.append(TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version=""))
    if cfg.logger.wandb.enabled:
        try:
            from lightning.pytorch.loggers import WandbLogger
            import wandb  # noqa: F401  (WandbLogger imports it lazily; fail here with a clear message)
        except ImportError as exc:
            raise ConfigError("logger.wandb.enabled=true but the wandb package is not installed (uv add wandb)") from exc
        w = cfg.logger.wandb
        loggers.append(WandbLogger(project=w.project, entity=w.entity, name=cfg.exp_name, offline=w.offline, save_dir=str(output_dir)))
    return loggers


def _static_summary(cfg: DictConfig, output_dir: Path, precision: str, datamodule: OCRDataModule) -> dict:
    return {
        "exp_name": cfg.exp_name,
        "output_dir": str(output_dir),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "precision": precision,
        "backend": datamodule.backend_description(),
        "hardware": probe().to_dict(),
        "versions": stack(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def build_trainer(cfg: DictConfig, output_dir: Path, precision: str, callbacks: list, loggers: list, validate: bool = True) -> L.Trainer:
    t = cfg.trainer
    if t.gpu_memory_fraction:
        callbacks = [*callbacks, GpuMemoryFraction(t.gpu_memory_fraction)]
    return L.Trainer(
        default_root_dir=str(output_dir),
        max_epochs=t.max_epochs,
        **precision_args(precision),
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches if validate else 0,
        limit_test_batches=t.limit_test_batches,
        num_sanity_val_steps=t.num_sanity_val_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        benchmark=t.benchmark,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        max_time=t.max_time,
        callbacks=callbacks,
        logger=loggers or False,
    )


def _quiet_lightning_handlers() -> None:
    """Lightning adds its own console handler; under Hydra the root logger already
    prints (and writes the run log), so every line would appear twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def _common_setup(cfg: DictConfig) -> tuple[Path, str]:
    _quiet_lightning_handlers()
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    check_cuda_usable(cfg.trainer.accelerator)
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in CUDA_ACCELERATORS
    precision, why = resolve_precision(cfg.trainer.precision, cuda)
    log.info("Using %s (trainer.precision=%s, %s)", PRECISION_NAMES.get(precision, precision), precision, why)
    if cuda:
        torch.set_float32_matmul_precision("high")
    return output_dir, precision


def check_cuda_usable(accelerator: str, info=None) -> None:
    """NVML sees a GPU but torch cannot use it (typically: the locked torch needs a newer driver):
    a clear error with the fix instead of a run that silently trains on the CPU. With
    ``trainer.accelerator=cpu`` the same facts are one log line."""
    info = info or probe()
    if not info.cuda_problem:
        return
    if str(accelerator) in CUDA_ACCELERATORS:
        raise ConfigError(info.cuda_problem)
    log.info("%s (trainer.accelerator=%s: training on the CPU as asked)", info.cuda_problem.split(";")[0], accelerator)


def train(cfg: DictConfig) -> Path | None:
    """Fit, validating every epoch; returns the path of the run summary JSON (None on the
    other ranks of a DDP run: rank 0 reports the run)."""
    output_dir, precision = _common_setup(cfg)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    datamodule = OCRDataModule(cfg, splits=("train", "val"))
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = DBNetModule(OmegaConf.to_container(cfg.model, resolve=True), eval_data=_eval_data(cfg))
    if cfg.model.init_from:
        _init_weights(module, cfg.model.init_from, resuming=bool(ckpt_path))

    validate = cfg.trainer.limit_val_batches not in (0, 0.0)
    timer = EpochTimer()
    summary_path = output_dir / "run_summary.json"
    summary = RunSummary(summary_path, timer, _static_summary(cfg, output_dir, precision, datamodule))
    checkpoints = _checkpoint_callbacks(output_dir / "checkpoints", validate)
    checkpoint = checkpoints[0]
    callbacks = [timer, CacheStatistics(datamodule, summary, timer), summary, *checkpoints,
                 PreemptionCheckpoint(output_dir / "checkpoints" / LAST),
                 LearningRateMonitor(logging_interval="epoch"), CurvesPlot(output_dir / "curves.png", timer, cfg.exp_name)]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps // 2)))
    trainer = build_trainer(cfg, output_dir, precision, callbacks, build_loggers(cfg, output_dir), validate)
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:
        return None

    final = module.last_metrics.get("val")
    if final:
        log.info(
            "Final validation: CLEval P %.4f R %.4f hmean %.4f | IoU P %.4f R %.4f hmean %.4f",
            final["cleval"]["precision"], final["cleval"]["recall"], final["cleval"]["hmean"],
            final["iou"]["precision"], final["iou"]["recall"], final["iou"]["hmean"],
        )
    log.info("Best checkpoint: %s", checkpoint.best_model_path)
    log.info("Run summary: %s", summary_path)
    return summary_path


LAST = "last.ckpt"


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``ckpt_path=last``: the newest ``*/checkpoints/last.ckpt`` (or SLURM auto-requeue
    ``*/hpc_ckpt_*.ckpt``) of the experiment, i.e. in the run folders beside ``output_dir``
    (``outputs/<exp_name>/<time>/``). Any other path must be a file."""
    if not ckpt_path:
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path: checkpoint {ckpt_path} not found")
        return ckpt_path
    runs = Path(output_dir).parent
    found = [*runs.glob(f"*/checkpoints/{LAST}"), *runs.glob("*/hpc_ckpt_*.ckpt")]
    if not found:
        raise ConfigError(f"ckpt_path=last: no checkpoint of this experiment to resume (no */checkpoints/{LAST} "
                          f"or */hpc_ckpt_*.ckpt under {runs}); give a checkpoint file, or start without ckpt_path")
    newest = max(found, key=lambda p: p.stat().st_mtime)
    log.info("ckpt_path=last: resuming from %s (the newest checkpoint under %s)", newest, runs)
    return str(newest)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file beside their place and renamed into place:
    a run killed while saving keeps the previous checkpoint, never a partial one (the
    temporary ``.<name>.*.tmp`` is not a ``*.ckpt``)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the checkpoint from the rest of the group
            faults.inject("checkpoint.publish")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class PreemptionCheckpoint(Callback):
    """On SIGTERM (a cluster's preemption; Lightning stops after the current batch and exits
    with code 0) save ``last.ckpt`` of the interrupted epoch, so that ``ckpt_path=last``
    resumes from it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        trainer.save_checkpoint(self.path)
        log.warning("SIGTERM received: saved %s (epoch %d, step %d); resume with ckpt_path=last", self.path,
                    trainer.current_epoch, trainer.global_step)


def _checkpoint_callbacks(folder: Path, validate: bool) -> list[ModelCheckpoint]:
    """The best epoch by validation hmean, and ``last.ckpt`` rewritten every epoch. (Lightning's
    ``save_last`` copies only epochs that were saved, so beside a best-only callback it would
    keep the best epoch under the name ``last``.)"""
    if not validate:
        return [ModelCheckpoint(dirpath=str(folder), filename="last", enable_version_counter=False)]
    best = ModelCheckpoint(dirpath=str(folder), filename="epoch{epoch:02d}-hmean{val/hmean:.4f}",
                           auto_insert_metric_name=False, monitor="val/hmean", mode="max")
    last = ModelCheckpoint(dirpath=str(folder), filename="last", enable_version_counter=False)
    return [best, last]


def _init_weights(module: DBNetModule, ckpt_path: str, resuming: bool) -> None:
    """Start from another run's weights (e.g. pretrained on the synthetic receipts, then
    fine-tuned on real data); the optimizer, schedule and epoch count start fresh."""
    if resuming:
        raise ConfigError("model.init_from and ckpt_path: give one (ckpt_path resumes a run, init_from starts a new one from its weights)")
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"model.init_from: checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one clear error
        raise ConfigError(f"model.init_from: {path} is not a training checkpoint ({type(exc).__name__}: {exc})") from exc
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # the first mismatch, not torch's header
        raise ConfigError(f"model.init_from: {path} does not fit this model (model.backbone and "
                          f"model.inner_channels must match the run that wrote it): {detail}") from exc
    log.info("Model weights initialised from %s (model.init_from; optimizer, schedule and epochs start fresh)", path)


def _eval_data(cfg: DictConfig) -> dict:
    return {"image_size": int(cfg.data.image_size), "mean": list(cfg.data.mean), "std": list(cfg.data.std)}


def _differences(given: dict, saved: dict, keys) -> list[str]:
    return [f"{k} {saved[k]} -> {given[k]}" for k in keys if k in saved and k in given and given[k] != saved[k]]


def _module_from_checkpoint(path: Path) -> DBNetModule:
    """The checkpoint's model, built with ``pretrained=False``: the checkpoint holds every
    weight, and fetching the ImageNet weights a run started from fails on an offline machine."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        hparams = checkpoint["hyper_parameters"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one clear error
        raise ConfigError(f"ckpt_path: {path} is not a training checkpoint ({type(exc).__name__}: {exc})") from exc
    module = DBNetModule({**hparams["model_cfg"], "pretrained": False}, eval_data=hparams.get("eval_data"))
    module.load_state_dict(checkpoint["state_dict"])
    return module


def _load_module(cfg: DictConfig) -> DBNetModule:
    """The checkpoint's model, post-processed as this command's ``model.postprocess`` says;
    a ``model.*`` architecture key or an evaluation input setting that differs from the
    training run is one warning (the checkpoint's architecture is what runs)."""
    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path is required (ckpt_path=outputs/<exp>/<time>/checkpoints/last.ckpt)")
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path: checkpoint {path} not found")
    module = _module_from_checkpoint(path)
    saved = module.hparams.model_cfg
    given = OmegaConf.to_container(cfg.model, resolve=True)
    changed = _differences(given, saved, ("backbone", "inner_channels", "k"))
    if changed:
        log.warning("model.* differs from the checkpoint (%s): the checkpoint's architecture is used", ", ".join(changed))
    changed = _differences(given["postprocess"], saved["postprocess"], sorted(given["postprocess"]))
    module.set_postprocess(given["postprocess"])
    module.set_eval_workers(given.get("eval_workers", -1))  # this machine's, not the training machine's
    if changed:
        log.info("Post-processing from this command's model.postprocess, not the checkpoint's: %s", ", ".join(changed))
    changed = _differences(_eval_data(cfg), module.hparams.get("eval_data") or {}, ("image_size", "mean", "std"))
    if changed:
        log.warning("data.* differs from the run that trained this checkpoint (%s): results may be worse than its "
                    "validation; pass the training run's values (e.g. data.image_size=...) to match it", ", ".join(changed))
    return module


def test(cfg: DictConfig) -> dict | None:
    """Evaluate a checkpoint on ``cfg.split``; returns {"cleval": {...}, "iou": {...}} (None on
    the other ranks of a DDP run: each rank scores its shard, rank 0 reports the whole split)."""
    output_dir, precision = _common_setup(cfg)
    module = _load_module(cfg)
    split = cfg.split
    if split not in ("val", "test"):
        raise ConfigError(f"split: expected val or test, got {split!r}")
    datamodule = OCRDataModule(cfg, splits=(split,))
    datamodule.prepare_data()
    datamodule.setup("test")
    module.evaluators["test"].reset()
    module.set_transcriptions("test", datamodule.transcriptions(split))  # CLEval as python -m ocr.metrics
    trainer = build_trainer(cfg, output_dir, precision, [], [], validate=False)
    datamodule.trainer = trainer  # the loader's caches read the trainer's limits, device and rank
    trainer.test(module, datamodule=LoaderWhenAsked(cfg.data, lambda: datamodule.split_loader(split)), verbose=False)
    if not trainer.is_global_zero:
        return None  # under DDP the metrics are gathered; rank 0 prints them once
    metrics = module.last_metrics["test"]
    log.info(
        "%s split (%d images): CLEval P %.4f R %.4f hmean %.4f | IoU P %.4f R %.4f hmean %.4f",
        split, len(datamodule.sources[split]),
        metrics["cleval"]["precision"], metrics["cleval"]["recall"], metrics["cleval"]["hmean"],
        metrics["iou"]["precision"], metrics["iou"]["recall"], metrics["iou"]["hmean"],
    )
    return metrics


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def predict(cfg: DictConfig) -> Path | None:
    """Write predictions for every image in ``cfg.input_dir`` in the annotation format; returns
    the file's path (None on the other ranks of a DDP run: rank 0 writes the one file)."""
    from ocr.data.annotations import Sample, save_annotations
    from ocr.data.backends import build_loader, choose_backend
    from ocr.data.datamodule import transform_params
    from ocr.data.source import SampleSource

    output_dir, precision = _common_setup(cfg)
    module = _load_module(cfg)
    if not cfg.input_dir:
        raise ConfigError("input_dir is required (input_dir=path/to/images)")
    folder = Path(cfg.input_dir)
    if not folder.is_dir():
        raise ConfigError(f"input_dir: folder {folder} not found")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"input_dir: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    overlay_gt = _overlay_ground_truth(cfg, folder, paths)
    samples = [Sample(name=p.name, path=p, polygons=(), ignore=(), word_ids=(), transcriptions=()) for p in paths]
    # unusable images become error records instead of stopping the run
    source = SampleSource(samples, split="predict", on_error="skip", max_pixels=cfg.data.max_image_pixels)
    choice = choose_backend(cfg.loader, trainer_cfg=cfg.trainer)
    trainer = build_trainer(cfg, output_dir, precision, [], [], validate=False)
    batches = trainer.predict(module, datamodule=LoaderWhenAsked(cfg.data, lambda: build_loader(
        choice, source, transform_params(cfg.data, train=False), {}, batch_size=cfg.loader.eval_batch_size,
        shuffle=False, drop_last=False, seed=cfg.seed, with_targets=False)))
    # under DDP each rank predicted and decoded its own shard: rank 0 writes them all
    images, why = _gathered_on_every_rank(_predicted_words(batches), _error_messages(source))
    if not trainer.is_global_zero:
        return None
    images = _with_error_records(paths, images, why)
    out = Path(cfg.output_json) if cfg.output_json else output_dir / "predictions.json"
    save_annotations(out, images)
    log.info("Predictions for %d images (%d words) written to %s", len(images), sum(len(v["words"]) for v in images.values()), out)
    if cfg.overlays:
        from ocr.training.overlays import write_overlays

        write_overlays(Path(cfg.overlays), [p for p in paths if "error" not in images[p.name]], images, overlay_gt)
    return out


def _with_error_records(paths: list[Path], images: dict, why: dict[str, str]) -> dict:
    """Every input image in input order: its predictions, or ``{"words": {}, "error": why}``
    for one that could not be read or decoded (logged with the count)."""
    out, failed = {}, []
    for path in paths:
        if path.name in images and path.name not in why:
            out[path.name] = images[path.name]
        else:
            out[path.name] = {"words": {}, "error": why.get(path.name, "no prediction was produced (see the log)")}
            failed.append(out[path.name]["error"])
    if failed:
        log.warning("%d of %d images could not be read or decoded; written as error records:\n%s", len(failed),
                    len(paths), "\n".join(f"  - {m}" for m in failed))
    return out


def _predicted_words(batches: list) -> dict:
    """{image name: {"words": {...}}} from ``trainer.predict``'s batches (this rank's)."""
    images = {}
    for item in (item for batch in batches for item in batch):
        words = {
            # full precision: python -m ocr.metrics then scores the boxes that runners/test.py scores
            f"{i + 1:04d}": {"points": [[float(x), float(y)] for x, y in poly], "score": round(float(score), 4)}
            for i, (poly, score) in enumerate(zip(item["polygons"], item["scores"]))
        }
        images[item["name"]] = {"words": words}
    return images


def _error_messages(source) -> dict[str, str]:
    """{image name: why} of the images this process could not read or decode."""
    why = {p.image: p.message for p in source.problems}
    why.update({source.samples[i].name: message for i, message in source.failures.items()})
    return why


def _gathered_on_every_rank(images: dict, why: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """Under DDP, every rank's ``images`` and ``why`` merged (on every rank); an image in two
    shards (the last one is padded by wrapping around) is kept once. Without DDP: as given."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return images, why
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (images, why))
    all_images, all_why = {}, {}
    for rank_images, rank_why in parts:
        for name, entry in rank_images.items():
            all_images.setdefault(name, entry)
        for name, message in rank_why.items():
            all_why.setdefault(name, message)
    return all_images, all_why


def _overlay_ground_truth(cfg: DictConfig, folder: Path, paths: list[Path]) -> dict | None:
    """Check ``overlays`` / ``gt_json`` before the model runs; the GT words of the images, or None."""
    if not cfg.overlays:
        if cfg.gt_json:
            raise ConfigError("gt_json is only read for overlays: add overlays=FOLDER")
        return None
    if Path(cfg.overlays).resolve() == folder.resolve():
        raise ConfigError(f"overlays: {cfg.overlays} is input_dir; the overlays would replace the input images")
    if not cfg.gt_json:
        return None
    from ocr.training.overlays import load_ground_truth

    return load_ground_truth(cfg.gt_json, [p.name for p in paths])
