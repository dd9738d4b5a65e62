"""Hardware probe (pynvml for GPUs, psutil for CPU/RAM) and hardware tiers."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field

import psutil


@dataclass
class GPUInfo:
    index: int
    name: str
    memory_total_gb: float
    memory_free_gb: float
    compute_capability: str = ""


@dataclass
class HardwareInfo:
    cpu_model: str
    cpu_cores_logical: int
    cpu_cores_physical: int
    cpu_cores_usable: int
    ram_total_gb: float
    ram_available_gb: float
    gpus: list[GPUInfo] = field(default_factory=list)
    driver_version: str = ""
    cuda_driver_version: str = ""
    torch_cuda_available: bool = False
    tier: str = "cpu-only"
    device: str = ""  # exact device string, e.g. "NVIDIA H100 80GB HBM3" or the CPU model

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _probe_gpus() -> tuple[list[GPUInfo], str, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: no GPU
        return [], "", ""
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                cc = f"{major}.{minor}"
            except Exception:
                cc = ""
            gpus.append(GPUInfo(i, name, round(mem.total / 2**30, 2), round(mem.free / 2**30, 2), cc))
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        return gpus, driver, f"{cuda // 1000}.{(cuda % 1000) // 10}"
    finally:
        pynvml.nvmlShutdown()


def gpu_tier(memory_gb: float) -> str:
    """entry < 12 GB <= mid < 24 GB <= high (by the largest GPU's memory)."""
    if memory_gb >= 23.0:
        return "high"
    if memory_gb >= 11.0:
        return "mid"
    return "entry"


def probe() -> HardwareInfo:
    import torch

    vm = psutil.virtual_memory()
    gpus, driver, cuda = _probe_gpus()
    cuda_ok = torch.cuda.is_available()
    info = HardwareInfo(
        cpu_model=_cpu_model(),
        cpu_cores_logical=psutil.cpu_count(logical=True) or 1,
        cpu_cores_physical=psutil.cpu_count(logical=False) or 1,
        cpu_cores_usable=usable_cpus(),
        ram_total_gb=round(vm.total / 2**30, 2),
        ram_available_gb=round(vm.available / 2**30, 2),
        gpus=gpus,
        driver_version=driver,
        cuda_driver_version=cuda,
        torch_cuda_available=cuda_ok,
    )
    if gpus and cuda_ok:
        best = max(gpus, key=lambda g: g.memory_total_gb)
        info.tier, info.device = gpu_tier(best.memory_total_gb), best.name
    else:
        info.tier, info.device = "cpu-only", f"{info.cpu_model} ({info.cpu_cores_usable} cores)"
    return info
