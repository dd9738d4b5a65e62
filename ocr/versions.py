"""The software and hardware stack a figure was measured on (run summaries, benchmark JSON)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_version() -> dict:
    """Commit of the checkout and whether it had uncommitted changes (None outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def stack() -> dict:
    """Python, torch (+ its CUDA build), Lightning, DALI, the NVIDIA driver, the commit."""
    import torch

    versions: dict = {"python": platform.python_version(), "torch": torch.__version__,
                      "torch_cuda": torch.version.cuda, "cuda_usable": torch.cuda.is_available()}
    try:
        import lightning

        versions["lightning"] = lightning.__version__
    except ImportError:
        versions["lightning"] = None
    try:
        import nvidia.dali as dali

        versions["dali"] = dali.__version__
    except ImportError:
        versions["dali"] = None
    versions["driver"] = _driver_version()
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name(0)
    versions.update(code_version())
    return versions


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no NVML: nothing to report
        return None
    return version.decode() if isinstance(version, bytes) else str(version)
