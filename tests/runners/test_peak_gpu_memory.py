"""Peak GPU memory in the run summary and the benchmark matrix: NVML's per-process figure
(torch's allocator and DALI's pools), or the device-wide one where NVML has none."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ocr import hardware
from ocr.training import callbacks
from ocr.training.callbacks import peak_memory

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from matrix_report import figures_from_summary, markdown_table  # noqa: E402


def test_cpu_run_has_no_gpu_figures():
    out = peak_memory(torch.device("cpu"))
    assert out["peak_gpu_allocated_gb"] is None and out["peak_gpu_process_gb"] is None
    assert out["peak_gpu_process_source"] is None and out["peak_host_rss_gb"] > 0


def test_cuda_summary_reports_the_process_figure(monkeypatch):
    """A CUDA run (torch's counters and NVML faked): the summary carries both figures."""
    figures = iter([(6 * 2**30, "nvml-process"), (5 * 2**30, "nvml-process")])
    monkeypatch.setattr(hardware, "process_gpu_memory", lambda device: next(figures))
    monkeypatch.setattr(callbacks.torch.cuda, "max_memory_allocated", lambda device: 2 * 2**30)
    monkeypatch.setattr(callbacks.torch.cuda, "max_memory_reserved", lambda device: 3 * 2**30)
    peak = hardware.GpuMemoryPeak()
    peak.sample(torch.device("cuda", 0))  # e.g. at the end of the train epoch: DALI's pools included
    out = peak_memory(torch.device("cuda", 0), peak)  # the summary samples once more
    assert out["peak_gpu_allocated_gb"] == 2.0 and out["peak_gpu_reserved_gb"] == 3.0
    assert out["peak_gpu_process_gb"] == 6.0 and out["peak_gpu_process_source"] == "nvml-process"


@pytest.mark.parametrize("memory,expect", [
    ({"peak_gpu_allocated_gb": 2.0, "peak_gpu_process_gb": 6.0, "peak_gpu_process_source": "nvml-process"},
     (6.0, "nvml-process", "6.000")),
    ({"peak_gpu_allocated_gb": 2.0, "peak_gpu_process_gb": 9.5, "peak_gpu_process_source": "nvml-device"},
     (9.5, "nvml-device", "9.500 (device)")),
    ({"peak_gpu_allocated_gb": 2.0}, (2.0, "torch-allocated", "2.000 (torch)")),  # an older summary
    ({"peak_gpu_allocated_gb": None}, (None, None, "-")),  # a CPU run
])
def test_matrix_reads_the_process_figure(memory, expect):
    figures = figures_from_summary({"epochs": [], "memory": memory})
    assert (figures["peak_gpu_gb"], figures["peak_gpu_source"]) == expect[:2]
    assert figures["peak_gpu_torch_gb"] == memory.get("peak_gpu_allocated_gb")
    row = {"tier": "high", "cell": "c", "status": "ok", **figures}
    assert f"| {expect[2]} |" in markdown_table([row])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_summary_counts_more_than_torch_tensors():
    device = torch.device("cuda", torch.cuda.current_device())
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    out = peak_memory(device)
    assert out["peak_gpu_process_source"] in ("nvml-process", "nvml-device")
    # the CUDA context alone is beyond what torch's allocator counts
    assert out["peak_gpu_process_gb"] > out["peak_gpu_allocated_gb"] >= 0.25
    del block
