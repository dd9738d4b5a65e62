"""The DALI loader: runs a split's graph and turns its outputs into complete Batches.

``len()`` is the number of batches of an epoch (this rank's share); every ``iter()`` is one
epoch: reshuffled from ``(seed, epoch)``, the last partial batch kept unless ``drop_last``.
An epoch abandoned mid-way (Lightning's sanity check, ``limit_*_batches``) is cancelled
when the next one starts: the external-source workers stop producing it, the batches
already in flight are run out, and the pipeline is reset (DALI resets only at the end of
an epoch).

The per-sample work, including each sample's DB target geometry, is done by the source
(``dali_pipelines.source``) in the external-source workers; turning a batch's outputs into
a Batch is array concatenation plus rendering the targets.

On the CPU (``device="cpu"``) the pipeline is driven, and each batch's outputs turned into
a Batch with its DB targets, by one helper thread that works one batch ahead of the
consumer; its torch ops run single-threaded (OpenMP's thread count is per calling
thread): torch's intra-op threads spinning against DALI's own threads made target
rendering ~15x slower on a 2-core machine. On the GPU the calling thread does it (the
targets are CUDA kernels; CUDA's current device and stream are per thread).
"""

from __future__ import annotations

import logging
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np
import torch

from dali_pipelines.graphs import OUTPUTS, build_pipeline
from dali_pipelines.source import WARMUP_EPOCH, DaliBatchSource, EpochControl, unpack_record
from ocr.data.batch import GEOMETRY_KEY, attach_targets
from ocr.data.geometry import split_rows
from ocr.data.sampling import PlannedLoader
from ocr.data.targets import DEFAULT_TILE, geometry_from_arrays, merge_geometries
from ocr.data.source import ImageReadError
from ocr.data.transforms import ImageDecodeError, TransformParams, decode_rgb

log = logging.getLogger(__name__)


def _to_numpy_list(tensor_list) -> list[np.ndarray]:
    return [np.array(tensor_list[i]) for i in range(len(tensor_list))]


