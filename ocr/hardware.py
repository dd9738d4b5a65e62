"""Hardware probe (pynvml for GPUs, psutil for CPU/RAM), hardware tiers, the check that
torch can use the GPUs NVML sees, and this process's GPU memory as NVML reports it."""

from __future__ import annotations

import logging
import os
import platform
import warnings
from dataclasses import asdict, dataclass, field

import psutil

log = logging.getLogger(__name__)

#: Minimum Linux driver of each CUDA major version (CUDA minor-version compatibility: a torch
#: built for CUDA 13.2 runs on any 13.x driver), from NVIDIA's CUDA compatibility guide.
MIN_DRIVER_FOR_CUDA = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
README_SECTION = "README.md, section 'GPU drivers and torch CUDA builds'"


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
    torch_version: str = ""
    torch_cuda_build: str = ""  # the CUDA torch was built for ("" for a CPU-only build)
    cuda_problem: str = ""  # why torch cannot use the GPUs NVML sees ("" when it can, or sees none)
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


def _version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split("."))
    except ValueError:
        return ()


def cuda_visible_devices_hidden() -> bool:
    """``CUDA_VISIBLE_DEVICES`` set to hide every GPU on purpose (empty, or -1)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def diagnose_cuda(gpus: list[GPUInfo], driver: str, driver_cuda: str, torch_version: str, torch_cuda: str | None,
                  cuda_ok: bool, torch_says: str = "") -> str:
    """Why torch cannot use the GPUs that NVML sees, and the fix ("" when nothing is wrong:
    torch uses them, NVML sees none, or ``CUDA_VISIBLE_DEVICES`` hides them on purpose)."""
    if cuda_ok or not gpus or cuda_visible_devices_hidden():
        return ""
    names = ", ".join(sorted({g.name for g in gpus}))
    head = (f"NVML sees {len(gpus)} GPU(s) ({names}; driver {driver or '?'}, CUDA {driver_cuda or '?'}) "
            f"but torch {torch_version} cannot use them, so this run would train on the CPU")
    tail = f"; to train on the CPU anyway: trainer.accelerator=cpu. See {README_SECTION}."
    if not torch_cuda:
        return (f"{head}: this torch is a CPU-only build. Fix: install a CUDA build of torch "
                f"(uv pip install torch torchvision --torch-backend=auto){tail}")
    need, have = _version_tuple(torch_cuda), _version_tuple(driver_cuda)
    if need and have and need[0] > have[0]:
        minimum = MIN_DRIVER_FOR_CUDA.get(need[0], "newer")
        backend = "cu126" if have[0] == 12 else f"cu{have[0]}x"
        return (f"{head}: this torch is built for CUDA {torch_cuda}, which needs an NVIDIA driver >= {minimum} "
                f"(CUDA {need[0]}.x), and driver {driver} supports CUDA {driver_cuda} at most. Fix: update the "
                f"driver to >= {minimum}, or install a torch built for CUDA {have[0]}.x, e.g. "
                f"uv pip install --reinstall torch torchvision --torch-backend={backend} (then uv run --no-sync ...), "
                f"or pin that index in pyproject.toml{tail}")
    said = f" torch says: {torch_says}." if torch_says else ""
    return (f"{head} (torch built for CUDA {torch_cuda}, driver supports CUDA {driver_cuda or '?'}).{said} "
            f"Check that /dev/nvidia* is accessible in this container and that nvidia-smi works{tail}")


def _torch_cuda_available() -> tuple[bool, str]:
    """``torch.cuda.is_available()`` and the warning torch gives when it is not (e.g. a driver too old)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    said = "; ".join(str(w.message).strip() for w in caught if "cuda" in str(w.message).lower())
    return ok, said[:500]


def probe() -> HardwareInfo:
    import torch

    vm = psutil.virtual_memory()
    gpus, driver, cuda = _probe_gpus()
    cuda_ok, torch_says = _torch_cuda_available()
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
        torch_version=torch.__version__,
        torch_cuda_build=torch.version.cuda or "",
        cuda_problem=diagnose_cuda(gpus, driver, cuda, torch.__version__, torch.version.cuda, cuda_ok, torch_says),
    )
    if gpus and cuda_ok:
        best = max(gpus, key=lambda g: g.memory_total_gb)
        info.tier, info.device = gpu_tier(best.memory_total_gb), best.name
    else:
        info.tier, info.device = "cpu-only", f"{info.cpu_model} ({info.cpu_cores_usable} cores)"
    return info


# ----------------------------------------------------------------------------- GPU memory

_device_fallback_said: set[int] = set()


def _nvml_index(device) -> int:
    """NVML's index of a torch CUDA device (``CUDA_VISIBLE_DEVICES`` renumbers torch's)."""
    import torch

    index = device.index if hasattr(device, "index") else device
    index = 0 if index is None else int(index)
    try:
        return int(torch.cuda._get_nvml_device_index(index))
    except Exception:  # noqa: BLE001 - private helper missing or visible devices unparsable: same numbering
        return index


def process_gpu_memory(device=0) -> tuple[int | None, str]:
    """GPU memory this process uses on ``device`` (a torch device or index), as NVML reports it:
    everything the process holds there (CUDA context, torch's caching allocator, DALI's memory
    pools, nvJPEG buffers), not only torch's tensors.

    Returns ``(bytes, source)``: source ``"nvml-process"`` (this process's own figure);
    ``"nvml-device"`` when NVML does not list this process or has no per-process figure (in a
    container NVML sees host PIDs, or the driver withholds it) -- then the device-wide used
    memory, which includes every other process on that GPU (said once per device in the log);
    ``(None, "unavailable")`` without NVML.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library
        return None, "unavailable"
    try:
        index = _nvml_index(device)
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pid = os.getpid()
        for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"):
            try:
                procs = getattr(pynvml, query)(handle)
            except Exception:  # noqa: BLE001 - the driver lacks this version of the call
                continue
            used = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory is not None]
            if used:
                return int(sum(used)), "nvml-process"
            break
        total_used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        if index not in _device_fallback_said:
            _device_fallback_said.add(index)
            log.info("NVML gives no per-process GPU memory for this process on GPU %d (in a container NVML lists "
                     "host PIDs, or the driver withholds the figure): reporting the device-wide used memory, "
                     "which includes other processes on that GPU", index)
        return total_used, "nvml-device"
    except Exception:  # noqa: BLE001 - a query failed: no figure rather than a failed run
        return None, "unavailable"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


class GpuMemoryPeak:
    """The largest :func:`process_gpu_memory` figure over the samples taken (at phase ends:
    torch's caching allocator and DALI's pools keep what they reserved, so the end of a phase
    sees its peak). A per-process figure wins over a device-wide one."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}

    def sample(self, device) -> None:
        if getattr(device, "type", "cuda") != "cuda":
            return
        used, source = process_gpu_memory(device)
        if used is not None:
            self.peaks[source] = max(used, self.peaks.get(source, 0))

    def to_dict(self) -> dict:
        for source in ("nvml-process", "nvml-device"):
            if source in self.peaks:
                return {"peak_gpu_process_gb": round(self.peaks[source] / 2**30, 3), "peak_gpu_process_source": source}
        return {"peak_gpu_process_gb": None, "peak_gpu_process_source": None}
