"""The Hydra configs compose with the seed documents' overrides, and typos fail."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ocr.config import register_configs

REPO = Path(__file__).resolve().parents[2]
SEED_OVERRIDES = [
    "exp_name=baseline", "seed=42", "trainer.max_epochs=3", "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=50", "trainer.precision=32-true", "logger.wandb.enabled=false",
    "datasets.val_dataset.config.preload_images=false",
    "datasets.val_dataset.config.cache_config.cache_transformed_tensors=false",
]


def _compose(name="train", overrides=()):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name=name, overrides=[*overrides, "output_dir=/tmp/x"])


def test_seed_document_overrides_compose():
    cfg = _compose(overrides=SEED_OVERRIDES)
    assert cfg.exp_name == "baseline" and cfg.seed == 42
    assert cfg.trainer.limit_val_batches == 50 and cfg.trainer.limit_train_batches == 5
    assert cfg.trainer.precision == "32-true"
    assert cfg.datasets.val_dataset.config.preload_images is False
    assert cfg.datasets.val_dataset.config.cache_config.cache_transformed_tensors is False
    assert cfg.logger.wandb.enabled is False


def test_data_root_selects_every_split():
    cfg = _compose(overrides=["data.root=/some/where"])
    resolved = OmegaConf.to_container(cfg.datasets, resolve=True)
    for split in ("train", "val", "test"):
        assert resolved[f"{split}_dataset"]["config"]["image_path"] == f"/some/where/images/{split}"
        assert resolved[f"{split}_dataset"]["config"]["annotation_path"] == f"/some/where/jsons/{split}.json"


@pytest.mark.parametrize("override", ["trainer.max_epoch=3", "datasets.val_dataset.config.preload_image=false"])
def test_typos_fail(override):
    with pytest.raises(ConfigCompositionException):
        _compose(overrides=[override])


def test_unknown_backbone_name_composes_in_hydra():
    # the schema types model.backbone as a string, so Hydra accepts any name: the value check
    # is the runner's (next test)
    cfg = _compose(overrides=["model.backbone=7x"])
    assert cfg.model.backbone == "7x"


def test_runner_rejects_unknown_backbone_before_data_loading(tmp_path):
    # data.root does not exist: an error about it would mean the data was touched first
    proc = subprocess.run([sys.executable, str(REPO / "runners" / "train.py"), "model.backbone=7x",
                           f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}",
                           "logger.wandb.enabled=false"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.backbone" in proc.stderr and "7x" in proc.stderr
    assert "train.json not found" not in proc.stderr and "Traceback" not in proc.stderr


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException):
        _compose(overrides=["trainer.max_epochs=three"])


@pytest.mark.parametrize("name", ["train", "test", "predict"])
def test_every_entry_config_composes(name):
    cfg = _compose(name)
    OmegaConf.to_container(cfg, resolve=True)


def test_cfg_job_resolve_prints_config():
    proc = subprocess.run([sys.executable, str(REPO / "runners" / "train.py"), "--cfg", "job", "--resolve", *SEED_OVERRIDES],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.exp_name == "baseline"
    assert printed.datasets.val_dataset.config.image_path == "data/synthetic_receipts/images/val"