class DaliLoader(PlannedLoader):
    """Iterable of Batches from a DALI pipeline (see module docstring)."""

    def __init__(self, source, params: TransformParams, target_kwargs: dict, batch_size: int, shuffle: bool,
                 drop_last: bool, seed: int, with_targets: bool = True, device: str = "cpu", num_threads: int = 2,
                 parallel: bool = False, py_num_workers: int = 1, prefetch: int = 2, rank: int | None = None,
                 world_size: int | None = None, device_id: int | None = None, render_targets: bool = True,
                 helper_thread: bool | None = None):
        """``render_targets=False``: batches carry the target geometry (``GEOMETRY_KEY``) and the
        consumer renders (``ocr.data.batch.attach_targets``). ``helper_thread``: drive the pipeline
        from one helper thread (default: on the CPU only, see the module docstring)."""
        super().__init__(len(source), batch_size, shuffle, drop_last, seed, rank, world_size)
        self.source = source
        self.params = params
        self.target_kwargs = dict(target_kwargs)
        self.with_targets = with_targets
        self.device = device
        self.num_threads = num_threads
        self.parallel = parallel
        self.py_num_workers = py_num_workers
        self.prefetch = prefetch
        self.device_id = device_id
        self.render_targets = render_targets
        self.helper_thread = device == "cpu" if helper_thread is None else bool(helper_thread)
        self._control: EpochControl | None = None
        self._pipe = None
        self._pipe_epoch = 0  # DALI's epoch index of the pipeline's current epoch
        self._epoch_open = False  # the pipeline has started an epoch that was not run out and reset
        self._active: _EpochIterator | None = None
        self._finalizer = None
        self._last_outputs = None
        self._worker: ThreadPoolExecutor | None = None
        self._callback: DaliBatchSource | None = None

    # ------------------------------------------------------------------ public
    def __iter__(self) -> "_EpochIterator":
        if self._active is not None:
            self._active.close()
            self._active = None
        self._call(self._finish_epoch)
        if self.plan.num_batches == 0:
            self._active = _EpochIterator(self, 0)
            return self._active
        self._call(self._pipeline)
        self._active = _EpochIterator(self, self.plan.num_batches)
        return self._active

    def _start_epoch(self) -> int:
        """Start the pipeline on the next epoch; called by an iterator's first request (see
        ``ocr.data.sampling.PlannedLoader.take_epoch``)."""
        epoch = self.take_epoch()
        self._control.start(self._pipe_epoch, epoch)
        self._epoch_open = True
        return epoch

    def close(self) -> None:
        """Stop the workers and free the pipeline (also done when the loader is collected)."""
        if self._active is not None:
            self._active.close()
            self._active = None
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self._finalizer is not None:
            self._finalizer()
        self._pipe = None
        self._control = None
        self._last_outputs = None
        self._epoch_open = False

    # ------------------------------------------------------------------ internals
    def _executor(self) -> ThreadPoolExecutor | None:
        if not self.helper_thread:
            return None
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="dali-loader", initializer=torch.set_num_threads,
                                              initargs=(1,))
        return self._worker

    def _submit(self, fn) -> Future:
        executor = self._executor()
        if executor is not None:
            return executor.submit(fn)
        future: Future = Future()
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            future.set_exception(exc)
        return future

    def _call(self, fn):
        """Run ``fn`` where the pipeline lives (the helper thread on the CPU), in order."""
        return self._submit(fn).result()

    def _pipeline(self, warm_up: bool = True):
        if self._pipe is None:
            self._control = EpochControl()
            self._callback = callback = DaliBatchSource(self.source, self.params, self.plan, self._control,
                                       self.target_kwargs if self.with_targets else None)
            device_id = self.device_id
            if device_id is None and self.device == "gpu":
                device_id = torch.cuda.current_device()
            pipe = build_pipeline(callback, self.params, self.device, self.plan.batch_size, self.num_threads,
                                  device_id, parallel=self.parallel, py_num_workers=self.py_num_workers,
                                  prefetch=self.prefetch)
            if self.parallel:
                pipe.start_py_workers()
            pipe.build()
            self._pipe = pipe
            self._pipe_epoch = 0
            self._finalizer = weakref.finalize(self, _release, pipe, self._control)
            if warm_up and not self._warm_up():
                self._discard_pipeline()
                return self._pipeline(warm_up=False)
        return self._pipe

    def _warm_up(self) -> bool:
        """Run one batch of the split's largest images (decoded size) through a new pipeline.
        DALI's host pool (allocations of 32 MB or more, e.g. a batch of decoded receipts) grows
        in doubling blocks and never shrinks: without this it grows again whenever a shuffle
        first puts large images together, epochs into a run (benchmarks/soak.py). A decode
        error here is left to the epoch that meets the image (it names the file there): False,
        and the pipeline is built again without the warm-up."""
        self._control.start(self._pipe_epoch, WARMUP_EPOCH)
        self._epoch_open = True
        try:
            self._pipe.run()
        except StopIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError for operator errors
            log.debug("DALI warm-up batch failed (%s); building the pipeline again without it", exc)
            return False
        self._finish_epoch()
        return True

    def _finish_epoch(self) -> None:
        """Run the open epoch out (cancelled: no new batches) and reset the pipeline."""
        if not self._epoch_open:
            return
        self._control.cancel(self._pipe_epoch)
        while True:
            try:
                self._pipe.run()
            except StopIteration:
                break
        self._pipe.reset()
        self._pipe_epoch += 1
        self._epoch_open = False

    def _run(self, epoch: int, batch: int) -> dict:
        """Batch number ``batch`` of ``epoch``. When the pipeline fails (a decode error), it is
        discarded (the next ``iter()`` builds a new one) and the error names the file, as the
        CPU backend's does; with ``on_error=skip`` the failed images are counted and replaced
        and a new pipeline resumes the epoch at this batch."""
        while True:
            try:
                outputs = dict(zip(OUTPUTS, self._pipe.run()))
                break
            except StopIteration:
                raise
            except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError for operator errors
                self._recover(epoch, batch, exc)
        self._last_outputs = outputs
        return self._to_batch(outputs)

    def _recover(self, epoch: int, batch: int, exc: Exception) -> None:
        # DALI may report the error of a batch already in flight: look at those too
        last = min(batch + self.prefetch + 1, self.plan.num_batches)
        indices = sorted({i for k in range(batch, last) for i in self._callback.batch_indices(epoch, k)})
        self._discard_pipeline()
        failed = []
        for index in indices:  # find the culprit by decoding the batch's images on the CPU
            try:
                decode_rgb(self.source.encoded_array(index), 1, str(self.source.samples[index].path))
            except (ImageDecodeError, ImageReadError) as error:
                failed.append((index, error))
        record = getattr(self.source, "record_failure", None)  # SampleSource look-alikes have none
        if not failed or record is None:
            raise exc  # not an image the CPU cannot decode either: DALI's own error, unchanged
        for index, error in failed:
            record(index, error)  # raises under on_error=raise
        self._pipeline()
        self._control.start(self._pipe_epoch, epoch, first_batch=batch)
        self._epoch_open = True

    def _discard_pipeline(self) -> None:
        """Drop a pipeline that raised: DALI leaves it unusable."""
        if self._finalizer is not None:
            self._finalizer()
        self._pipe = None
        self._control = None
        self._callback = None
        self._last_outputs = None
        self._epoch_open = False

    def _to_batch(self, out: dict) -> dict:
        """DALI outputs -> Batch: array views and concatenations only (the per-polygon work was done
        by the source, in the external-source workers); then the targets, unless deferred."""
        images = self._images(out["images"])
        records = [unpack_record(r) for r in _to_numpy_list(out["record"])]
        samples = [self.source.samples[r["index"]] for r in records]
        net_polygons = [split_rows(r["net_vertices"], r["lengths"].tolist()) for r in records]
        batch = {
            "images": images,
            "matrices": torch.from_numpy(np.stack([r["matrix"] for r in records])),
            "orig_sizes": torch.tensor([self.source.sizes[r["index"]] for r in records], dtype=torch.int64),
            "polygons": [list(s.polygons) for s in samples],
            "net_polygons": net_polygons,
            "ignore": [r["ignore"].tolist() for r in records],
            "names": [s.name for s in samples],
        }
        if self.with_targets:
            size = self.params.output_size
            batch[GEOMETRY_KEY] = merge_geometries(
                [geometry_from_arrays(r["geometry"], size, size, DEFAULT_TILE) for r in records])
            if self.render_targets:
                attach_targets(batch, self.target_kwargs)
        return batch

    def _images(self, tensor_list) -> torch.Tensor:
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensor = tensor_list.as_tensor()
            device = torch.device("cuda", torch.cuda.current_device())
            out = torch.empty(tensor.shape(), dtype=torch.float32, device=device)
            # on torch's current stream, as DALIGenericIterator does; the DALI outputs stay
            # referenced until the next batch (self._last_outputs), past the queued copy
            feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
            return out
        return torch.from_numpy(tensor_list.as_array())


