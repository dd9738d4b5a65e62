"""The real runners, end to end, on a tiny generated dataset."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ocr.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "receipts"
    generate_dataset(root, num_train=8, num_val=4, num_test=4, seed=3, progress=False)
    return root


def _run(script, *overrides, cwd):
    cmd = [sys.executable, str(REPO / "runners" / script), *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def _start(script, *overrides, cwd) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "runners" / script), *overrides]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


COMMON = [
    "data.image_size=128", "data.targets.min_text_size=3", "loader.batch_size=4", "loader.eval_batch_size=4", "loader.num_workers=0",
    "trainer.enable_progress_bar=false", "logger.wandb.enabled=false", "seed=42",
]


@pytest.mark.slow
def test_train_improves_loss_and_writes_summary(tiny_root, tmp_path):
    out = tmp_path / "run"
    proc = _run(
        "train.py", f"data.root={tiny_root}", f"hydra.run.dir={out}", "exp_name=tiny",
        "trainer.max_epochs=4", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "model.optimizer.lr=0.003", "model.scheduler.warmup_epochs=0", "trainer.precision=32-true",
        "trainer.check_val_every_n_epoch=2", *COMMON, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "finished"
    losses = [e["train_loss"] for e in summary["epochs"]]
    assert len(losses) == 4
    assert losses[-1] < 0.8 * losses[0], losses
    first, second = summary["epochs"][:2]
    assert first["train_images"] == 8 and second["val_images"] == 4
    assert first["train_seconds"] > 0 and first["train_img_s"] > 0
    # validation every 2nd epoch: an epoch without validation carries no (stale) val figures
    assert [("val_seconds" in e, "val_hmean" in e) for e in summary["epochs"]] == [(False, False), (True, True)] * 2
    assert set(summary["final_metrics"]["val"]) == {"cleval", "iou"}
    assert summary["precision"] == "32-true"
    assert summary["config"]["data"]["root"] == str(tiny_root)
    assert summary["hardware"]["cpu_cores_usable"] >= 1
    last = out / "checkpoints" / "last.ckpt"
    assert summary["last_checkpoint"] == str(last) and Path(summary["best_checkpoint"]).is_file()
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3  # the last epoch, not the best

    # Then, started together (each runner spends most of its time starting up):
    # - a new run starts from its weights (fine-tuning): the first epoch's loss is far below a fresh start;
    # - a checkpoint that does not fit the model is one clear error;
    # - the checkpoint evaluates through the test runner, whose post-processing overrides are used
    #   (and said): only box_thresh changes between two runs, so the probability maps are the same
    #   and a higher threshold keeps a subset of the boxes (a low binarisation threshold makes the
    #   barely trained model find text at all);
    # - it predicts through the predict runner; an input size unlike training's is a warning.
    ckpt = f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"
    pred_json = tmp_path / "pred.json"
    runs = {
        "finetune": _start("train.py", f"data.root={tiny_root}", f"hydra.run.dir={tmp_path / 'finetune'}",
                           f"model.init_from={out / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=1",
                           "trainer.limit_train_batches=2", "trainer.limit_val_batches=0", "trainer.precision=32-true",
                           "model.scheduler.warmup_epochs=0", *COMMON, cwd=tmp_path),
        "misfit": _start("train.py", f"data.root={tiny_root}", f"hydra.run.dir={tmp_path / 'misfit'}",
                         "model.inner_channels=32", f"model.init_from={out / 'checkpoints' / 'last.ckpt'}",
                         "trainer.max_epochs=1", *COMMON, cwd=tmp_path),
        "test": _start("test.py", f"data.root={tiny_root}", f"hydra.run.dir={tmp_path / 'test'}", ckpt, *COMMON,
                       cwd=tmp_path),
        **{f"box_thresh={t}": _start("test.py", f"data.root={tiny_root}", f"hydra.run.dir={tmp_path / ('test' + t)}",
                                     ckpt, *COMMON, "model.postprocess.thresh=0.1", f"model.postprocess.box_thresh={t}",
                                     cwd=tmp_path) for t in ("0.1", "0.99")},
        "predict": _start("predict.py", f"hydra.run.dir={tmp_path / 'pred'}", ckpt,
                          f"input_dir={tiny_root / 'images' / 'test'}", f"output_json={pred_json}", *COMMON,
                          "data.image_size=96", cwd=tmp_path),
    }
    done = {name: _finish(proc) for name, proc in runs.items()}

    proc = done["finetune"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Model weights initialised from" in proc.stderr + proc.stdout
    finetuned = json.loads((tmp_path / "finetune" / "run_summary.json").read_text())
    assert finetuned["epochs"][0]["train_loss"] < 0.8 * losses[0]
    proc = done["misfit"]
    assert proc.returncode != 0 and "does not fit this model" in proc.stderr and "Traceback" not in proc.stderr

    proc = done["test"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(metrics) == {"cleval", "iou"} and 0.0 <= metrics["cleval"]["hmean"] <= 1.0
    assert "differs" not in proc.stderr + proc.stdout
    recalls = {}
    for box_thresh in ("0.1", "0.99"):
        proc = done[f"box_thresh={box_thresh}"]
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"not the checkpoint's: box_thresh 0.4 -> {box_thresh}" in proc.stderr + proc.stdout
        recalls[box_thresh] = json.loads(proc.stdout.strip().splitlines()[-1])["cleval"]["recall"]
    assert recalls["0.1"] > 0
    assert recalls["0.99"] < recalls["0.1"]

    proc = done["predict"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.* differs from the run that trained this checkpoint (image_size 128 -> 96)" in proc.stderr + proc.stdout
    predictions = json.loads(pred_json.read_text())["images"]
    assert sorted(predictions) == sorted(p.name for p in (tiny_root / "images" / "test").iterdir())


def test_bad_data_root_is_one_clear_error(tmp_path):
    proc = _run("train.py", f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}", *COMMON, cwd=tmp_path)
    assert proc.returncode == 2
    assert "nowhere/jsons/train.json not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_typo_in_override_fails_loudly(tmp_path):
    proc = _run("train.py", "trainer.max_epoch=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "max_epoch" in proc.stderr
