"""Prediction overlays: each box drawn in its colour at its place (original pixels), missed GT words
in the missed colour, matching by the IoU metric's rule, and one overlay per input image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import lightning
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ocr.config import ModelConfig, register_configs
from ocr.data.annotations import AnnotationError
from ocr.data.synthetic import generate_dataset
from ocr.metrics.evaluator import Word
from ocr.training import run
from ocr.training.module import DBNetModule
from ocr.training.overlays import COLOURS, classify, write_overlays

REPO = Path(__file__).resolve().parents[3]


def _box(x0, y0, x1, y1) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _colour_at(image: np.ndarray, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in image[y, x])


def test_boxes_drawn_in_their_colours_at_their_place(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = inputs / "reçu n° 1.png"  # spaces and non-ASCII characters in the name
    cv2.imencode(".png", np.full((300, 400, 3), 255, np.uint8))[1].tofile(path)
    found, missed, dont_care = _box(20, 20, 180, 60), _box(20, 200, 180, 240), _box(250, 20, 380, 60)
    false = _box(220, 150, 380, 190)
    gt = {path.name: [Word(np.array(found, float), "TOTAL"), Word(np.array(missed, float), "CASH"),
                      Word(np.array(dont_care, float), "###")]}
    # the detection of ``found`` is 4 px off (IoU 0.92 > 0.5): matched; ``false`` overlaps no GT word
    predictions = {path.name: {"words": {"0001": {"points": _box(24, 20, 184, 60)}, "0002": {"points": false}}}}
    out = tmp_path / "over lays"
    assert write_overlays(out, [path], predictions, gt) == 1

    image = cv2.imdecode(np.fromfile(out / path.name, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (300, 400, 3)
    assert _colour_at(image, 100, 20) == COLOURS["detected"]  # top edge of the matched detection
    assert _colour_at(image, 184, 40) == COLOURS["detected"]  # its right edge, at its own x (not the GT's 180)
    assert _colour_at(image, 100, 200) == COLOURS["missed"]
    assert _colour_at(image, 20, 220) == COLOURS["missed"]
    assert _colour_at(image, 300, 150) == COLOURS["false"]
    assert _colour_at(image, 300, 20) == COLOURS["dont_care"]
    assert _colour_at(image, 100, 40) == (255, 255, 255)  # inside a box: the image itself
    assert _colour_at(image, 100, 120) == (255, 255, 255)
    assert not list(out.glob(".*"))  # no temp files left

    # without ground truth every detection is a plain detection
    write_overlays(out, [path], predictions, None)
    image = cv2.imdecode(np.fromfile(out / path.name, np.uint8), cv2.IMREAD_COLOR)
    assert _colour_at(image, 300, 150) == COLOURS["detected"] and _colour_at(image, 100, 200) == (255, 255, 255)


def test_classify_uses_the_iou_metrics_one_to_one_rule():
    gt = [Word(np.array(_box(0, 0, 100, 20), float), "A")]
    near, nearer = np.array(_box(10, 0, 100, 20), float), np.array(_box(2, 0, 100, 20), float)
    kinds = [kind for _, kind in classify([near, nearer], gt)]
    assert kinds == ["detected", "false"] or kinds == ["false", "detected"]
    assert kinds[1] == "detected"  # the higher IoU wins the GT word; the other is a false detection
    half = np.array(_box(0, 0, 50, 20), float)  # IoU 0.5 exactly: not a match (strict >)
    assert [kind for _, kind in classify([half], gt)] == ["missed", "false"]
    # a detection mostly inside a don't-care word is neither true nor false
    gt.append(Word(np.array(_box(0, 100, 100, 120), float), "###"))
    kinds = [kind for _, kind in classify([np.array(_box(5, 100, 100, 120), float)], gt)]
    assert kinds == ["dont_care", "missed", "dont_care"]


def _checkpoint(path: Path) -> Path:
    cfg = OmegaConf.to_container(OmegaConf.structured(ModelConfig))
    cfg.update(inner_channels=16, eval_workers=0)
    module = DBNetModule(cfg, eval_data={"image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def _predict_cfg(**keys):
    register_configs()
    overrides = [f"{k}={json.dumps(str(v)) if isinstance(v, Path) else v}" for k, v in keys.items()]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name="predict", overrides=[
            *overrides, "data.image_size=64", "loader.backend=cpu", "loader.num_workers=0", "loader.eval_batch_size=2",
            "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "data/performance_preset=none",
        ])


def _near(mask: np.ndarray, x: float, y: float) -> bool:
    h, w = mask.shape
    x, y = min(max(round(x), 0), w - 1), min(max(round(y), 0), h - 1)
    return bool(mask[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3].any())


def _edge_middles(points):
    return [((x0 + x1) / 2, (y0 + y1) / 2) for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])]


def _read(path: Path) -> np.ndarray:
    return cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)


def _mask(image: np.ndarray, kind: str) -> np.ndarray:
    return np.all(np.abs(image.astype(int) - COLOURS[kind]) <= 40, axis=-1)  # JPEG: near the colour


def test_predict_writes_an_overlay_for_every_input_image(tmp_path):
    root = generate_dataset(tmp_path / "data", num_train=1, num_val=1, num_test=3, seed=5, progress=False)
    inputs = tmp_path / "my receipts"
    shutil.copytree(root / "images" / "test", inputs)
    shutil.copy(sorted(inputs.iterdir())[0], inputs / "kvittering ø.jpg")  # not in the ground truth
    names = sorted(p.name for p in inputs.iterdir())
    torch.manual_seed(0)
    ckpt = _checkpoint(tmp_path / "model.ckpt")
    gt_json = root / "jsons" / "test.json"
    common = {"ckpt_path": ckpt, "input_dir": inputs, "output_dir": tmp_path / "out"}

    # every image, in its original size, with the predicted boxes where predictions.json puts them
    predictions_json = run.predict(_predict_cfg(**common, overlays=tmp_path / "plain"))
    predictions = json.loads(Path(predictions_json).read_text())["images"]
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == names
    for name in names:
        image = _read(tmp_path / "plain" / name)
        assert image.shape == _read(inputs / name).shape, name
        words = [w["points"] for w in predictions[name]["words"].values()]
        assert words, name  # an untrained model finds something (one box per image, seed 0)
        assert all(_near(_mask(image, "detected"), x, y) for p in words for x, y in _edge_middles(p)), name

    # with ground truth and no detections (thresh 1): each GT word is missed, drawn at its place
    run.predict(_predict_cfg(**common, overlays=tmp_path / "gt", gt_json=gt_json, **{"model.postprocess.thresh": 1.0}))
    assert sorted(p.name for p in (tmp_path / "gt").iterdir()) == names
    gt = json.loads(gt_json.read_text())["images"]
    for name in names:
        missed = _mask(_read(tmp_path / "gt" / name), "missed")
        if name not in gt:
            assert not missed.any(), name
            continue
        words = [w["points"] for w in gt[name]["words"].values() if w.get("transcription") != "###"]
        assert words and all(_near(missed, x, y) for p in words for x, y in _edge_middles(p)), name

    with pytest.raises(run.ConfigError, match="replace the input images"):
        run.predict(_predict_cfg(**common, overlays=inputs))
    with pytest.raises(run.ConfigError, match="add overlays=FOLDER"):
        run.predict(_predict_cfg(**common, gt_json=gt_json))
    with pytest.raises(AnnotationError, match="has none of the 4 input images"):
        run.predict(_predict_cfg(**common, overlays=tmp_path / "o2", gt_json=root / "jsons" / "train.json"))