def _release(pipe, control: EpochControl) -> None:
    """Stop the external-source workers and the pipeline; remove the control file. Safe to
    run twice and at interpreter exit (after DALI's own shutdown)."""
    try:
        pool = getattr(pipe, "_py_pool", None)
        if pool is not None:
            pool.close()
        pipe._shutdown()
    except Exception:  # noqa: BLE001 - best effort at shutdown
        log.debug("DALI pipeline shutdown failed", exc_info=True)
    finally:
        control.close()


class _EpochIterator:
    """One epoch of a :class:`DaliLoader`; invalid once the loader starts another epoch.
    With a helper thread, the next batch is requested when this one is handed out."""

    def __init__(self, loader: DaliLoader, num_batches: int):
        self._loader = loader
        self.epoch: int | None = None  # chosen by the first request
        self._to_request = num_batches
        self._num_batches = num_batches
        self._pending: Future | None = None
        self._closed = False

    def __iter__(self) -> "_EpochIterator":
        return self

    def __len__(self) -> int:
        return self._num_batches

    def _request(self) -> None:
        if self._pending is None and self._to_request > 0:
            if self.epoch is None:
                self.epoch = self._loader._start_epoch()
            batch = self._num_batches - self._to_request
            self._pending = self._loader._submit(partial(self._loader._run, self.epoch, batch))
            self._to_request -= 1

    def __next__(self) -> dict:
        if self._closed:
            raise StopIteration
        self._request()
        if self._pending is None:
            raise StopIteration
        future, self._pending = self._pending, None
        try:
            batch = future.result()
        except BaseException:
            self._closed = True  # the loader discarded its pipeline; the next iter() starts afresh
            raise
        if self._loader._worker is not None:
            self._request()  # the helper thread works on the next batch meanwhile
        return batch

    def close(self) -> None:
        """Stop requesting; a batch in flight is finished (the pipeline stays consistent)."""
        self._closed = True
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:  # noqa: BLE001 - the epoch is being dropped anyway
                pass
            self._pending = None


def build_dali_loader(choice, source, params: TransformParams, target_kwargs: dict, batch_size: int, shuffle: bool,
                      drop_last: bool, seed: int, with_targets: bool = True, *, parallel: bool | None = None,
                      rank: int | None = None, world_size: int | None = None) -> DaliLoader:
    """The DALI loader of one split for ``ocr.data.backends.build_loader`` (``choice``: a
    ``BackendChoice`` with ``.device`` "gpu" | "cpu" and ``.dali_threads``)."""
    if parallel is None:
        parallel = choice.device == "gpu"
    return DaliLoader(source, params, target_kwargs, batch_size, shuffle, drop_last, seed, with_targets,
                      device=choice.device, num_threads=choice.dali_threads, parallel=parallel,
                      py_num_workers=max(1, min(4, choice.num_workers)), rank=rank, world_size=world_size)
