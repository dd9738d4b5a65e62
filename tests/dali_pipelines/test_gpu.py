"""The GPU graphs (skipped without CUDA): nvJPEG decode (``device="mixed"``), warp and
normalisation on the GPU, DB targets rendered on CUDA from the geometry the loader workers
prepared, the Batch on the GPU. (Both graphs' definitions with ``device="gpu"`` are checked on
every commit, without CUDA, by ``test_graph_definition.py``.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dali_pipelines.loader import DaliLoader
from ocr.data.batch import GEOMETRY_KEY, TARGET_KEYS, attach_targets, batch_to
from ocr.data.dataset import ProcessLoader, ThreadedLoader, ValidatedOCRDataset
from ocr.data.transforms import TransformParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TARGET_KW = dict(min_text_size=3)
EXACT = ("prob_maps", "prob_masks", "thresh_masks")


def _loader(source, device, train, **kw):
    params = TransformParams(image_size=160, train=train, reduced_decode=False)
    return DaliLoader(source, params, TARGET_KW, batch_size=2, shuffle=train, drop_last=False, seed=3, device=device,
                      num_threads=2, **kw)


def _same_targets(got: dict, want: dict) -> None:
    """Targets rendered from the same geometry on CUDA and on the CPU: equal maps and masks, the
    threshold map up to float rounding."""
    for key in EXACT:
        assert torch.equal(got[key].cpu(), want[key].cpu()), key
    assert torch.allclose(got["thresh_maps"].cpu(), want["thresh_maps"].cpu(), atol=1e-5)


def test_eval_batch_on_cuda_matches_dali_cpu(val_source):
    gpu, cpu = _loader(val_source, "gpu", False), _loader(val_source, "cpu", False)
    try:
        for g, c in zip(gpu, cpu, strict=True):
            assert g["images"].is_cuda and g["images"].dtype == torch.float32
            assert g["images"].shape == c["images"].shape
            for key in TARGET_KEYS:
                assert g[key].is_cuda and g[key].shape == (len(g["names"]), 1, 160, 160)
            assert g["names"] == c["names"] and torch.equal(g["matrices"], c["matrices"])
            # nvJPEG (fancy upsampling, like libjpeg) vs libjpeg-turbo's IDCT, GPU vs CPU resampling
            diff = (g["images"].cpu() - c["images"]).abs()
            assert diff.mean() < 0.03, float(diff.mean())
            # the geometry comes from the same external-source code: the targets differ only by
            # where they were rendered
            _same_targets(g, c)
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
            for ng, nc in zip(g["net_polygons"], c["net_polygons"]):  # geometry.transform_polygons in both
                assert all(np.array_equal(a, b) for a, b in zip(ng, nc, strict=True))
            _same_targets(g, c)
            assert (g["images"].cpu() - c["images"]).abs().mean() < 0.05
    finally:
        gpu.close()
        cpu.close()


def test_targets_on_cuda_equal_targets_on_cpu(val_source):
    loader = _loader(val_source, "gpu", False)
    try:
        batch = next(iter(loader))
        on_cpu = attach_targets({**batch, "images": batch["images"].cpu()}, TARGET_KW)  # from net_polygons
        _same_targets(batch, on_cpu)
    finally:
        loader.close()


@pytest.mark.parametrize("train", [False, True])
def test_geometry_from_the_external_source_rendered_on_cuda(train_source, val_source, train):
    """The GPU paths' split of the targets: the DALI loader's parallel external source prepares the
    geometry, the training thread only renders it on the device; same maps as rendering in the
    loader."""
    source = train_source if train else val_source
    rendered = _loader(source, "gpu", train, parallel=True)
    deferred = _loader(source, "gpu", train, parallel=True, render_targets=False)
    try:
        for r, d in zip(rendered, deferred, strict=True):
            assert r["names"] == d["names"] and GEOMETRY_KEY in d and "prob_maps" not in d
            attach_targets(d, TARGET_KW)
            assert GEOMETRY_KEY not in d and d["prob_maps"].is_cuda
            _same_targets(d, r)
    finally:
        rendered.close()
        deferred.close()


def test_geometry_from_worker_processes_rendered_on_cuda(val_source):
    """The CPU backend on a GPU machine: worker processes prepare the geometry, the batch arrives in
    pinned memory, the targets are rendered on the device after the transfer."""
    params = TransformParams(image_size=160, train=False, reduced_decode=False)
    want = list(ThreadedLoader(ValidatedOCRDataset(val_source, params, target_kwargs=TARGET_KW,
                                                   target_mode="vectorized"),
                               batch_size=2, shuffle=False, drop_last=False, seed=3, num_threads=2))
    procs = ProcessLoader(ValidatedOCRDataset(val_source, params, target_kwargs=TARGET_KW, target_mode="deferred"),
                          batch_size=2, shuffle=False, drop_last=False, seed=3, num_workers=2, pin_memory=True)
    device = torch.device("cuda", torch.cuda.current_device())
    for got, w in zip(procs, want, strict=True):
        assert GEOMETRY_KEY in got and "prob_maps" not in got and got["images"].is_pinned()
        got = attach_targets(batch_to(got, device, non_blocking=True), TARGET_KW)
        assert got["prob_maps"].is_cuda
        _same_targets(got, w)
    procs.close()


def test_parallel_source_with_gpu_pipeline(train_source):
    loader = _loader(train_source, "gpu", True, parallel=True)
    try:
        next(iter(loader))  # abandoned
        batches = list(loader)
        assert [len(b["names"]) for b in batches] == [2, 2, 2, 1]
        assert all(b["images"].is_cuda for b in batches)
    finally:
        loader.close()
