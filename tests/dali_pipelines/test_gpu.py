"""The GPU graphs (skipped without CUDA): nvJPEG decode (``device="mixed"``), warp and
normalisation on the GPU, DB targets on CUDA, the Batch on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dali_pipelines.loader import DaliLoader
from ocr.data.batch import TARGET_KEYS, attach_targets
from ocr.data.dataset import ThreadedLoader, ValidatedOCRDataset
from ocr.data.transforms import TransformParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TARGET_KW = dict(min_text_size=3)


def _loader(source, device, train, **kw):
    params = TransformParams(image_size=160, train=train, reduced_decode=False)
    return DaliLoader(source, params, TARGET_KW, batch_size=2, shuffle=train, drop_last=False, seed=3, device=device,
                      num_threads=2, **kw)


def test_eval_batch_on_cuda_matches_dali_cpu(val_source):
    gpu, cpu = _loader(val_source, "gpu", False), _loader(val_source, "cpu", False)
    try:
        for g, c in zip(gpu, cpu, strict=True):
            assert g["images"].is_cuda and g["images"].dtype == torch.float32
            assert g["images"].shape == c["images"].shape
            for key in TARGET_KEYS:
                assert g[key].is_cuda and g[key].shape == (len(g["names"]), 1, 160, 160)
            assert g["names"] == c["names"] and torch.equal(g["matrices"], c["matrices"])
            # nvJPEG vs libjpeg-turbo (chroma upsampling, IDCT) and GPU vs CPU resampling
            diff = (g["images"].cpu() - c["images"]).abs()
            assert diff.mean() < 0.03, float(diff.mean())
            for key in ("prob_maps", "prob_masks", "thresh_masks"):
                assert (g[key].cpu() != c[key]).float().mean() < 1e-3, key
            assert (g["thresh_maps"].cpu() - c["thresh_maps"]).abs().mean() < 1e-4
    finally:
        gpu.close()
        cpu.close()


def test_train_batch_on_cuda_draws_the_cpu_backend_geometry(train_source):
    params = TransformParams(image_size=160, train=True, reduced_decode=False)
    gpu = _loader(train_source, "gpu", True)
    cpu = ThreadedLoader(ValidatedOCRDataset(train_source, params, target_kwargs=TARGET_KW, target_mode="vectorized"),
                         batch_size=2, shuffle=True, drop_last=False, seed=3, num_threads=2)
    try:
        for g, c in zip(gpu, cpu, strict=True):
            assert g["names"] == c["names"] and torch.equal(g["matrices"], c["matrices"])
            assert g["images"].is_cuda and g["prob_maps"].is_cuda
            for ng, nc in zip(g["net_polygons"], c["net_polygons"]):
                assert all(np.abs(a - b).max() < 1e-3 for a, b in zip(ng, nc, strict=True))
            assert (g["images"].cpu() - c["images"]).abs().mean() < 0.05
    finally:
        gpu.close()
        cpu.close()


def test_targets_on_cuda_equal_targets_on_cpu(val_source):
    loader = _loader(val_source, "gpu", False)
    try:
        batch = next(iter(loader))
        on_cpu = attach_targets({**batch, "images": batch["images"].cpu()}, TARGET_KW)
        for key in ("prob_maps", "prob_masks", "thresh_masks"):
            assert torch.equal(batch[key].cpu(), on_cpu[key]), key
        assert torch.allclose(batch["thresh_maps"].cpu(), on_cpu["thresh_maps"], atol=1e-5)
    finally:
        loader.close()


def test_parallel_source_with_gpu_pipeline(train_source):
    loader = _loader(train_source, "gpu", True, parallel=True)
    try:
        next(iter(loader))  # abandoned
        batches = list(loader)
        assert [len(b["names"]) for b in batches] == [2, 2, 2, 1]
        assert all(b["images"].is_cuda for b in batches)
    finally:
        loader.close()
