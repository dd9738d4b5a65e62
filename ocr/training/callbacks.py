"""Callbacks: per-epoch timing and throughput, cache statistics, and the run summary JSON."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ocr.data.annotations import atomic_write_bytes
from ocr.data.batch import batch_size
from ocr.hardware import GpuMemoryPeak

log = logging.getLogger(__name__)


def _sync(pl_module: L.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class _PhaseClock:
    """Wall time of one loop phase, the part of it spent waiting for the loader
    (from the end of one batch to the start of the next), and images seen."""

    def __init__(self) -> None:
        self.start = self.last_end = time.perf_counter()
        self.loader_wait = 0.0
        self.images = 0
        self.batches = 0

    def batch_start(self) -> None:
        self.loader_wait += time.perf_counter() - self.last_end

    def batch_end(self, images: int) -> None:
        self.last_end = time.perf_counter()
        self.images += images
        self.batches += 1

    def result(self, prefix: str) -> dict:
        seconds = time.perf_counter() - self.start
        return {
            f"{prefix}_seconds": round(seconds, 3),
            f"{prefix}_loader_wait_seconds": round(self.loader_wait, 3),
            f"{prefix}_images": self.images,
            f"{prefix}_batches": self.batches,
            f"{prefix}_img_s": round(self.images / seconds, 3) if seconds > 0 else 0.0,
        }


class EpochTimer(L.Callback):
    """Measures train and validation time per epoch, loader wait time and images/s; logs one
    line per epoch and keeps the records for the summary. CUDA is synchronised at phase
    boundaries only, so the loader and the model overlap as they do in a normal run."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self._train: _PhaseClock | None = None
        self._val: _PhaseClock | None = None
        self._current: dict = {}

    def annotate(self, **values) -> None:
        """Add values to the current epoch's record (e.g. cache statistics)."""
        self._current.update(values)

    # training
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _sync(pl_module)
        self._current = {"epoch": trainer.current_epoch}
        self._train = _PhaseClock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._train is None:  # resumed mid-epoch: Lightning skips on_train_epoch_start
            self.on_train_epoch_start(trainer, pl_module)
        self._train.batch_start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._train.batch_end(batch_size(batch))

    # validation (runs inside the training epoch, before on_train_epoch_end)
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        _sync(pl_module)
        if self._train is not None and "train_seconds" not in self._current:
            self._current.update(self._train.result("train"))
        self._val = _PhaseClock()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._val is not None and not trainer.sanity_checking:
            self._val.batch_start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._val is not None and not trainer.sanity_checking:
            self._val.batch_end(batch_size(batch))

    def on_validation_end(self, trainer, pl_module) -> None:
        # After every on_validation_epoch_end (the module computes the metrics there).
        if trainer.sanity_checking or self._val is None:
            return
        _sync(pl_module)
        self._current.update(self._val.result("val"))
        # Split of validation time: forward (CUDA events on a GPU, read at the epoch end) and the
        # wait for scoring (post-processing + metrics, in the module's scoring pool).
        timings = getattr(pl_module, "eval_timings", {}).get("val") or {}
        self._current.update({f"val_{k}": v for k, v in timings.items()})
        self._val = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._train is not None and "train_seconds" not in self._current:
            _sync(pl_module)
            self._current.update(self._train.result("train"))
        # resumed from a checkpoint saved after the epoch's last batch: no batch ran, no record yet
        record = {"epoch": trainer.current_epoch, **self._current}
        metrics = trainer.callback_metrics
        if "train/loss_epoch" in metrics:
            record["train_loss"] = round(float(metrics["train/loss_epoch"]), 5)
        # callback_metrics keeps the last validation's values: copy them only for an epoch that validated.
        if "val_seconds" in record:
            for key in ("val/loss", "val/hmean", "val/cleval_precision", "val/cleval_recall",
                        "val/iou_precision", "val/iou_recall", "val/iou_hmean"):
                if key in metrics:
                    record[key.replace("/", "_")] = round(float(metrics[key]), 5)
        record["lr"] = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        self.epochs.append(record)
        for logger in trainer.loggers:
            logger.log_metrics({f"time/{k}": v for k, v in record.items() if k.endswith(("_seconds", "_img_s"))}, step=trainer.global_step)
        if trainer.is_global_zero:  # under DDP every rank keeps its record; rank 0 reports
            log.info(_epoch_line(record))


def _epoch_line(r: dict) -> str:
    line = f"Epoch {r['epoch']}: train {r.get('train_seconds', 0):.1f} s ({r.get('train_img_s', 0):.2f} img/s"
    line += f", loader wait {r.get('train_loader_wait_seconds', 0):.1f} s)"
    if "val_seconds" in r:
        line += f", val {r['val_seconds']:.1f} s (loader wait {r['val_loader_wait_seconds']:.1f} s"
        if "val_forward_seconds" in r:
            line += f", forward {r['val_forward_seconds']:.1f} s, scoring wait {r['val_scoring_seconds']:.1f} s"
        line += ")"
    if "train_loss" in r:
        line += f", train loss {r['train_loss']:.4f}"
    if "val_hmean" in r:
        line += (f", val hmean CLEval {r['val_hmean']:.4f} (P {r.get('val_cleval_precision', 0):.3f} "
                 f"R {r.get('val_cleval_recall', 0):.3f}), IoU {r.get('val_iou_hmean', 0):.4f}")
    return line


