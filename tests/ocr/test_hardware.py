"""ocr.hardware: the diagnosis when torch cannot use the GPUs NVML sees, and this process's
GPU memory from NVML (per process, or the device-wide figure where NVML has none)."""

from __future__ import annotations

import logging
import os
import sys
import types

import pytest
import torch

from ocr import hardware
from ocr.hardware import GPUInfo, GpuMemoryPeak, diagnose_cuda, probe, process_gpu_memory

GPUS = [GPUInfo(0, "NVIDIA A10", 24.0, 23.5), GPUInfo(1, "NVIDIA A10", 24.0, 23.5)]


def test_driver_older_than_the_torch_build(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    text = diagnose_cuda(GPUS, "535.183.01", "12.2", "2.15.0+cu132", "13.2", cuda_ok=False)
    assert text.startswith("NVML sees 2 GPU(s) (NVIDIA A10; driver 535.183.01, CUDA 12.2) but torch 2.15.0+cu132")
    assert "would train on the CPU" in text
    assert "needs an NVIDIA driver >= 580.65.06" in text and "supports CUDA 12.2 at most" in text
    assert "--torch-backend=cu126" in text and "uv run --no-sync" in text
    assert "trainer.accelerator=cpu" in text and "GPU drivers and torch CUDA builds" in text


def test_cpu_only_torch_build(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    text = diagnose_cuda(GPUS, "580.65.06", "13.0", "2.15.0+cpu", None, cuda_ok=False)
    assert "CPU-only build" in text and "--torch-backend=auto" in text


def test_unknown_cause_quotes_torch(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    text = diagnose_cuda(GPUS, "580.65.06", "13.0", "2.15.0", "13.2", cuda_ok=False, torch_says="CUDA unknown error")
    assert "torch says: CUDA unknown error" in text and "/dev/nvidia" in text


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_nothing_to_say(monkeypatch, hidden):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert diagnose_cuda(GPUS, "580.65.06", "13.0", "2.15.0", "13.2", cuda_ok=True) == ""
    assert diagnose_cuda([], "", "", "2.15.0", "13.2", cuda_ok=False) == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)  # GPUs hidden on purpose
    assert diagnose_cuda(GPUS, "535.183.01", "12.2", "2.15.0", "13.2", cuda_ok=False) == ""


def test_probe_records_the_torch_build():
    info = probe().to_dict()
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda_build"] == (torch.version.cuda or "")
    assert "cuda_problem" in info


# ------------------------------------------------------------------- process GPU memory (fake NVML)


def _fake_nvml(procs, used=7 * 2**30, init_fails=False):
    nvml = types.ModuleType("pynvml")

    def init():
        if init_fails:
            raise RuntimeError("NVML Shared Library Not Found")

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: procs
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=used, total=24 * 2**30, free=1)
    return nvml


def _proc(pid, used):
    return types.SimpleNamespace(pid=pid, usedGpuMemory=used)


@pytest.fixture
def fresh_fallback_note(monkeypatch):
    monkeypatch.setattr(hardware, "_device_fallback_said", set())


def test_per_process_figure(monkeypatch, fresh_fallback_note):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([_proc(1, 5), _proc(os.getpid(), 3 * 2**30)]))
    assert process_gpu_memory(0) == (3 * 2**30, "nvml-process")


@pytest.mark.parametrize("procs", [[_proc(1, 5)], [_proc(os.getpid(), None)], []])
def test_container_falls_back_to_the_device_figure_and_says_so_once(monkeypatch, caplog, fresh_fallback_note, procs):
    """In a container NVML lists host PIDs (ours is absent) or gives no per-process figure."""
    caplog.set_level(logging.INFO, logger="ocr.hardware")
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(procs))
    assert process_gpu_memory(0) == (7 * 2**30, "nvml-device")
    assert process_gpu_memory(0) == (7 * 2**30, "nvml-device")
    notes = [r.getMessage() for r in caplog.records if "device-wide" in r.getMessage()]
    assert len(notes) == 1 and "includes other processes" in notes[0]


def test_no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([], init_fails=True))
    assert process_gpu_memory(0) == (None, "unavailable")


def test_peak_keeps_the_largest_and_prefers_the_process_figure(monkeypatch):
    figures = iter([(2 * 2**30, "nvml-process"), (5 * 2**30, "nvml-process"), (3 * 2**30, "nvml-process")])
    monkeypatch.setattr(hardware, "process_gpu_memory", lambda device: next(figures))
    peak = GpuMemoryPeak()
    for _ in range(3):
        peak.sample(torch.device("cuda", 0))
    peak.sample(torch.device("cpu"))  # not a GPU: nothing sampled
    assert peak.to_dict() == {"peak_gpu_process_gb": 5.0, "peak_gpu_process_source": "nvml-process"}
    assert GpuMemoryPeak().to_dict() == {"peak_gpu_process_gb": None, "peak_gpu_process_source": None}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_nvml_sees_this_process_allocation():
    device = torch.device("cuda", torch.cuda.current_device())
    before, source = process_gpu_memory(device)
    block = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    torch.cuda.synchronize()
    after, source_after = process_gpu_memory(device)
    assert source == source_after and source in ("nvml-process", "nvml-device")
    assert after is not None and after >= before + 400 * 2**20, (before, after, source)
    if source == "nvml-process":
        assert after >= torch.cuda.memory_reserved(device)
    del block
