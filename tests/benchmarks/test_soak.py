"""benchmarks/soak.py: the RSS slope is a least-squares fit over the right epochs, and a tiny soak of
both CPU-usable backends writes every figure its report promises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from receipt_data import write_receipts

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import soak  # noqa: E402


def test_rss_slope_is_the_least_squares_slope():
    assert soak.rss_slope([1, 2, 3, 4], [10, 12, 14, 16]) == pytest.approx(2.0)
    # y = 1 + 0.5 x with residuals +1, -1, -1, +1: the fit keeps the slope
    assert soak.rss_slope([0, 1, 2, 3], [2.0, 0.5, 1.0, 3.5]) == pytest.approx(0.5)
    assert soak.rss_slope([5], [100.0]) is None
    assert soak.rss_slope([3, 3], [1.0, 2.0]) is None


def test_epoch_slope_ignores_the_warm_up_epochs():
    # epochs 1..4 grow by 100 MB each (pools filling), then 0.25 MB/epoch
    rss = [100, 200, 300, 400, 500, 500.25, 500.5, 500.75]
    epochs = [{"epoch": i + 1, "rss_mb": r} for i, r in enumerate(rss)]
    assert soak.epoch_slope(epochs, first=5) == pytest.approx(0.25)
    assert soak.epoch_slope(epochs, first=1) > 50
    assert soak.epoch_slope(epochs, first=8) is None


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """Six 320x240 JPEGs with two dark text boxes each, train and val alike."""
    return write_receipts(tmp_path_factory.mktemp("soak"), 320, 240, [(20, 60 + 120 * k) for k in range(2)], (160, 24))


def test_tiny_soak_of_both_backends_writes_every_figure(tiny_root, tmp_path, capsys):
    out = tmp_path / "soak.json"
    rc = soak.main(["--root", str(tiny_root), "--epochs", "3", "--replay-passes", "5", "--replay-every", "2",
                    "--image-size", "128", "--max-images", "4", "--slope-from", "2", "--backends", "cpu/cpu,dali/cpu",
                    "--in-process", "--json", str(out), "--markdown", "batch_size=2", "data.train_crop_size=128"])
    report = json.loads(out.read_text())
    assert rc == (0 if report["verdict"] == "PASS" else 1)
    assert not out.with_suffix(".json.tmp").exists()
    assert report["command"].startswith("python benchmarks/soak.py --root ")
    assert len(report["loadavg_start"]) == 3 and len(report["loadavg_end"]) == 3
    assert report["stack"]["torch"] and report["machine"]["usable_cpus"] >= 1
    assert [r["backend"] for r in report["results"]] == ["cpu/cpu", "dali/cpu"]
    for r in report["results"]:
        assert (r["train_images"], r["val_images"]) == (4, 4)  # --max-images
        assert r["choice"]["backend"] == r["backend"].split("/")[0]
        epochs = r["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2, 3]
        assert all(e["batches"] == 2 and e["rss_mb"] > 100 for e in epochs)
        assert epochs[0]["delta_mb"] == pytest.approx(epochs[0]["rss_mb"] - r["start"]["rss_mb"], abs=0.02)
        assert epochs[2]["delta_mb"] == pytest.approx(epochs[2]["rss_mb"] - epochs[1]["rss_mb"], abs=0.02)
        # the slope is fitted over epochs 2..3 only: two points, so it is their difference
        assert r["slope_epochs"] == [2, 3]
        assert r["rss_slope_mb_per_epoch"] == pytest.approx(epochs[2]["rss_mb"] - epochs[1]["rss_mb"])
        assert r["verdict"] == ("PASS" if r["rss_slope_mb_per_epoch"] < 1.0 else "FAIL")
        assert [x["pass"] for x in r["replay"]] == [2, 4, 5]
        assert all(x["batches"] == 2 for x in r["replay"])
        tensors = r["cache"]["tensors"]  # the first validation pass recorded the batch cache, the others replayed it
        assert tensors["enabled"] is True and tensors["passes"] == 5 and tensors["hits"] == 4 * 4
        assert r["replay_rss_slope_mb_per_100_passes"] is not None
    printed = capsys.readouterr().out
    assert "| backend | RSS start MB |" in printed and "| dali/cpu |" in printed
    assert f"soak verdict: {report['verdict']}" in printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_soak_on_the_gpu_reports_gpu_memory(tiny_root, tmp_path):
    out = tmp_path / "soak.json"
    soak.main(["--root", str(tiny_root), "--epochs", "2", "--replay-passes", "2", "--replay-every", "1",
               "--image-size", "128", "--backends", "dali/gpu", "--json", str(out), "batch_size=2",
               "data.train_crop_size=128"])
    (result,) = json.loads(out.read_text())["results"]
    assert all(e["gpu_mb"] > 0 and e["gpu_source"].startswith("nvml") for e in result["epochs"])
