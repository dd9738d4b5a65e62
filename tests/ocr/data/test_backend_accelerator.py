"""``trainer.accelerator`` decides the data path too: a CPU model on a CUDA machine gets the CPU path."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ocr.data.backends import BackendError, choose_backend


def _loader(**kw):
    return OmegaConf.create({"backend": "auto", "device": "auto", "targets": "auto", "num_workers": 2,
                             "dali_threads": 2, **kw})


def _trainer(accelerator):
    return OmegaConf.create({"accelerator": accelerator})


@pytest.mark.parametrize("accelerator", ["cpu", "mps"])
def test_cpu_accelerator_on_a_cuda_machine_takes_the_cpu_path(accelerator):
    choice = choose_backend(_loader(), cuda_available=True, trainer_cfg=_trainer(accelerator))
    assert (choice.backend, choice.device, choice.cpu_loader) == ("cpu", "cpu", "threads")
    assert f"trainer.accelerator={accelerator}: the CPU backend" in choice.reason


@pytest.mark.parametrize("accelerator", ["auto", "gpu", "cuda", None])
def test_cuda_accelerators_keep_the_gpu_path(accelerator):
    trainer = None if accelerator is None else _trainer(accelerator)
    choice = choose_backend(_loader(backend="cpu"), cuda_available=True, trainer_cfg=trainer)
    assert choice.device == "gpu"


def test_dali_on_cpu_when_asked_for_explicitly():
    pytest.importorskip("nvidia.dali")
    choice = choose_backend(_loader(backend="dali"), cuda_available=True, trainer_cfg=_trainer("cpu"))
    assert (choice.backend, choice.device) == ("dali", "cpu")


def test_gpu_data_with_a_cpu_model_is_refused():
    with pytest.raises(BackendError, match="loader.device=gpu but trainer.accelerator=cpu"):
        choose_backend(_loader(device="gpu"), cuda_available=True, trainer_cfg=_trainer("cpu"))


def test_datamodule_passes_the_trainer_group(monkeypatch, tmp_path):
    """OCRDataModule hands ``cfg.trainer`` to choose_backend (a CUDA machine simulated)."""
    import torch

    from ocr.data.datamodule import OCRDataModule
    from small_data import compose_small

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = compose_small(tmp_path, "loader.backend=auto", "loader.device=auto", "trainer.accelerator=cpu")
    dm = OCRDataModule(cfg, splits=("val",))
    assert (dm.choice.backend, dm.choice.device) == ("cpu", "cpu")
    cfg = compose_small(tmp_path, "loader.backend=cpu", "loader.device=auto", "trainer.accelerator=auto")
    assert OCRDataModule(cfg, splits=("val",)).choice.device == "gpu"


@pytest.mark.parametrize("cuda, cpu_loader, expect", [
    (False, "auto", "threads"), (True, "auto", "processes"),  # auto: threads on the CPU, processes next to a GPU
    (False, "processes", "processes"), (True, "threads", "threads"),
])
def test_cpu_loader_kind_is_chosen_or_as_configured(cuda, cpu_loader, expect):
    choice = choose_backend(_loader(backend="cpu", cpu_loader=cpu_loader), cuda_available=cuda)
    assert choice.cpu_loader == expect
    assert ("worker processes" if expect == "processes" else "loader threads") in choice.reason


def test_unknown_cpu_loader_is_refused():
    with pytest.raises(BackendError, match="loader.cpu_loader: 'workers' is not one of auto, threads, processes"):
        choose_backend(_loader(backend="cpu", cpu_loader="workers"), cuda_available=False)
