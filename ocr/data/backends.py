"""Which data backend runs, and building a split's loader with it.

Every loader returned here is an iterable of Batches (see ``ocr.data.batch``) with a
``len()``; nothing downstream knows which backend produced a batch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig

from ocr.config import BACKENDS, CPU_LOADERS, DEVICES, TARGET_MODES  # noqa: F401 - re-exported
from ocr.data.dataset import ProcessLoader, ThreadedLoader, ValidatedOCRDataset
from ocr.data.source import SampleSource
from ocr.data.transforms import TransformParams
from ocr.hardware import usable_cpus

log = logging.getLogger(__name__)



#: Why ``auto`` takes the CPU backend without CUDA: in benchmarks/loader_bench.py the CPU
#: backend's loader threads deliver more images/s than the DALI loader on the CPU, train and
#: eval. That compares two loader designs, not OpenCV with DALI's CPU operators: the CPU backend
#: decodes JPEGs DCT-scaled and makes whole batches (targets included) in N threads, while the
#: DALI loader on the CPU decodes full size and runs the Python source and the targets in one
#: helper thread (or the source in parallel external-source workers, also measured there). The
#: measured figures are the README's loader table; earlier ones here (1.5-3.4x) came from a
#: benchmark whose loaders prefetched while the clock was stopped.
CPU_VS_DALI_CPU = ("more images/s than the DALI loader on the CPU in benchmarks/loader_bench.py: "
                   "DCT-scaled JPEG decode, whole batches in N loader threads")


class BackendError(ValueError):
    pass


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # cpu | dali
    device: str  # cpu | gpu: where pixels and targets are computed
    targets: str  # reference | vectorized
    num_workers: int  # CPU backend: loader threads (cpu_loader="threads") or DataLoader worker processes
    dali_threads: int
    reason: str
    cpu_loader: str = "threads"  # CPU backend: threads (in-process) | processes (torch DataLoader workers)

    def to_dict(self) -> dict:
        return asdict(self)


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


#: ``trainer.accelerator`` values under which the model may run on a CUDA device.
CUDA_ACCELERATORS = ("auto", "gpu", "cuda")


def choose_backend(loader_cfg: DictConfig, cuda_available: bool | None = None,
                   trainer_cfg: DictConfig | None = None) -> BackendChoice:
    """Resolve ``loader.backend`` / ``loader.device`` / ``loader.targets`` (auto or explicit).

    ``trainer_cfg``: the run's ``trainer`` group. ``trainer.accelerator=cpu`` (or any non-CUDA
    accelerator) on a CUDA machine means the CPU data path too: the model runs on the CPU, and
    decoding, augmenting or computing targets on the GPU would only copy every batch back.
    """
    backend, device, targets = loader_cfg.backend, loader_cfg.device, loader_cfg.targets
    cpu_loader = loader_cfg.get("cpu_loader", "auto")
    for key, value, allowed in (("backend", backend, BACKENDS), ("device", device, DEVICES), ("targets", targets, TARGET_MODES),
                                ("cpu_loader", cpu_loader, CPU_LOADERS)):
        if value not in allowed:
            raise BackendError(f"loader.{key}: {value!r} is not one of {', '.join(allowed)}")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    accelerator = trainer_cfg.get("accelerator") if trainer_cfg is not None else None
    no_cuda = "no CUDA"
    if accelerator is not None and str(accelerator) not in CUDA_ACCELERATORS:
        cuda, no_cuda = False, f"trainer.accelerator={accelerator}"
    if device == "gpu" and not cuda:
        if no_cuda != "no CUDA":
            raise BackendError(f"loader.device=gpu but {no_cuda}: the model runs on the CPU "
                               f"(use loader.device=cpu or auto, or trainer.accelerator=gpu)")
        raise BackendError("loader.device=gpu but CUDA is not usable on this machine (use loader.device=cpu or auto)")
    if device == "auto":
        device = "gpu" if cuda else "cpu"
    if backend == "dali" and not _dali_available():
        raise BackendError("loader.backend=dali but nvidia-dali is not installed")
    reasons = []
    if backend == "auto":
        if device == "gpu" and _dali_available():
            backend = "dali"
            reasons.append("CUDA usable: DALI decodes and augments on the GPU")
        else:
            backend = "cpu"
            reasons.append(f"{no_cuda}: the CPU backend ({CPU_VS_DALI_CPU})" if device == "cpu" else "DALI not installed")
    else:
        reasons.append(f"loader.backend={backend}")
    if targets == "auto":
        targets = "vectorized"
        reasons.append(f"vectorised DB targets on the {device}")
    cpus = usable_cpus()
    if cpu_loader == "auto":
        # CPU training: loader threads in the training process (no inter-process copies; OpenCV,
        # NumPy and torch release the GIL); with a GPU, the classic DataLoader worker processes
        cpu_loader = "threads" if device == "cpu" else "processes"
    if loader_cfg.num_workers >= 0:
        workers = loader_cfg.num_workers
    else:
        workers = max(1, min(8, cpus)) if cpu_loader == "threads" else max(1, min(8, cpus - 1))
    if loader_cfg.dali_threads >= 0:
        threads = loader_cfg.dali_threads
    else:
        threads = max(1, min(8, cpus)) if device == "cpu" else max(1, min(8, cpus - 1))
    if backend == "cpu":
        reasons.append(f"{workers} loader {'threads' if cpu_loader == 'threads' else 'worker processes'}")
    else:
        reasons.append(f"{threads} DALI threads")
    return BackendChoice(backend, device, targets, workers, threads, "; ".join(reasons), cpu_loader)


def build_loader(choice: BackendChoice, source: SampleSource, params: TransformParams, target_kwargs: dict,
                 batch_size: int, shuffle: bool, drop_last: bool, seed: int, with_targets: bool = True):
    """The split's loader for the chosen backend."""
    if choice.backend == "dali":
        from dali_pipelines.loader import build_dali_loader

        return build_dali_loader(choice, source, params, target_kwargs, batch_size, shuffle, drop_last, seed, with_targets)
    dataset = ValidatedOCRDataset(
        source, params, with_targets=with_targets, target_kwargs=target_kwargs,
        target_mode=choice.targets if choice.device == "cpu" else "deferred",
    )
    if choice.cpu_loader == "threads":
        return ThreadedLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                              num_threads=choice.num_workers)
    return ProcessLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                         num_workers=choice.num_workers, pin_memory=choice.device == "gpu")
