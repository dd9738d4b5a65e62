"""The batch cache of evaluation splits: the first complete pass over a split records
the Batches the loader produced (images, DB targets, metadata) and later passes replay
them without touching the loader.

It lives in the main process: :class:`CachedLoader` wraps the split's loader (what the
trainer iterates), so there is one cache per split, never one per DataLoader worker.

Recording. Each batch of the recording pass is completed before it is stored: moved to
the model's device and given its DB targets when the backend deferred them
(``ocr.data.batch.needs_targets`` / ``attach_targets``), so a replayed batch costs only
the forward pass. A pass is recorded only when it is complete: it must deliver the
number of batches the key was built for (the trainer's ``limit_*_batches`` applied to
the loader's length). Sanity-check passes and passes abandoned half way are not
recorded (a half cache never replays as complete).

Stores (see ``ocr.data.memory``): ``gpu`` keeps the device batches (replay: no copy at
all), ``pinned``/``host`` keeps a host copy (page-locked when CUDA is usable), ``disk``
writes one file per batch into an entry directory under
``<cache_dir>/tensors/<split>-<key>/`` that later runs and other processes reuse. Disk
entries are written into a temporary directory and renamed into place (atomic: a reader
sees no entry or a complete one), every file's SHA-256 is in the entry's manifest and is
verified when a process first opens the entry; a corrupt entry is reported with one
warning and rebuilt. Files hold tensors only (``torch.load(weights_only=True)``).
One process writes an entry at a time (:class:`EntryLock`): a run that finds another
process writing the same key reads its pass from the loader, unrecorded, and replays the
entry once the other process has published it.

Keys (``ocr.data.cache_key``): the dataset content fingerprint, the annotation file's
hash, every transform parameter, the target parameters, the loader settings that change
the output (backend, device, target mode, batch size, order, number of batches,
libraries) and the cache format version. A changed key means a rebuild, announced with
one line saying which components changed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ocr import faults
from ocr.data.batch import attach_targets, batch_to, needs_targets
from ocr.data.cache_key import FORMAT_VERSION, CacheKey, bytes_sha256, file_sha256
from ocr.data.memory import StoreDecision, gb
from ocr.shm import pid_alive

log = logging.getLogger(__name__)

TENSORS, MAPS = "tensors", "maps"
KINDS = (TENSORS, MAPS)
MANIFEST = "manifest.json"
LAST_USED = "last_used"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LOCK_PREFIX = ".lock-"
LOCK_STALE_S = 600.0  # a lock not refreshed for this long is taken over (see EntryLock)
HOST = socket.gethostname()
LOW_HIT_RATE = 0.8


class CacheError(RuntimeError):
    pass


class CacheEntryError(CacheError):
    """A disk entry is missing files, unreadable or fails its checksum."""


# =============================================================================== disk entries


def entry_path(cache_dir: str | os.PathLike, key: CacheKey) -> Path:
    return Path(cache_dir) / key.kind / f"{key.split}-{key.short}"


# One writer per entry. A writer first creates the lock file ``<kind>/.lock-<entry>``
# (O_CREAT|O_EXCL: exactly one process succeeds) holding its pid and host, refreshes its
# mtime with every file it writes and deletes it after publishing or giving up. The others
# do not write that entry: the batch cache reads its pass from the loader (which that pass
# needs anyway; waiting would be slower) and replays the entry once it is published; the
# maps writer waits for it, bounded, then writes anyway. A lock is stale, and taken over,
# when its process is dead (same host: the pid check of ocr/shm.py) or when it was not
# refreshed for LOCK_STALE_S (another host, a reused pid, a hung writer): a killed writer
# never blocks anyone. Correctness does not rest on the lock: each writer still writes its
# own temporary directory and publishes it with one rename, and the loser of a rename race
# keeps the winner's verified entry, so two writers (a lock taken over twice at the same
# instant, a waiter that gave up) only waste work. Not fcntl locks: unreliable on network
# file systems, and inherited by the DataLoader workers forked while one is held.


@dataclass(frozen=True)
class LockInfo:
    pid: int | None  # None: unreadable, or its writer has not written it yet
    host: str
    age: float  # seconds since its holder last refreshed it
    ident: tuple  # (inode, mtime_ns, text): tells one lock file from its successor

    def describe(self) -> str:
        return f"process {self.pid if self.pid is not None else '?'} on {self.host or '?'}"


def lock_path(final: Path) -> Path:
    final = Path(final)
    return final.parent / f"{LOCK_PREFIX}{final.name}"


def read_lock(path: Path) -> LockInfo | None:
    """The lock file at ``path`` (None: there is none)."""
    try:
        st = os.stat(path)
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        st, text = os.stat(path), ""  # unreadable: judged by its age alone
    try:
        data = json.loads(text)
        pid, host = int(data["pid"]), str(data["host"])
    except (ValueError, KeyError, TypeError):
        pid, host = None, ""
    return LockInfo(pid, host, max(0.0, time.time() - st.st_mtime), (st.st_ino, st.st_mtime_ns, text))


def lock_is_live(info: LockInfo, stale_s: float = LOCK_STALE_S) -> bool:
    if info.age >= stale_s:
        return False
    if info.host == HOST and info.pid is not None:
        return pid_alive(info.pid)
    return True  # another host (its pid means nothing here), or being written: trusted while fresh


class EntryLock:
    """The lock of one entry, held by this process (see the comment above)."""

    def __init__(self, path: Path, token: str):
        self.path = path
        self.token = token

    def refresh(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self) -> None:
        held = read_lock(self.path)
        if held is not None and self.token in held.ident[2]:  # not a successor's (ours was taken over)
            try:
                os.unlink(self.path)
            except OSError:
                pass


def try_lock(final: Path, stale_s: float = LOCK_STALE_S) -> tuple[EntryLock | None, LockInfo | None]:
    """(lock, None) when this process now writes the entry ``final``; (None, holder) when a
    live process does. A stale lock is taken over, and its dead writer's temporary
    directories of this entry are removed."""
    path = lock_path(final)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = os.urandom(8).hex()
    holder = None
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = read_lock(path)
            if holder is None:
                continue  # released in the meantime
            if lock_is_live(holder, stale_s):
                return None, holder
            again = read_lock(path)
            if again is not None and again.ident == holder.ident:  # still the one judged stale, not a successor's
                log.warning("%s: taking over the lock of %s, gone or silent for %.0f s", final, holder.describe(),
                            holder.age)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                if holder.pid is not None:
                    remove_temporaries(Path(final), holder.pid)
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps({"pid": os.getpid(), "host": HOST, "token": token, "created_unix": time.time()}))
        except BaseException:
            os.unlink(path)  # an empty lock would hold the entry for LOCK_STALE_S
            raise
        return EntryLock(path, token), None
    return None, holder


def lock_or_wait(final: Path, wait_s: float, poll_s: float = 0.2,
                 stale_s: float = LOCK_STALE_S) -> tuple[EntryLock | None, bool]:
    """For a writer with nothing better to do than wait: (lock, False) when this process
    now writes ``final``; (None, True) when the process it waited for published the
    entry; (None, False) after ``wait_s`` seconds without either (one warning: the caller
    then writes without the lock, and the first complete copy wins)."""
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        lock, holder = try_lock(final, stale_s)
        if lock is not None:
            if waited and (Path(final) / MANIFEST).is_file():
                lock.release()
                return None, True
            return lock, False
        if time.monotonic() >= deadline:
            log.warning("%s: %s is still writing it after %.0f s; writing it as well without waiting longer "
                        "(the first complete copy is kept)", final, holder.describe() if holder else "another process",
                        wait_s)
            return None, False
        if not waited:
            log.info("%s: %s is writing it; waiting up to %.0f s for it", final,
                     holder.describe() if holder else "another process", wait_s)
            waited = True
        time.sleep(poll_s)


def remove_temporaries(final: Path, pid: int) -> None:
    """The temporary directories that process ``pid`` left for the entry ``final``."""
    prefix = f"{TMP_PREFIX}{final.name}-{pid}-"
    try:
        names = [p for p in final.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for p in names:
        shutil.rmtree(p, ignore_errors=True)


def entry_is_valid(entry: Path) -> bool:
    try:
        return not verify_entry(entry, read_manifest(entry), checksums=True)
    except CacheEntryError:
        return False


def remove_entry(entry: Path, judged: dict | None) -> bool:
    """Remove a damaged entry, under its lock, if it is still the one judged damaged
    (``judged``: its manifest then, None if unreadable). A process holding the lock will
    publish over it itself."""
    try:
        lock, _holder = try_lock(entry)
    except OSError:
        return False
    if lock is None:
        return False
    try:
        try:
            now = read_manifest(entry)
        except CacheEntryError:
            now = None
        if now == judged and Path(entry).exists():
            remove_tree(entry)
            return True
        return False
    except OSError:
        return False
    finally:
        lock.release()


class EntryWriter:
    """Writes an entry into a temporary directory beside its final place, then renames
    it into place: readers see either no entry or a complete one. ``lock``: the entry's
    lock, refreshed with every file and released when the writer is done."""

    def __init__(self, final: Path, lock: EntryLock | None = None):
        self.final = Path(final)
        self.lock = lock
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{self.final.name}-{os.getpid()}-",
                                             dir=self.final.parent))
        except BaseException:
            self._release()
            raise
        self.files: dict[str, dict] = {}
        self.done = False

    @property
    def kind(self) -> str:
        return self.final.parent.name  # tensors | maps

    def add(self, name: str, data: bytes) -> None:
        (self.tmp / name).write_bytes(data)
        faults.inject(f"{self.kind}.write")
        self.files[name] = {"sha256": bytes_sha256(data), "bytes": len(data)}
        if self.lock is not None:
            self.lock.refresh()

    @property
    def nbytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    def commit(self, manifest: dict, replace: bool = False) -> bool:
        """Publish the entry: True. False when a valid entry of another process is already
        in place (ours is discarded; ``replace``: ours replaces it). A damaged or
        half-removed directory in the way is replaced. OSError when it cannot be written."""
        now = time.time()
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": self.files, "bytes": self.nbytes,
                    "created_unix": now, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
                    "writer_pid": os.getpid()}
        try:
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            (self.tmp / LAST_USED).touch()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; an entry is as shared as its cache dir
            faults.inject(f"{self.kind}.publish")
            try:
                os.rename(self.tmp, self.final)
            except OSError:
                if not self.final.exists():
                    raise
                if not replace and entry_is_valid(self.final):
                    return False
                remove_tree(self.final)
                os.rename(self.tmp, self.final)
            self.done = True
            return True
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the temporary directory (unless published) and release the lock."""
        if not self.done:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.done = True
        self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def writer_pid(path: Path) -> int | None:
    """The pid in the name of a temporary (``.tmp-<entry>-<pid>-<random>``) or half-deleted
    (``.trash-<entry>-<pid>-<ns>``) directory; None for any other name."""
    name = Path(path).name
    if not name.startswith((TMP_PREFIX, TRASH_PREFIX)):
        return None
    parts = name.rsplit("-", 2)  # the entry name has dashes; the random / ns tail has none
    try:
        return int(parts[1]) if len(parts) == 3 else None
    except ValueError:
        return None


