"""Validation scoring (DB post-processing + CLEval/IoU counting) beside the forward pass.

The main (training) thread only queues work: :meth:`ScoringPool.submit` starts one pinned,
non-blocking device-to-host copy of the batch's probability maps (and of its small matrices
and sizes), records a CUDA event and returns. A dispatcher thread waits for that event and
hands the images to worker processes; each worker post-processes its probability maps and
counts them against the ground truth (``DetectionEvaluator.image_counts``). :meth:`result`
adds the counts in submission order, so the evaluator is bit-identical to scoring the same
images one after another in this process (``workers=0``, the reference path).

Processes, not threads: post-processing (pyclipper, small numpy) and CLEval (Python + numba
without ``nogil``) hold the GIL nearly all the time. Measured on a 2-core machine (48-64
images of 640 px with ~42 words each, ~25 ms each): two threads scored 0.70-0.76x as fast as
one, two processes 1.6-1.8x (three runs: 1.76, 1.80, 1.58), with results identical to serial
scoring.
The probability maps do not travel through the pipe (pickled, a 640-px float32 map cost
~7.5 ms per image, a third of the scoring work, partly in a parent thread that holds the GIL
while it copies): the dispatcher copies each batch (GIL released) into a
slot file under /dev/shm that the workers map (:class:`_SharedSlots`), and only the slot's
name, the matrices, sizes and ground truth (polygons, don't-care flags, transcriptions) are pickled.

Workers are started with ``spawn`` (safe with CUDA and DALI in the parent) and never import
torch: :mod:`ocr.models` imports its names lazily, so :mod:`ocr.models.postprocess` comes
without the network (torch + torchvision: ~9 s and ~0.9 GB per process). Each worker
pays cleval's numba JIT once, in the pool initializer (:func:`_init_worker`), before it
takes any image. Pools are started once per process (``DBNetModule.setup``), reused by every
validation/test epoch and closed in ``teardown``.

Timing: :attr:`ScoringPool.wait_seconds` is the wall time the calling thread spent blocked
in ``submit`` (too many batches in flight) and ``result`` (the tail at epoch end), or, with
``workers=0``, scoring itself: the part of validation that scoring costs the training loop.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import importlib.util
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections import deque
from typing import Any, Iterable, Sequence

import numpy as np

from ocr.metrics.cleval_metric import CLEvalCounts
from ocr.metrics.evaluator import DetectionEvaluator
from ocr.metrics.iou_metric import IoUCounts
from ocr.shm import SHM_DIR, remove_stale_files

log = logging.getLogger(__name__)

__all__ = ["ScoringPool", "benchmark_scoring", "host_copy", "resolve_workers", "score_batches", "score_serial",
           "synthetic_predictions"]

#: DBPostProcessor's keyword arguments that the config's ``model.postprocess`` gives.
POSTPROCESS_KEYS = ("thresh", "box_thresh", "unclip_ratio", "max_candidates", "min_size", "output")
MAX_AUTO_WORKERS = 4

ImageCounts = tuple[IoUCounts, CLEvalCounts]


def resolve_workers(requested: int, cpus: int | None = None, processes_per_node: int = 1) -> int:
    """``model.eval_workers``: ``-1`` (auto) is ``min(4, CPUs per training process)``, and 0
    (serial, in this process) on a single CPU; ``0`` serial; ``n`` that many worker processes."""
    requested = int(requested)
    if requested >= 0:
        return requested
    if requested != -1:
        raise ValueError(f"model.eval_workers: expected -1 (auto), 0 (serial) or a worker count, got {requested}")
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cpus // max(1, processes_per_node))
    return 0 if per_process < 2 else min(MAX_AUTO_WORKERS, per_process)


def _postprocess_config(cfg: dict) -> dict:
    return {k: cfg[k] for k in POSTPROCESS_KEYS if k in cfg}


# --------------------------------------------------------------------------------------------------
# Worker side (also used in-process by the serial path): no torch here.


def _postprocessor_class():
    """``DBPostProcessor``; ``ocr.models`` imports its names lazily, so a worker loads neither torch nor
    torchvision for it."""
    from ocr.models.postprocess import DBPostProcessor

    return DBPostProcessor


#: Per process: ``{config key: (DBPostProcessor, DetectionEvaluator)}`` and the worker record.
_SCORERS: dict[tuple, tuple[Any, DetectionEvaluator]] = {}
_WORKER: dict[str, Any] = {}


def _scorer(key: tuple) -> tuple[Any, DetectionEvaluator]:
    scorer = _SCORERS.get(key)
    if scorer is None:
        pp_items, ev_items = key
        scorer = (_postprocessor_class()(**dict(pp_items)), DetectionEvaluator(**dict(ev_items)))
        _SCORERS[key] = scorer
    return scorer


def _key(postprocess_cfg: dict, evaluator_kwargs: dict | None) -> tuple:
    return tuple(sorted(_postprocess_config(postprocess_cfg).items())), tuple(sorted((evaluator_kwargs or {}).items()))


def _cleval_kernels() -> dict[str, int]:
    """cleval's numba kernels and how many signatures each has compiled in this process."""
    from ocr.metrics.cleval_metric import _cleval_modules

    _, eval_functions = _cleval_modules()
    utils = importlib.import_module("cleval.utils")
    out = {}
    for module in (eval_functions, utils):
        for name, value in vars(module).items():
            if hasattr(value, "signatures") and hasattr(value, "py_func") and value.__module__ == module.__name__:
                out[f"{module.__name__}.{name}"] = len(value.signatures)
    return out


