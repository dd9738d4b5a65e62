"""The GPU decoder (``fn.decoders.image(device="mixed")``) on the bad-input corpus: a decode
error mid-epoch becomes the CPU backend's error naming the file, the next ``iter()`` works, and
``on_error=skip`` replaces and counts the image (CPU operators: tests/ocr/data/test_bad_inputs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dali_pipelines.loader import DaliLoader
from ocr.data.transforms import ImageDecodeError, TransformParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ocr" / "data"))
from bad_inputs import write_corpus  # noqa: E402
from test_bad_inputs import TARGET_KW, load_source  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gpu_decode_error_mid_epoch(tmp_path):
    root = write_corpus(tmp_path, ["control", "png_alpha", "grayscale_jpeg", "cmyk_jpeg", "exif_rotated"],
                        splits=("val",))
    bad = root / "images" / "val" / "gray.jpg"
    good = bad.read_bytes()
    for on_error in ("raise", "skip"):
        source = load_source(root, on_error=on_error)
        bad.write_bytes(b"\xff\xd8" + b"\0" * 300 + b"\xff\xd9")  # passes the checks before the run, not a JPEG
        loader = DaliLoader(source, TransformParams(image_size=64), TARGET_KW, 2, shuffle=False, drop_last=False,
                            seed=0, device="gpu", num_threads=1)
        if on_error == "raise":
            with pytest.raises(ImageDecodeError, match=rf"^{bad}: cannot decode image data"):
                list(loader)
            bad.write_bytes(good)
            assert sorted(n for b in loader for n in b["names"]) == sorted(s.name for s in source.samples)
        else:
            names = [n for b in loader for n in b["names"]]
            assert len(names) == 5 and "gray.jpg" not in names and len(source.failures) == 1
        loader.close()
