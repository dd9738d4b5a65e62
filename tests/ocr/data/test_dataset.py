"""The CPU backend's two loaders: loader threads (ThreadedLoader) and DataLoader worker
processes (ProcessLoader) run one epoch plan, so they give the same batches, bit for bit,
sharded by rank, epoch after epoch, whichever worker builds a sample."""

from __future__ import annotations

import pytest
import torch

from ocr.data.annotations import load_annotations
from ocr.data.dataset import ProcessLoader, ThreadedLoader, ValidatedOCRDataset
from ocr.data.source import SampleSource
from ocr.data.synthetic import generate_dataset
from ocr.data.transforms import TransformParams

SIZE = 64
TARGET_KW = {"shrink_ratio": 0.4, "thresh_min": 0.3, "thresh_max": 0.7, "min_text_size": 3}
TENSORS = ("images", "matrices", "orig_sizes", "prob_maps", "prob_masks", "thresh_maps", "thresh_masks")
NUM_TRAIN = 7


@pytest.fixture(scope="module")
def train_source(tmp_path_factory) -> SampleSource:
    root = tmp_path_factory.mktemp("loaders") / "receipts"
    generate_dataset(root, num_train=NUM_TRAIN, num_val=1, num_test=1, seed=21, progress=False)
    return SampleSource(load_annotations(root / "jsons" / "train.json", root / "images" / "train"), split="train")


def _dataset(source, train: bool = True) -> ValidatedOCRDataset:
    return ValidatedOCRDataset(source, TransformParams(image_size=SIZE, train=train), target_kwargs=TARGET_KW,
                               target_mode="vectorized")


def _epochs(loader, epochs: int) -> list[list[dict]]:
    """What Lightning does: ``iter()`` (twice before the first epoch), ``set_epoch``, run the epoch."""
    out = []
    iter(loader)
    for epoch in range(epochs):
        iterator = iter(loader)
        loader.sampler.set_epoch(epoch)
        out.append(list(iterator))
    return out


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["names"] == b["names"]
        for key in TENSORS:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_worker_processes_give_the_threaded_loaders_augmented_batches(train_source):
    kw = dict(batch_size=3, shuffle=True, drop_last=False, seed=7)
    threads = ThreadedLoader(_dataset(train_source), num_threads=2, **kw)
    procs = ProcessLoader(_dataset(train_source), num_workers=2, **kw)
    try:
        want, got = _epochs(threads, 2), _epochs(procs, 2)
        assert len(procs) == len(threads) == 3
        for epoch in range(2):
            _assert_same(got[epoch], want[epoch])
        # each epoch reshuffled and augmented anew: the plan and the per-sample streams, not a worker's RNG
        assert [b["names"] for b in got[0]] != [b["names"] for b in got[1]]
        first = {n: b["images"][i] for b in got[0] for i, n in enumerate(b["names"])}
        second = {n: b["images"][i] for b in got[1] for i, n in enumerate(b["names"])}
        assert all(not torch.equal(first[n], second[n]) for n in first)
    finally:
        threads.close()
        procs.close()


def test_worker_processes_shard_by_rank_with_equal_batch_counts(train_source):
    """Two ranks of 7 samples: 4 each (one wrapped around), every sample seen in an epoch, the
    threaded loader's shard on each rank."""
    kw = dict(batch_size=2, shuffle=True, drop_last=False, seed=3, world_size=2)
    ranks = [ProcessLoader(_dataset(train_source), num_workers=1, rank=r, **kw) for r in (0, 1)]
    threads = ThreadedLoader(_dataset(train_source), num_threads=1, rank=1, **kw)
    try:
        epochs = [_epochs(loader, 2) for loader in ranks]
        assert [len(loader) for loader in ranks] == [2, 2]
        names = sorted(p.name for p in train_source.samples[0].path.parent.iterdir())
        for epoch in range(2):
            seen = [n for rank in epochs for b in rank[epoch] for n in b["names"]]
            assert len(seen) == 8 and sorted(set(seen)) == names
        _assert_same(epochs[1][1], _epochs(threads, 2)[1])
    finally:
        threads.close()
        for loader in ranks:
            loader.close()


def test_worker_processes_resume_at_an_epoch_and_recover_from_an_abandoned_one(train_source):
    """A loader set to epoch 2 (a resumed run) gives the batches of the uninterrupted run's epoch
    2, after an epoch abandoned mid-way (Lightning's sanity check) on the same workers."""
    kw = dict(batch_size=2, shuffle=True, drop_last=True, seed=5)
    straight = ProcessLoader(_dataset(train_source), num_workers=2, **kw)
    resumed = ProcessLoader(_dataset(train_source), num_workers=2, **kw)
    try:
        want = _epochs(straight, 3)[2]
        abandoned = iter(resumed)
        resumed.sampler.set_epoch(0)
        next(abandoned)
        iterator = iter(resumed)
        resumed.sampler.set_epoch(2)
        _assert_same(list(iterator), want)
        assert len(want) == NUM_TRAIN // 2
    finally:
        straight.close()
        resumed.close()
