"""Iterator semantics of the DALI loader (DALI's CPU operators) and of the CPU backend's
threaded loader, which share ``ocr.data.sampling.EpochPlan``: len(), the last partial
batch, drop_last, reshuffling per epoch, abandoned epochs, sharding by rank."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dali_helpers import MemorySource, text_image
from dali_pipelines.loader import DaliLoader, build_dali_loader
from ocr.data import geometry
from ocr.data.backends import BackendChoice
from ocr.data.dataset import ThreadedLoader, ValidatedOCRDataset
from ocr.data.sampling import EpochPlan
from ocr.data.transforms import TransformParams

SIZE = 96
TARGET_KW = dict(min_text_size=3)


def make_loader(kind, source, *, train=True, batch_size=3, shuffle=True, drop_last=False, seed=0, rank=0,
                world_size=1, with_targets=True, **kw):
    params = TransformParams(image_size=SIZE, train=train)
    if kind == "dali":
        return DaliLoader(source, params, TARGET_KW, batch_size, shuffle, drop_last, seed, with_targets, device="cpu",
                          num_threads=2, rank=rank, world_size=world_size, **kw)
    dataset = ValidatedOCRDataset(source, params, with_targets=with_targets, target_kwargs=TARGET_KW,
                                  target_mode="vectorized")
    return ThreadedLoader(dataset, batch_size, shuffle, drop_last, seed, num_threads=2, rank=rank,
                          world_size=world_size)


def names(loader) -> list[list[str]]:
    return [batch["names"] for batch in loader]


@pytest.fixture(params=["dali", "threads"])
def kind(request):
    return request.param


def _close(*loaders):
    for loader in loaders:
        loader.close()


def test_len_partial_last_batch_and_drop_last(kind, train_source):
    keep = make_loader(kind, train_source, drop_last=False)
    drop = make_loader(kind, train_source, drop_last=True)
    try:
        assert len(train_source) == 7
        assert len(keep) == 3 and len(drop) == 2
        batches = list(keep)
        assert [len(b["names"]) for b in batches] == [3, 3, 1]
        last = batches[-1]
        assert last["images"].shape == (1, 3, SIZE, SIZE) and last["prob_maps"].shape == (1, 1, SIZE, SIZE)
        assert last["matrices"].shape == (1, 3, 3) and last["orig_sizes"].shape == (1, 2)
        assert sorted(sum((b["names"] for b in batches), [])) == sorted(s.name for s in train_source.samples)
        assert [len(n) for n in names(drop)] == [3, 3]
    finally:
        _close(keep, drop)


def test_reshuffles_every_epoch_reproducibly(kind, train_source):
    a = make_loader(kind, train_source, seed=3)
    b = make_loader(kind, train_source, seed=3)
    try:
        epochs = [sum(names(a), []) for _ in range(3)]
        assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
        assert len({tuple(e) for e in epochs}) == 3  # a new order every epoch
        assert [sum(names(b), []) for _ in range(3)] == epochs  # same seed, same orders
        b.sampler.set_epoch(1)  # what Lightning calls before an epoch
        assert sum(names(b), []) == epochs[1]
    finally:
        _close(a, b)


def test_abandoned_epoch_does_not_break_the_next(kind, train_source):
    loader = make_loader(kind, train_source, seed=1)
    reference = make_loader(kind, train_source, seed=1)
    try:
        want = [names(reference) for _ in range(4)]
        first = next(iter(loader))  # e.g. limit_train_batches=1 / a sanity check
        assert first["names"] == want[0][0]
        assert names(loader) == want[1]  # the next epoch complete, and epoch 1's order
        iter(loader)  # dropped without a single batch (Lightning's iterable check): uses no epoch
        assert names(loader) == want[2]
        it = iter(loader)
        next(it)
        next(it)  # abandoned after two batches, one left in flight
        assert len(list(loader)) == 3
    finally:
        _close(loader, reference)


def test_lightning_call_order_runs_the_epoch_it_sets(kind, train_source):
    """Lightning calls iter() twice before set_epoch, and on resume sets the checkpoint's
    epoch after its last iter(): the iterator runs the epoch set before its first batch."""
    loader = make_loader(kind, train_source, seed=1)
    reference = make_loader(kind, train_source, seed=1)
    try:
        want = [names(reference) for _ in range(3)]
        iter(loader)
        it = iter(loader)
        loader.sampler.set_epoch(2)  # resuming after epoch 1
        assert [b["names"] for b in it] == want[2]
        loader.sampler.set_epoch(0)
        assert names(loader) == want[0] != want[2]
    finally:
        _close(loader, reference)


def test_eval_loader_is_deterministic_after_a_sanity_check(kind, val_source):
    loader = make_loader(kind, val_source, train=False, shuffle=False, batch_size=2)
    try:
        it = iter(loader)
        sanity = [next(it) for _ in range(2)]  # Lightning's num_sanity_val_steps=2
        full = list(loader)
        assert [len(b["names"]) for b in full] == [2, 2, 1]
        for s, f in zip(sanity, full):
            assert s["names"] == f["names"] and torch.equal(s["images"], f["images"])
            assert torch.equal(s["prob_maps"], f["prob_maps"])
    finally:
        _close(loader)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_by_rank(kind, train_source, drop_last):
    loaders = [make_loader(kind, train_source, rank=r, world_size=2, drop_last=drop_last, batch_size=2, seed=4)
               for r in range(2)]
    try:
        per_rank = [sum(names(l), []) for l in loaders]
        assert len(loaders[0]) == len(loaders[1])  # every rank runs the same number of steps
        if drop_last:
            assert set(per_rank[0]).isdisjoint(per_rank[1]) and len(per_rank[0]) == len(per_rank[1]) == 2
        else:
            assert set(per_rank[0]) | set(per_rank[1]) == {s.name for s in train_source.samples}
            assert len(per_rank[0]) == len(per_rank[1]) == 4  # 7 samples padded to 8 by wrapping
    finally:
        _close(*loaders)


def test_epoch_plan_matches_distributed_sampler_sizes():
    for n, world, bs in [(7, 2, 2), (10, 3, 4), (5, 4, 1), (100, 8, 3)]:
        for drop_last in (False, True):
            plans = [EpochPlan(n, bs, True, drop_last, 0, r, world) for r in range(world)]
            lengths = {p.num_batches for p in plans}
            assert len(lengths) == 1
            for p in plans:
                assert len(p.batches(2)) == p.num_batches
                assert all(len(b) == bs for b in p.batches(2)[:-1])


def test_ragged_polygons_reach_torch_intact():
    h, w = 120, 160
    polys = [
        [np.array([[10, 10], [60, 12], [58, 30], [9, 28]], np.float32)],
        [],  # an image without text
        [np.array([[20, 40], [90, 40], [90, 60], [55, 70], [20, 60]], np.float32),  # 5 vertices
         np.array([[100, 80], [150, 80], [150, 100], [100, 100]], np.float32)],
    ]
    images = [text_image(h, w, (10, 10, 60, 30), seed=k) for k in range(3)]
    source = MemorySource(images, polys)
    loader = make_loader("dali", source, train=False, shuffle=False, batch_size=3)
    try:
        (batch,) = list(loader)
        assert [len(p) for p in batch["net_polygons"]] == [1, 0, 2]
        for k in range(3):
            m = batch["matrices"][k].numpy()
            assert np.array_equal(m, geometry.eval_matrix(h, w, SIZE))
            for got, orig in zip(batch["net_polygons"][k], polys[k], strict=True):
                assert got.shape == orig.shape and got.dtype == np.float32
                np.testing.assert_allclose(got, geometry.transform_points(m, orig), atol=1e-4)
            assert [p.shape for p in batch["polygons"][k]] == [p.shape for p in polys[k]]
        assert batch["prob_maps"][1].sum() == 0 and batch["prob_maps"][0].sum() > 0
        assert batch["ignore"] == [[False], [], [False, False]]
    finally:
        loader.close()


def test_close_removes_the_control_file(train_source):
    loader = make_loader("dali", train_source)
    next(iter(loader))
    path = loader._control.path
    assert os.path.exists(path)
    loader.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize("warm_up_fails", [False, True])
def test_a_new_pipeline_first_runs_the_largest_images(monkeypatch, train_source, warm_up_fails):
    """Each pipeline starts with one batch of the split's largest images (DALI's host pool then
    grows to its working size at once, not epochs later: benchmarks/soak.py); the epochs after
    it are the plan's, as the threaded loader's. A warm-up that fails is dropped, not raised."""
    from dali_pipelines.source import WARMUP_EPOCH, DaliBatchSource

    calls, real = [], DaliBatchSource.sample_inputs

    def recording(self, index, epoch):
        calls.append((int(index), int(epoch)))
        if warm_up_fails and epoch == WARMUP_EPOCH:
            raise RuntimeError("warm-up decode failed")
        return real(self, index, epoch)

    monkeypatch.setattr(DaliBatchSource, "sample_inputs", recording)
    dali, threads = make_loader("dali", train_source), make_loader("threads", train_source)
    try:
        got, want = list(dali), list(threads)
        pixels = [h * w for h, w in train_source.sizes]
        largest = sorted(range(len(pixels)), key=lambda i: (-pixels[i], i))[:3]
        assert len(set(pixels)) > 1  # the choice is not just the first three
        warm = [i for i, e in calls if e == WARMUP_EPOCH]
        assert warm == (largest[:1] if warm_up_fails else largest)
        assert [e for _, e in calls if e != WARMUP_EPOCH] == [0] * len(train_source)
        assert [b["names"] for b in got] == [b["names"] for b in want]
    finally:
        _close(dali, threads)


def test_parallel_external_source_gives_the_same_batches(train_source):
    """py_start_method="spawn" workers (what runs under Lightning): same batches as the
    in-process source, and an abandoned epoch is cancelled in the workers."""
    serial = make_loader("dali", train_source, seed=2)
    parallel = build_dali_loader(BackendChoice("dali", "cpu", "vectorized", 2, 2, "test"), train_source,
                                 TransformParams(image_size=SIZE, train=True), TARGET_KW, 3, True, False, 2,
                                 parallel=True, rank=0, world_size=1)
    try:
        assert parallel.parallel
        next(iter(parallel))  # abandoned
        want = [names(serial) for _ in range(2)][1]
        got = list(parallel)
        assert [b["names"] for b in got] == want
        again = list(make_loader("dali", train_source, seed=2, parallel=False))  # epoch 0 in-process
        parallel.set_epoch(0)
        for a, b in zip(list(parallel), again, strict=True):
            assert a["names"] == b["names"] and torch.equal(a["images"], b["images"])
            assert torch.equal(a["matrices"], b["matrices"])
    finally:
        _close(serial, parallel)


def _forbid_geometry_in_this_thread(monkeypatch):
    """prepare_polygons (the per-polygon target geometry) raises when the calling thread runs it."""
    import threading

    from ocr.data import targets

    real, main = targets.prepare_polygons, (os.getpid(), threading.get_ident())
    calls = {"workers": 0}

    def guarded(*args, **kwargs):  # (a forked DataLoader worker inherits the patch and the thread id)
        if (os.getpid(), threading.get_ident()) == main:
            raise AssertionError("target geometry computed on the training thread")
        calls["workers"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(targets, "prepare_polygons", guarded)
    return calls


def _maps(batch) -> dict:
    from ocr.data.batch import TARGET_KEYS

    return {k: batch[k] for k in TARGET_KEYS}


@pytest.mark.parametrize("split", ["train", "val"])
def test_deferred_targets_leave_only_rendering_to_the_training_thread(monkeypatch, train_source, val_source, split):
    """The GPU paths' host side, run here on the CPU: the CPU backend's deferred mode (loader threads
    and worker processes) and the DALI loader without rendering (parallel external source) hand the
    training thread the batch's packed geometry; rendering it gives the maps of the normal path."""
    from ocr.data.batch import GEOMETRY_KEY, attach_targets
    from ocr.data.dataset import ProcessLoader

    source = train_source if split == "train" else val_source
    params = TransformParams(image_size=SIZE, train=split == "train")
    kw = dict(batch_size=3, shuffle=split == "train", drop_last=False, seed=4)
    want = list(ThreadedLoader(ValidatedOCRDataset(source, params, target_kwargs=TARGET_KW, target_mode="vectorized"),
                               num_threads=2, **kw))
    calls = _forbid_geometry_in_this_thread(monkeypatch)
    deferred = ThreadedLoader(ValidatedOCRDataset(source, params, target_kwargs=TARGET_KW, target_mode="deferred"),
                              num_threads=2, **kw)
    procs = ProcessLoader(ValidatedOCRDataset(source, params, target_kwargs=TARGET_KW, target_mode="deferred"),
                          num_workers=1, **kw)
    dali = DaliLoader(source, params, TARGET_KW, device="cpu", num_threads=2, parallel=True, py_num_workers=1,
                      helper_thread=False, render_targets=False, **kw)
    try:
        got_threads, got_dali, got_procs = list(deferred), list(dali), list(procs)
        assert calls["workers"] > 0  # the loader threads did it
        for got in (got_threads, got_dali, got_procs):
            for a, b in zip(got, want, strict=True):
                assert a["names"] == b["names"] and "prob_maps" not in a and GEOMETRY_KEY in a
                attach_targets(a, TARGET_KW)
                assert GEOMETRY_KEY not in a
                for key, value in _maps(b).items():
                    assert torch.equal(a[key], value), key
    finally:
        _close(deferred, dali, procs)
