"""benchmarks/loader_bench.py: no loader works while the clock is stopped, and every figure it
prints is the one its JSON holds (row ratio = row img/s over the same round's reference)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from receipt_data import write_receipts

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import loader_bench  # noqa: E402

from ocr.data.dataset import ThreadedLoader  # noqa: E402


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """Six 480x360 JPEG "receipts" with three dark text boxes each, train and val alike."""
    return write_receipts(tmp_path_factory.mktemp("loader_bench"), 480, 360,
                          [(20 + 30 * k, 40 + 120 * k) for k in range(3)], (200, 24))


ONE_THREAD = {"backend": "cpu", "device": "cpu", "cpu_loader": "threads", "num_workers": 1}


def test_timed_rounds_include_no_batch_prepared_while_the_clock_was_stopped(tiny_root, monkeypatch):
    # Each batch takes >= 0.1 s, so a loader alive during the references (>= 1 s here) would
    # have finished its prefetch queue (2 batches) before the clock started. With one loader
    # thread, a loader timed right after its warm-up has finished exactly the warm-up batches
    # when the clock starts.
    done: list[float] = []
    lock = threading.Lock()
    make_batch = ThreadedLoader.make_batch

    def timed_make_batch(self, indices, epoch):
        time.sleep(0.1)
        batch = make_batch(self, indices, epoch)
        with lock:
            done.append(time.perf_counter())
        return batch

    monkeypatch.setattr(ThreadedLoader, "make_batch", timed_make_batch)
    warmup, batches = 2, 2
    report = loader_bench.run_loader_bench(tiny_root, "train", image_size=128, batches=batches, warmup=warmup,
                                           batch_size=2, configs=[ONE_THREAD], rounds=2, log=lambda *a: None)

    windows = [run["window"] for row in report["results"] for run in row["rounds"]]
    assert len(windows) == 4  # 2 rounds x (train, eval)
    for w in windows:
        finished = [t for t in done if w["loader_open"] <= t <= w["loader_closed"]]
        before_clock = [t for t in finished if t < w["clock_start"]]
        timed = [t for t in finished if w["clock_start"] <= t <= w["clock_stop"]]
        assert len(before_clock) == warmup, (len(before_clock), w)
        assert len(timed) >= batches - 1  # the first timed batch may finish as the clock starts
    # every batch was made while its own loader was open, and none while a reference ran
    assert all(any(w["loader_open"] <= t <= w["loader_closed"] for w in windows) for t in done)
    refs = [run["window"] for ref in report["references"].values() for run in ref["rounds"]]
    assert len(refs) == 4  # (full, reduced) x 2 rounds
    for r in refs:
        assert not any(r["start"] <= t <= r["stop"] for t in done)
        assert all(w["loader_closed"] <= r["start"] or w["loader_open"] >= r["stop"] for w in windows)


def test_table_json_and_markdown_give_the_same_figures(tiny_root, tmp_path, capsys):
    out = tmp_path / "loader.json"
    argv = ["--root", str(tiny_root), "--split", "val", "--max-images", "4", "--image-size", "128",
            "--only", "cpu/cpu/threads", "--loaders", "eval", "--rounds", "1", "--batches", "2", "--warmup", "1",
            "--batch-size", "2", "--markdown", "--json", str(out)]
    report = loader_bench.main(argv)
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert saved["num_images"] == 4 and saved["stack"]["torch"] == torch.__version__
    assert len(saved["loadavg_start"]) == 3 and len(saved["loadavg_end"]) == 3
    assert saved["command"].endswith(" ".join(argv[-4:])) and "--max-images 4" in saved["command"]
    assert set(saved["references"]) == {"full", "reduced"}
    # the tiny JPEGs are decoded at half size for 128 px: the reduced reference decodes less
    assert saved["references"]["reduced"]["cpu_ms_per_img"] < saved["references"]["full"]["cpu_ms_per_img"]
    threads = loader_bench.training_config("cpu", "cpu", cuda=False)["num_workers"]
    assert [r["name"] for r in saved["results"]] == [f"cpu/cpu threads={threads}", f"cpu/cpu threads={threads + 1}"]
    for row in saved["results"]:
        run = row["rounds"][row["median_round"]]
        assert row["reference"] == "reduced" and row["img_s"] == run["img_s"]
        assert row["reference_img_s"] == saved["references"]["reduced"]["rounds"][0]["img_s"]
        assert row["ratio"] == pytest.approx(row["img_s"] / row["reference_img_s"], rel=1e-12)
        line = (f"| {row['name']} | eval | {row['img_s']:.1f} | {row['img_s']:.1f}..{row['img_s']:.1f} | reduced | "
                f"{row['reference_img_s']:.1f} | {row['ratio']:.2f} |")
        assert line in printed
    assert f"`{saved['command']}`" in printed and "`cpu threads`: CPU backend" in printed


def test_median_round_is_a_real_round():
    runs = [{"img_s": x} for x in (30.0, 10.0, 20.0, 40.0)]
    assert loader_bench.median_round(runs) == 2  # 20.0: the lower median of an even count
    assert loader_bench.median_round(runs[:3]) == 2


def test_rows_are_compared_with_the_reference_that_decodes_alike():
    assert loader_bench.reference_for(ONE_THREAD, cuda_reference=True) == "reduced"
    dali_cpu = {"backend": "dali", "device": "cpu", "dali_threads": 2}
    dali_gpu = {"backend": "dali", "device": "gpu", "dali_threads": 2, "parallel": True, "num_workers": 2}
    assert loader_bench.reference_for(dali_cpu, cuda_reference=True) == "full"
    assert loader_bench.reference_for(dali_gpu, cuda_reference=True) == "dali-gpu"
    assert loader_bench.reference_for(dali_gpu, cuda_reference=False) == "full"


def test_default_rows_are_trainings_loaders_and_dali_cpu_with_parallel_workers():
    configs = loader_bench.default_configs(cuda=False, cpus=2)
    names = [loader_bench.config_name(c) for c in configs]
    threads = loader_bench.training_config("cpu", "cpu", cuda=False)["num_workers"]
    assert names[0] == f"cpu/cpu threads={threads}"
    assert [c for c in configs if c["backend"] == "dali"] == [
        {"backend": "dali", "device": "cpu", "dali_threads": configs[3]["dali_threads"], "parallel": False,
         "num_workers": 0},
        {"backend": "dali", "device": "cpu", "dali_threads": configs[3]["dali_threads"], "parallel": True,
         "num_workers": 2},
    ]
    assert loader_bench._matches(configs[4], {"dali/cpu/parallel"})
    assert not loader_bench._matches(configs[3], {"dali/cpu/parallel"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_gpu_row_is_a_fraction_of_the_decode_only_pipeline(tiny_root):
    config = loader_bench.training_config("dali", "gpu", cuda=True)
    report = loader_bench.run_loader_bench(tiny_root, "val", image_size=128, batches=3, warmup=1, batch_size=2,
                                           configs=[config], loader_splits=("eval",), rounds=1, log=lambda *a: None)
    assert set(report["references"]) == {"full", "reduced", "dali-gpu"}
    (row,) = report["results"]
    assert row["reference"] == "dali-gpu" and row["reference_img_s"] > 0
    assert row["ratio"] == pytest.approx(row["img_s"] / report["references"]["dali-gpu"]["img_s"], rel=1e-12)
