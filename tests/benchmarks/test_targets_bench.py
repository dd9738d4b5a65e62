"""benchmarks/targets_bench.py runs training's configuration (one torch thread), times both
implementations the same number of times, and prints the figures its JSON holds."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import targets_bench  # noqa: E402


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_run_matches_training_and_its_json(tmp_path, capsys, keep_torch_threads):
    out = tmp_path / "targets.json"
    argv = ["--batch", "2", "--polygons", "6", "--size", "96", "--repeats", "3", "--warmup", "1", "--markdown",
            "--json", str(out)]
    result = targets_bench.main(argv)
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["config"]["torch_threads"] == 1  # as each training loader thread
    ref, vec = saved["reference"], saved["vectorised"]
    assert len(ref["runs_ms"]) == len(vec["runs_ms"]) == 3
    assert ref["ms_per_image"] == pytest.approx(statistics.median(ref["runs_ms"]) / 2)
    assert ref["ms_per_image_min"] == pytest.approx(min(ref["runs_ms"]) / 2)
    assert vec["ms_per_image_min"] <= vec["ms_per_image"]
    assert saved["speedup_per_image"] == pytest.approx(ref["ms_per_image"] / vec["ms_per_image"])
    assert saved["speedup_per_image_min"] == pytest.approx(ref["ms_per_image_min"] / vec["ms_per_image_min"])
    assert saved["agreement"]["thresh_mae"] < 1e-3
    assert saved["stack"]["torch"] == torch.__version__ and len(saved["loadavg_start"]) == 3
    assert saved["command"] == "python benchmarks/targets_bench.py " + " ".join(argv)
    assert saved["speedup_per_image"] == result["speedup_per_image"]
    line = (f"| speed-up | {saved['speedup_per_image']:.1f}x | {saved['speedup_per_image_min']:.1f}x | "
            f"{saved['speedup_per_image_cpu_time']:.1f}x |")
    assert line in printed and f"| {ref['ms_per_image']:.2f} | {ref['ms_per_image_min']:.2f} |" in printed
