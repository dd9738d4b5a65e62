"""Resuming a run from ``last.ckpt`` ends with the same weights as the run that was never
interrupted (bitwise on the CPU, same backend), for both backends; ``ckpt_path=last``
finds the newest checkpoint of the experiment."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ocr.config import register_configs
from ocr.data.synthetic import generate_dataset
from ocr.training import run
from ocr.training.module import DBNetModule

pytestmark = pytest.mark.slow  # starts runner processes or trains: -m 'not slow' skips it

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "receipts"
    generate_dataset(root, num_train=6, num_val=2, num_test=1, seed=5, progress=False)
    return root


BACKENDS = {
    "cpu": ["loader.backend=cpu", "loader.num_workers=0"],
    "dali": ["loader.backend=dali", "loader.device=cpu", "loader.dali_threads=1"],
}


def _cfg(root: Path, out: Path, backend: str, epochs: int, ckpt_path: str | None = None):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name="train", overrides=[
            f"data.root={root}", f"output_dir={out}", f"trainer.max_epochs={epochs}", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.precision=32-true",
            "trainer.enable_progress_bar=false", "data.image_size=64", "data.train_crop_size=0",
            "data.targets.min_text_size=3", "model.inner_channels=16", "model.eval_workers=0", "loader.batch_size=2",
            "loader.eval_batch_size=2", "data/performance_preset=none", "seed=7", *BACKENDS[backend],
            *([f"ckpt_path={ckpt_path}"] if ckpt_path else []),
        ])


def _weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _interrupted(cfg, monkeypatch, at_epoch: int) -> None:
    """Run ``cfg`` and stop it with Ctrl-C when epoch ``at_epoch`` starts (same schedule as
    the full run: the scheduler's length depends on max_epochs)."""
    def interrupt(self):
        if self.current_epoch == at_epoch:
            raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        m.setattr(DBNetModule, "on_train_epoch_start", interrupt)
        try:
            with pytest.raises(SystemExit):  # Lightning's graceful Ctrl-C shutdown
                run.train(cfg)
        finally:
            signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tiny_root, tmp_path, backend, monkeypatch):
    straight = tmp_path / "straight"
    run.train(_cfg(tiny_root, straight, backend, epochs=3))
    first = tmp_path / "first"
    _interrupted(_cfg(tiny_root, first, backend, epochs=3), monkeypatch, at_epoch=2)
    assert _weights(first)["epoch"] == 1
    resumed = tmp_path / "resumed"
    run.train(_cfg(tiny_root, resumed, backend, epochs=3, ckpt_path=str(first / "checkpoints" / "last.ckpt")))

    a, b = _weights(straight), _weights(resumed)
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different[:5]
    moved = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], _weights(first)["state_dict"][k])]
    assert len(moved) > 10  # the resumed epoch trained
    assert torch.equal(a["optimizer_states"][0]["state"][0]["exp_avg"], b["optimizer_states"][0]["state"][0]["exp_avg"])
    sa = json.loads((straight / "run_summary.json").read_text())["epochs"]
    sb = json.loads((resumed / "run_summary.json").read_text())["epochs"]
    assert [e["epoch"] for e in sb] == [2]
    assert sb[-1]["train_loss"] == pytest.approx(sa[-1]["train_loss"], abs=1e-6)
    assert sb[-1]["val_hmean"] == pytest.approx(sa[-1]["val_hmean"], abs=1e-6)


def test_resumed_from_a_checkpoint_saved_after_the_epochs_last_batch(tiny_root, tmp_path, monkeypatch):
    """A preemption checkpoint (SIGTERM, SLURM's SIGUSR1) can land after an epoch's last batch and
    before its end: the resumed run runs no batch of that epoch, ends it, and goes on."""
    first = tmp_path / "first"
    saved = first / "after_last_batch.ckpt"

    def save_and_stop(self):
        self.trainer.save_checkpoint(saved)
        raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        m.setattr(DBNetModule, "on_validation_start", save_and_stop)
        try:
            with pytest.raises(SystemExit):
                run.train(_cfg(tiny_root, first, "cpu", epochs=2))
        finally:
            signal.signal(signal.SIGINT, handler)
    resumed = tmp_path / "resumed"
    summary = json.loads(Path(run.train(_cfg(tiny_root, resumed, "cpu", epochs=2, ckpt_path=str(saved)))).read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1] and "train_seconds" not in summary["epochs"][0]
    assert summary["epochs"][1]["train_images"] == 4 and _weights(resumed)["global_step"] == 4
