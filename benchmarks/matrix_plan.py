"""The benchmark matrix: which cells exist, which can run here (and why not), and the
Hydra overrides that make each cell a separate runners/train.py run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

LOADERS = {
    # name: (overrides, needs CUDA, description)
    "cpu": (["loader.backend=cpu", "loader.device=auto"], False, "CPU backend (DataLoader workers, OpenCV)"),
    "dali-gpu": (["loader.backend=dali", "loader.device=gpu"], True, "DALI on the GPU (nvJPEG decode, GPU augment)"),
    "dali-cpu": (["loader.backend=dali", "loader.device=cpu"], False, "DALI with its CPU operators"),
}
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
CACHE_OVERRIDES = {
    "off": [
        "datasets.val_dataset.config.preload_images=false",
        "datasets.val_dataset.config.cache_config.cache_transformed_tensors=false",
    ],
    "on": [
        "datasets.val_dataset.config.preload_images=true",
        "datasets.val_dataset.config.cache_config.cache_transformed_tensors=true",
    ],
}
DEFAULT_LOADERS = ("cpu", "dali-gpu", "dali-cpu")
DEFAULT_PRECISIONS = ("32-true", "16-mixed")
DEFAULT_CACHES = ("off", "on")
BASELINE = ("cpu", "32-true", "off")

# Emulated tiers: caps on loader parallelism and GPU memory (GB).
EMULATED_TIERS = {
    "entry": {"workers": 4, "gpu_memory_gb": 8.0},
    "mid": {"workers": 8, "gpu_memory_gb": 16.0},
}


@dataclass(frozen=True)
class Cell:
    loader: str
    precision: str
    cache: str

    @property
    def name(self) -> str:
        return f"{self.loader}_{self.precision}_cache-{self.cache}"

    @property
    def is_baseline(self) -> bool:
        return (self.loader, self.precision, self.cache) == BASELINE

    def overrides(self) -> list[str]:
        return [*LOADERS[self.loader][0], f"trainer.precision={self.precision}", *CACHE_OVERRIDES[self.cache]]


@dataclass
class PlannedCell:
    cell: Cell
    skip_reason: str | None = None
    note: str | None = None
    extra_overrides: list[str] = field(default_factory=list)

    def overrides(self, common: list[str]) -> list[str]:
        return [*common, *self.extra_overrides, *self.cell.overrides()]

    def key(self, common: list[str], versions: dict, repeat: int = 0) -> str:
        """Identity of a finished run for reuse: every override that shapes the run, the code
        version (commit, dirty flag) and the library versions (``ocr.versions.stack()``), and
        which repeat it is. Any change there gives another folder, so nothing stale is reused."""
        payload = json.dumps({"overrides": self.overrides(common), "versions": versions}, sort_keys=True, default=str)
        return f"{self.cell.name}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}-r{repeat}"

    def to_dict(self) -> dict:
        return {**asdict(self.cell), "name": self.cell.name, "skip_reason": self.skip_reason, "note": self.note}


class PlanError(ValueError):
    pass


def _check(values, allowed, what) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise PlanError(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")


def plan_cells(loaders=DEFAULT_LOADERS, precisions=DEFAULT_PRECISIONS, caches=DEFAULT_CACHES, *,
               cuda: bool, dali: bool) -> list[PlannedCell]:
    """Every cell of loaders x precisions x caches, in that order. Cells this machine
    cannot run carry a skip reason; without CUDA, fp16 AMP becomes bf16 AMP (noted)."""
    _check(loaders, LOADERS, "loader")
    _check(precisions, PRECISIONS, "precision")
    _check(caches, CACHE_OVERRIDES, "cache setting")
    substituted = not cuda and "16-mixed" in precisions and "bf16-mixed" not in precisions
    if substituted:
        precisions = ["bf16-mixed" if p == "16-mixed" else p for p in precisions]
    planned = []
    for loader in loaders:
        for precision in precisions:
            for cache in caches:
                cell = PlannedCell(Cell(loader, precision, cache))
                if LOADERS[loader][1] and not cuda:
                    cell.skip_reason = "needs CUDA (no usable GPU on this machine)"
                elif loader.startswith("dali") and not dali:
                    cell.skip_reason = "nvidia-dali is not installed"
                elif precision == "16-mixed" and not cuda:
                    cell.skip_reason = "fp16 AMP needs CUDA"
                elif precision == "bf16-mixed" and substituted:
                    cell.note = "bf16-mixed instead of 16-mixed (no CUDA)"
                planned.append(cell)
    return planned


def emulation_overrides(tier: str, gpu_total_gb: float | None) -> list[str]:
    """Overrides that make a big machine behave like a smaller tier."""
    if tier not in EMULATED_TIERS:
        raise PlanError(f"--emulate-tier: {tier!r} is not one of {', '.join(EMULATED_TIERS)}")
    caps = EMULATED_TIERS[tier]
    out = [f"loader.num_workers={caps['workers']}", f"loader.dali_threads={caps['workers']}"]
    if gpu_total_gb:
        fraction = min(1.0, caps["gpu_memory_gb"] / gpu_total_gb)
        out.append(f"trainer.gpu_memory_fraction={fraction:.4f}")
    return out
