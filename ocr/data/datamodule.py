"""LightningDataModule: config -> SampleSources -> the chosen backend's loaders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from ocr.data.annotations import load_annotations
from ocr.data.dataset import ValidatedOCRDataset, make_cpu_loader
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


def auto_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus - 1))


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
    def __init__(self, cfg: DictConfig, splits: tuple[str, ...] = ("train", "val")):
        super().__init__()
        self.cfg = cfg
        self.splits = splits
        self.sources: dict[str, SampleSource] = {}
        self.num_workers = auto_workers(cfg.loader.num_workers)

    def prepare_data(self) -> None:
        ensure_builtin_dataset(self.cfg.data)

    def setup(self, stage: str | None = None) -> None:
        for split in self.splits:
            if split not in self.sources:
                self.sources[split] = load_split_source(self.cfg, split)

    def backend_description(self) -> dict:
        return {"backend": "cpu", "device": "cpu", "num_workers": self.num_workers, "reason": "CPU baseline backend"}

    def eval_dataloader(self, split: str):
        return self._loader(split)

    def _loader(self, split: str):
        train = split == "train"
        dataset = ValidatedOCRDataset(
            self.sources[split], transform_params(self.cfg.data, train), with_targets=True,
            target_kwargs=target_kwargs(self.cfg.data),
        )
        batch_size = self.cfg.loader.batch_size if train else self.cfg.loader.eval_batch_size
        return make_cpu_loader(dataset, batch_size, shuffle=train, num_workers=self.num_workers, drop_last=train and len(dataset) > batch_size)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")
