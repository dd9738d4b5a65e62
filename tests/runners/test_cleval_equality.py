"""One CLEval everywhere: for one checkpoint and split, the training-time validation figures,
``runners/test.py``'s and ``runners/predict.py`` + ``python -m ocr.metrics``'s are the same, on
line-level ground truth with long transcriptions (where CLEval's shape guess, at most 10
characters a word, would give other figures)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ocr.config import register_configs
from ocr.data.annotations import save_annotations
from ocr.data.datamodule import OCRDataModule
from ocr.metrics.__main__ import main as metrics_cli
from ocr.metrics.evaluator import evaluate_files
from ocr.training import run
from ocr.training.module import DBNetModule

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "data.image_size=256", "data.performance_preset=none", "loader.backend=cpu", "loader.num_workers=0",
    "loader.eval_batch_size=2", "model.inner_channels=32", "model.eval_workers=0", "model.postprocess.box_thresh=0.3",
    "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
    "logger.csv.enabled=false", "logger.tensorboard.enabled=false", "logger.wandb.enabled=false",
]
CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:-"
SIDE = 256


def make_line_dataset(root: Path, images: int = 3, seed: int = 0) -> None:
    """A val split of small square receipts (256 px: no padding at ``data.image_size=256``), each
    of 5 printed lines of 20-28 characters annotated line by line, the last one don't care (``###``)."""
    rng = np.random.default_rng(seed)
    (root / "images" / "val").mkdir(parents=True, exist_ok=True)
    entries = {}
    for i in range(images):
        canvas = np.full((SIDE, SIDE, 3), 245, np.uint8)
        words = {}
        for k in range(5):
            text = "".join(rng.choice(list(CHARS), int(rng.integers(20, 29))))
            (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
            x, y = int(rng.integers(4, max(5, SIDE - 4 - w))), 34 + 46 * k
            cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (20, 20, 20), 1, cv2.LINE_AA)
            box = [[x - 2, y - h - 3], [x + w + 2, y - h - 3], [x + w + 2, y + base + 1], [x - 2, y + base + 1]]
            words[f"{k:04d}"] = {"points": box, "transcription": "###" if k == 4 else text}
        name = f"val_{i}.jpg"
        cv2.imwrite(str(root / "images" / "val" / name), canvas)
        entries[name] = {"words": words}
    save_annotations(root / "jsons" / "val.json", entries)


@torch.no_grad()
def ink_detector(module: DBNetModule, bias: float = 1.8, gain: float = 6.0, offset: float = 5.0) -> DBNetModule:
    """Weights set by hand (no training) so that the probability map marks dark ink: conv1's
    channel 0 is minus the mean normalised intensity over 7 x 7 px (+ ``bias``: paper -> 0, ink
    -> > 0), every residual block passes it on unchanged (its residual convolutions are zero, the
    downsampling shortcuts copy channel 0), the FPN keeps C2's channel 0 and the probability
    head turns it into ``sigmoid(gain * ink - offset)``. A real detector of printed lines,
    only a rough one: enough for the metrics to have matches, misses and splits to count."""
    for p in module.parameters():
        p.zero_()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # identity in eval mode
            m.weight.fill_(1.0)
            m.running_mean.zero_()
            m.running_var.fill_(1.0 - m.eps)
    net = module.model
    stem = net.backbone.stem  # conv1, bn1, relu, maxpool
    stem[0].weight[0] = -1.0 / (3 * 49)
    stem[1].bias[0] = bias
    for name, m in net.backbone.named_modules():
        if name.endswith("downsample.0"):
            m.weight[0, 0] = 1.0
    net.neck.lateral[0].weight[0, 0] = 1.0
    net.neck.smooth[0].weight[0, 0] = 1.0 / 9
    fused = 3 * net.neck.inner_channels // 4  # smooth[0]'s output comes last in the concatenation
    head = net.prob_head
    head[0].weight[0, fused, 1, 1] = 1.0
    head[3].weight[0, 0] = 1.0
    head[6].weight[0, 0] = gain
    head[6].bias.fill_(-offset)
    return module


def _compose(name: str, root: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name=name, overrides=[f"data.root={root}", *OVERRIDES, *overrides])


def _cli(gt: Path, pred: Path) -> dict:
    """``python -m ocr.metrics --gt GT --pred PRED`` (its main, in this process)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert metrics_cli(["--gt", str(gt), "--pred", str(pred)]) == 0
    return json.loads(out.getvalue())


def _assert_same(a: dict, b: dict) -> None:
    for family in ("cleval", "iou"):
        for name in ("precision", "recall", "hmean"):
            assert a[family][name] == pytest.approx(b[family][name], abs=1e-4), (family, name, a, b)


@pytest.mark.slow
def test_validation_test_runner_and_cli_agree_on_line_level_data(tmp_path):
    root = tmp_path / "receipts"
    make_line_dataset(root)
    gt = root / "jsons" / "val.json"

    # the checkpoint, and the figures validation during training gives it (the module takes the
    # transcriptions from the trainer's datamodule, as in fit)
    cfg = _compose("train", root, f"output_dir={tmp_path / 'train'}")
    module = ink_detector(DBNetModule(OmegaConf.to_container(cfg.model, resolve=True), eval_data=run._eval_data(cfg)))
    datamodule = OCRDataModule(cfg, splits=("val",))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path / "train"))
    trainer.validate(module, datamodule=datamodule, verbose=False)
    validation = module.last_metrics["val"]
    ckpt = tmp_path / "ink.ckpt"
    trainer.save_checkpoint(ckpt)

    # runners/test.py (through the scoring pool) and runners/predict.py + python -m ocr.metrics
    tested = run.test(_compose("test", root, f"ckpt_path={ckpt}", "split=val", "model.eval_workers=1",
                               f"output_dir={tmp_path / 'test'}"))
    predictions = run.predict(_compose("predict", root, f"ckpt_path={ckpt}", f"input_dir={root / 'images' / 'val'}",
                                       f"output_json={tmp_path / 'pred.json'}", f"output_dir={tmp_path / 'predict'}"))
    cli = _cli(gt, predictions)
    _assert_same(tested, cli)
    _assert_same(validation, cli)

    # the data tells the two CLEvals apart: detections match, miss and split the lines, and
    # without the transcriptions (CLEval's shape guess) the CLI's figures are others
    assert 0.3 < cli["cleval"]["recall"] < 0.99 and 0 < cli["iou"]["hmean"] < 0.5, cli
    doc = json.loads(gt.read_text())
    for entry in doc["images"].values():
        for word in entry["words"].values():
            if word["transcription"] != "###":
                word["transcription"] = ""
    save_annotations(tmp_path / "no_text.json", doc["images"])
    guessed = evaluate_files(tmp_path / "no_text.json", predictions)
    assert abs(guessed["cleval"]["hmean"] - cli["cleval"]["hmean"]) > 0.05, (guessed, cli)
    assert guessed["iou"] == cli["iou"]