def _warm_up(key: tuple) -> None:
    """Post-process a small map and score images that take every cleval match path (one-to-one,
    one-to-many, many-to-one, false positives, don't care): numba compiles its kernels now."""
    postprocess, evaluator = _scorer(key)
    prob = np.zeros((64, 96), np.float32)
    prob[10:22, 8:60] = 0.9
    postprocess.process_single(prob)

    def box(x, y, w, h):
        return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64)

    gt = [box(10, 10, 100, 20), box(10, 50, 100, 20), box(120, 50, 100, 20), box(10, 90, 60, 20), box(10, 130, 20, 60)]
    pred = [box(10, 10, 100, 20),                       # one-to-one
            box(10, 50, 210, 20),                       # many-to-one (covers two words)
            box(10, 90, 28, 20), box(40, 90, 30, 20),   # one-to-many (a word split in two)
            box(300, 300, 40, 20), box(400, 300, 20, 80),  # false positives
            box(10, 130, 20, 60)]                       # on a don't-care word
    ignore = [False, False, False, False, True]
    evaluator.image_counts(gt, ignore, pred)
    evaluator.image_counts(gt, ignore, [])
    evaluator.image_counts([], [], pred)


def _init_worker(key: tuple) -> None:
    """Pool initializer: build the post-processor and pay cleval's JIT before any task."""
    start = time.perf_counter()
    _warm_up(key)
    _WORKER.update(pid=os.getpid(), warmup_seconds=time.perf_counter() - start,
                   kernels_after_warmup=_cleval_kernels(), tasks=0, torch_imported="torch" in sys.modules)


def _worker_info() -> dict:
    """The record of the worker that runs this (for tests / diagnostics)."""
    return dict(_WORKER, kernels_now=_cleval_kernels(), torch_imported_now="torch" in sys.modules)


#: Per worker process: slot file path -> its read-only mapping (slots are reused batch after batch).
_MAPPINGS: dict[str, np.memmap] = {}


def _slot_view(ref: tuple) -> np.ndarray:
    """``(path, nbytes, shape, start, stop)`` -> images ``start:stop`` of the batch in that slot file."""
    path, nbytes, shape, start, stop = ref
    array = _MAPPINGS.get(path)
    if array is None or array.size < nbytes:
        if len(_MAPPINGS) > 64:  # slot files are replaced only when a larger batch needs more room
            _MAPPINGS.clear()
        array = _MAPPINGS[path] = np.memmap(path, dtype=np.uint8, mode="r", shape=(nbytes,))
    return np.frombuffer(array, dtype=np.float32, count=int(np.prod(shape))).reshape(shape)[start:stop]


