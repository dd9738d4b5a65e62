"""Several processes sharing a disk cache directory (DDP ranks, two runs of one config):
one writer per entry (``EntryLock``), the others read the pass from their loader and
replay the entry once published; a dead writer's lock and temporary directory are taken
over; a reader never sees a partial entry; the loser of a rename race keeps the winner's
entry. Real processes (fork), small synthetic batches."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

from ocr.data.cache import (HOST, LOCK_STALE_S, MANIFEST, BatchCache, EntryWriter, entry_path, lock_or_wait, lock_path,
                            read_manifest, verify_entry)
from ocr.data.cache_key import CacheKey
from ocr.data.memory import StoreDecision
from ocr.faults import ENV

KEY = CacheKey(kind="tensors", split="val", components={"test": {"v": 1}})
N = 4

fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")


def expected_batches() -> list[dict]:
    return [{"images": torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1000 * i,
             "names": [f"img_{i}_{j}" for j in range(2)]} for i in range(N)]


class SlowLoader:
    """A loader whose pass takes ``N * delay`` seconds (a real loader decoding images)."""

    def __init__(self, delay: float):
        self.delay = delay

    def __len__(self):
        return N

    def __iter__(self):
        for batch in expected_batches():
            time.sleep(self.delay)
            yield batch


def disk_cache(cache_dir) -> BatchCache:
    return BatchCache("val", KEY, StoreDecision("disk", "disk", 0, "test"), N, torch.device("cpu"), cache_dir, {},
                      log_every=0)


def images(batches) -> list[list[float]]:
    return [b["images"].flatten().tolist() for b in batches]


def leftovers(cache_dir) -> list[str]:
    folder = cache_dir / "tensors"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def fill_twice(cache_dir, barrier, results) -> None:
    cache = disk_cache(cache_dir)
    loader = SlowLoader(delay=0.25)
    barrier.wait(timeout=60)
    first = images(cache.iterate(loader, N))
    barrier.wait(timeout=60)  # both first passes are over: the writer's entry is published
    second = images(cache.iterate(loader, N))
    results.put(([p.action for p in cache.stats.passes], first, second))


@fork
def test_two_processes_filling_one_key_write_it_once_and_both_replay_it(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=fill_twice, args=(tmp_path, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    want = images(expected_batches())
    for _actions, first, second in got:
        assert first == want and second == want
    actions = sorted(a for a, _, _ in got)
    # one writer; the other read its first pass from the loader (or, scheduled very late, replayed it already)
    assert actions in ([["miss", "replay"], ["record", "replay"]], [["record", "replay"], ["replay", "replay"]])
    path = entry_path(tmp_path, KEY)
    assert leftovers(tmp_path) == [path.name]  # one entry; no temporary directory, no lock left
    assert verify_entry(path, read_manifest(path)) == [] and read_manifest(path)["num_batches"] == N


def record_slowly(cache_dir) -> None:
    list(disk_cache(cache_dir).iterate(SlowLoader(delay=0.2), N))


@fork
def test_a_reader_never_sees_a_partial_entry(tmp_path):
    writer = multiprocessing.get_context("fork").Process(target=record_slowly, args=(tmp_path,))
    writer.start()
    want = images(expected_batches())
    seen = {"entry": 0, "partial write": 0}

    def look() -> None:
        cache = disk_cache(tmp_path)  # opens (and verifies) the entry when there is one
        if cache.ready:
            assert cache.entry.num_batches == N and images(cache.iterate([], N)) == want
            seen["entry"] += 1
        elif any(name.startswith(".tmp-") for name in leftovers(tmp_path)):
            seen["partial write"] += 1

    while writer.is_alive():
        look()
        time.sleep(0.02)
    writer.join(timeout=30)
    assert writer.exitcode == 0
    look()
    assert seen["partial write"] > 5 and seen["entry"] >= 1  # looked during the write, and after it
    assert leftovers(tmp_path) == [entry_path(tmp_path, KEY).name]


def killed_while_writing(cache_dir) -> None:
    os.environ[ENV] = "kill@tensors.write"
    record_slowly(cache_dir)


@fork
def test_the_lock_and_temporary_directory_of_a_killed_writer_are_taken_over(tmp_path, caplog):
    child = multiprocessing.get_context("fork").Process(target=killed_while_writing, args=(tmp_path,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    lock = lock_path(entry_path(tmp_path, KEY))
    assert json.loads(lock.read_text())["pid"] == child.pid
    assert len(leftovers(tmp_path)) == 2  # its lock and its temporary directory, no entry

    caplog.set_level(logging.INFO)
    cache = disk_cache(tmp_path)
    assert images(cache.iterate(SlowLoader(0), N)) == images(expected_batches())
    assert [p.action for p in cache.stats.passes] == ["record"]
    assert f"taking over the lock of process {child.pid} on {HOST}" in caplog.text
    assert leftovers(tmp_path) == [entry_path(tmp_path, KEY).name]


def write_lock(cache_dir, pid: int, host: str, age: float = 0.0):
    lock = lock_path(entry_path(cache_dir, KEY))
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": host, "token": "test", "created_unix": time.time()}))
    if age:
        os.utime(lock, (time.time() - age, time.time() - age))
    return lock


@pytest.mark.parametrize("host", [HOST, "another-host"])
def test_a_live_lock_is_respected_and_one_left_silent_too_long_is_taken_over(tmp_path, host, caplog):
    caplog.set_level(logging.INFO)
    lock = write_lock(tmp_path, os.getpid(), host)  # a live writer (this pid; on another host: a fresh lock)
    cache = disk_cache(tmp_path)
    want = images(expected_batches())
    assert images(cache.iterate(SlowLoader(0), N)) == want
    assert [p.action for p in cache.stats.passes] == ["miss"]  # correct batches, nothing written
    assert f"process {os.getpid()} on {host} is writing" in caplog.text
    assert leftovers(tmp_path) == [lock.name]

    write_lock(tmp_path, os.getpid(), host, age=LOCK_STALE_S + 60)  # hung, or a reused pid
    assert images(cache.iterate(SlowLoader(0), N)) == want
    assert images(cache.iterate(SlowLoader(0), N)) == want
    assert [p.action for p in cache.stats.passes] == ["miss", "record", "replay"]
    assert leftovers(tmp_path) == [entry_path(tmp_path, KEY).name]


def test_the_loser_of_a_rename_race_keeps_the_winners_entry(tmp_path):
    final = entry_path(tmp_path, KEY)
    a, b = EntryWriter(final), EntryWriter(final)  # two writers without the lock (one that gave up waiting)
    a.add("x.bin", b"a" * 100)
    b.add("x.bin", b"b" * 200)
    assert a.commit({**KEY.to_manifest()}) is True
    assert b.commit({**KEY.to_manifest()}) is False
    assert (final / "x.bin").read_bytes() == b"a" * 100 and verify_entry(final, read_manifest(final)) == []
    (final / "x.bin").write_bytes(b"a" * 50)  # damaged since: the next writer replaces it
    c = EntryWriter(final)
    c.add("x.bin", b"c" * 10)
    assert c.commit({**KEY.to_manifest()}) is True
    assert (final / "x.bin").read_bytes() == b"c" * 10
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]


def test_a_waiting_writer_uses_the_entry_published_meanwhile_or_gives_up_after_its_timeout(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    final = entry_path(tmp_path, KEY)
    lock = write_lock(tmp_path, os.getpid(), HOST)

    t0 = time.monotonic()
    assert lock_or_wait(final, wait_s=0.5, poll_s=0.05) == (None, False)
    assert 0.5 <= time.monotonic() - t0 < 5
    assert f"process {os.getpid()} on {HOST} is still writing it after" in caplog.text

    def publish():
        time.sleep(0.3)
        w = EntryWriter(final)
        w.add("x.bin", b"x")
        w.commit(KEY.to_manifest())
        lock.unlink()

    thread = threading.Thread(target=publish)
    thread.start()
    assert lock_or_wait(final, wait_s=30, poll_s=0.05) == (None, True)
    thread.join()
    assert (final / MANIFEST).is_file() and not lock.exists()
