"""What the DALI graphs read: a picklable per-batch callback over a ``SampleSource``.

The callback runs in DALI's parallel external-source workers (``parallel=True``,
``py_start_method="spawn"``) or in the loader's own process. It does the cheap,
Python-side part of a sample: the encoded bytes, the geometry ``M`` (built by the same
``ocr.data.transforms.sample_matrix`` the CPU backend uses), the parameters derived from
it (antialiasing resize, residual warp, colour jitter), the polygons in network pixels as one
vertex array plus per-polygon lengths and ignore flags (the same ``geometry.transform_polygons``
the CPU backend uses), and the sample's DB target geometry (``ocr.data.targets``: shrink
distances, shrunk polygons, packed edges), so that the training thread only concatenates and
renders. Pixels are then the graph's business.

Which samples form batch ``i`` of an epoch is decided by :class:`EpochPlan` alone (seed,
epoch, rank, world size), so every process computes the same batches without talking to
each other. The only state shared with the workers is a tiny control file
(:class:`EpochControl`): which logical epoch a pipeline epoch stands for (so Lightning's
``set_epoch`` and resumed runs reshuffle correctly), and whether the loader abandoned it
(then the workers stop producing it at once, so the rest of an abandoned epoch costs at
most the few batches already in flight).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ocr.data import geometry
from ocr.data.batch import sample_geometry
from ocr.data.sampling import EpochPlan, sample_rng
from ocr.data.targets import geometry_to_arrays
from ocr.data.transforms import TransformParams, draw_jitter, sample_matrix
from ocr.shm import SHM_DIR, remove_stale_files

__all__ = ["DaliBatchSource", "EpochControl", "EpochPlan", "pack_record", "resize_geometry", "unpack_record"]

#: Outputs of :class:`DaliBatchSource`, in order (one list entry per sample of a batch).
SOURCE_OUTPUTS = (
    "encoded",  # uint8 (bytes,): the file's bytes
    "record",  # float64 (K,): everything else the loader needs of the sample (pack_record)
    "params",  # float32 (4,) eval, (13,) train: the graph's per-sample arguments (PARAM_SLICES)
)
SOURCE_DTYPES = ("uint8", "float64", "float32")
SOURCE_NDIMS = (1, 1, 1)
#: Where each per-sample argument of the graphs lies in ``params`` (the graph slices it out).
PARAM_SLICES = {
    "resize_size": (0, 2),  # (h, w) after the antialiasing resize
    "resize_roi": (2, 4),  # (h, w) of the source region that maps onto it (keeps the exact scale)
    "warp": (4, 10),  # train: residual warp (2 x 3, row-major), destination -> source (DALI's inverse map)
    "jitter": (10, 13),  # train: brightness, contrast, saturation factors
}
#: What the graphs pass through to the loader unchanged (CPU outputs).
PASS_THROUGH = ("record",)
_NO_GEOMETRY = (np.zeros((0, 2)), np.zeros((0, 4), np.int64), np.zeros((0, 6)), np.zeros((0, 3), np.int64))
_HEADER = 5  # index, vertices V, polygons P, fill edges E, distance pieces S


def pack_record(index: int, matrix: np.ndarray, net_vertices: np.ndarray, lengths: np.ndarray, ignore: np.ndarray,
                geometry_arrays=_NO_GEOMETRY) -> np.ndarray:
    """A sample's non-pixel data as one float64 vector. DALI's parallel external source costs the
    training thread ~0.15 ms per output per batch of 16 (measured: 2.6 ms for 14 outputs, 0.6 ms for
    2), so the source has three outputs (bytes, this record, the graph's arguments) and the sample index, ``M``, the network-pixel vertices, the polygon lengths, the ignore flags
    and the four target-geometry arrays (``ocr.data.targets.geometry_to_arrays``) travel as one.
    Layout: ``[index, V, P, E, S]``, M (9), vertices (2V), lengths (P), ignore (P), fill floats (2E),
    fill ints (4E), piece floats (6S), piece ints (3S). The integers (< 2**53) and the float32
    vertices are exact in float64."""
    fill_f, fill_i, seg_f, seg_i = geometry_arrays
    header = np.array([index, len(net_vertices), len(lengths), len(fill_f), len(seg_f)], dtype=np.float64)
    parts = (header, matrix, net_vertices, lengths, ignore, fill_f, fill_i, seg_f, seg_i)
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in parts])


def unpack_record(record: np.ndarray) -> dict:
    """Inverse of :func:`pack_record` (views and small copies)."""
    index, v, p, e, n = (int(x) for x in record[:_HEADER])
    pos = _HEADER

    def take(count: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        nonlocal pos
        out = record[pos : pos + count].reshape(shape).astype(dtype)
        pos += count
        return out

    out = {"index": index, "matrix": take(9, (3, 3), np.float64), "net_vertices": take(2 * v, (v, 2), np.float32),
           "lengths": take(p, (p,), np.int64), "ignore": take(p, (p,), bool)}
    out["geometry"] = (take(2 * e, (e, 2), np.float64), take(4 * e, (e, 4), np.int64), take(6 * n, (n, 6), np.float64),
                       take(3 * n, (n, 3), np.int64))
    if pos != len(record):
        raise ValueError(f"sample record of {len(record)} values does not match its header ({pos} expected)")
    return out


def cv_round(x: float) -> int:
    """OpenCV's ``saturate_cast<int>(double)`` (round half to even), as ``cv2.resize`` sizes its output."""
    return int(np.rint(x))


def resize_geometry(height: int, width: int, scale: float) -> tuple[tuple[int, int], tuple[float, float]]:
    """Output size of an isotropic resize by ``scale`` as ``cv2.resize(fx=fy=scale)`` makes it, and the
    source region (from the origin) that maps exactly onto it at that scale: DALI's ``fn.resize`` with
    ``size`` and ``roi_end`` then applies exactly ``scale``, like OpenCV does."""
    oh, ow = max(1, cv_round(height * scale)), max(1, cv_round(width * scale))
    return (oh, ow), (oh / scale, ow / scale)


class EpochControl:
    """A few int64 slots in a small file (in /dev/shm when available) that the loader
    writes and the external-source workers read: for pipeline epoch ``k`` (DALI's
    ``BatchInfo.epoch_idx``) slot ``k % RING`` holds ``(k, logical epoch, cancelled, first batch)``;
    the first batch is not 0 when a rebuilt pipeline resumes an epoch after a decode error."""

    RING = 8
    SLOT = 4
    PREFIX = "dali_epoch_ctrl_"

    def __init__(self, path: str | None = None):
        self._owner = path is None
        if path is None:
            base = SHM_DIR if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK) else tempfile.gettempdir()
            remove_stale_files(base, self.PREFIX)
            fd, path = tempfile.mkstemp(prefix=f"{self.PREFIX}{os.getpid()}_", suffix=".bin", dir=base)
            os.close(fd)
            np.full(self.RING * self.SLOT, -1, dtype=np.int64).tofile(path)
        self.path = path
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self._owner = False
        self.path = state["path"]
        self._array = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.int64, mode="r+", shape=(self.RING * self.SLOT,))
        return self._array

    def start(self, pipeline_epoch: int, logical_epoch: int, first_batch: int = 0) -> None:
        slot = (pipeline_epoch % self.RING) * self.SLOT
        self.array[slot : slot + self.SLOT] = (pipeline_epoch, logical_epoch, 0, first_batch)

    def cancel(self, pipeline_epoch: int) -> None:
        slot = (pipeline_epoch % self.RING) * self.SLOT
        if self.array[slot] == pipeline_epoch:
            self.array[slot + 2] = 1

    def lookup(self, pipeline_epoch: int) -> tuple[int, bool, int]:
        """(logical epoch, cancelled, first batch); an epoch the loader never started counts as cancelled."""
        slot = (pipeline_epoch % self.RING) * self.SLOT
        k, logical, cancelled, first = (int(v) for v in self.array[slot : slot + self.SLOT])
        if k != pipeline_epoch:
            return -1, True, 0
        return logical, bool(cancelled), first

    def close(self) -> None:
        self._array = None
        if self._owner:
            Path(self.path).unlink(missing_ok=True)
            self._owner = False