def _score_images(key: tuple, probs: np.ndarray | tuple, matrices: np.ndarray, sizes: np.ndarray,
                  gt_polygons: Sequence, gt_ignore: Sequence, gt_texts: Sequence) -> list[ImageCounts]:
    """Post-process ``probs`` ``[n, H, W]`` (an array, or a reference into a slot file) and count
    each image against its ground truth (``gt_texts[i]``: image i's transcriptions, or None)."""
    postprocess, evaluator = _scorer(key)
    if isinstance(probs, tuple):
        probs = _slot_view(probs)
    out = []
    for i in range(len(probs)):
        polygons, _scores = postprocess.process_single(probs[i], matrices[i], (float(sizes[i][0]), float(sizes[i][1])))
        out.append(evaluator.image_counts(gt_polygons[i], gt_ignore[i], polygons, gt_texts[i]))
    if _WORKER:
        _WORKER["tasks"] += 1
    return out


# --------------------------------------------------------------------------------------------------
# Main process


def host_copy(*tensors):
    """Start copying tensors to the host: CUDA tensors into pinned memory with one
    ``non_blocking`` copy each, then one CUDA event on the current stream that completes when
    all copies have; host tensors and arrays are passed through. Returns ``(host, event | None)``."""
    copies, event = [], None
    for t in tensors:
        if getattr(t, "is_cuda", False):
            import torch

            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
            copies.append(host)
            if event is None:
                event = torch.cuda.Event()
        else:
            copies.append(t)
    if event is not None:
        event.record()
    return copies, event


class _SharedSlots:
    """``count`` reusable files under /dev/shm, each holding one batch of float32 maps, that the
    worker processes map read-only. The pool hands a slot to each batch in flight and takes it
    back when the batch's tasks are done, so a slot is never rewritten while a worker reads it.
    Files are named ``ocr_scoring_<pid>_*`` and removed on ``close`` (or, if the process was
    killed, by the next pool's start: :func:`ocr.shm.remove_stale_files`)."""

    PREFIX = "ocr_scoring_"

    def __init__(self, count: int, directory: str = SHM_DIR):
        self.directory = directory
        self.free = list(range(count))
        self._files: dict[int, tuple[str, int, np.memmap]] = {}
        self._paths: set[str] = set()
        remove_stale_files(directory, self.PREFIX)
        # without close() (an exception before teardown): removed when this object goes or at exit
        weakref.finalize(self, _unlink_all, self._paths)

    @staticmethod
    def usable(count: int, batch_bytes: int, directory: str = SHM_DIR) -> bool:
        try:
            return (os.path.isdir(directory) and os.access(directory, os.W_OK)
                    and shutil.disk_usage(directory).free > 2 * count * batch_bytes)
        except OSError:
            return False

    def write(self, slot: int, probs: np.ndarray) -> tuple[str, int]:
        """Copy ``probs`` (float32, C order) into the slot (grown if needed); ``(path, nbytes)``."""
        nbytes = probs.nbytes
        entry = self._files.get(slot)
        if entry is None or entry[1] < nbytes:
            if entry is not None:
                self._remove(slot)
            fd, path = tempfile.mkstemp(prefix=f"{self.PREFIX}{os.getpid()}_", suffix=".bin", dir=self.directory)
            try:
                # allocated now (ENOSPC here, an OSError), not on first write (SIGBUS in a mapping)
                os.posix_fallocate(fd, 0, nbytes)
            except OSError:
                _unlink_all([path])
                raise
            finally:
                os.close(fd)
            self._paths.add(path)
            entry = self._files[slot] = (path, nbytes, np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,)))
        path, size, array = entry
        np.copyto(np.frombuffer(array, dtype=np.float32, count=probs.size).reshape(probs.shape), probs)
        return path, size

    def _remove(self, slot: int) -> None:
        path, _, array = self._files.pop(slot)
        del array
        self._paths.discard(path)
        _unlink_all([path])

    def close(self) -> None:
        for slot in list(self._files):
            self._remove(slot)


def _unlink_all(paths) -> None:
    for path in list(paths):
        try:
            os.unlink(path)
        except OSError:
            pass


class _Batch:
    __slots__ = ("names", "future", "slot")

    def __init__(self, names, future, slot):
        self.names = names
        self.future = future  # dispatcher future -> list of task futures
        self.slot = slot  # shared-memory slot of its maps (None: the maps were pickled)


