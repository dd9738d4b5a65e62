"""LightningDataModule: config -> SampleSources -> the chosen backend's loaders."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from ocr.data.annotations import load_annotations
from ocr.data.backends import build_loader, choose_backend
from ocr.data.batch import attach_targets, needs_targets
from ocr.data.geometry import TrainAugment
from ocr.data.source import SampleSource
from ocr.data.transforms import ColorJitter, TransformParams

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


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


def load_split_source(cfg: DictConfig, split: str) -> SampleSource:
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
    log.info("%s split: %d images from %s", split, len(samples), image_dir)
    return SampleSource(samples, preload=dcfg.preload_images, split=split)


class OCRDataModule(L.LightningDataModule):
    """Sources per split, the backend choice (logged once), and the loaders."""

    def __init__(self, cfg: DictConfig, splits: tuple[str, ...] = ("train", "val")):
        super().__init__()
        self.cfg = cfg
        self.splits = splits
        self.sources: dict[str, SampleSource] = {}
        self.choice = choose_backend(cfg.loader)
        log.info("Data backend: %s on %s, %s targets (%s)", self.choice.backend, self.choice.device,
                 self.choice.targets, self.choice.reason)

    def prepare_data(self) -> None:
        ensure_builtin_dataset(self.cfg.data)

    def setup(self, stage: str | None = None) -> None:
        for split in self.splits:
            if split not in self.sources:
                self.sources[split] = load_split_source(self.cfg, split)

    def backend_description(self) -> dict:
        return self.choice.to_dict()

    def split_loader(self, split: str):
        train = split == "train"
        loader_cfg = self.cfg.loader
        batch_size = loader_cfg.batch_size if train else loader_cfg.eval_batch_size
        source = self.sources[split]
        return build_loader(
            self.choice, source, transform_params(self.cfg.data, train), target_kwargs(self.cfg.data),
            batch_size=batch_size, shuffle=train, drop_last=train and len(source) > batch_size, seed=self.cfg.seed,
        )

    def train_dataloader(self):
        return self.split_loader("train")

    def val_dataloader(self):
        return self.split_loader("val")

    def test_dataloader(self):
        return self.split_loader("test")

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Deferred targets: computed here, on the model's device, for the whole batch."""
        if needs_targets(batch):
            attach_targets(batch, target_kwargs(self.cfg.data))
        return batch
