"""A GPU tensor cache is budgeted again when it starts recording (after a trained epoch),
not only when its loader is built (before any activation exists)."""

from __future__ import annotations

import logging

import torch

from ocr.data.cache import BatchCache
from ocr.data.cache_key import CacheKey
from ocr.data.memory import GB, MemoryProbe, choose_store

CUDA = torch.device("cuda", 0)  # what the probe is asked about; the fake probe answers for it
HOST = "pinned" if torch.cuda.is_available() else "host"


class ShrinkingProbe(MemoryProbe):
    """GPU memory that the training epoch takes: ``gpu_free`` is changed by the test."""

    def __init__(self, gpu_free: int, host_free: int = 64 * GB):
        self.gpu_free, self.host_free = gpu_free, host_free

    def gpu(self, device):
        return (self.gpu_free, 80 * GB) if device.type == "cuda" else None

    def host(self):
        return self.host_free, 128 * GB

    def disk(self, path):
        return 500 * GB


def _batches(n: int = 3, b: int = 2):
    return [{"images": torch.full((b, 3, 8, 8), float(i)), "matrices": torch.eye(3, dtype=torch.float64).repeat(b, 1, 1),
             "names": [f"{i}_{j}" for j in range(b)]} for i in range(n)]


def _cache(probe, requested="gpu", estimate=10 * GB, tmp_path="."):
    decision = choose_store(requested, CUDA, estimate, probe, tmp_path, 0.5, what="val tensor cache")
    key = CacheKey(kind="tensors", split="val", components={"test": {"v": 1}})
    # the cache itself lives on the CPU here (no CUDA on the test machine): the decision is what is checked
    return BatchCache("val", key, decision, 3, torch.device("cpu"), tmp_path, {}, log_every=0)


def test_recheck_keeps_a_store_that_still_fits():
    probe = ShrinkingProbe(gpu_free=40 * GB)
    decision = choose_store("gpu", CUDA, 10 * GB, probe, ".", 0.5)
    assert decision.store == "gpu"
    probe.gpu_free = 30 * GB  # 15 GB usable: still fits
    assert decision.recheck() is decision


def test_recheck_degrades_to_host_then_off():
    probe = ShrinkingProbe(gpu_free=40 * GB)
    decision = choose_store("gpu", CUDA, 10 * GB, probe, ".", 0.5, what="val tensor cache")
    probe.gpu_free = 8 * GB
    later = decision.recheck()
    assert later.store == HOST and later.requested == "gpu"
    assert later.warning.startswith("val tensor cache: needs 10.00 GB but at recording time gpu has 4.00 GB usable")
    probe.host_free = 4 * GB
    off = decision.recheck()
    assert off.store == "off" and off.warning.startswith("val tensor cache disabled (it does not fit)")


def test_recheck_leaves_host_and_disk_stores_alone():
    probe = ShrinkingProbe(gpu_free=0)
    for requested in ("auto", "host", "disk"):
        decision = choose_store(requested, CUDA, GB, probe, ".", 0.5)
        assert decision.store != "gpu"
        assert decision.recheck() is decision


def test_cache_records_into_host_memory_when_the_gpu_filled_up(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    probe = ShrinkingProbe(gpu_free=40 * GB)
    cache = _cache(probe, tmp_path=tmp_path)
    assert cache.store == "gpu"
    probe.gpu_free = 6 * GB  # the trained epoch's activations and optimizer state
    batches = _batches()
    first = list(cache.iterate(batches, 3, counted=True, epoch=0))
    assert len(first) == 3 and cache.ready
    assert cache.store == HOST and cache.entry.store == HOST
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "at recording time gpu has" in warnings[0]
    summary = cache.to_dict()
    assert summary["store"] == HOST and summary["requested_store"] == "gpu"
    assert summary["passes"][0]["action"] == "record"
    replay = list(cache.iterate(batches, 3, counted=True, epoch=1))
    assert [int(b["images"][0, 0, 0, 0]) for b in replay] == [0, 1, 2]
    assert cache.to_dict()["passes"][1]["action"] == "replay"


def test_cache_turned_off_at_recording_still_serves_the_pass(tmp_path):
    probe = ShrinkingProbe(gpu_free=40 * GB)
    cache = _cache(probe, tmp_path=tmp_path)
    probe.gpu_free, probe.host_free = 1 * GB, 1 * GB
    batches = _batches()
    out = list(cache.iterate(batches, 3, counted=True, epoch=0))
    assert len(out) == 3 and not cache.ready and cache.store == "off"
    passes = cache.to_dict()["passes"]
    assert passes[0]["action"] == "miss"
    # later passes read the loader (nothing recorded, no second warning)
    assert len(list(cache.iterate(batches, 3, counted=True, epoch=1))) == 3
    assert not cache.ready