#: The logical epoch of a pipeline's warm-up batch: the split's largest images (see
#: ``DaliLoader._warm_up``); any epoch number no run reaches.
WARMUP_EPOCH = 2**31 - 1


class DaliBatchSource:
    """``source`` of the graphs' ``fn.external_source`` (``batch=True``, ``batch_info=True``):
    one call per batch, stateless apart from a per-epoch cache of the sample order, so any
    number of worker processes can compute batches in any order. Raises ``StopIteration``
    past the plan's last batch and for abandoned epochs."""

    def __init__(self, source, params: TransformParams, plan: EpochPlan, control: EpochControl,
                 target_kwargs: dict | None = None):
        """``target_kwargs``: compute each sample's DB target geometry here (None: no targets)."""
        self.source = source
        self.params = params
        self.plan = plan
        self.control = control
        self.target_kwargs = None if target_kwargs is None else dict(target_kwargs)
        self.outputs = SOURCE_OUTPUTS
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_order_epoch"], state["_order"] = None, None
        return state

    def batch_indices(self, epoch: int, iteration: int) -> list[int]:
        """The samples of batch ``iteration``; images that failed to decode earlier in the run
        (``on_error=skip``) are replaced by their stand-ins (``SampleSource.usable_index``)."""
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self._epoch_order(epoch), epoch
        b = self.plan.batch_size
        indices = [int(i) for i in self._order[iteration * b : (iteration + 1) * b]]
        usable = getattr(self.source, "usable_index", None)  # SampleSource look-alikes have none
        return indices if usable is None else [usable(i) for i in indices]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != WARMUP_EPOCH:
            return self.plan.order(epoch)
        pixels = np.array([h * w for h, w in self.source.sizes], dtype=np.int64)
        return np.argsort(-pixels, kind="stable")[: self.plan.batch_size]

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        epoch, cancelled, first = self.control.lookup(int(info.epoch_idx))
        iteration = int(info.iteration) + first
        if cancelled or iteration >= (1 if epoch == WARMUP_EPOCH else self.plan.num_batches):
            raise StopIteration
        columns: tuple[list[np.ndarray], ...] = tuple([] for _ in self.outputs)
        for index in self.batch_indices(epoch, iteration):
            for column, value in zip(columns, self.sample_inputs(int(index), epoch), strict=True):
                column.append(value)
        return columns

    def geometry(self, index: int, epoch: int) -> tuple[np.ndarray, tuple[float, float, float]]:
        """(M, jitter factors) of a sample: drawn exactly as the CPU backend's threaded loader
        draws them (``ocr.data.sampling.sample_rng``, then ``sample_matrix``, then the jitter)."""
        sample = self.source.samples[index]
        height, width = self.source.sizes[index]
        rng = sample_rng(self.plan.seed, epoch, index) if self.params.train else None
        matrix = sample_matrix(self.params, height, width, sample.polygons, sample.ignore, rng)
        jitter = draw_jitter(rng, self.params.jitter) if rng is not None else (1.0, 1.0, 1.0)
        return matrix, jitter

    def sample_inputs(self, index: int, epoch: int) -> tuple[np.ndarray, ...]:
        sample = self.source.samples[index]
        height, width = self.source.sizes[index]
        params = self.params
        matrix, jitter = self.geometry(index, epoch)
        scale = geometry.matrix_scale(matrix)
        # Eval: the whole (isotropic) M is the resize. Train: antialiased resize by the
        # isotropic scale when it shrinks, then the residual warp -- as warp_to_canvas does.
        resize_scale = scale if not params.train else min(scale, 1.0)
        size, roi = resize_geometry(height, width, resize_scale)
        residual = matrix @ geometry.scale_matrix(1.0 / resize_scale)
        warp = np.linalg.inv(residual)[:2]
        net_polygons = geometry.transform_polygons(matrix, sample.polygons)
        if net_polygons:
            net_vertices = np.concatenate(net_polygons).astype(np.float32, copy=False)
        else:
            net_vertices = np.zeros((0, 2), dtype=np.float32)
        geometry_arrays = _NO_GEOMETRY
        if self.target_kwargs is not None:
            map_size = params.output_size
            geometry_arrays = geometry_to_arrays(sample_geometry(net_polygons, sample.ignore, map_size,
                                                                 self.target_kwargs))
        record = pack_record(index, matrix, net_vertices, np.array([len(p) for p in sample.polygons]),
                             np.array(sample.ignore, dtype=bool), geometry_arrays)
        args = [size, roi, warp.reshape(-1), jitter] if params.train else [size, roi]
        return self.source.encoded_array(index), record, np.concatenate(args).astype(np.float32)