class ScoringPool:
    """Scores validation batches beside the forward pass; see the module docstring.

    Args:
        postprocess_cfg: ``model.postprocess`` (thresh, box_thresh, unclip_ratio, ...).
        workers: worker processes; 0 scores in the calling thread (the serial reference).
        evaluator_kwargs: ``DetectionEvaluator`` arguments (iou_threshold, dont_care_overlap).
        max_pending: batches in flight before ``submit`` waits (default ``workers + 2``).
        chunk: images per task (default 1: the workers share each batch image by image).
        start_method: ``spawn`` (default) or ``forkserver``; never ``fork`` (CUDA and DALI in
            the parent).
        shared_memory: pass the maps through /dev/shm slot files (default; falls back to
            pickling them when /dev/shm is missing or too small). An attribute: it can be
            switched between batches.
    """

    def __init__(self, postprocess_cfg: dict, workers: int, evaluator_kwargs: dict | None = None, *,
                 max_pending: int | None = None, chunk: int = 1, start_method: str = "spawn",
                 shared_memory: bool = True):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers} (resolve -1 with resolve_workers)")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver' (CUDA / DALI in the parent), got {start_method!r}")
        self.postprocess_cfg = _postprocess_config(postprocess_cfg)
        self.evaluator_kwargs = dict(evaluator_kwargs or {})
        self.workers = int(workers)
        self.max_pending = int(max_pending or self.workers + 2)
        self.chunk = max(1, int(chunk))
        self.start_method = start_method
        self.shared_memory = shared_memory
        self.wait_seconds = 0.0  # total since creation (callers take differences)
        self._key = _key(self.postprocess_cfg, self.evaluator_kwargs)
        self._pool: cf.ProcessPoolExecutor | None = None
        self._dispatcher: cf.ThreadPoolExecutor | None = None
        self._slots: _SharedSlots | None = None
        self._pending: deque[_Batch] = deque()
        self._done: list[tuple[list, list]] = []  # (names, counts) of finished batches, in order
        self._warm = False

    def __reduce__(self):
        # pickling (a module sent to DDP-spawned processes) carries the settings, not the processes
        return (_rebuild, (self.postprocess_cfg, self.workers, self.evaluator_kwargs, self.max_pending,
                           self.chunk, self.start_method, self.shared_memory))

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def started(self) -> bool:
        return self._pool is not None

    def start(self, wait: bool = False, timeout: float = 120.0) -> "ScoringPool":
        """Start the workers now (each warms up in the background); ``wait``: until all are ready.
        ``workers=0``: warms up this process instead (cleval's JIT, once)."""
        if self.workers == 0:
            if not self._warm:  # this process pays cleval's JIT now, not at the first batch
                _warm_up(self._key)
                self._warm = True
            return self
        if self._pool is None:
            ctx = multiprocessing.get_context(self.start_method)
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(self._key,))
            self._dispatcher = cf.ThreadPoolExecutor(1, thread_name_prefix="scoring-dispatch")
            # ProcessPoolExecutor spawns a process per submit while none is idle: one task each
            # starts them all, here.
            with _without_main_module():
                for _ in range(self.workers):
                    self._pool.submit(_worker_info)
        if wait:
            self.worker_info(timeout)
        return self

    def worker_info(self, timeout: float = 120.0) -> list[dict]:
        """One record per worker process (pid, warm-up seconds, cleval kernels compiled after the
        warm-up and now, whether torch is imported); waits until every worker has started."""
        if self.workers == 0:
            return []
        self.start()
        deadline = time.monotonic() + timeout
        seen: dict[int, dict] = {}
        while len(seen) < self.workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"scoring workers: {len(seen)}/{self.workers} started after {timeout:.0f} s")
            for f in [self._pool.submit(_worker_info) for _ in range(self.workers)]:
                info = f.result(timeout=max(0.1, deadline - time.monotonic()))
                seen[info["pid"]] = info
        return sorted(seen.values(), key=lambda r: r["pid"])

    def submit(self, prob_maps, matrices, orig_sizes, gt_polygons: Sequence, gt_ignore: Sequence,
               names: Sequence[str] | None = None, gt_texts: Sequence | None = None) -> None:
        """Queue one batch: ``prob_maps`` ``[B,1,H,W]`` (or ``[B,H,W]``) probabilities on any
        device, ``matrices`` ``[B,3,3]``, ``orig_sizes`` ``[B,2]`` (h, w), the batch's GT polygons
        and don't-care flags (original pixels), its image names (the evaluator's keys) and the GT
        transcriptions of each image (CLEval's character counts, as ``python -m ocr.metrics``
        takes them; None: estimated from each word's shape).
        Returns at once unless ``max_pending`` batches are in flight (or ``workers=0``)."""
        names = list(names) if names is not None else [None] * len(gt_polygons)
        gt_texts = list(gt_texts) if gt_texts is not None else [None] * len(gt_polygons)
        if self.workers == 0:
            start = time.perf_counter()
            counts = _score_images(self._key, *_host_arrays(prob_maps, matrices, orig_sizes), gt_polygons, gt_ignore,
                                   gt_texts)
            self._done.append((names, counts))
            self.wait_seconds += time.perf_counter() - start
            return
        self.start()
        (probs, mats, sizes), event = host_copy(prob_maps, matrices, orig_sizes)
        if len(self._pending) >= self.max_pending:
            start = time.perf_counter()
            while len(self._pending) >= self.max_pending:
                self._finish_oldest()
            self.wait_seconds += time.perf_counter() - start
        if self._slots is None and self.shared_memory:
            batch_bytes = int(np.prod(prob_maps.shape)) * 4
            if _SharedSlots.usable(self.max_pending, batch_bytes):
                self._slots = _SharedSlots(self.max_pending)
            else:
                self.shared_memory = False
                log.warning("scoring pool: %s is missing or too small for %d batches of %.1f MB; the probability "
                            "maps are pickled to the workers instead (slower)", SHM_DIR, self.max_pending, batch_bytes / 2**20)
        slot = self._slots.free.pop() if self._slots is not None and self.shared_memory else None
        future = self._dispatcher.submit(self._dispatch, probs, mats, sizes, event, list(gt_polygons), list(gt_ignore),
                                         gt_texts, slot)
        self._pending.append(_Batch(names, future, slot))

    def _dispatch(self, probs, mats, sizes, event, gt_polygons, gt_ignore, gt_texts, slot) -> list[cf.Future]:
        """Dispatcher thread: wait for the batch's copies, put its maps in its slot, queue its tasks."""
        if event is not None:
            event.synchronize()
        probs, mats, sizes = _host_arrays(probs, mats, sizes)
        n = len(probs)
        if slot is not None:
            try:
                path, nbytes = self._slots.write(slot, probs)
            except OSError as exc:  # /dev/shm filled up meanwhile: pickle the maps from now on
                if self.shared_memory:
                    log.warning("scoring pool: cannot use %s (%s); the probability maps are pickled to the "
                                "workers instead (slower)", SHM_DIR, exc)
                self.shared_memory, slot = False, None
        tasks = []
        for i in range(0, n, self.chunk):
            j = min(n, i + self.chunk)
            maps = (path, nbytes, probs.shape, i, j) if slot is not None else probs[i:j]
            tasks.append(self._pool.submit(_score_images, self._key, maps, mats[i:j], sizes[i:j],
                                           gt_polygons[i:j], gt_ignore[i:j], gt_texts[i:j]))
        return tasks

    def _finish_oldest(self) -> None:
        batch = self._pending.popleft()
        try:
            counts: list[ImageCounts] = []
            for task in batch.future.result():
                counts.extend(task.result())
        finally:
            if batch.slot is not None and self._slots is not None:
                self._slots.free.append(batch.slot)
        self._done.append((batch.names, counts))

    @property
    def pending(self) -> int:
        """Batches submitted and not yet collected by ``result``."""
        return len(self._pending) + len(self._done)

    def result(self) -> DetectionEvaluator:
        """Wait for every submitted batch; their counts, added in submission order (bit-identical
        to the serial path). The next ``submit`` starts a new round."""
        start = time.perf_counter()
        try:
            while self._pending:
                self._finish_oldest()
        finally:
            self.wait_seconds += time.perf_counter() - start
        evaluator = DetectionEvaluator(**self.evaluator_kwargs)
        for names, counts in self._done:
            for name, (iou, cleval) in zip(names, counts):
                evaluator.add_counts(iou, cleval, key=name)
        self._done = []
        return evaluator

    def discard(self) -> None:
        """Drop a round left over (e.g. by an interrupted epoch): waits for its tasks, keeps nothing."""
        while self._pending:
            try:
                self._finish_oldest()
            except Exception:  # noqa: BLE001 - discarded work: its error does not matter any more
                pass
        self._done = []

    def close(self) -> None:
        """Stop the workers (pending work is cancelled) and remove the slot files. A closed
        pool starts again on the next ``submit``/``start``."""
        self._pending.clear()
        self._done = []
        if self._dispatcher is not None:
            self._dispatcher.shutdown(wait=True, cancel_futures=True)
            self._dispatcher = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._slots is not None:
            self._slots.close()
            self._slots = None


