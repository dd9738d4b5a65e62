"""curves.png beside run_summary.json: after a tiny real training run, and after an interrupted one."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from ocr.config import register_configs
from ocr.data.synthetic import generate_dataset
from ocr.training import run
from ocr.training.module import DBNetModule
from ocr.training.plots import draw_curves

REPO = Path(__file__).resolve().parents[3]
TAB_BLUE_BGR = (180, 119, 31)  # matplotlib's tab:blue (#1f77b4), the train-loss line


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "receipts"
    generate_dataset(root, num_train=4, num_val=2, num_test=2, seed=3, progress=False)
    return root


def _cfg(root: Path, out: Path, epochs: int):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name="train", overrides=[
            f"data.root={root}", f"output_dir={out}", f"trainer.max_epochs={epochs}", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
            "data.image_size=64", "data.train_crop_size=64", "data.targets.min_text_size=3", "model.inner_channels=16",
            "model.eval_workers=0", "loader.backend=cpu", "loader.batch_size=4", "loader.eval_batch_size=2",
            "loader.num_workers=0", "data/performance_preset=none",
        ])


def _blue_pixels(path: Path) -> int:
    image = cv2.imread(str(path))
    assert image is not None and image.shape[1] > 1000, path
    return int(np.all(np.abs(image.astype(int) - TAB_BLUE_BGR) <= 10, axis=-1).sum())


def test_curves_after_a_finished_run(tiny_root, tmp_path):
    out = tmp_path / "run"
    run.train(_cfg(tiny_root, out, epochs=2))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["epochs"]) == 2
    assert _blue_pixels(out / "curves.png") > 100  # the train-loss line over two epochs
    assert not list(out.glob(".curves.png.*"))  # no temp file left


def test_curves_after_an_interrupted_run(tiny_root, tmp_path, monkeypatch):
    def interrupt(self):
        if self.current_epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(DBNetModule, "on_train_epoch_start", interrupt)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful Ctrl-C shutdown
            run.train(_cfg(tiny_root, out, epochs=3))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C after the first
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "interrupted" and len(summary["epochs"]) == 1
    assert _blue_pixels(out / "curves.png") > 20  # the one epoch's loss marker


def test_draws_records_without_validation_into_a_non_ascii_path(tmp_path):
    epochs = [{"epoch": 0, "train_loss": 1.0, "train_seconds": 2.0, "train_loader_wait_seconds": 0.5},
              {"epoch": 1, "train_loss": 0.5, "train_seconds": 2.0, "train_loader_wait_seconds": 0.5,
               "val_hmean": 0.8, "val_iou_hmean": 0.7}]
    draw_curves(epochs, tmp_path / "sub dir" / "cürves.png")
    assert _blue_pixels(tmp_path / "sub dir" / "cürves.png") > 100
