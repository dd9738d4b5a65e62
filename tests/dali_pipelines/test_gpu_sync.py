"""A training step of the real module on the real loaders makes no host synchronisation of ours
(skipped without CUDA).

DESIGN.md: "the training thread only queues device work ... a step has no host synchronisation
(``.item()``, ``int(tensor)``, ``.cpu()``)". Each case builds ``OCRDataModule`` and
``DBNetModule`` from the real configs and drives a few steps the way Lightning does under
``16-mixed`` -- the loader's ``next()``, ``transfer_batch_to_device``,
``on_after_batch_transfer``, ``training_step`` under autocast, the scaled backward, then gradient
clipping and the GradScaler's optimizer step -- with ``torch.cuda.set_sync_debug_mode("warn")``
recording every synchronising CUDA call of the training thread with its phase and the calling
line (warm-up steps, where cuDNN autotuning and lazy initialisation happen, are not checked).

Failing: any synchronisation in the phases that are ours (``fetch``, ``transfer``,
``after_transfer``, ``forward_loss``, ``backward``). ``fetch`` counts because both GPU loaders
hand batches to the training thread there (the DALI loader even runs its pipeline and renders
the targets in it).

What the sync debug mode sees: calls that go through c10's synchronising helpers --
``.item()``, ``int()``/``float()``/``bool()`` of a CUDA tensor, ``.cpu()``/``.tolist()``/
``.numpy()`` and other blocking device-to-host copies, ``nonzero``/``masked_select``/boolean
indexing and other ops whose output shape depends on the data, ``torch.cuda.synchronize()``,
``Stream/Event.synchronize()``. It does not see DALI's own CUDA calls, nor a ``non_blocking``
host-to-device copy from pageable memory (the CUDA driver stages it through a bounce buffer,
blocking the host but not waiting for the device); the host tensors of each batch that are not
pinned are therefore recorded as a test property (``pageable_host_tensors``), not failed.

Framework synchronisations that remain, listed here rather than hidden (:data:`FRAMEWORK_SYNCS`);
the optimizer phase's are recorded (``framework_syncs``) and must come from torch itself.
"""

from __future__ import annotations

import threading
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ocr.config import register_configs
from ocr.data.datamodule import OCRDataModule
from ocr.training.module import DBNetModule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]
SYNC_MESSAGE = "called a synchronizing CUDA operation"

#: Phases of a step that are ours: no synchronisation allowed.
OUR_PHASES = ("fetch", "transfer", "after_transfer", "forward_loss", "backward")

#: Synchronisations that remain in a Lightning training step and are not ours.
FRAMEWORK_SYNCS = {
    "GradScaler.step (16-mixed)": "reads found_inf (one .item() per device) to decide whether to skip the "
                                  "optimizer step; 32-true and bf16-mixed have no scaler",
    "logging every log_every_n_steps": "Lightning converts the logged tensors (train/loss and its parts) to Python "
                                       "numbers for the loggers every trainer.log_every_n_steps steps",
    "progress bar": "the progress bar reads the prog_bar metrics (train/loss) at each refresh; "
                    "runners/train.py refreshes every log_every_n_steps // 2 steps, "
                    "trainer.enable_progress_bar=false turns it off",
}

WARMUP_STEPS = 2
CHECKED_STEPS = 3


def _package_frames(frames) -> list[str]:
    """The frames in the project's own code (not tests, not installed packages)."""
    out = []
    for f in frames:
        try:
            rel = Path(f.filename).resolve().relative_to(REPO)
        except ValueError:
            continue
        if rel.parts and rel.parts[0] not in ("tests", ".venv"):
            out.append(f"{rel}:{f.lineno} {f.line}")
    return out


