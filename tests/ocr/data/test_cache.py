"""The batch cache: exact replay without the loader, complete passes only, stores and
their fallback, disk entries (atomic, verified, rebuilt when corrupt), keys that never
replay stale batches, and the refusal on augmented splits."""

from __future__ import annotations

import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from small_data import VAL, compose_small, tiny_dataset

from ocr.data.cache import (
    CachedLoader,
    CacheStats,
    deserialize_batch,
    entry_path,
    num_batches_for,
    read_manifest,
    serialize_batch,
    verify_entry,
)
from ocr.data.datamodule import DataConfigError, OCRDataModule
from ocr.data.memory import GB, MemoryProbe, choose_store


def compose_cfg(root, *overrides, name="train"):
    return compose_small(root, f"{VAL}.load_maps=false", *overrides, name=name)


def val_loader(root, *overrides, probe=None, stage="fit"):
    dm = OCRDataModule(compose_cfg(root, *overrides), splits=("val",), memory_probe=probe)
    dm.setup(stage)
    return dm, dm.val_dataloader()


def assert_batches_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        elif k in ("polygons", "net_polygons"):
            assert [len(x) for x in a[k]] == [len(x) for x in b[k]]
            for xa, xb in zip(a[k], b[k]):
                for pa, pb in zip(xa, xb):
                    assert pa.dtype == pb.dtype and np.array_equal(pa, pb), k
        else:
            assert a[k] == b[k], k


class CountingLoader:
    def __init__(self, loader):
        self.loader, self.batches = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for b in self.loader:
            self.batches += 1
            yield b


@pytest.fixture(scope="module")
def data_a(tmp_path_factory):
    return tiny_dataset(tmp_path_factory, "a", seed=1, num_val=5, num_train=2)


@pytest.fixture(scope="module")
def data_b(tmp_path_factory):
    return tiny_dataset(tmp_path_factory, "b", seed=2, num_val=5)


@pytest.fixture(scope="module")
def fresh_a(data_a):
    """The val batches of dataset A straight from the backend (no cache)."""
    _dm, loader = val_loader(data_a, f"{VAL}.cache_config.cache_transformed_tensors=false")
    assert not isinstance(loader, CachedLoader)
    return list(loader)


def test_replay_is_exact_and_skips_the_loader(data_a, fresh_a, caplog):
    caplog.set_level(logging.INFO)
    dm, loader = val_loader(data_a, f"{VAL}.cache_config.store=host", f"{VAL}.cache_config.log_statistics_every_n=0")
    assert isinstance(loader, CachedLoader) and len(loader) == 3
    assert "Tensor caching enabled (store=host, estimated" in caplog.text
    counting = CountingLoader(loader.loader)
    loader.loader = counting
    first = list(loader)
    assert counting.batches == 3
    for _ in range(2):
        again = list(loader)
        assert counting.batches == 3  # replayed: the loader was not touched
        for a, b, c in zip(fresh_a, first, again):
            assert_batches_equal(a, b)
            assert_batches_equal(a, c)
    stats = dm.cache_stats()["val"]["tensors"]
    assert [p["action"] for p in stats["passes"]] == ["record", "replay", "replay"]
    assert stats["hits"] == 10 and stats["misses"] == 5
    assert "Cache Statistics - Hits: 5, Misses: 0, Hit Rate: 100.0%" in caplog.text


def test_only_complete_passes_are_recorded(data_a):
    dm, loader = val_loader(data_a, f"{VAL}.cache_config.store=host", f"{VAL}.cache_config.log_statistics_every_n=0")
    counting = CountingLoader(loader.loader)
    loader.loader = counting
    it = iter(loader)
    next(it)  # e.g. Lightning's limit or an interrupted epoch: one batch of three
    del it
    cache = dm._tensor_caches["val"]
    assert not cache.ready
    # a sanity-check pass (not counted) is never recorded either
    sanity = list(cache.iterate(counting, 2, counted=False))
    assert len(sanity) == 2 and not cache.ready
    list(loader)
    assert cache.ready
    before = counting.batches
    list(loader)
    assert counting.batches == before
    assert [p["action"] for p in dm.cache_stats()["val"]["tensors"]["passes"]] == ["record", "record", "replay"]


class ShortLoader(CountingLoader):
    """Claims the real length but ends one batch early (a loader that went wrong)."""

    def __iter__(self):
        for i, b in enumerate(self.loader):
            if i == len(self.loader) - 1:
                return
            yield b


def test_a_pass_that_ends_early_is_not_recorded(data_a, tmp_path, caplog):
    for store in ("host", "disk"):
        dm, loader = val_loader(data_a, f"{VAL}.cache_config.store={store}", f"{VAL}.cache_config.cache_dir={tmp_path}")
        loader.loader = ShortLoader(loader.loader)
        caplog.clear()
        assert len(list(loader)) == 2
        assert not loader.cache.ready and "ended after 2 of 3 batches; not recording" in caplog.text
        assert not entry_path(tmp_path, loader.cache.key).exists()


