"""Helpers of the DALI tests: in-memory sources of synthetic images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ocr.data.annotations import Sample


class MemorySource:
    """A SampleSource look-alike over in-memory encoded images (what the loaders read:
    ``samples``, ``sizes``, ``encoded_array``)."""

    def __init__(self, images: list[np.ndarray], polygons: list[list[np.ndarray]], ext: str = ".png"):
        self.samples, self.sizes, self._bytes = [], [], []
        for k, (image, polys) in enumerate(zip(images, polygons)):
            ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            assert ok
            self._bytes.append(buf.reshape(-1))
            name = f"mem_{k:03d}{ext}"
            polys = tuple(np.asarray(p, dtype=np.float32) for p in polys)
            self.samples.append(Sample(name=name, path=Path(name), polygons=polys, ignore=(False,) * len(polys),
                                       word_ids=tuple(f"{i:04d}" for i in range(len(polys))),
                                       transcriptions=("x",) * len(polys)))
            self.sizes.append(image.shape[:2])

    def __len__(self) -> int:
        return len(self.samples)

    def encoded_array(self, index: int) -> np.ndarray:
        return self._bytes[index]


def text_image(height: int, width: int, box: tuple[float, float, float, float], seed: int = 0) -> np.ndarray:
    """Dark paper (the warp's black padding stays darker still) with bright 'text' strokes
    filling ``box`` (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 40, np.uint8)
    image += rng.integers(0, 20, size=(height, width, 1), dtype=np.uint8)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    for x in range(x0 + 2, x1 - 2, 7):  # vertical strokes, like letters
        cv2.rectangle(image, (x, y0 + 2), (min(x + 3, x1 - 3), y1 - 3), (240, 240, 240), -1)
    return image
