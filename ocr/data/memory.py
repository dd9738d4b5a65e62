"""Memory budgets: what is free (GPU, host RAM, disk), whether an estimated cache fits,
and the store a cache falls back to when it does not (gpu -> pinned -> off), decided
before anything is allocated and announced with one warning.

Stores: ``gpu`` (tensors on the model's CUDA device), ``pinned`` / ``host`` (host RAM:
page-locked when CUDA is usable, plain pageable memory otherwise; the two names are
synonyms in the config and logs say ``pinned`` on a CUDA machine and ``host`` without
one), ``disk`` (persistent files under ``cache_dir``) and ``off``.

The probe is injectable (``OCRDataModule(..., memory_probe=...)``) so tests can simulate
a machine with little free memory.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from ocr.config import STORES

log = logging.getLogger(__name__)

GB = 1024 ** 3
DISK_FRACTION = 0.9  # of the free disk space a disk store may take
DISK_RESERVE = 1 * GB  # and always leave this much free


class MemoryProbe:
    """Free memory right now. Override methods to simulate another machine."""

    def gpu(self, device: torch.device) -> tuple[int, int] | None:
        """(free, total) bytes of a CUDA device, None if it cannot be queried."""
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        try:
            free, total = torch.cuda.mem_get_info(device)
        except Exception:  # noqa: BLE001 - fall back to NVML
            try:
                import pynvml

                pynvml.nvmlInit()
                try:
                    mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device.index or 0))
                    free, total = mem.free, mem.total
                finally:
                    pynvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                return None
        return capped_free(int(free), int(total), device), int(total)

    def host(self) -> tuple[int, int]:
        """(available, total) bytes of host RAM."""
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    def disk(self, path: str | Path) -> int:
        """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
        p = Path(path).resolve()
        while not p.exists() and p != p.parent:
            p = p.parent
        return int(shutil.disk_usage(p).free)


def capped_free(free: int, total: int, device: torch.device) -> int:
    """What this process may still allocate on ``device``: the device's free memory, but no
    more than a ``torch.cuda.set_per_process_memory_fraction`` cap (``trainer.gpu_memory_fraction``,
    used to emulate a smaller GPU) leaves above what torch has already reserved."""
    try:
        fraction = float(torch.cuda.get_per_process_memory_fraction(device))
    except Exception:  # noqa: BLE001 - no cap can be read: the device's free memory
        return free
    if fraction >= 1.0:
        return free
    allowed = int(fraction * total) - int(torch.cuda.memory_reserved(device))
    return max(0, min(free, allowed))


def gb(n: float) -> str:
    return f"{n / GB:.3g} GB" if n < GB else f"{n / GB:.2f} GB"


def host_store_name(device: torch.device | None = None) -> str:
    """Page-locked host memory when batches go to a CUDA device (faster, asynchronous copies), plain
    host memory otherwise (pinning would only start a CUDA context, e.g. under trainer.accelerator=cpu)."""
    if not torch.cuda.is_available():
        return "host"
    return "pinned" if device is None or torch.device(device).type == "cuda" else "host"


@dataclass
class Budget:
    """Whether ``estimate`` bytes fit in one store, and the numbers that decided it."""

    store: str
    fits: bool
    usable: int
    free: int
    detail: str


def budget(store: str, estimate: int, probe: MemoryProbe, device: torch.device, cache_dir: str | Path,
           fraction: float) -> Budget:
    if store == "gpu":
        info = probe.gpu(device)
        if info is None:
            return Budget(store, False, 0, 0, f"{device} memory cannot be queried")
        free, total = info
        usable = int(free * fraction)
        return Budget(store, estimate <= usable, usable, free,
                      f"{gb(usable)} usable of {gb(free)} free on {device} (total {gb(total)})")
    if store in ("pinned", "host"):
        free, total = probe.host()
        usable = int(free * fraction)
        return Budget(store, estimate <= usable, usable, free,
                      f"{gb(usable)} usable of {gb(free)} available host RAM (total {gb(total)})")
    if store == "disk":
        free = probe.disk(cache_dir)
        usable = max(0, int(free * DISK_FRACTION) - DISK_RESERVE)
        return Budget(store, estimate <= usable, usable, free, f"{gb(usable)} usable of {gb(free)} free disk at {cache_dir}")
    raise ValueError(f"unknown store {store!r}")


