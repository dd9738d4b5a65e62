"""Faults while disk caches are written: a run killed (SIGKILL) between writing an entry
and renaming it into place, a full disk, a truncated entry. Made deterministic with
``OCR_FAULT`` (``ocr.faults``): nothing half-written is ever read as valid."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from small_data import REPO, SMALL, VAL, compose_small, tiny_dataset

from ocr.data.cache import (LOCK_PREFIX, MANIFEST, TMP_PREFIX, entry_path, live_writer, read_manifest, verify_entry,
                            writer_pid)
from ocr.data.datamodule import OCRDataModule
from ocr.data.maps import MapFiller
from ocr.faults import ENV

CHILD = """
import sys
sys.path.insert(0, {tests!r})
from small_data import VAL, compose_small
from ocr.data.datamodule import OCRDataModule
dm = OCRDataModule(compose_small({root!r}, f"{{VAL}}.load_maps=false", f"{{VAL}}.cache_config.store=disk",
                                 f"{{VAL}}.cache_config.cache_dir={cache!r}"), splits=("val",))
dm.setup("fit")
list(dm.val_dataloader())
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory, "f", seed=4, num_val=5)


def disk_opts(cache_dir):
    return (f"{VAL}.load_maps=false", f"{VAL}.cache_config.store=disk", f"{VAL}.cache_config.cache_dir={cache_dir}")


def val_loader(root, cache_dir):
    dm = OCRDataModule(compose_small(root, *disk_opts(cache_dir)), splits=("val",))
    dm.setup("fit")
    return dm, dm.val_dataloader()


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.parametrize("point", ["tensors.write", "tensors.publish"])
def test_killed_while_writing_a_cache_entry_leaves_nothing_valid(data, tmp_path, point, caplog):
    cache = tmp_path / "cache"
    code = CHILD.format(tests=str(REPO / "tests" / "ocr" / "data"), root=str(data), cache=str(cache))
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV: f"kill@{point}"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the temporary directory and the dead writer's lock only: no entry
    lock, tmp = sorted((cache / "tensors").iterdir(), key=lambda p: p.name.startswith(TMP_PREFIX))
    assert tmp.name.startswith(TMP_PREFIX) and writer_pid(tmp) is not None and live_writer(tmp) is None
    assert lock.name.startswith(LOCK_PREFIX) and live_writer(lock) is None
    assert not (tmp / MANIFEST).exists() or point == "tensors.publish"

    caplog.set_level(logging.INFO)
    dm, loader = val_loader(data, cache)
    batches = list(loader)  # recorded anew (the dead writer's lock taken over), not replayed
    assert dm.cache_stats()["val"]["tensors"]["passes"][0]["action"] == "record"
    path = entry_path(cache, loader.cache.key)
    assert verify_entry(path, read_manifest(path)) == [] and len(batches) == 3
    assert leftovers(cache / "tensors") == [path.name]  # its lock and temporary directory are gone


@pytest.mark.parametrize("point", ["tensors.write", "tensors.publish"])
def test_a_full_disk_is_one_warning_and_the_run_goes_on_without_the_cache(data, tmp_path, point, caplog, monkeypatch):
    _dm, plain = val_loader(data, tmp_path / "reference")
    want = list(plain)
    monkeypatch.setenv(ENV, f"enospc@{point}")
    cache = tmp_path / "cache"
    dm, loader = val_loader(data, cache)
    caplog.set_level(logging.INFO)
    for _ in range(2):
        got = list(loader)
        assert [b["names"] for b in got] == [b["names"] for b in want]
        assert all(torch.equal(a["images"], b["images"]) and torch.equal(a["prob_maps"], b["prob_maps"])
                   for a, b in zip(got, want))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cannot write" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert "training goes on without this cache" in warnings[0]
    assert leftovers(cache / "tensors") == []  # nothing half-written left behind
    stats = dm.cache_stats()["val"]["tensors"]
    assert stats["store"] == "off" and [p["action"] for p in stats["passes"]] == ["miss", "miss"]


def test_a_truncated_entry_is_detected_and_rebuilt(data, tmp_path, caplog):
    _dm, loader = val_loader(data, tmp_path)
    want = list(loader)
    path = entry_path(tmp_path, loader.cache.key)
    victim = path / "batch_00002.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    caplog.set_level(logging.INFO)
    dm, loader = val_loader(data, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "batch_00002.pt: 100 bytes, manifest says" in warnings[0]
    got = list(loader)
    assert dm.cache_stats()["val"]["tensors"]["passes"][0]["action"] == "record"
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(got, want))
    assert verify_entry(path, read_manifest(path)) == []


def test_killed_while_writing_precomputed_maps_leaves_no_entry(data, tmp_path, caplog):
    script = REPO / "scripts" / "preprocess_data.py"
    args = [sys.executable, str(script), "-q", "maps", "--split", "val", "--cache-dir", str(tmp_path),
            f"data.root={data}", *SMALL]
    proc = subprocess.run(args, env={**os.environ, ENV: "kill@maps.publish"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    lock, tmp = sorted((tmp_path / "maps").iterdir(), key=lambda p: p.name.startswith(TMP_PREFIX))
    assert tmp.name.startswith(TMP_PREFIX) and (tmp / MANIFEST).is_file()  # complete, but never published
    assert lock.name.startswith(LOCK_PREFIX) and live_writer(lock) is None  # the dead writer's lock
    caplog.set_level(logging.INFO)
    dm = OCRDataModule(compose_small(data, f"{VAL}.cache_config.cache_dir={tmp_path}",
                                     f"{VAL}.cache_config.cache_transformed_tensors=false", f"{VAL}.load_maps=true"),
                       splits=("val",))
    dm.setup("fit")
    assert not isinstance(dm.val_dataloader(), MapFiller)  # the loader computes its own targets
    assert "Fallback to on-the-fly generation: 5/5 samples (100.0%) of the val split: no precomputed maps" in caplog.text
