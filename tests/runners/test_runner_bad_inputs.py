"""Bad inputs (``tests/ocr/data/bad_inputs.py``) through the real runner processes: with the
default ``on_error=raise`` the run stops before training or evaluation with exit code 2 and
one line on stderr naming the file and the problem (no traceback); with
``datasets.train_dataset.config.on_error=skip`` training finishes and the log lists what
was skipped, with the counts. The runs of the first test start together: each spends its
~10 s importing torch and Lightning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ocr.config import ModelConfig
from ocr.training.module import DBNetModule

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "ocr" / "data"))
from bad_inputs import write_bad_json, write_corpus  # noqa: E402

pytestmark = pytest.mark.slow  # starts runner processes or trains: -m 'not slow' skips it

COMMON = ["data.image_size=64", "data.targets.min_text_size=3", "loader.backend=cpu", "loader.num_workers=0",
          "loader.batch_size=1", "loader.eval_batch_size=1", "data/performance_preset=none", "trainer.accelerator=cpu",
          "trainer.precision=32-true", "trainer.enable_progress_bar=false", "logger.wandb.enabled=false"]
TRAIN = ["model.inner_channels=16", "model.eval_workers=0", "data.train_crop_size=0", "trainer.max_epochs=1",
         "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0"]


def _dataset(root: Path, split: str, cases: list[str], bad_json: str | None = None) -> Path:
    """``cases`` in ``split``; the other splits the runner reads hold one good image."""
    for other in {"train": ("val",), "test": ()}.get(split, ()):
        write_corpus(root, ["control"], splits=(other,))
    write_corpus(root, cases, splits=(split,))
    if bad_json:
        write_bad_json(root, bad_json, split)
    return root


def _checkpoint(path: Path) -> Path:
    model_cfg = {**OmegaConf.to_container(OmegaConf.structured(ModelConfig)), "inner_channels": 16, "pretrained": False}
    torch.save({"state_dict": DBNetModule(model_cfg).state_dict(),
                "hyper_parameters": {"model_cfg": model_cfg,
                                     "eval_data": {"image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}},
               path)
    return path


def _start(script: str, root: Path, out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "runners" / script), f"data.root={root}", f"hydra.run.dir={out}", *COMMON, *overrides]
    return subprocess.Popen(cmd, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


#: (name, runner, split, corpus cases, bad annotation file, the line the user sees ({root} = the data root))
RAISE = [
    ("truncated_jpeg", "train.py", "train", ["control", "truncated_jpeg"], None,
     "error: {root}/images/train/truncated.jpg: image file is truncated (no end-of-image marker)"),
    ("not_json", "train.py", "train", ["control"], "not_json",
     "error: {root}/jsons/train.json: not valid JSON: Expecting ',' delimiter (line 1, column 35)"),
    ("nan_polygon", "train.py", "train", ["control", "nan_inf"], None,
     "error: {root}/jsons/train.json, image 'nan_inf.jpg', word '0002', field 'points': point 0 has a non-finite x "
     "coordinate: nan"),
    ("empty_split", "train.py", "train", ["control"], "empty_split",
     "error: train split: {root}/jsons/train.json holds no usable images"),
    ("missing_file", "test.py", "test", ["control", "missing_file"], None,
     "error: {root}/jsons/test.json, image 'missing.jpg': image file not found: {root}/images/test/missing.jpg"),
]


def test_bad_input_is_one_line_and_exit_2_before_training(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.ckpt")
    runs = {}
    for name, script, split, cases, bad_json, _ in RAISE:
        root = _dataset(tmp_path / name, split, cases, bad_json)
        out = tmp_path / "runs" / name
        out.parent.mkdir(exist_ok=True)
        extra = TRAIN if script == "train.py" else [f"ckpt_path={ckpt}"]
        runs[name] = (_start(script, root, out, *extra), root, out)
    try:
        for name, script, _, _, _, line in RAISE:
            proc, root, out = runs[name]
            stdout, stderr = proc.communicate(timeout=300)
            expected = line.format(root=root)
            assert proc.returncode == 2, f"{name}: {stderr[-3000:]}"
            assert stderr.splitlines() == [expected], name
            assert "Traceback" not in stdout
            # stopped before the first step: no checkpoint, no run summary; the run's log file has the line too
            log_file = script.replace(".py", ".log")
            assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == [log_file], name
            assert (out / log_file).read_text().rstrip().endswith(expected[len("error: "):])
    finally:
        for proc, _, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_skip_trains_on_the_rest_and_lists_what_was_skipped(tmp_path):
    cases = ["control", "png_alpha", "truncated_jpeg", "zero_byte", "text_as_jpg", "missing_file", "nan_inf"]
    root = _dataset(tmp_path / "corpus", "train", cases)
    out = tmp_path / "run"
    proc = _start("train.py", root, out, *TRAIN, "datasets.train_dataset.config.on_error=skip")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["epochs"][0]["train_images"] == 3  # one a batch: control, alpha.png and nan_inf.jpg (its good word)
    log = (out / "train.log").read_text()
    images, jsons = root / "images" / "train", root / "jsons" / "train.json"
    for line in [
        f"{jsons}: skipped bad annotations: 3 problem(s) [missing_image_file=1, non_finite_coordinate=2]; "
        f"dropped 1 image entry(ies) and 2 word(s)",
        f"  - {jsons}, image 'missing.jpg': image file not found: {images}/missing.jpg",
        f"  - {jsons}, image 'nan_inf.jpg', word '0002', field 'points': point 0 has a non-finite x coordinate: nan",
        f"  - {jsons}, image 'nan_inf.jpg', word '0003', field 'points': point 0 has a non-finite x coordinate: inf",
        "train split: skipped 3 image(s) and 0 word(s) (on_error=skip):",
        f"  - {images}/text_as.jpg: cannot read image header (cannot identify image file '{images}/text_as.jpg')",
        f"  - {images}/truncated.jpg: image file is truncated (no end-of-image marker)",
        f"  - {images}/zero_byte.jpg: cannot read image header (cannot identify image file '{images}/zero_byte.jpg')",
        f"train split: 3 images from {images} (3 skipped)",  # 6 annotated images: the header checks drop 3
    ]:
        assert line in log, line
    assert "Traceback" not in stdout + stderr