@dataclass
class StoreDecision:
    store: str  # gpu | pinned | host | disk | off
    requested: str
    estimate: int
    reason: str  # why this store (one phrase)
    warning: str | None = None  # the one warning when the requested store could not be used
    # what the budget was computed with (probe, device, cache_dir, fraction, what): for recheck()
    context: dict | None = field(default=None, repr=False, compare=False)

    def recheck(self) -> StoreDecision:
        """The same budget for a GPU store again, with what is free *now*. A cache is sized when
        its loader is built, before any activation exists; the recording starts after a trained
        epoch, when the allocator holds the training step's memory. Still fits: ``self``; else
        the next smaller store (pinned/host -> off) with one warning."""
        if self.store != "gpu" or not self.context:
            return self
        c = self.context
        now = budget("gpu", self.estimate, c["probe"], c["device"], c["cache_dir"], c["fraction"])
        if now.fits:
            return self
        why = f"needs {gb(self.estimate)} but at recording time gpu has {now.detail}"
        host = host_store_name(c["device"])
        b = budget(host, self.estimate, c["probe"], c["device"], c["cache_dir"], c["fraction"])
        if b.fits:
            return StoreDecision(host, self.requested, self.estimate, f"{self.reason}; {why}; {b.detail}",
                                 warning=f"{c['what']}: {why}; using {host} memory instead ({b.detail})", context=c)
        notes = f"{why}; needs {gb(self.estimate)} but {host} has {b.detail}"
        return StoreDecision("off", self.requested, self.estimate, f"{self.reason}; {notes}",
                             warning=f"{c['what']} disabled (it does not fit): {notes}", context=c)


def choose_store(requested: str, device: torch.device, estimate: int, probe: MemoryProbe, cache_dir: str | Path = ".",
                 fraction: float = 0.5, what: str = "tensor cache") -> StoreDecision:
    """Pick the store for a cache of ``estimate`` bytes: the requested one when it fits,
    else the next smaller one (gpu -> pinned/host -> off; disk -> off)."""
    if requested not in STORES:
        raise ValueError(f"cache_config.store: {requested!r} is not one of {', '.join(STORES)}")
    decision = _choose_store(requested, device, estimate, probe, cache_dir, fraction, what)
    decision.context = {"probe": probe, "device": device, "cache_dir": cache_dir, "fraction": fraction, "what": what}
    return decision


def _choose_store(requested: str, device: torch.device, estimate: int, probe: MemoryProbe, cache_dir: str | Path,
                  fraction: float, what: str) -> StoreDecision:
    host = host_store_name(device)
    on_cuda = device.type == "cuda"
    notes: list[str] = []
    if requested == "off":
        return StoreDecision("off", requested, estimate, "store=off")
    if requested == "auto":
        chain = ["gpu", host] if on_cuda else [host]
        first_reason = "auto: model on " + (f"{device}" if on_cuda else "the CPU")
    elif requested == "gpu":
        if not on_cuda:
            notes.append(f"store=gpu but the model runs on {device}")
            chain = [host]
        else:
            chain = ["gpu", host]
        first_reason = "store=gpu"
    elif requested in ("pinned", "host"):
        chain = [host]
        first_reason = f"store={requested}" + ("" if requested == host else f" ({host} memory on this machine)")
    else:  # disk
        chain = ["disk"]
        first_reason = "store=disk"
    for i, store in enumerate(chain):
        b = budget(store, estimate, probe, device, cache_dir, fraction)
        if b.fits:
            reason = "; ".join([first_reason, *notes, b.detail])
            if (i == 0 and not notes) or requested == "auto":
                # auto falling back to host memory is the plan working: said in the reason, no warning
                return StoreDecision(store, requested, estimate, reason)
            return StoreDecision(store, requested, estimate, reason,
                                 warning=f"{what}: {'; '.join(notes)}; using {store} memory instead ({b.detail})")
        notes.append(f"needs {gb(estimate)} but {store} has {b.detail}")
    return StoreDecision("off", requested, estimate, "; ".join([first_reason, *notes]),
                         warning=f"{what} disabled (it does not fit): " + "; ".join(notes))
