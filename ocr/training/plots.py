"""``curves.png`` beside the run summary: train loss, validation CLEval / IoU hmean, and epoch time
with its loader wait, per epoch, from the EpochTimer's records (the ``epochs`` of run_summary.json)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import lightning as L

from ocr.data.annotations import atomic_write_bytes
from ocr.training.callbacks import EpochTimer

log = logging.getLogger(__name__)


def _series(epochs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records that have ``key`` (validation may skip epochs)."""
    pairs = [(e["epoch"], e[key]) for e in epochs if e.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def draw_curves(epochs: list[dict], path: Path, title: str = "") -> None:
    """Draw the per-epoch records into ``path`` (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe when a GUI backend was chosen earlier
    import matplotlib.pyplot as plt

    fig, (loss_ax, metric_ax, time_ax) = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
    try:
        loss_ax.plot(*_series(epochs, "train_loss"), "o-", color="tab:blue", label="train loss")
        loss_ax.set_title("train loss")
        metric_ax.plot(*_series(epochs, "val_hmean"), "o-", color="tab:green", label="CLEval hmean")
        metric_ax.plot(*_series(epochs, "val_iou_hmean"), "s--", color="tab:purple", label="IoU hmean")
        metric_ax.set_title("validation hmean")
        metric_ax.set_ylim(0, 1.02)
        time_ax.plot(*_series(epochs, "train_seconds"), "o-", color="tab:orange", label="train")
        time_ax.plot(*_series(epochs, "train_loader_wait_seconds"), "s--", color="tab:red", label="train loader wait")
        time_ax.plot(*_series(epochs, "val_seconds"), "^:", color="tab:gray", label="validation")
        time_ax.set_title("epoch time (s)")
        time_ax.set_ylim(bottom=0)
        for ax in (loss_ax, metric_ax, time_ax):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.xaxis.get_major_locator().set_params(integer=True)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


class CurvesPlot(L.Callback):
    """Draws ``curves.png`` when fitting ends or fails (Ctrl-C, an exception). A plot that cannot
    be drawn is one warning: it never hides the run's own result or error."""

    def __init__(self, path: Path, timer: EpochTimer, title: str = ""):
        self.path = Path(path)
        self.timer = timer
        self.title = title

    def draw(self, trainer) -> None:
        if trainer.global_rank != 0:
            return
        try:
            draw_curves(self.timer.epochs, self.path, self.title)
        except Exception as exc:  # noqa: BLE001 - a plot is a convenience
            log.warning("Could not draw %s: %s: %s", self.path, type(exc).__name__, exc)
            return
        log.info("Training curves: %s", self.path)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.draw(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.draw(trainer)
