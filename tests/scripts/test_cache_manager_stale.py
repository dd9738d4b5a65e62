"""``cache_manager.py clear --stale`` removes the temporary directories and entry locks
(``ocr.data.cache.EntryLock``) of killed writers and keeps those of live ones (the pid, as
``ocr/shm.py`` checks)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ocr.data.cache import HOST

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("cache_manager_stale_under_test", ROOT / "scripts" / "cache_manager.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cm = _load()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clear_stale_keeps_a_live_writers_temporary_directory(tmp_path, capsys):
    folder = tmp_path / "tensors"
    live = folder / f".tmp-val-0123456789abcdef-{os.getpid()}-k2j4x8"
    dead = folder / f".tmp-val-0123456789abcdef-{_dead_pid()}-q9w1e3"
    trash = folder / f".trash-val-0123456789abcdef-{_dead_pid()}-123456789"
    for d in (live, dead, trash):
        d.mkdir(parents=True)
        (d / "batch_00000.pt").write_bytes(b"x" * 100)
    assert cm.main(["--cache-dir", str(tmp_path), "clear", "--stale"]) == 0
    out = capsys.readouterr().out
    assert live.is_dir() and not dead.exists() and not trash.exists()
    assert f"kept {live} (process {os.getpid()} is still writing it)" in out
    assert cm.main(["--cache-dir", str(tmp_path), "health"]) == 0  # a write in progress is no problem


def _lock(path: Path, pid: int) -> Path:
    path.write_text(json.dumps({"pid": pid, "host": HOST, "token": "t", "created_unix": time.time()}))
    return path


def test_clear_stale_keeps_a_live_writers_lock_and_removes_a_dead_ones(tmp_path, capsys):
    folder = tmp_path / "tensors"
    folder.mkdir()
    dead_pid = _dead_pid()
    live_tmp = folder / f".tmp-val-0123456789abcdef-{os.getpid()}-k2j4x8"
    live_tmp.mkdir()
    live = _lock(folder / ".lock-val-0123456789abcdef", os.getpid())
    dead = _lock(folder / ".lock-val-fedcba9876543210", dead_pid)
    assert cm.main(["--cache-dir", str(tmp_path), "health"]) == 1
    assert f"orphan: {dead}: lock file of a writer" in capsys.readouterr().out
    assert cm.main(["--cache-dir", str(tmp_path), "clear", "--stale"]) == 0
    out = capsys.readouterr().out
    assert live.is_file() and live_tmp.is_dir() and not dead.exists()
    assert f"kept {live} (process {os.getpid()} is still writing it)" in out
    assert cm.main(["--cache-dir", str(tmp_path), "health"]) == 0