def write_json_atomic(path: Path, payload: dict, fault_point: str | None = None) -> None:
    """``payload`` as JSON, written atomically (``atomic_write_bytes``: 0644, fsync, rename).
    ``fault_point``: the ``ocr.faults`` point called between the write and the rename (tests)."""
    atomic_write_bytes(path, json.dumps(payload, indent=2, default=str).encode("utf-8"), fault_point)


class RunSummary(L.Callback):
    """Writes ``run_summary.json`` (atomically) when fitting or testing ends or fails:
    per-epoch timings from the EpochTimer, final metrics, the resolved config, the
    hardware and the run's choices (backend, precision). Benchmarks read this file."""

    def __init__(self, path: Path, timer: EpochTimer, static: dict):
        self.path = Path(path)
        self.timer = timer
        self.static = static
        self.started = time.time()
        self.status = "running"
        self.extra: dict = {}
        self.gpu_peak = GpuMemoryPeak()  # NVML: torch's and DALI's GPU memory, sampled at phase ends

    def payload(self, pl_module) -> dict:
        final = getattr(pl_module, "last_metrics", {})
        epochs = self.timer.epochs
        return {
            **self.static,
            "status": self.status,
            "wall_seconds": round(time.time() - self.started, 3),
            "epochs": epochs,
            "final_metrics": final,
            "mean_train_img_s": _mean([e.get("train_img_s") for e in epochs]),
            "memory": peak_memory(pl_module.device, self.gpu_peak),
            **self.extra,
        }

    def write(self, pl_module) -> None:
        if pl_module.global_rank != 0:  # one file per run; under DDP its timings are rank 0's
            return
        write_json_atomic(self.path, self.payload(pl_module), fault_point="run_summary.publish")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.gpu_peak.sample(pl_module.device)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.gpu_peak.sample(pl_module.device)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.status = "finished"
        callbacks = trainer.checkpoint_callbacks  # the best epoch first, then last.ckpt (ocr.training.run)
        if callbacks:
            self.extra["best_checkpoint"] = callbacks[0].best_model_path or None
            self.extra["last_checkpoint"] = callbacks[-1].best_model_path or None
        self.write(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self.status = "finished"
        self.gpu_peak.sample(pl_module.device)
        self.write(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.gpu_peak.sample(pl_module.device)
        # Ctrl-C, or SIGTERM (preemption: Lightning stops after the current batch)
        self.status = "interrupted" if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) else "failed"
        self.extra["error"] = f"{type(exception).__name__}: {exception}"
        self.write(pl_module)


class CacheStatistics(L.Callback):
    """Puts the datamodule's cache statistics (``datamodule.cache_stats()``) into the run
    summary (``cache``) and the validation hits/misses of each epoch into its record."""

    def __init__(self, datamodule, summary: RunSummary, timer: EpochTimer):
        self.datamodule = datamodule
        self.summary = summary
        self.timer = timer

    def _update(self) -> dict:
        stats = self.datamodule.cache_stats()
        self.summary.extra["cache"] = stats
        return stats

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        stats = self._update()
        passes = stats.get("val", {}).get("tensors", {}).get("passes") or []
        if passes and passes[-1]["epoch"] == trainer.current_epoch:
            last = passes[-1]
            self.timer.annotate(val_cache_action=last["action"], val_cache_hits=last["hits"],
                                val_cache_misses=last["misses"], val_cache_hit_rate=last["hit_rate"])

    def on_fit_end(self, trainer, pl_module) -> None:
        self._update()

    def on_test_end(self, trainer, pl_module) -> None:
        self._update()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._update()


def peak_memory(device: torch.device, gpu_peak: GpuMemoryPeak | None = None) -> dict:
    """Peak resident memory of this process and of its largest child (loader workers); on
    CUDA the peak memory torch allocated and reserved on ``device``, and the process's GPU
    memory as NVML reports it (``peak_gpu_process_gb``: torch's allocator *and* DALI's pools,
    nvJPEG, the CUDA context; ``peak_gpu_process_source`` says whether NVML had a per-process
    figure, ``nvml-process``, or only the device-wide one, ``nvml-device``)."""
    import resource

    kb = 1024 / 2**30  # ru_maxrss is in KiB on Linux
    out = {
        "peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb, 3),
        "peak_child_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kb, 3),
        "peak_gpu_allocated_gb": None,
        "peak_gpu_reserved_gb": None,
        "peak_gpu_process_gb": None,
        "peak_gpu_process_source": None,
    }
    if device.type == "cuda":
        out["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        out["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        gpu_peak = gpu_peak or GpuMemoryPeak()
        gpu_peak.sample(device)
        out.update(gpu_peak.to_dict())
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None
