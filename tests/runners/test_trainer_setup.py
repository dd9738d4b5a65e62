"""What ocr.training.run builds the Trainer with: ``*-true`` precisions that cast only the
images of a batch, the GPU memory cap on each rank's own device, and the refusal to train on
the CPU by accident when torch cannot use the GPUs NVML sees."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from ocr.config import register_configs
from ocr.hardware import GPUInfo, HardwareInfo
from ocr.training.run import (BatchHalfPrecision, ConfigError, GpuMemoryFraction, ballast_bytes, build_trainer,
                              check_cuda_usable, precision_args, torch_fraction)

REPO = Path(__file__).resolve().parents[2]


def _batch(b: int = 2) -> dict:
    m = torch.tensor([[0.3217, 0.0, 0.0], [0.0, 0.3217, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return {
        "images": torch.randn(b, 3, 16, 16),
        "prob_maps": torch.rand(b, 1, 16, 16),
        "thresh_maps": 0.3 + 0.4 * torch.rand(b, 1, 16, 16),
        "matrices": m.repeat(b, 1, 1) + 1e-7 * torch.arange(b, dtype=torch.float64)[:, None, None],
        "orig_sizes": torch.tensor([[2000, 1500]] * b),
        "polygons": [[torch.zeros(4, 2).numpy()] for _ in range(b)],
        "names": [f"{i}.jpg" for i in range(b)],
    }


@pytest.mark.parametrize("precision,dtype", [("bf16-true", torch.bfloat16), ("16-true", torch.float16)])
def test_convert_input_casts_only_the_images(precision, dtype):
    batch = _batch()
    out = BatchHalfPrecision(precision).convert_input(batch)
    assert out["images"].dtype == dtype
    for key in ("prob_maps", "thresh_maps", "matrices", "orig_sizes", "polygons", "names"):
        assert out[key] is batch[key]
    assert list(out) == list(batch)
    # anything that is not a Batch is cast as Lightning does
    assert BatchHalfPrecision(precision).convert_input([torch.ones(2)])[0].dtype == dtype


def test_precision_args():
    args = precision_args("bf16-true")
    assert args["precision"] is None and isinstance(args["plugins"][0], BatchHalfPrecision)
    assert precision_args("16-mixed") == {"precision": "16-mixed", "plugins": None}
    assert precision_args("32-true") == {"precision": "32-true", "plugins": None}


class _Recorder(L.LightningModule):
    """Records what each step receives."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)
        self.seen: dict[str, dict] = {}

    def _record(self, stage, batch):
        self.seen[stage] = {k: v.dtype for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.seen[stage]["matrices_value"] = batch["matrices"].clone()

    def training_step(self, batch, batch_idx):
        self._record("train", batch)
        return self.conv(batch["images"]).float().mean() + 0 * batch["prob_maps"].mean()

    def validation_step(self, batch, batch_idx):
        self._record("val", batch)

    def predict_step(self, batch, batch_idx):
        self._record("predict", batch)
        return batch["matrices"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Loader:
    """An iterable of ready Batches, as the project's loaders are."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_bf16_true_keeps_matrices_and_targets_through_the_loops(tmp_path):
    """A real Trainer on the CPU with bf16-true: training, validation and predict steps get bf16
    images and the float64 matrices unchanged, bit for bit."""
    batches = _Loader([_batch(), _batch()])
    module = _Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), **precision_args("bf16-true"))
    assert trainer.precision == "bf16-true"
    trainer.fit(module, train_dataloaders=batches, val_dataloaders=batches)
    out = trainer.predict(module, dataloaders=batches)
    for stage in ("train", "val", "predict"):
        seen = module.seen[stage]
        assert seen["images"] == torch.bfloat16, stage
        assert seen["matrices"] == torch.float64 and seen["prob_maps"] == torch.float32, stage
        assert seen["orig_sizes"] == torch.int64, stage
        assert torch.equal(seen["matrices_value"], batches.batches[0]["matrices"]), stage
    assert out[0].dtype == torch.float64


def _compose(*overrides):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name="train", overrides=["logger.wandb.enabled=false", *overrides])


def test_build_trainer_uses_the_batch_plugin_and_the_memory_cap(tmp_path):
    cfg = _compose("trainer.precision=bf16-true", "trainer.accelerator=cpu", "trainer.gpu_memory_fraction=0.25")
    trainer = build_trainer(cfg, tmp_path, "bf16-true", [], [], validate=False)
    assert isinstance(trainer.precision_plugin, BatchHalfPrecision)
    caps = [c for c in trainer.callbacks if isinstance(c, GpuMemoryFraction)]
    assert len(caps) == 1 and caps[0].fraction == 0.25
    cfg = _compose("trainer.accelerator=cpu")
    trainer = build_trainer(cfg, tmp_path, "32-true", [], [], validate=False)
    assert not isinstance(trainer.precision_plugin, BatchHalfPrecision)
    assert not [c for c in trainer.callbacks if isinstance(c, GpuMemoryFraction)]


def test_memory_cap_is_a_no_op_on_the_cpu(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *a: calls.append(a))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path))
    GpuMemoryFraction(0.5).setup(trainer, None, "fit")
    assert calls == []


def test_ballast_leaves_the_cap_free():
    gb = 2**30
    # 80 GB card, 79 GB free, cap 0.1: hold 71 GB so 8 GB stay free; torch may hold ballast + 8 GB
    assert ballast_bytes(79 * gb, 80 * gb, 0.1) == 71 * gb
    assert torch_fraction(71 * gb, 80 * gb, 0.1) == pytest.approx(79 / 80)
    # less than the cap free already: no ballast, torch's fraction is the cap itself
    assert ballast_bytes(5 * gb, 80 * gb, 0.1) == 0
    assert torch_fraction(0, 80 * gb, 0.1) == pytest.approx(0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_cap_holds_a_ballast_on_the_trainers_device(tmp_path):
    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path))
    device = torch.device(trainer.strategy.root_device)
    total = torch.cuda.mem_get_info(device)[1]
    cap = GpuMemoryFraction(0.25)
    try:
        cap.setup(trainer, None, "fit")
        assert cap.ballast is not None and cap.ballast.device == device and cap.ballast.numel() > 0
        # what any allocator (torch, DALI, nvJPEG) can still get is the cap, not the card
        free = torch.cuda.mem_get_info(device)[0]
        assert free <= 0.25 * total + 64 * 2**20
        assert free >= 0.25 * total - 64 * 2**20
        # torch itself may still allocate most of the cap beside the ballast
        block = torch.empty(int(0.2 * total), dtype=torch.uint8, device=device)
        del block
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(0.3 * total), dtype=torch.uint8, device=device)
    finally:
        cap.teardown(trainer, None, "fit")
    assert cap.ballast is None and torch.cuda.mem_get_info(device)[0] > 0.5 * total


def _info(problem: str) -> HardwareInfo:
    return HardwareInfo(cpu_model="x", cpu_cores_logical=1, cpu_cores_physical=1, cpu_cores_usable=1, ram_total_gb=1.0,
                        ram_available_gb=1.0, gpus=[GPUInfo(0, "NVIDIA A10", 24.0, 23.0)], cuda_problem=problem)


@pytest.mark.parametrize("accelerator", ["auto", "gpu", "cuda"])
def test_unusable_gpu_is_an_error_unless_the_cpu_is_asked_for(accelerator):
    with pytest.raises(ConfigError, match="update the driver"):
        check_cuda_usable(accelerator, _info("NVML sees 1 GPU(s) ... Fix: update the driver; to train on the CPU anyway"))


def test_unusable_gpu_with_cpu_accelerator_is_one_line(caplog):
    caplog.set_level(logging.INFO)
    check_cuda_usable("cpu", _info("NVML sees 1 GPU(s) but torch cannot use them: old driver; to train on the CPU"))
    assert any("NVML sees 1 GPU(s)" in r.getMessage() for r in caplog.records)
    check_cuda_usable("auto", _info(""))  # nothing wrong: nothing said, nothing raised
