"""A training run killed while it writes a checkpoint or its run summary leaves nothing
that reads as valid (``OCR_FAULT``, see ``ocr.faults``); SIGTERM (preemption) saves
``last.ckpt`` and exits with code 0; ``ckpt_path=last`` resumes from the newest checkpoint. Under
SLURM, Lightning's auto-requeue (SIGUSR1: ``hpc_ckpt_<n>.ckpt`` in the run folder, ``scontrol
requeue <job id>``) with a fake ``scontrol``, and the requeued job resuming from it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ocr.config import register_configs
from ocr.data.synthetic import generate_dataset
from ocr.faults import ENV
from ocr.training import run

pytestmark = pytest.mark.slow  # starts runner processes or trains: -m 'not slow' skips it

REPO = Path(__file__).resolve().parents[2]
TINY = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
        "trainer.precision=32-true", "trainer.enable_progress_bar=false", "data.image_size=64", "data.train_crop_size=0",
        "data.targets.min_text_size=3", "model.inner_channels=16", "model.eval_workers=0", "loader.backend=cpu",
        "loader.num_workers=0", "loader.batch_size=2", "loader.eval_batch_size=2", "data/performance_preset=none",
        "logger.wandb.enabled=false", "seed=3"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "receipts"
    generate_dataset(root, num_train=4, num_val=2, num_test=1, seed=3, progress=False)
    return root


def _start(root, out, *overrides, fault=None):
    env = {**os.environ, **({ENV: fault} if fault else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "runners" / "train.py"), f"data.root={root}", f"hydra.run.dir={out}", *TINY, *overrides]
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cfg(root, out, *overrides):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name="train", overrides=[f"data.root={root}", f"output_dir={out}", *TINY, *overrides])


def test_killed_while_saving_a_checkpoint_leaves_no_checkpoint(tiny_root, tmp_path):
    out = tmp_path / "exp" / "run1"
    proc = _start(tiny_root, out, "trainer.max_epochs=1", fault="kill@checkpoint.publish")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(files) == 1 and files[0].startswith(".") and files[0].endswith(".tmp"), files  # never a *.ckpt
    with pytest.raises(run.ConfigError, match=r"ckpt_path=last: no checkpoint of this experiment"):
        run.resolve_ckpt_path("last", tmp_path / "exp" / "run2")


def test_killed_while_writing_the_run_summary_leaves_no_summary(tiny_root, tmp_path):
    out = tmp_path / "run"
    proc = _start(tiny_root, out, "trainer.max_epochs=1", fault="kill@run_summary.publish")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not (out / "run_summary.json").exists() and list(out.glob(".run_summary.json.*.tmp"))
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0


def test_sigterm_saves_a_checkpoint_and_ckpt_path_last_resumes(tiny_root, tmp_path):
    first = tmp_path / "exp" / "first"
    proc = _start(tiny_root, first, "trainer.max_epochs=100")
    last = first / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), proc.communicate()[1][-2000:]
    saved_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received: saved" in out + err and "Traceback" not in out + err
    summary = json.loads((first / "run_summary.json").read_text())
    assert summary["status"] == "interrupted"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] > saved_at  # the preemption's checkpoint, newer than the epoch's
    assert not list((first / "checkpoints").glob(".*.tmp"))

    resumed = tmp_path / "exp" / "second"
    epochs = ckpt["epoch"] + 2
    summary = json.loads(Path(run.train(_cfg(tiny_root, resumed, "ckpt_path=last", f"trainer.max_epochs={epochs}"))).read_text())
    assert summary["status"] == "finished"
    assert [e["epoch"] for e in summary["epochs"]][-1] == epochs - 1
    final = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["epoch"] == epochs - 1 and final["global_step"] == 2 * epochs


#: what srun/sbatch set for a one-task job: Lightning's SLURMEnvironment is detected (SLURM_NTASKS
#: set, job name not bash/interactive) and handles SIGUSR1 (auto-requeue)
SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dbnet", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
#: records its arguments; then, as slurmctld does to a running job it requeues, sends SIGTERM to the job
FAKE_SCONTROL = '#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\nkill -TERM "$PPID"\n'


def test_slurm_sigusr1_saves_an_hpc_checkpoint_requeues_and_the_requeued_job_resumes(tiny_root, tmp_path, monkeypatch, caplog):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    calls = tmp_path / "scontrol.log"
    env = {**SLURM_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SCONTROL_LOG": str(calls)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # _start passes os.environ on; the in-process resume sees it too
    job = tmp_path / "exp" / "job-4242"  # a run folder the requeued job finds again (its job id is kept)
    proc = _start(tiny_root, job, "trainer.max_epochs=100")
    epoch_end = job / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not epoch_end.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert epoch_end.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert calls.read_text().splitlines() == ["requeue 4242"]
    assert "Requeued SLURM job: 4242" in out + err and "SIGTERM received: saved" in out + err
    assert "Traceback" not in out + err
    hpc = job / "hpc_ckpt_1.ckpt"  # Lightning's: in default_root_dir (the run folder), through AtomicCheckpointIO
    assert hpc.stat().st_mode & 0o777 == 0o644 and not list(job.rglob(".*.tmp"))
    saved = torch.load(hpc, map_location="cpu", weights_only=True)
    assert saved["global_step"] >= 2  # after the first epoch's 2 steps

    # ckpt_path=last: the newest of last.ckpt (the SIGTERM's, saved after the hpc checkpoint) and hpc_ckpt_*.ckpt
    assert run.resolve_ckpt_path("last", tmp_path / "exp" / "next") == str(epoch_end)
    os.utime(hpc, (time.time() + 5, time.time() + 5))
    assert run.resolve_ckpt_path("last", tmp_path / "exp" / "next") == str(hpc)

    # the requeued job: same environment and run folder, no ckpt_path: Lightning resumes from the hpc checkpoint
    resumed_epoch = saved["global_step"] // 2  # 2 steps an epoch: the epoch the hpc checkpoint was saved in or before
    epochs = resumed_epoch + 2
    with caplog.at_level(logging.INFO):
        summary = json.loads(Path(run.train(_cfg(tiny_root, job, f"trainer.max_epochs={epochs}"))).read_text())
    assert f"Restoring states from the checkpoint path at {hpc}" in caplog.text
    assert summary["status"] == "finished"
    assert [e["epoch"] for e in summary["epochs"]] == [resumed_epoch, resumed_epoch + 1]
    final = torch.load(epoch_end, map_location="cpu", weights_only=True)
    assert final["epoch"] == epochs - 1 and final["global_step"] == 2 * epochs
