"""SampleSource: what every backend reads. Encoded image bytes (from disk, or from RAM
when preloaded), the image's displayed size (EXIF-aware, read from the header only) and
its polygons. It is picklable, so DataLoader workers and DALI's parallel external source
can carry it to other processes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ocr.data.annotations import Sample
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# EXIF orientations 5..8 swap width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageReadError(RuntimeError):
    pass


def read_image_size(path: Path) -> tuple[int, int]:
    """(height, width) as displayed, i.e. after EXIF orientation, from the header only."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # PIL raises many types for broken files
        raise ImageReadError(f"{path}: cannot read image header ({exc})") from exc
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width


class SampleSource:
    """Indexable view of one split: bytes, size and labels per sample."""

    def __init__(self, samples: list[Sample], preload: bool = False, split: str = ""):
        self.samples = list(samples)
        self.split = split
        self.sizes = [read_image_size(s.path) for s in self.samples]
        self._bytes: list[bytes] | None = None
        if preload:
            self.preload()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def preloaded(self) -> bool:
        return self._bytes is not None

    def preload(self) -> None:
        if self._bytes is not None or not self.samples:
            return
        directory = self.samples[0].path.parent
        log.info("Preloading images from %s into RAM...", directory)
        loaded = [_read_bytes(s.path) for s in tqdm(self.samples, desc=f"Preloading {self.split}", unit="img", leave=False)]
        self._bytes = loaded
        total_mb = sum(len(b) for b in loaded) / 2**20
        log.info(
            "Preloaded %d/%d images into RAM (%.1f%%, %.1f MB)",
            len(loaded), len(self.samples), 100.0 * len(loaded) / len(self.samples), total_mb,
        )

    def encoded(self, index: int) -> bytes:
        if self._bytes is not None:
            return self._bytes[index]
        return _read_bytes(self.samples[index].path)

    def encoded_array(self, index: int) -> np.ndarray:
        return np.frombuffer(self.encoded(index), dtype=np.uint8)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read image ({exc})") from exc