def test_a_leftover_entry_directory_without_manifest_is_replaced(data_a, fresh_a, tmp_path):
    opts = (f"{VAL}.cache_config.store=disk", f"{VAL}.cache_config.cache_dir={tmp_path}")
    _dm, loader = val_loader(data_a, *opts)
    path = entry_path(tmp_path, loader.cache.key)
    path.mkdir(parents=True)
    (path / "batch_00000.pt").write_bytes(b"half-deleted")  # e.g. an interrupted removal
    recorded = list(loader)
    assert loader.cache.ready and verify_entry(path, read_manifest(path)) == []
    for a, b in zip(fresh_a, recorded):
        assert_batches_equal(a, b)


def test_limit_batches_is_part_of_the_key(data_a):
    assert num_batches_for(3, 50) == 3 and num_batches_for(3, 2) == 2
    assert num_batches_for(10, 0.5) == 5 and num_batches_for(3, 1.0) == 3

    class FakeTrainer:
        limit_val_batches, testing, sanity_checking, current_epoch = 2, False, False, 0

        class strategy:
            root_device = torch.device("cpu")

    cfg = compose_cfg(data_a, f"{VAL}.cache_config.store=host")
    dm = OCRDataModule(cfg, splits=("val",))
    dm.setup("fit")
    dm.trainer = FakeTrainer()
    loader = dm.val_dataloader()
    cache = loader.cache
    assert cache.num_batches == 2 and cache.key.components["loader"]["num_batches"] == 2
    assert len(list(loader)) == 2 and cache.ready
    assert len(list(loader)) == 2 and cache.stats.passes[-1].action == "replay"


def test_test_stage_uses_the_test_limit_and_only_the_disk_store(data_a, tmp_path):
    class TestTrainer:  # what runners/test.py builds: no validation, trainer.test() on the split's loader
        limit_val_batches, limit_test_batches, testing, sanity_checking, current_epoch = 0, 1.0, False, False, 0

        class strategy:
            root_device = torch.device("cpu")

    dm = OCRDataModule(compose_cfg(data_a, f"{VAL}.cache_config.store=disk", f"{VAL}.cache_config.cache_dir={tmp_path}"),
                       splits=("val",))
    dm.setup("test")
    dm.trainer = TestTrainer()
    loader = dm.split_loader("val")
    assert isinstance(loader, CachedLoader) and loader.cache.num_batches == 3
    assert len(list(loader)) == 3 and loader.cache.ready