def live_writer(path: Path) -> int | None:
    """The pid of the live process still writing (or removing) ``path``, else None. For a
    lock file (``.lock-<entry>``): its holder's pid while the lock is live (0 when the
    file does not say yet)."""
    if Path(path).name.startswith(LOCK_PREFIX):
        info = read_lock(Path(path))
        return (info.pid or 0) if info is not None and lock_is_live(info) else None
    pid = writer_pid(path)
    return pid if pid is not None and pid_alive(pid) else None


def read_manifest(entry: Path) -> dict:
    try:
        manifest = json.loads((Path(entry) / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CacheEntryError(f"{entry}: no {MANIFEST}") from exc
    except (OSError, ValueError) as exc:
        raise CacheEntryError(f"{entry}: unreadable {MANIFEST} ({exc})") from exc
    for field_name in ("kind", "key", "components", "files"):
        if field_name not in manifest:
            raise CacheEntryError(f"{entry}: {MANIFEST} has no {field_name!r}")
    return manifest


def verify_entry(entry: Path, manifest: dict, checksums: bool = True) -> list[str]:
    """Problems of an entry's files: missing, wrong size, (``checksums``) wrong SHA-256."""
    problems = []
    for name, meta in manifest["files"].items():
        path = Path(entry) / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if size != meta["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {meta['bytes']}")
        elif checksums and file_sha256(path) != meta["sha256"]:
            problems.append(f"{name}: checksum mismatch")
    return problems


def read_file_verified(entry: Path, name: str, manifest: dict) -> bytes:
    meta = manifest["files"].get(name)
    if meta is None:
        raise CacheEntryError(f"{entry}: {name} is not in the manifest")
    try:
        data = (Path(entry) / name).read_bytes()
    except OSError as exc:
        raise CacheEntryError(f"{entry}: cannot read {name} ({exc.strerror or exc})") from exc
    if len(data) != meta["bytes"] or bytes_sha256(data) != meta["sha256"]:
        raise CacheEntryError(f"{entry}: {name} fails its checksum")
    return data


def touch_last_used(entry: Path) -> None:
    try:
        (Path(entry) / LAST_USED).touch()
    except OSError:
        pass


def last_used(entry: Path) -> float:
    for name in (LAST_USED, MANIFEST):
        try:
            return (Path(entry) / name).stat().st_mtime
        except OSError:
            continue
    return 0.0


def tree_size(path: Path) -> int:
    path = Path(path)
    if path.is_file() or path.is_symlink():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def remove_tree(path: Path) -> int:
    """Delete a file or directory; returns the bytes freed. A directory is first renamed
    aside so that a half-deleted entry is never mistaken for an entry."""
    path = Path(path)
    size = tree_size(path)
    if path.is_dir() and not path.is_symlink():
        aside = path.parent / f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(path, aside)
        except OSError:
            aside = path
        shutil.rmtree(aside)
    else:
        path.unlink()
    return size


@dataclass
class EntryInfo:
    path: Path
    kind: str
    manifest: dict | None  # None: unreadable
    error: str | None = None

    @property
    def split(self) -> str:
        return (self.manifest or {}).get("split", self.path.name.split("-", 1)[0])

    @property
    def key(self) -> str:
        return (self.manifest or {}).get("key", "")


def scan_cache(cache_dir: str | os.PathLike) -> tuple[list[EntryInfo], list[Path]]:
    """Entries under ``cache_dir/<kind>/`` and everything else found there (temporary
    directories of interrupted writes, half-deleted entries, stray files)."""
    root = Path(cache_dir)
    entries: list[EntryInfo] = []
    others: list[Path] = []
    if not root.is_dir():
        return entries, others
    for child in sorted(root.iterdir()):
        if child.name not in KINDS or not child.is_dir():
            others.append(child)
            continue
        for item in sorted(child.iterdir()):
            if item.name.startswith((TMP_PREFIX, TRASH_PREFIX)) or not item.is_dir():
                others.append(item)
                continue
            try:
                entries.append(EntryInfo(item, child.name, read_manifest(item)))
            except CacheEntryError as exc:
                entries.append(EntryInfo(item, child.name, None, str(exc)))
    return entries, others


def previous_entry(cache_dir: str | os.PathLike, key: CacheKey) -> EntryInfo | None:
    """The most recently used readable entry of the same kind and split (to say why a
    new key does not match it)."""
    folder = Path(cache_dir) / key.kind
    if not folder.is_dir():
        return None
    best, best_t = None, -1.0
    for item in folder.iterdir():
        if not item.is_dir() or item.name.startswith((TMP_PREFIX, TRASH_PREFIX)) or not item.name.startswith(f"{key.split}-"):
            continue
        try:
            manifest = read_manifest(item)
        except CacheEntryError:
            continue
        t = last_used(item)
        if t > best_t:
            best, best_t = EntryInfo(item, key.kind, manifest), t
    return best


def rebuild_reason(cache_dir: str | os.PathLike, key: CacheKey) -> str:
    prev = previous_entry(cache_dir, key)
    if prev is None:
        return "no earlier entry"
    try:
        reasons = key.changes_since(CacheKey.from_manifest(prev.manifest))
    except (KeyError, TypeError):
        reasons = []
    return (", ".join(reasons) or "key changed") + f" since {prev.path.name}"


# ============================================================================ batch (de)serialisation


def _is_str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _is_nested(v: Any, leaf: Callable[[Any], bool]) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, (list, tuple)) and all(leaf(y) for y in x) for x in v)


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def pack_batch(batch: dict) -> dict:
    """A Batch as a dict of CPU tensors and plain lists (loadable with ``weights_only``)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
            meta[key] = {"type": "tensor"}
        elif _is_str_list(value):
            meta[key] = {"type": "str_list", "values": list(value)}
        elif _is_nested(value, _is_bool):
            meta[key] = {"type": "bool_lists", "values": [[bool(y) for y in x] for x in value]}
        elif _is_nested(value, lambda y: isinstance(y, np.ndarray)):
            arrays = [a for x in value for a in x]
            dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
            if any(a.dtype != dtype for a in arrays):
                raise CacheError(f"batch key {key!r}: arrays of mixed dtypes cannot be stored")
            flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype=dtype)
            tensors[f"{key}.data"] = torch.from_numpy(np.ascontiguousarray(flat))
            meta[key] = {"type": "array_lists", "counts": [len(x) for x in value], "dtype": dtype.str,
                         "shapes": [list(a.shape) for a in arrays]}
        else:
            raise CacheError(f"batch key {key!r} ({type(value).__name__}) cannot be stored on disk")
    return {"tensors": tensors, "meta": meta, "order": list(batch)}


def unpack_batch(packed: dict) -> dict:
    tensors, meta = packed["tensors"], packed["meta"]
    out = {}
    for key in packed["order"]:
        m = meta[key]
        if m["type"] == "tensor":
            out[key] = tensors[key]
        elif m["type"] == "str_list":
            out[key] = list(m["values"])
        elif m["type"] == "bool_lists":
            out[key] = [list(x) for x in m["values"]]
        elif m["type"] == "array_lists":
            flat = tensors[f"{key}.data"].numpy()
            dtype = np.dtype(m["dtype"])
            arrays, pos = [], 0
            for shape in m["shapes"]:
                n = int(np.prod(shape)) if shape else 1
                arrays.append(flat[pos:pos + n].astype(dtype, copy=True).reshape(shape))
                pos += n
            lists, i = [], 0
            for c in m["counts"]:
                lists.append(arrays[i:i + c])
                i += c
            out[key] = lists
        else:
            raise CacheEntryError(f"unknown stored type {m['type']!r} for {key!r}")
    return out


def serialize_batch(batch: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(pack_batch(batch), buf)
    return buf.getvalue()


def deserialize_batch(data: bytes) -> dict:
    try:
        packed = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return unpack_batch(packed)
    except CacheEntryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding problem is a corrupt entry
        raise CacheEntryError(f"cannot decode a stored batch ({type(exc).__name__}: {exc})") from exc


def batch_nbytes(batch: dict) -> int:
    total = 0
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, (list, tuple)):
            for x in value:
                if isinstance(x, (list, tuple)):
                    total += sum(a.nbytes for a in x if isinstance(a, np.ndarray)) + 8 * len(x)
                elif isinstance(x, str):
                    total += len(x)
    return total


def estimate_batches_bytes(num_samples: int, image_size: int, num_points: int = 0, channels: int = 3,
                           target_maps: int = 4) -> int:
    """Bytes of ``num_samples`` complete samples: float32 image + DB target maps at
    ``image_size``, matrices and sizes, polygons in two coordinate systems."""
    per_sample = image_size * image_size * 4 * (channels + target_maps) + 9 * 8 + 2 * 8
    return num_samples * per_sample + num_points * 2 * 4 * 2


# ====================================================================================== stores


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    if pin:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t)
        return out
    if t.device.type == "cpu" and not t.is_shared():
        return t  # a plain tensor the loader made for us: keep it (no copy)
    return t.to("cpu", copy=True)  # device or shared-memory (worker) tensor: a private copy


class _MemoryEntry:
    def __init__(self, store: str):
        self.store = store  # gpu | pinned | host
        self.batches: list[dict] = []
        self.nbytes = 0

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def put(self, batch: dict) -> None:
        if self.store == "gpu":
            stored = dict(batch)  # the device tensors themselves: replay costs nothing
        else:
            pin = self.store == "pinned"
            try:
                stored = {k: (_host_copy(v, pin) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            except RuntimeError as exc:  # page-locking can fail (limits): pageable memory still works
                if not pin:
                    raise
                log.warning("tensor cache: cannot page-lock host memory (%s); using pageable host memory", exc)
                self.store = "host"
                stored = {k: (_host_copy(v, False) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        self.batches.append(stored)
        self.nbytes += batch_nbytes(stored)

    def get(self, index: int) -> dict:
        return dict(self.batches[index])

    def close(self) -> None:
        self.batches = []


class _DiskEntryWriter:
    def __init__(self, final: Path, lock: EntryLock | None = None):
        self.writer = EntryWriter(final, lock)
        self.names: list[list[str]] = []

    @property
    def nbytes(self) -> int:
        return self.writer.nbytes

    def put(self, index: int, batch: dict) -> None:
        self.writer.add(f"batch_{index:05d}.pt", serialize_batch(batch))
        self.names.append(list(batch.get("names", [])))


class _DiskEntry:
    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.store = "disk"

    @property
    def num_batches(self) -> int:
        return int(self.manifest["num_batches"])

    @property
    def nbytes(self) -> int:
        return int(self.manifest.get("bytes", 0))

    def get(self, index: int) -> dict:
        # checksums were verified when the entry was opened; a file that vanished or
        # no longer decodes since is a CacheEntryError
        try:
            data = (self.path / f"batch_{index:05d}.pt").read_bytes()
        except OSError as exc:
            raise CacheEntryError(f"{self.path}: cannot read batch {index} ({exc.strerror or exc})") from exc
        if len(data) != self.manifest["files"][f"batch_{index:05d}.pt"]["bytes"]:
            raise CacheEntryError(f"{self.path}: batch {index} changed size since it was written")
        return deserialize_batch(data)

    def close(self) -> None:
        pass


# ====================================================================================== stats


@dataclass
class _Pass:
    epoch: int | None
    action: str  # replay | record | miss
    hits: int = 0
    misses: int = 0

    def to_dict(self) -> dict:
        total = self.hits + self.misses
        return {"epoch": self.epoch, "action": self.action, "hits": self.hits, "misses": self.misses,
                "hit_rate": round(self.hits / total, 4) if total else None}


@dataclass
class CacheStats:
    """Hits and misses in samples (a replayed batch of 8 is 8 hits)."""

    split: str
    log_every: int = 100
    hits: int = 0
    misses: int = 0
    passes: list[_Pass] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def start_pass(self, epoch: int | None, action: str) -> None:
        self.passes.append(_Pass(epoch, action))

    def record(self, hit: bool, n: int) -> None:
        before = self.hits + self.misses
        if hit:
            self.hits += n
            self.passes[-1].hits += n
        else:
            self.misses += n
            self.passes[-1].misses += n
        after = before + n
        if self.log_every > 0 and after // self.log_every > before // self.log_every:
            log.info("Cache Statistics - Hits: %d, Misses: %d, Hit Rate: %.1f%% (%s, run total after %d accesses)",
                     self.hits, self.misses, 100 * self.hit_rate, self.split, after)

    def end_pass(self, store: str) -> None:
        p = self.passes[-1]
        total = p.hits + p.misses
        rate = p.hits / total if total else 0.0
        when = f"epoch {p.epoch}" if p.epoch is not None else f"pass {len(self.passes) - 1}"
        log.info("Cache Statistics - Hits: %d, Misses: %d, Hit Rate: %.1f%% (%s %s: %s; run total %d/%d, %.1f%%)",
                 p.hits, p.misses, 100 * rate, self.split, when,
                 {"replay": f"replayed from {store}", "record": f"recorded into {store}", "miss": "not cached"}[p.action],
                 self.hits, self.hits + self.misses, 100 * self.hit_rate)
        if len(self.passes) > 1 and rate < LOW_HIT_RATE:
            log.warning("Low cache hit rate for the %s split: %.1f%% in %s (expected >= %.0f%% after the first epoch): "
                        "the batch cache is not being replayed (see the lines above for why)",
                        self.split, 100 * rate, when, 100 * LOW_HIT_RATE)

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 4),
                "passes": [p.to_dict() for p in self.passes]}


# ================================================================================ the cache


class BatchCache:
    """Records and replays the Batches of one evaluation split (see the module doc)."""

    def __init__(self, split: str, key: CacheKey, decision: StoreDecision, num_batches: int, device: torch.device,
                 cache_dir: str | os.PathLike, target_kwargs: dict, log_every: int = 100,
                 rekey: Callable[[], CacheKey] | None = None):
        self.split = split
        self.key = key
        self.decision = decision
        self.store = decision.store  # gpu | pinned | host | disk | off
        self.num_batches = int(num_batches)
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir)
        self.target_kwargs = dict(target_kwargs)
        self.rekey = rekey
        self.stats = CacheStats(split, log_every)
        self.entry: _MemoryEntry | _DiskEntry | None = None
        self.rebuilds: list[str] = []
        self._warned_read = False
        self._warned_busy: set[int | None] = set()
        if self.store == "disk":
            self._open_disk_entry(first=True)

    # ------------------------------------------------------------------ public

    @property
    def enabled(self) -> bool:
        return self.store != "off"

    @property
    def ready(self) -> bool:
        return self.entry is not None

    def to_dict(self) -> dict:
        return {
            "store": self.store,
            "requested_store": self.decision.requested,
            "store_reason": self.decision.reason,
            "estimated_bytes": int(self.decision.estimate),
            "stored_bytes": int(self.entry.nbytes) if self.entry is not None else 0,
            "num_batches": self.num_batches,
            "key": self.key.short,
            "entry": str(entry_path(self.cache_dir, self.key)) if self.store == "disk" else None,
            "ready": self.ready,
            "rebuilds": list(self.rebuilds),
            **self.stats.to_dict(),
        }

    def iterate(self, loader, num_batches: int, counted: bool = True, epoch: int | None = None) -> Iterator[dict]:
        """One pass over the split: ``num_batches`` batches (the trainer's limit), replayed
        when a complete recording exists, else from ``loader`` (and recorded when this
        pass is a complete, counted one). Uncounted passes (sanity checks) are never recorded."""
        if counted:
            self._check_key()
        if self.entry is None and self.store == "disk" and (entry_path(self.cache_dir, self.key) / MANIFEST).is_file():
            self._open_disk_entry(first=False)  # published by another process since we looked
        entry = self.entry
        if entry is not None and entry.num_batches >= num_batches:
            return self._replay(loader, entry, min(num_batches, entry.num_batches), counted, epoch)
        return self._from_loader(loader, num_batches, counted, epoch)

    def close(self) -> None:
        if self.entry is not None:
            self.entry.close()
        self.entry = None

    # ------------------------------------------------------------------ internals

    def _check_key(self) -> None:
        """Rebuild when what the key covers changed since the cache was filled (files
        edited during a run that reads them from disk)."""
        if self.rekey is None:
            return
        new = self.rekey()
        if new.hexdigest == self.key.hexdigest:
            return
        why = ", ".join(new.changes_since(self.key)) or "key changed"
        log.info("Rebuilding the %s tensor cache: %s", self.split, why)
        self.rebuilds.append(why)
        self.key = new
        self.close()
        if self.store == "disk":
            self._open_disk_entry(first=False)

    def _open_disk_entry(self, first: bool) -> None:
        path = entry_path(self.cache_dir, self.key)
        if (path / MANIFEST).is_file():
            manifest = None
            try:
                manifest = read_manifest(path)
                if manifest.get("key") != self.key.hexdigest:
                    raise CacheEntryError(f"{path}: manifest key {manifest.get('key', '')[:16]} does not match the directory")
                problems = verify_entry(path, manifest, checksums=True)
                if problems:
                    raise CacheEntryError(f"{path}: " + "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
            except CacheEntryError as exc:
                log.warning("Tensor cache entry is corrupt, rebuilding it: %s", exc)
                self.rebuilds.append(f"corrupt entry: {exc}")
                remove_entry(path, judged=manifest)
                return
            self.entry = _DiskEntry(path, manifest)
            touch_last_used(path)
            log.info("%s tensor cache: entry %s verified (%d batches, %s), replaying it", self.split, path,
                     self.entry.num_batches, gb(self.entry.nbytes))
            return
        why = rebuild_reason(self.cache_dir, self.key)
        if first:
            log.info("%s tensor cache: building %s (%s)", self.split, path, why)
        if why != "no earlier entry":
            self.rebuilds.append(why)

    def _complete(self, batch: dict) -> dict:
        """What the model will see: on its device, with targets."""
        if self.device.type == "cuda":
            batch = batch_to(batch, self.device, non_blocking=True)
        if needs_targets(batch):
            attach_targets(batch, self.target_kwargs)
        return batch

    def _replay(self, loader, entry, n: int, counted: bool, epoch: int | None) -> Iterator[dict]:
        if counted:
            self.stats.start_pass(epoch, "replay")
        if isinstance(entry, _DiskEntry):
            touch_last_used(entry.path)
        for i in range(n):
            try:
                batch = entry.get(i)
            except CacheEntryError as exc:
                log.warning("Tensor cache entry became unreadable, rebuilding it: %s", exc)
                self.rebuilds.append(f"unreadable entry: {exc}")
                self.close()
                if isinstance(entry, _DiskEntry):
                    remove_entry(entry.path, judged=entry.manifest)
                yield from self._rest_from_loader(loader, i, n, counted)
                return
            if counted:
                self.stats.record(True, int(batch["images"].shape[0]))
                if i == n - 1:
                    self.stats.end_pass(entry.store)
            yield batch

    def _rest_from_loader(self, loader, start: int, n: int, counted: bool) -> Iterator[dict]:
        """Batches start..n-1 from the loader (the replay broke off): correct, not recorded."""
        it = iter(loader)
        for i in range(n):
            try:
                batch = next(it)
            except StopIteration:
                break
            if i < start:
                continue
            if counted:
                self.stats.record(False, int(batch["images"].shape[0]))
            yield batch
        if counted:
            self.stats.end_pass(self.store)

    def _begin_recording(self):
        """The entry this pass records into (None: the cache no longer fits and is off)."""
        if self.store == "gpu":
            self._recheck_budget()
        if self.store == "off":
            return None
        if self.store == "disk":
            final = entry_path(self.cache_dir, self.key)
            try:
                lock, holder = try_lock(final)
                if lock is None:
                    self._busy(final, holder)
                    return None
                return _DiskEntryWriter(final, lock)
            except OSError as exc:
                self._disk_failed(None, exc)
                return None
        return _MemoryEntry(self.store)

    def _busy(self, final: Path, holder: LockInfo | None) -> None:
        """Another process writes this entry: this pass comes from the loader, unrecorded."""
        pid = holder.pid if holder else None
        if pid not in self._warned_busy:
            self._warned_busy.add(pid)
            log.warning("%s tensor cache: %s is writing %s; this pass is read from the loader without recording "
                        "it, and the entry is replayed once that process has published it", self.split,
                        holder.describe() if holder else "another process", final)

    def _disk_failed(self, recording: "_DiskEntryWriter | None", exc: OSError) -> None:
        """A disk write failed (full disk, permissions): drop what was written, warn once and
        go on without this cache for the rest of the run."""
        if recording is not None:
            recording.writer.abort()
        log.warning("%s tensor cache: cannot write %s (%s); training goes on without this cache for the rest "
                    "of the run", self.split, entry_path(self.cache_dir, self.key), exc.strerror or exc)
        self.rebuilds.append(f"write failed: {exc.strerror or exc}")
        self.store = "off"
        if self.stats.passes and self.stats.passes[-1].action == "record":
            self.stats.passes[-1].action = "miss"  # this pass's batches came from the loader, unrecorded

    def _recheck_budget(self) -> None:
        """A GPU store was budgeted when the loader was built, before any activation existed:
        check it again now that an epoch has trained (``StoreDecision.recheck``)."""
        decision = self.decision.recheck()
        if decision.store == self.store:
            return
        log.warning("%s", decision.warning)
        self.decision, self.store = decision, decision.store

    def _commit(self, recording, count: int) -> None:
        if isinstance(recording, _DiskEntryWriter):
            manifest = {**self.key.to_manifest(), "num_batches": count,
                        "num_samples": sum(len(n) for n in recording.names), "names": recording.names}
            path = recording.writer.final
            try:
                # not published: another process's entry, verified like at start-up, is in place
                published = recording.writer.commit(manifest)
            except OSError as exc:
                self._disk_failed(recording, exc)
                return
            try:
                manifest = read_manifest(path)
            except CacheEntryError as exc:
                log.warning("%s tensor cache: could not publish this pass (%s); it will be recorded again", self.split, exc)
                return
            if published:
                log.info("%s tensor cache: wrote %s (%d batches, %s)", self.split, path, count, gb(recording.nbytes))
            else:
                log.info("%s tensor cache: another process published %s first; replaying its entry", self.split, path)
            self.entry = _DiskEntry(path, manifest)
            return
        self.entry = recording
        log.info("%s tensor cache: recorded %d batches into %s memory (%s)", self.split, count, recording.store,
                 gb(recording.nbytes))

    def _from_loader(self, loader, n: int, counted: bool, epoch: int | None) -> Iterator[dict]:
        recording = self._begin_recording() if counted and self.enabled and n == self.num_batches else None
        record = recording is not None
        if counted:
            self.stats.start_pass(epoch, "record" if record else "miss")
        committed = False
        count = 0
        try:
            it = iter(loader)
            while count < n:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                if record:
                    batch = self._complete(batch)
                    if isinstance(recording, _DiskEntryWriter):
                        try:
                            recording.put(count, batch)
                        except OSError as exc:
                            self._disk_failed(recording, exc)
                            record = False
                    else:
                        recording.put(batch)
                count += 1
                if counted:
                    self.stats.record(False, int(batch["images"].shape[0]))
                if count == n:
                    if record:
                        self._commit(recording, count)
                        committed = True
                    if counted:
                        self.stats.end_pass(self.store if record else "loader")
                yield batch
            if count < n and count > 0:
                # Both loaders know their exact length: an early end means something went wrong,
                # and a partial recording replayed later would score part of the split.
                if record:
                    log.warning("%s tensor cache: the loader ended after %d of %d batches; not recording this pass",
                                self.split, count, n)
                if counted:
                    self.stats.end_pass("loader")
        finally:
            if recording is not None and not committed and isinstance(recording, _DiskEntryWriter):
                recording.writer.abort()


class CachedLoader:
    """The iterable the trainer gets for a cached evaluation split: ``len()`` of the
    loader, and passes served by :class:`BatchCache`. ``pass_info(length)`` returns
    ``(batches this pass will take, counted, epoch)`` -- the trainer's limits applied,
    counted False for sanity-check passes."""

    def __init__(self, loader, cache: BatchCache, pass_info: Callable[[int], tuple[int, bool, int | None]]):
        self.loader = loader
        self.cache = cache
        self.pass_info = pass_info

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        n, counted, epoch = self.pass_info(len(self.loader))
        return self.cache.iterate(self.loader, n, counted, epoch)


def num_batches_for(length: int, limit: int | float) -> int:
    """Batches the trainer takes from a loader of ``length`` under ``limit_*_batches``
    (Lightning's rule: an int is a count, a float a fraction)."""
    if isinstance(limit, bool):
        raise TypeError("limit must be a number")
    if isinstance(limit, int):
        return min(length, limit)
    if float(limit) == 1.0:
        return length
    return int(length * float(limit))
