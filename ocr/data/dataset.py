"""The CPU backend: a torch Dataset over a SampleSource (OpenCV decode, NumPy geometry,
reference DB targets) and its DataLoader."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ocr.data import geometry
from ocr.data.batch import TARGET_KEY_OF, Collator
from ocr.data.source import SampleSource
from ocr.data.targets import make_db_targets
from ocr.data.transforms import TransformParams, normalize_chw, render_sample, sample_matrix


TARGET_MODES = ("reference", "vectorized", "deferred")


class ValidatedOCRDataset(Dataset):
    """One split as samples: normalised image, M, polygons (original and network
    pixels), ignore flags and, when ``with_targets``, the DB target maps.

    Random augmentation draws from a generator seeded from the process's torch seed,
    so ``seed_everything(..., workers=True)`` makes runs repeatable and every worker
    (and every epoch of non-persistent workers) gets its own stream.
    """

    def __init__(self, source: SampleSource, params: TransformParams, with_targets: bool = True,
                 target_kwargs: dict | None = None, target_mode: str = "reference"):
        if target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode must be one of {TARGET_MODES}, got {target_mode!r}")
        self.source = source
        self.params = params
        self.with_targets = with_targets
        self.target_kwargs = dict(target_kwargs or {})
        # reference: per sample here; vectorized: per batch in the collate (same worker);
        # deferred: per batch on the model's device after the transfer.
        self.target_mode = target_mode
        self._rng: np.random.Generator | None = None
        self._rng_seed: int | None = None

    def __len__(self) -> int:
        return len(self.source)

    def _generator(self) -> np.random.Generator:
        seed = torch.initial_seed()
        if self._rng is None or self._rng_seed != seed:
            self._rng, self._rng_seed = np.random.default_rng(seed), seed
        return self._rng

    def __getitem__(self, index: int) -> dict:
        sample = self.source.samples[index]
        height, width = self.source.sizes[index]
        rng = self._generator() if self.params.train else None
        matrix = sample_matrix(self.params, height, width, sample.polygons, sample.ignore, rng)
        canvas = render_sample(self.params, self.source.encoded_array(index), matrix, height, width, rng, str(sample.path))
        net_polygons = [geometry.transform_points(matrix, p) for p in sample.polygons]
        item = {
            "image": normalize_chw(canvas, self.params.mean, self.params.std),
            "matrix": matrix,
            "orig_size": (height, width),
            "polygons": list(sample.polygons),
            "net_polygons": net_polygons,
            "ignore": list(sample.ignore),
            "names": sample.name,
        }
        if self.with_targets and self.target_mode == "reference":
            size = self.params.output_size
            targets = make_db_targets(net_polygons, list(sample.ignore), size, size, **self.target_kwargs)
            item.update({TARGET_KEY_OF[k]: v for k, v in targets.items()})
        return item


def make_cpu_loader(dataset: ValidatedOCRDataset, batch_size: int, shuffle: bool, num_workers: int,
                    drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    mode = dataset.target_mode if dataset.with_targets else "reference"
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=Collator(mode, dataset.target_kwargs),
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