@contextlib.contextmanager
def _without_main_module():
    """Processes spawned in this block do not re-run the parent's ``__main__`` script (what
    ``spawn`` does so that pickled ``__main__`` objects resolve). The pool pickles only this
    module's functions, and a script such as ``benchmarks/host_overhead.py`` imports torch at
    the top: re-running it would cost every worker ~9 s and ~0.9 GB."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def preparation_data(name):
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    spawn.get_preparation_data = preparation_data
    try:
        yield
    finally:
        spawn.get_preparation_data = original


def _rebuild(postprocess_cfg, workers, evaluator_kwargs, max_pending, chunk, start_method, shared_memory) -> ScoringPool:
    return ScoringPool(postprocess_cfg, workers, evaluator_kwargs, max_pending=max_pending, chunk=chunk,
                       start_method=start_method, shared_memory=shared_memory)


def _host_arrays(prob_maps, matrices, orig_sizes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ocr.models.postprocess.batch_arrays`` of the batch; on a GPU (the serial path) after one
    blocking copy."""
    from ocr.models.postprocess import batch_arrays

    if hasattr(prob_maps, "is_cuda") and prob_maps.is_cuda:
        (prob_maps, matrices, orig_sizes), event = host_copy(prob_maps, matrices, orig_sizes)
        event.synchronize()
    return batch_arrays(prob_maps, matrices, orig_sizes)


