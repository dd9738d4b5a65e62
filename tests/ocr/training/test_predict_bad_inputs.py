"""``predict`` over the bad-input corpus, both backends: every input image gets its
predictions or an ``"error"`` record naming the file and the problem. (Images that fail
only mid-run reach the same records through ``SampleSource.failures``, whose filling on
both backends ``tests/ocr/data/test_bad_inputs.py`` tests.)"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ocr.config import register_configs
from ocr.training import run
from test_overlays import REPO, _checkpoint

sys.path.insert(0, str(REPO / "tests" / "ocr" / "data"))
from bad_inputs import BAD_IMAGES, CASES, write_corpus  # noqa: E402


def _cfg(backend: str, **keys):
    register_configs()
    overrides = [f"{k}={json.dumps(str(v)) if isinstance(v, Path) else v}" for k, v in keys.items()]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name="predict", overrides=[
            *overrides, "data.image_size=64", f"loader.backend={backend}", "loader.device=cpu", "loader.num_workers=0",
            "loader.dali_threads=1", "loader.eval_batch_size=4", "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu", "data/performance_preset=none",
        ])


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_predict_writes_a_result_or_an_error_for_every_image(tmp_path, backend, caplog):
    root = write_corpus(tmp_path / "corpus", splits=("val",))
    inputs = root / "images" / "val"
    torch.manual_seed(0)
    ckpt = _checkpoint(tmp_path / "model.ckpt")
    with caplog.at_level(logging.WARNING):
        out = run.predict(_cfg(backend, ckpt_path=ckpt, input_dir=inputs, output_dir=tmp_path / "out"))
    images = json.loads(Path(out).read_text())["images"]
    assert list(images) == sorted(p.name for p in inputs.iterdir())  # every input, in order
    errors = {name: entry["error"] for name, entry in images.items() if "error" in entry}
    expected_bad = {CASES[c][0] for c, r in BAD_IMAGES.items() if r != "missing_image_file"}
    assert set(errors) == expected_bad
    assert "truncated" in errors["truncated.jpg"] and "cannot read image header" in errors["zero_byte.jpg"]
    assert all(isinstance(images[n]["words"], dict) and images[n]["words"] == {} for n in errors)
    assert any(f"{len(expected_bad)} of {len(images)} images could not be read or decoded" in r.getMessage()
               for r in caplog.records)