class SyncRecorder:
    """Records the synchronising CUDA calls of the training thread (sync debug mode ``warn``),
    each with the phase it happened in and the innermost calling lines."""

    def __init__(self):
        self.phase = "setup"
        self.records: list[dict] = []
        self.other_threads: list[str] = []
        self._thread = threading.get_ident()

    def showwarning(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE not in str(message):
            return
        if threading.get_ident() != self._thread:  # e.g. the DataLoader's pin-memory thread
            self.other_threads.append(f"{threading.current_thread().name}: {filename}:{lineno}")
            return
        self.records.append({"phase": self.phase, "where": f"{filename}:{lineno}",
                             "our_frames": _package_frames(traceback.extract_stack()[:-1])[-3:]})

    @contextmanager
    def active(self):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = self.showwarning
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield self
            finally:
                torch.cuda.set_sync_debug_mode(previous)

    @contextmanager
    def in_phase(self, phase: str):
        self.phase = phase
        try:
            yield
        finally:
            self.phase = "between"


def _config(root: Path, backend: str, tmp_path: Path):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name="train", overrides=[
            f"data.root={root}", "data.image_size=128", "data.train_crop_size=0", "data.targets.min_text_size=3",
            f"loader.backend={backend}", "loader.device=gpu", "loader.batch_size=2", "loader.eval_batch_size=2",
            "loader.num_workers=2", "loader.dali_threads=2", "model.inner_channels=32", "trainer.precision=16-mixed",
            "seed=3", f"output_dir={tmp_path}"])


def _batches(loader):
    """Batches across epochs (every ``iter()`` is a new epoch)."""
    while True:
        for batch in loader:
            yield batch


def _pageable(batch: dict) -> list[str]:
    return sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor) and not v.is_cuda and not v.is_pinned())


@pytest.mark.parametrize("backend", ["dali", "cpu"])
def test_training_step_makes_no_host_sync_of_ours(backend, tiny_root, tmp_path, record_property):
    cfg = _config(tiny_root, backend, tmp_path)
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)
    datamodule = OCRDataModule(cfg, splits=("train",))
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert (datamodule.choice.backend, datamodule.choice.device) == (backend, "gpu")
    module = DBNetModule(OmegaConf.to_container(cfg.model, resolve=True)).to(device)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    loader = datamodule.train_dataloader()
    stream = _batches(loader)
    recorder = SyncRecorder()
    pageable: set[str] = set()

    phase = recorder.in_phase

    def step(i: int) -> torch.Tensor:
        with phase("fetch"):
            batch = next(stream)
        pageable.update(_pageable(batch))
        with phase("transfer"):
            batch = datamodule.transfer_batch_to_device(batch, device, 0)
        with phase("after_transfer"):
            batch = datamodule.on_after_batch_transfer(batch, 0)
        with phase("forward_loss"), torch.autocast("cuda", dtype=torch.float16):
            loss = module.training_step(batch, i)  # self.log without a trainer: a warning, nothing logged
        with phase("backward"):
            scaler.scale(loss).backward()
        with phase("optimizer"):  # Lightning: unscale, clip (trainer.gradient_clip_val), scaler step
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(module.parameters(), float(cfg.trainer.gradient_clip_val))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        assert batch["images"].is_cuda and batch["prob_maps"].is_cuda
        return loss.detach()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(WARMUP_STEPS):
                step(i)
        torch.cuda.synchronize()
        losses = []
        with recorder.active():
            for i in range(WARMUP_STEPS, WARMUP_STEPS + CHECKED_STEPS):
                losses.append(step(i))
    finally:
        stream.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    torch.cuda.synchronize()
    assert all(torch.isfinite(loss).item() for loss in losses)

    ours = [r for r in recorder.records if r["phase"] in OUR_PHASES]
    framework = [r for r in recorder.records if r["phase"] not in OUR_PHASES]
    record_property("framework_syncs", [f"{r['phase']}: {r['where']}" for r in framework])
    record_property("framework_syncs_listed", list(FRAMEWORK_SYNCS))
    record_property("pageable_host_tensors", sorted(pageable))
    record_property("other_thread_syncs", recorder.other_threads)
    print(f"{backend}: {len(framework)} framework sync(s) in {CHECKED_STEPS} steps "
          f"({sorted({r['where'] for r in framework})}); pageable host tensors: {sorted(pageable)}")
    assert not ours, (
        f"{len(ours)} host synchronisation(s) in {CHECKED_STEPS} training steps of ours ({backend} loader on the GPU):\n"
        + "\n".join(f"  {r['phase']}: {r['where']}  <- {' <- '.join(reversed(r['our_frames'])) or '(no repo frame)'}"
                    for r in ours))
    # the optimizer phase's synchronisations are torch's own (the GradScaler's found_inf read)
    assert all(not r["our_frames"] for r in framework), framework