# --------------------------------------------------------------------------------------------------
# One call for benchmarks: the same predictions, serial or pooled


def score_batches(batches: Iterable[dict], postprocess_cfg: dict, workers: int = 0,
                  pool: ScoringPool | None = None) -> DetectionEvaluator:
    """Score batches (dicts with ``prob_maps``, ``matrices``, ``orig_sizes``, ``polygons``,
    ``ignore``, ``names`` and optionally ``texts``, the GT transcriptions of each image: a Batch
    with the model's ``prob_map`` as ``prob_maps``). ``workers=0``
    scores serially in this thread; otherwise a pool (``pool``, already started, or a new one
    that is closed afterwards; time it started with ``start(wait=True)`` to exclude start-up)."""
    own = pool is None
    pool = pool or ScoringPool(postprocess_cfg, workers)
    try:
        for b in batches:
            pool.submit(b["prob_maps"], b["matrices"], b["orig_sizes"], b["polygons"], b["ignore"], b.get("names"),
                        b.get("texts"))
        return pool.result()
    finally:
        if own:
            pool.close()


def score_serial(batches: Iterable[dict], postprocess_cfg: dict) -> DetectionEvaluator:
    """The reference: ``DBPostProcessor`` + ``DetectionEvaluator.add`` image after image, as the
    module did before the pool existed."""
    postprocess = _postprocessor_class()(**_postprocess_config(postprocess_cfg))
    evaluator = DetectionEvaluator()
    for b in batches:
        results = postprocess(b["prob_maps"], b["matrices"], b["orig_sizes"])
        names = b.get("names") or [None] * len(results)
        texts = b.get("texts") or [None] * len(results)
        for i, (polygons, _scores) in enumerate(results):
            evaluator.add(b["polygons"][i], b["ignore"][i], polygons, texts[i], key=names[i])
    return evaluator


