"""Bad configuration through the real runner processes: exit code 2 and exactly one line,
naming the key, the value and what is allowed, before any data is generated or read; and
the commands that must work (the seed documents' batch_size=8, a checkpoint trained with
model.pretrained=true on an offline machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ocr.config import ModelConfig
from ocr.training.module import DBNetModule

REPO = Path(__file__).resolve().parents[2]


def _run(script, *args, cwd, env=None):
    cmd = [sys.executable, str(REPO / "runners" / script), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


BAD = [
    # validated before any data (several problems: still one line, in the table's order)
    ("train.py", ["model.backbone=7x", "data.image_size=100", "model.scheduler.name=linear", "model.postprocess.output=box"],
     "error: data.image_size=100: must be a multiple of 32, >= 32; model.backbone=7x: must be one of resnet18, "
     "resnet34, resnet50; model.scheduler.name=linear: must be one of cosine, poly, constant; "
     "model.postprocess.output=box: must be one of quad, polygon"),
    ("test.py", ["split=train", "ckpt_path=none.ckpt"], "error: split=train: must be one of test, val"),
    ("predict.py", ["model.postprocess.unclip_ratio=0", "ckpt_path=none.ckpt", "input_dir=."],
     "error: model.postprocess.unclip_ratio=0.0: must be > 0"),
    pytest.param("train.py", ["loader.targets=reference", "loader.backend=dali"],
                 "error: loader.targets=reference: must be one of auto, reference, vectorized (reference: only with "
                 "the CPU backend on the CPU, loader.backend=cpu loader.device=cpu) (here: the dali backend on the "
                 "cpu, which computes vectorized targets)",
                 marks=pytest.mark.skipif(not _has_dali(), reason="nvidia-dali not installed")),
    # Hydra cannot compose these
    ("train.py", ["trainer.max_epoch=3"], "error: trainer.max_epoch=3: Key 'max_epoch' not in 'TrainerConfig' (every key: --cfg job)"),
    ("train.py", ["model=dbnet_r99"], "error: model=dbnet_r99: must be one of dbnet_r18, dbnet_r34, dbnet_r50 (configs/model/)"),
]


@pytest.mark.parametrize("script,overrides,line", BAD, ids=["validate-train", "validate-test", "validate-predict",
                                                             "reference-dali", "typo", "group"])
def test_bad_config_is_one_line_and_exit_2_before_any_data(script, overrides, line, tmp_path):
    fresh = tmp_path / "synthetic"  # the built-in dataset would be generated here
    proc = _run(script, *overrides, f"data.synthetic.root={fresh}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _lines(proc) == [line]
    assert not fresh.exists()


def test_seed_batch_size_override_sets_the_batch_size(tmp_path):
    # configs/data/performance_preset/README (the presets document): the low-memory example
    proc = _run("train.py", "--cfg", "job", "--resolve", "data/performance_preset=memory_efficient", "batch_size=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert (printed.batch_size, printed.loader.batch_size, printed.loader.eval_batch_size) == (4, 4, 4)


@pytest.fixture
def pretrained_checkpoint(tmp_path):
    """A checkpoint whose training run said model.pretrained=true (weights random here)."""
    model_cfg = OmegaConf.to_container(OmegaConf.structured(ModelConfig))
    module = DBNetModule(model_cfg)
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": module.state_dict(),
                "hyper_parameters": {"model_cfg": {**model_cfg, "pretrained": True},
                                     "eval_data": {"image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}},
               path)
    return path


@pytest.mark.slow
def test_pretrained_checkpoint_predicts_offline_and_ignored_keys_are_reported(pretrained_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), np.full((48, 64, 3), 255, np.uint8))
    torch_home = tmp_path / "torch_home"  # an empty hub: the ImageNet weights are not on this machine
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    out = tmp_path / "pred.json"
    proc = _run("predict.py", f"ckpt_path={pretrained_checkpoint}", f"input_dir={images}", f"output_json={out}",
                "data.image_size=64", "loader.backend=cpu", "loader.device=cpu", "loader.num_workers=0",
                "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger.wandb.enabled=false",
                "datasets.val_dataset.config.preload_images=false", f"hydra.run.dir={tmp_path / 'run'}",
                cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(json.loads(out.read_text())["images"]) == ["a.jpg"]
    assert not torch_home.exists()
    assert ("runners/predict.py reads nothing from these overrides (ignored): logger.wandb.enabled=false "
            "datasets.val_dataset.config.preload_images=false") in proc.stdout + proc.stderr