def test_disk_store_is_reused_by_a_new_process_and_verified(data_a, fresh_a, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    opts = (f"{VAL}.cache_config.store=disk", f"{VAL}.cache_config.cache_dir={tmp_path}")
    dm, loader = val_loader(data_a, *opts)
    first = list(loader)
    path = entry_path(tmp_path, loader.cache.key)
    manifest = read_manifest(path)
    assert manifest["num_batches"] == 3 and verify_entry(path, manifest) == []
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    # another datamodule (a later run): replays from its first pass
    dm2, loader2 = val_loader(data_a, *opts)
    counting = CountingLoader(loader2.loader)
    loader2.loader = counting
    replayed = list(loader2)
    assert counting.batches == 0
    for a, b, c in zip(fresh_a, first, replayed):
        assert_batches_equal(a, b)
        assert_batches_equal(a, c)
    assert dm2.cache_stats()["val"]["tensors"]["passes"][0]["action"] == "replay"
    assert "verified (3 batches" in caplog.text


def test_corrupt_disk_entry_is_detected_warned_and_rebuilt(data_a, fresh_a, tmp_path, caplog):
    opts = (f"{VAL}.cache_config.store=disk", f"{VAL}.cache_config.cache_dir={tmp_path}")
    _dm, loader = val_loader(data_a, *opts)
    list(loader)
    path = entry_path(tmp_path, loader.cache.key)
    victim = path / "batch_00001.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x55
    victim.write_bytes(bytes(data))
    caplog.clear()
    caplog.set_level(logging.INFO)
    dm2, loader2 = val_loader(data_a, *opts)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and "batch_00001.pt: checksum mismatch" in warnings[0].getMessage()
    rebuilt = list(loader2)
    assert dm2.cache_stats()["val"]["tensors"]["passes"][0]["action"] == "record"
    for a, b in zip(fresh_a, rebuilt):
        assert_batches_equal(a, b)
    manifest = read_manifest(path)
    assert verify_entry(path, manifest) == []


def test_a_changed_key_never_replays_old_batches(data_a, data_b, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    opts = (f"{VAL}.cache_config.store=disk", f"{VAL}.cache_config.cache_dir={tmp_path}")
    _dm, loader = val_loader(data_a, *opts)
    list(loader)
    # switch the image folder to another dataset (annotations too): a new entry, built from B
    caplog.clear()
    _dm, loader_b = val_loader(data_a, *opts, f"{VAL}.image_path={data_b}/images/val",
                               f"{VAL}.annotation_path={data_b}/jsons/val.json")
    got = list(loader_b)
    assert loader_b.cache.stats.passes[0].action == "record"
    assert "dataset changed (image folder" in caplog.text and "annotations changed" in caplog.text
    _dm, plain_b = val_loader(data_b, f"{VAL}.cache_config.cache_transformed_tensors=false")
    for a, b in zip(plain_b, got):
        assert_batches_equal(a, b)
    # image size
    caplog.clear()
    _dm, loader_96 = val_loader(data_a, *opts, "data.image_size=96")
    got = list(loader_96)
    assert got[0]["images"].shape[-1] == 96 and loader_96.cache.stats.passes[0].action == "record"
    assert "transforms changed (image_size: 64 -> 96)" in caplog.text


def test_editing_an_image_during_a_run_rebuilds(data_a, tmp_path, caplog):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(data_a, root)
    caplog.set_level(logging.INFO)
    # not preloaded: the loader reads the files every pass, so the cache re-checks them
    _dm, loader = val_loader(root, f"{VAL}.cache_config.store=host", f"{VAL}.preload_images=false",
                             f"{VAL}.cache_config.cache_images=false")
    first = list(loader)
    img = root / "images" / "val" / "val_00000.jpg"
    pixels = cv2.imread(str(img))
    cv2.imwrite(str(img), 255 - pixels)
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    second = list(loader)
    assert loader.cache.stats.passes[-1].action == "record"
    assert "Rebuilding the val tensor cache: dataset changed" in caplog.text
    assert not torch.equal(first[0]["images"], second[0]["images"])
    assert torch.equal(first[1]["images"], second[1]["images"])


def test_tensor_cache_on_the_train_split_is_refused(data_a):
    cfg = compose_cfg(data_a, "datasets.train_dataset.config.cache_config.cache_transformed_tensors=true")
    with pytest.raises(DataConfigError) as err:
        OCRDataModule(cfg, splits=("train", "val"))
    assert "Remove the override datasets.train_dataset.config.cache_config.cache_transformed_tensors=true" in str(err.value)
    cfg = compose_cfg(data_a, "datasets.train_dataset.config.load_maps=true")
    with pytest.raises(DataConfigError, match="datasets.train_dataset.config.load_maps=true"):
        OCRDataModule(cfg, splits=("train", "val"))


class SmallProbe(MemoryProbe):
    def __init__(self, gpu_free=80 * GB, host_free=64 * GB, disk_free=500 * GB):
        self.gpu_free, self.host_free, self.disk_free = gpu_free, host_free, disk_free

    def gpu(self, device):
        return (self.gpu_free, 80 * GB) if device.type == "cuda" else None

    def host(self):
        return self.host_free, 128 * GB

    def disk(self, path):
        return self.disk_free


def test_store_fallback_chain():
    cuda = torch.device("cuda", 0)
    host = "pinned" if torch.cuda.is_available() else "host"
    d = choose_store("auto", cuda, 10 * GB, SmallProbe())
    assert d.store == "gpu" and d.warning is None
    d = choose_store("auto", cuda, 10 * GB, SmallProbe(gpu_free=4 * GB))
    assert d.store == host and d.warning is None and "needs 10.00 GB but gpu has" in d.reason  # auto: by design
    d = choose_store("gpu", cuda, 10 * GB, SmallProbe(gpu_free=4 * GB))
    assert d.store == host and d.warning.startswith("tensor cache: needs 10.00 GB but gpu has")
    d = choose_store("gpu", cuda, 10 * GB, SmallProbe(gpu_free=4 * GB, host_free=4 * GB))
    assert d.store == "off" and d.warning.startswith("tensor cache disabled (it does not fit)")
    # a model on the CPU never gets pinned memory (it would only start a CUDA context)
    d = choose_store("auto", torch.device("cpu"), 10 * GB, SmallProbe(host_free=30 * GB))
    assert d.store == "host"
    d = choose_store("disk", cuda, 10 * GB, SmallProbe(disk_free=5 * GB))
    assert d.store == "off" and "disk" in d.warning
    d = choose_store("gpu", torch.device("cpu"), GB, SmallProbe())
    assert d.store == "host" and "the model runs on cpu" in d.warning
    d = choose_store("pinned", torch.device("cpu"), GB, SmallProbe())
    assert d.store == "host"


def test_too_little_memory_degrades_with_one_warning(data_a, fresh_a, caplog):
    caplog.set_level(logging.INFO)
    dm, loader = val_loader(data_a, probe=SmallProbe(gpu_free=0, host_free=1000))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([w for w in warnings if "tensor cache" in w]) == 1, warnings
    assert len([w for w in warnings if "Not preloading val images" in w]) == 1, warnings
    assert not isinstance(loader, CachedLoader) and not dm.sources["val"].preloaded
    for a, b in zip(fresh_a, loader):
        assert_batches_equal(a, b)
    stats = dm.cache_stats()["val"]
    assert stats["tensors"]["enabled"] is False and "does not fit" in stats["tensors"]["reason"]


def test_in_memory_cache_is_skipped_for_a_single_test_pass(data_a, caplog):
    caplog.set_level(logging.INFO)
    _dm, loader = val_loader(data_a, stage="test")
    assert not isinstance(loader, CachedLoader)
    assert "a single test pass" in caplog.text


def test_disk_format_round_trip_is_exact(fresh_a):
    batch = fresh_a[0]
    back = deserialize_batch(serialize_batch(batch))
    assert_batches_equal(batch, back)
    assert isinstance(back["ignore"][0], list) and all(isinstance(x, bool) for x in back["ignore"][0])


def test_statistics_lines_and_low_hit_rate_warning(caplog):
    caplog.set_level(logging.INFO)
    stats = CacheStats("val", log_every=4)
    stats.start_pass(0, "record")
    stats.record(False, 3)
    stats.record(False, 3)  # crosses 4 accesses
    stats.end_pass("host")
    stats.start_pass(1, "miss")
    stats.record(False, 6)
    stats.end_pass("loader")
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Cache Statistics - Hits: 0, Misses: 6, Hit Rate: 0.0% (val, run total") for m in lines)
    assert any(m.startswith("Cache Statistics - Hits: 0, Misses: 6, Hit Rate: 0.0% (val epoch 0") for m in lines)
    low = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(low) == 1 and "Low cache hit rate for the val split: 0.0% in epoch 1" in low[0].getMessage()
    assert json.loads(json.dumps(stats.to_dict()))["passes"][1]["hit_rate"] == 0.0


def test_preload_decoded_keeps_eval_pixels_identical(data_a, fresh_a, caplog):
    caplog.set_level(logging.INFO)
    dm, loader = val_loader(data_a, f"{VAL}.preload_decoded=true", f"{VAL}.cache_config.cache_transformed_tensors=false")
    source = dm.sources["val"]
    assert source.has_decoded and not source.preloaded
    assert "Preloaded 5/5 decoded images into RAM (100.0%)" in caplog.text
    assert {source.decoded(i)[1] for i in range(len(source))} == {8}  # decoded at the eval JPEG reduction
    for a, b in zip(fresh_a, loader):
        assert_batches_equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_probe_respects_the_per_process_memory_cap():
    device = torch.device("cuda", torch.cuda.current_device())
    uncapped, total = MemoryProbe().gpu(device)
    torch.cuda.set_per_process_memory_fraction(0.1, device)
    try:
        capped, _ = MemoryProbe().gpu(device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert capped <= 0.1 * total < uncapped
    assert capped >= 0.1 * total - torch.cuda.memory_reserved(device) - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("store", ["gpu", "pinned"])
def test_gpu_and_pinned_stores_record_complete_device_batches(data_a, fresh_a, store):
    class CudaTrainer:
        limit_val_batches, testing, sanity_checking, current_epoch, global_rank, world_size = 1.0, False, False, 0, 0, 1

        class strategy:
            root_device = torch.device("cuda", 0)

    # the CPU backend with targets deferred to the device: the cache must attach them
    cfg = compose_cfg(data_a, "loader.device=gpu", f"{VAL}.cache_config.store={store}")
    dm = OCRDataModule(cfg, splits=("val",))
    dm.setup("fit")
    dm.trainer = CudaTrainer()
    loader = dm.val_dataloader()
    assert loader.cache.store == store
    first = list(loader)
    assert all(b["images"].device.type == "cuda" and "prob_maps" in b for b in first)
    again = list(loader)
    assert loader.cache.stats.passes[-1].action == "replay"
    for f, a, want in zip(first, again, fresh_a):
        if store == "gpu":
            assert a["images"].data_ptr() == f["images"].data_ptr()  # no copy at all
        else:
            assert a["images"].device.type == "cpu" and a["images"].is_pinned()
        assert torch.equal(a["images"].cpu(), want["images"])
        torch.testing.assert_close(a["prob_maps"].cpu(), want["prob_maps"], rtol=0, atol=1e-5)