def synthetic_predictions(source, image_size: int, images: int, batch_size: int = 8, seed: int = 0) -> list[dict]:
    """Batches of predictions made from a split's ground truth, for benchmarks: each GT word,
    mapped to the network input by the eval matrix, is drawn as its DB kernel with a random
    confidence, ~5% of the words are missed and each image gets two spurious blobs.
    ``source`` is a :class:`ocr.data.source.SampleSource` (samples cycled up to ``images``)."""
    import cv2

    from ocr.data.geometry import eval_matrix, transform_points

    rng = np.random.default_rng(seed)
    batches = []
    for first in range(0, images, batch_size):
        idx = [k % len(source) for k in range(first, min(images, first + batch_size))]
        probs = np.zeros((len(idx), 1, image_size, image_size), np.float32)
        mats, sizes, polygons, ignore, texts, names = [], [], [], [], [], []
        for row, k in enumerate(idx):
            sample, (h, w) = source.samples[k], source.sizes[k]
            m = eval_matrix(h, w, image_size)
            prob = np.full((image_size, image_size), 0.01, np.float32)
            for poly in sample.polygons:
                if rng.random() < 0.05:
                    continue
                # the DB kernel: the word's rectangle shrunk by D = A (1 - 0.4^2) / L on each side
                (cx, cy), (rw, rh), angle = cv2.minAreaRect(transform_points(m, np.asarray(poly, np.float64)).astype(np.float32))
                d = rw * rh * (1 - 0.4 ** 2) / max(1e-6, 2 * (rw + rh))
                # (at least 4 px across, as a trained model's kernels of small words are)
                kernel = cv2.boxPoints(((cx, cy), (max(rw - 2 * d, min(rw, 4.0)), max(rh - 2 * d, min(rh, 4.0))), angle))
                cv2.fillPoly(prob, [np.round(kernel).astype(np.int32)], float(rng.uniform(0.6, 0.95)))
            for _ in range(2):
                x, y = (int(v) for v in rng.integers(0, image_size - 24, 2))
                cv2.rectangle(prob, (x, y), (x + 20, y + 6), 0.8, -1)
            probs[row, 0] = cv2.GaussianBlur(prob, (5, 5), 1.0)
            mats.append(m)
            sizes.append((h, w))
            polygons.append([np.asarray(p, np.float32) for p in sample.polygons])
            ignore.append(list(sample.ignore))
            texts.append(list(sample.transcriptions))
            names.append(f"{first + row}:{sample.name}")  # a cycled sample is another image
        batches.append({"prob_maps": probs, "matrices": np.stack(mats), "orig_sizes": np.asarray(sizes, np.int64),
                        "polygons": polygons, "ignore": ignore, "texts": texts, "names": names})
    return batches


def benchmark_scoring(source, params, workers: int | None = None, repeats: int = 3, images: int = 32,
                      batch_size: int = 8, postprocess_cfg: dict | None = None) -> dict:
    """Scoring throughput on the same predictions (:func:`synthetic_predictions` of ``source`` at
    ``params.image_size``): the pool (``workers``; None: the training default, ``resolve_workers(-1)``)
    vs one worker, i.e. serial in this process. Both are warmed up (pool started, JIT paid) before
    the clock; repeats alternate between the two; medians. ``identical``: every pooled result
    equals the serial one (counts and P/R/H)."""
    import statistics
    from dataclasses import asdict

    from ocr.config import PostprocessConfig

    pp = postprocess_cfg or asdict(PostprocessConfig())
    workers = resolve_workers(-1 if workers is None else workers)
    batches = synthetic_predictions(source, int(params.image_size), images, batch_size)
    n = sum(len(b["names"]) for b in batches)
    serial = ScoringPool(pp, 0).start()  # pays cleval's JIT here
    reference = score_batches(batches, pp, pool=serial)
    start = time.perf_counter()
    pool = ScoringPool(pp, workers).start(wait=True)
    start_seconds = time.perf_counter() - start
    times, times_1, identical = [], [], True
    try:
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            result = score_batches(batches, pp, pool=pool)
            times.append(time.perf_counter() - t)
            identical &= result.counts() == reference.counts() and result.compute() == reference.compute()
            t = time.perf_counter()
            score_batches(batches, pp, pool=serial)
            times_1.append(time.perf_counter() - t)
    finally:
        pool.close()
    sec, sec_1 = statistics.median(times), statistics.median(times_1)
    return {"workers": workers, "images": n, "image_size": int(params.image_size),
            "words_per_image": round(sum(len(p) for b in batches for p in b["polygons"]) / max(1, n), 1),
            "img_s": n / sec, "img_s_1": n / sec_1, "speedup": sec_1 / sec, "identical": bool(identical),
            "seconds": times, "seconds_1": times_1, "pool_start_seconds": round(start_seconds, 3),
            "metrics": reference.compute()}
