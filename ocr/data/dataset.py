"""The CPU backend: a torch Dataset over a SampleSource (OpenCV decode, NumPy geometry,
DB targets) and its two loaders:

* :class:`ThreadedLoader` (the default when training on the CPU): a pool of threads in the
  training process, each building whole Batches. OpenCV, NumPy's large-array work and
  torch release the GIL, so the threads run in parallel, and nothing crosses a process
  boundary (a DataLoader worker hands every batch over through fresh shared memory, ~11 MB
  per 640 px image with its targets: on the 2-core development machine the worker
  processes spent ~45% more CPU time per image, benchmarks/loader_bench.py). Sample order
  and random geometry come from ``(seed, epoch, index)`` (``ocr.data.sampling``), sharded
  by rank like the DALI loader.
* :class:`ProcessLoader`: a ``torch.utils.data.DataLoader`` with worker processes (the
  classic baseline; the default when the model trains on a GPU), on the same epoch plan
  and per-sample random streams, so it gives the threaded loader's batches.

Items carry the uint8 HWC canvas; the collate function normalises the whole batch (see
``ocr.data.batch``), so the Batch the model sees is the same float tensor either way.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ocr.data.batch import GEOMETRY_KEY, TARGET_KEY_OF, Collator, sample_geometry
from ocr.data.geometry import transform_polygons
from ocr.data.sampling import PlannedLoader, sample_rng
from ocr.data.source import ImageReadError, SampleSource
from ocr.data.targets import make_db_targets
from ocr.data.transforms import ImageDecodeError, TransformParams, render_decoded, render_sample, sample_matrix

log = logging.getLogger(__name__)

TARGET_MODES = ("reference", "vectorized", "deferred")


class ValidatedOCRDataset(Dataset):
    """One split as samples: the uint8 canvas (``image``, HWC RGB), M, polygons (original
    and network pixels), ignore flags and, with ``target_mode="reference"``, the DB maps.

    Random augmentation: sample ``i`` of epoch ``e`` draws from ``sample_rng(seed, e, i)``
    (what both CPU loaders and the DALI loader use; the loaders set ``seed`` to theirs), so
    it does not depend on the thread, worker process or rank that builds it.
    """

    def __init__(self, source: SampleSource, params: TransformParams, with_targets: bool = True,
                 target_kwargs: dict | None = None, target_mode: str = "reference", seed: int | None = None):
        if target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode must be one of {TARGET_MODES}, got {target_mode!r}")
        self.source = source
        self.params = params
        self.with_targets = with_targets
        self.target_kwargs = dict(target_kwargs or {})
        # reference: per sample here; vectorized: geometry per sample here, maps per batch in the
        # collate (same worker); deferred: geometry per sample here, maps per batch on the model's
        # device after the transfer (the training thread only renders).
        self.target_mode = target_mode
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_generator(self, index: int, epoch: int | None = None) -> np.random.Generator | None:
        if not self.params.train:
            return None
        seed = 0 if self.seed is None else self.seed
        return sample_rng(seed, self.epoch if epoch is None else epoch, index)

    def _canvas(self, index: int, matrix: np.ndarray, rng) -> np.ndarray:
        height, width = self.source.sizes[index]
        decoded_of = getattr(self.source, "decoded", None)
        decoded = decoded_of(index) if decoded_of is not None else None
        if decoded is None:
            return render_sample(self.params, self.source.encoded_array(index), matrix, height, width, rng,
                                 str(self.source.samples[index].path))
        image, reduction = decoded  # preloaded decoded arrays (SampleSource.preload_decoded)
        return render_decoded(self.params, image, reduction, matrix, height, width, rng)

    def get(self, index: int, epoch: int | None = None) -> dict:
        """Item ``index`` (with ``seed`` set: as drawn in ``epoch``, default the current one). An
        image that fails to decode raises naming the file, or with ``on_error=skip`` is counted
        by the source and replaced by the next usable sample (``SampleSource.usable_index``)."""
        usable = getattr(self.source, "usable_index", None)  # SampleSource look-alikes have none
        while True:
            if usable is not None:
                index = usable(index)
            try:
                return self._item(index, epoch)
            except (ImageDecodeError, ImageReadError) as exc:
                if usable is None:
                    raise
                self.source.record_failure(index, exc)  # raises under on_error=raise

    def _item(self, index: int, epoch: int | None) -> dict:
        sample = self.source.samples[index]
        height, width = self.source.sizes[index]
        rng = self.sample_generator(index, epoch)
        matrix = sample_matrix(self.params, height, width, sample.polygons, sample.ignore, rng)
        canvas = self._canvas(index, matrix, rng)
        net_polygons = transform_polygons(matrix, sample.polygons)
        item = {
            "image": canvas,
            "matrix": matrix,
            "orig_size": (height, width),
            "polygons": list(sample.polygons),
            "net_polygons": net_polygons,
            "ignore": list(sample.ignore),
            "names": sample.name,
        }
        if self.with_targets:
            size = self.params.output_size
            if self.target_mode == "reference":
                targets = make_db_targets(net_polygons, list(sample.ignore), size, size, **self.target_kwargs)
                item.update({TARGET_KEY_OF[k]: v for k, v in targets.items()})
            else:  # vectorized / deferred: the geometry here, the maps per batch (collate or device)
                item[GEOMETRY_KEY] = sample_geometry(net_polygons, sample.ignore, size, self.target_kwargs)
        return item

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """``dataset[i]`` (the current epoch) or ``dataset[(i, epoch)]`` (:class:`ProcessLoader`)."""
        if isinstance(index, tuple):
            return self.get(*index)
        return self.get(index)

    def collator(self) -> Collator:
        mode = self.target_mode if self.with_targets else "reference"
        return Collator(mode, self.target_kwargs, mean=self.params.mean, std=self.params.std)


class _PlanBatches:
    """A DataLoader's ``batch_sampler``: the batches of the epoch the :class:`ProcessLoader` set,
    each sample as ``(index, epoch)`` so the worker processes draw that epoch's augmentation
    (their copy of the dataset never hears of ``set_epoch``)."""

    def __init__(self):
        self.epoch = 0
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        for batch in self.batches:
            yield [(int(i), self.epoch) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class _WorkerError:
    """A worker's decode error, handed to the main process as data: it raises it there as it
    is (the DataLoader would re-raise it with the worker's traceback as the message)."""

    def __init__(self, error: Exception):
        self.error = error


class _WorkerItems(Dataset):
    """What :class:`ProcessLoader`'s workers read: sample ``(index, epoch)`` and the decode
    failures it recorded in the worker's copy of the source (``on_error=skip``), which the
    main process then records in its own; or the decode error (``on_error=raise``)."""

    def __init__(self, dataset: ValidatedOCRDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        failures = getattr(self.dataset.source, "failures", {})
        known = set(failures)
        try:
            item = self.dataset.get(*key)
        except (ImageDecodeError, ImageReadError) as exc:
            return _WorkerError(exc)
        return item, {i: failures[i] for i in failures.keys() - known}


class _ReportingCollate:
    """The dataset's collate over the items, plus the failures of the batch (or its first error)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, results: list):
        errors = [r for r in results if isinstance(r, _WorkerError)]
        if errors:
            return errors[0]
        items, failures = zip(*results)
        return self.collate(list(items)), {i: m for found in failures for i, m in found.items()}


def _quiet_source_log(worker_id: int) -> None:
    """Workers do not log decode failures: the main process records and logs each one once."""
    logging.getLogger(ImageReadError.__module__).disabled = True


def _worker_context():
    """Worker processes forked from a fork server (a clean process that has imported this
    module, so a worker starts in milliseconds): forking the training process itself copies
    whatever threads hold locks at that moment (DALI's, OpenMP's), and a worker forked from a
    process that had run a DALI pipeline died of SIGABRT now and then."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class ProcessLoader(PlannedLoader):
    """The CPU backend with ``torch.utils.data.DataLoader`` worker processes (the classic
    baseline; the default when the model trains on a GPU). The batches are the
    :class:`~ocr.data.sampling.EpochPlan`'s, as in the threaded loader: shuffled from
    ``(seed, epoch)``, sharded by the torch.distributed rank (Lightning adds no
    DistributedSampler to it, nor to the batch cache or map filler that may wrap it), every
    sample augmented from ``sample_rng(seed, epoch, index)`` whichever worker builds it. So
    both CPU loaders give the same batches, bit for bit."""

    def __init__(self, dataset: ValidatedOCRDataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 num_workers: int, pin_memory: bool = False, rank: int | None = None, world_size: int | None = None):
        if dataset.seed is None:
            dataset.seed = seed
        super().__init__(len(dataset), batch_size, shuffle, drop_last, seed, rank, world_size)
        self.dataset = dataset
        self._plan_batches = _PlanBatches()
        self.loader = DataLoader(
            _WorkerItems(dataset),
            batch_sampler=self._plan_batches,
            num_workers=num_workers,
            collate_fn=_ReportingCollate(dataset.collator()),
            pin_memory=pin_memory,
            worker_init_fn=_quiet_source_log,
            multiprocessing_context=_worker_context() if num_workers > 0 else None,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None,
        )

    def __iter__(self) -> "_ProcessEpoch":
        return _ProcessEpoch(self)

    def _start_epoch(self):
        """The DataLoader's iterator over the next epoch; called by an iterator's first ``next()``
        (see ``ocr.data.sampling.PlannedLoader.take_epoch``). A DataLoader with persistent
        workers keeps one iterator: starting an epoch drops what is left of an abandoned one."""
        epoch = self.take_epoch()
        self._plan_batches.epoch, self._plan_batches.batches = epoch, self.plan.batches(epoch)
        return iter(self.loader)

    def close(self) -> None:
        """Stop the worker processes (a later ``iter()`` starts new ones)."""
        iterator = getattr(self.loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.loader._iterator = None


class _ProcessEpoch:
    def __init__(self, loader: ProcessLoader):
        self._loader = loader
        self._iterator = None

    def __iter__(self) -> "_ProcessEpoch":
        return self

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._loader._start_epoch()
        out = next(self._iterator)
        if isinstance(out, _WorkerError):
            raise out.error
        batch, failures = out
        source = self._loader.dataset.source
        for index, message in sorted(failures.items()):  # raises under on_error=raise
            source.record_failure(index, ImageDecodeError(message))
        return batch


def _limit_thread_parallelism() -> None:
    """Loader threads run their torch ops single-threaded (OpenMP's thread count is per
    calling thread, so the training thread keeps its own), as DataLoader workers do."""
    torch.set_num_threads(1)


class ThreadedLoader(PlannedLoader):
    """Batches built by ``num_threads`` threads of this process (0: in the calling thread),
    in order, up to ``prefetch`` batches ahead. One ``iter()`` is one epoch of
    :class:`~ocr.data.sampling.EpochPlan` (shuffled from ``(seed, epoch)``, sharded by the
    torch.distributed rank, last partial batch kept unless ``drop_last``); starting a new
    epoch drops what is left of an abandoned one. ``sampler.set_epoch`` (Lightning) picks
    the epoch."""

    def __init__(self, dataset: ValidatedOCRDataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 num_threads: int, prefetch: int | None = None, rank: int | None = None,
                 world_size: int | None = None):
        if dataset.seed is None:
            dataset.seed = seed
        super().__init__(len(dataset), batch_size, shuffle, drop_last, seed, rank, world_size)
        self.dataset = dataset
        self.collate = dataset.collator()
        self.num_threads = max(0, int(num_threads))
        self.prefetch = prefetch if prefetch is not None else max(2, 2 * self.num_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._active: _ThreadedEpoch | None = None
        self._lock = threading.Lock()

    def make_batch(self, indices, epoch: int) -> dict:
        return self.collate([self.dataset.get(int(i), epoch) for i in indices])

    def _executor(self) -> ThreadPoolExecutor | None:
        if self.num_threads == 0:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="ocr-loader",
                                            initializer=_limit_thread_parallelism)
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def __iter__(self) -> "_ThreadedEpoch":
        with self._lock:
            if self._active is not None:
                self._active.close()
            self._active = _ThreadedEpoch(self)
            return self._active

    def _start_epoch(self) -> tuple[int, list[np.ndarray]]:
        """The next epoch and its batches; called by an iterator's first ``next()`` (see
        ``ocr.data.sampling.PlannedLoader.take_epoch``)."""
        epoch = self.take_epoch()
        self.dataset.set_epoch(epoch)
        return epoch, self.plan.batches(epoch)

    def close(self) -> None:
        if self._active is not None:
            self._active.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class _ThreadedEpoch:
    def __init__(self, loader: ThreadedLoader):
        self._loader = loader
        self._epoch: int | None = None  # chosen by the first next()
        self._batches: list[np.ndarray] = []
        self._next_submit = 0
        self._next_yield = 0
        self._pending: dict[int, Future] = {}
        self._closed = False

    def __iter__(self) -> "_ThreadedEpoch":
        return self

    def __len__(self) -> int:
        return len(self._batches) if self._epoch is not None else len(self._loader)

    def _fill(self, pool: ThreadPoolExecutor) -> None:
        while self._next_submit < len(self._batches) and len(self._pending) < self._loader.prefetch:
            i = self._next_submit
            self._pending[i] = pool.submit(self._loader.make_batch, self._batches[i], self._epoch)
            self._next_submit += 1

    def __next__(self) -> dict:
        if self._epoch is None and not self._closed:
            self._epoch, self._batches = self._loader._start_epoch()
        if self._closed or self._next_yield >= len(self._batches):
            self.close()
            raise StopIteration
        i = self._next_yield
        pool = self._loader._executor()
        if pool is None:
            batch = self._loader.make_batch(self._batches[i], self._epoch)
        else:
            self._fill(pool)
            batch = self._pending.pop(i).result()
            self._fill(pool)
        self._next_yield += 1
        return batch

    def close(self) -> None:
        self._closed = True
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
