"""benchmarks/host_overhead.py runs end to end on the CPU (tiny settings) and writes what it says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import host_overhead  # noqa: E402


@pytest.mark.slow
def test_host_overhead_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "ho.json"
    rc = host_overhead.main(["--json", str(out), "--quick", "--device", "cpu", "--batch-size", "2",
                             "--image-size", "128", "--lines", "12", "--repeats", "2", "--scoring-workers", "2",
                             "--scoring-images", "4", "--step-batch-size", "2", "--step-image-size", "64",
                             "--step-steps", "1", "--data", str(tmp_path / "data")])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result["train_thread_ms_per_batch"]) == set(host_overhead.CPU_PATHS)
    for path, detail in result["train_thread_ms_per_batch_detail"].items():
        assert detail["ms_per_batch"] >= 0 and len(detail["per_repeat"]) == 2, path
        # the GPU paths' device step (rendering) is measured apart, and it is real work here
        assert detail["render_counted"] == (path in ("cpu/cpu", "dali/cpu"))
    assert result["render_ms_per_batch"]["cpu/gpu-host"] > 0
    scoring = result["val_scoring"]
    assert scoring["identical"] is True and scoring["workers"] == 2 and scoring["img_s"] > 0
    step = result["step_with_real_loader_vs_resident"]
    assert step["real_loader_ms"] > 0 and step["resident_ms"] > 0 and step["ratio"] > 0
    assert len(result["loadavg"]) == 3 and result["stack"]["torch"]
