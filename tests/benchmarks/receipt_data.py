"""A tiny receipt-like dataset for the benchmark smoke tests: JPEGs with dark text-line boxes,
train and val alike, in the annotation format."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np


def write_receipts(root: Path, height: int, width: int, lines: list[tuple[int, int]], line_size: tuple[int, int],
                   images_per_split: int = 6) -> Path:
    """``lines``: the (x, y) of each line's top-left corner; ``line_size``: (w, h) of every line."""
    rng = np.random.default_rng(0)
    w, h = line_size
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        images = {}
        for i in range(images_per_split):
            canvas = np.full((height, width, 3), 235, np.uint8) + rng.integers(0, 20, (height, width, 3), dtype=np.uint8)
            words = {}
            for k, (x, y) in enumerate(lines):
                cv2.rectangle(canvas, (x, y), (x + w, y + h), (20, 20, 20), -1)
                words[f"{k + 1:04d}"] = {"points": [[x, y], [x + w, y], [x + w, y + h], [x, y + h]],
                                         "transcription": f"LINE {k}"}
            name = f"{split}_{i}.jpg"
            assert cv2.imwrite(str(root / "images" / split / name), canvas)
            images[name] = {"words": words}
        (root / "jsons").mkdir(exist_ok=True)
        (root / "jsons" / f"{split}.json").write_text(json.dumps({"images": images}), encoding="utf-8")
    return root
