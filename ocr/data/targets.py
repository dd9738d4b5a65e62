"""DB (Differentiable Binarization, Liao et al. 2020) training targets.

Two implementations of one definition:

* :func:`make_db_targets` -- the numpy/OpenCV *reference* (one image, clarity over speed).
* :func:`make_db_targets_batch` -- the *vectorised* torch version for a whole batch on the batch's
  device (CPU or CUDA); it is :func:`pack_db_geometry` (host, numpy + pyclipper) followed by
  :func:`render_db_targets` (device, a handful of tensor ops per batch).

Both share :func:`prepare_polygons` (the per-polygon geometry: small/degenerate -> ignore, the shrink
distance ``D``, the shrunk and dilated polygons).

Conventions
-----------
Polygons are float arrays ``(N, 2)`` of ``(x, y)`` in pixel coordinates of the target map (``N >= 3``;
they may lie partly or fully outside the map). Pixel ``(row i, col j)`` covers ``x in [j, j+1)``,
``y in [i, i+1)``; its centre is ``(j + 0.5, i + 0.5)``. A pixel is inside a polygon when its centre is;
distances are measured from pixel centres.

Definition (per image)
----------------------
For each polygon (with its ignore flag, ``True`` for don't-care "###"):

1. the shorter side of its ``cv2.minAreaRect`` < ``min_text_size`` -> ignore; degenerate (area ~0) ->
   ignore.
2. ``D = A * (1 - shrink_ratio**2) / L`` (area, perimeter). Shrunk polygon = pyclipper offset by ``-D``
   (``JT_ROUND``, ``ET_CLOSEDPOLYGON``, float precision kept with ``scale_to_clipper``); empty -> ignore;
   several pieces -> the largest.
3. ``prob_map`` = 1 inside the shrunk polygon of every kept polygon; ``prob_mask`` = 0 inside every
   ignored (original) polygon, else 1.
4. ``thresh_mask`` = 1 inside the dilated polygon (offset ``+D``) of every kept polygon;
   ``canvas = max_k clip(1 - d_k / D_k, 0, 1)`` with ``d_k`` the exact Euclidean distance from the pixel
   centre to polygon ``k``'s boundary (point-to-segment); ``thresh_map = canvas * (max - min) + min``.

Notes on the two implementations
--------------------------------
* The reference rasterises with ``cv2.fillPoly`` (sub-pixel ``shift`` bits, ``-0.5`` centre offset).
  OpenCV's fill is *inclusive*: it also paints the polygon's outline, so it adds pixels whose centres
  lie up to ~1 px outside the polygon (its shrunk text kernels come out ~1 px fatter). The vectorised
  version is an exact pixel-centre winding-number test. The binary maps differ only on pixels within
  ~1 px of the relevant boundary.
* The vectorised ``thresh_mask`` is the exact dilation ``{d < D} U polygon``, i.e. ``canvas > 0`` or
  ``prob_map`` (the shrunk polygon is exactly the part of the polygon at distance ``>= D`` from its
  boundary), instead of a rasterisation of pyclipper's dilated polygon, whose round joins are chords of
  the exact arcs (``ARC_TOLERANCE_PX``): they agree except within that tolerance of the boundary, and it
  saves a pyclipper call per polygon.
* Both threshold maps use exact point-to-segment distances (float64 in the reference, float32 in the
  vectorised version: mean absolute difference ~1e-8).
* :func:`prepare_polygons` shrinks strictly convex polygons (text-line quads) analytically, in one
  vectorised pass (the intersection of the inward-shifted edge lines: what pyclipper returns for them,
  to its 2**-16 px grid); other polygons go through pyclipper.

Performance notes
-----------------
:func:`pack_db_geometry` (host; ~10 us per polygon, dominated by ``prepare_polygons``) runs where the pixels
are prepared: :func:`prepare_sample_geometry` per image in the loader workers (DALI: its external-source
workers, which hand the arrays on as pipeline outputs), :func:`merge_geometries` (concatenation) per batch.
:func:`render_db_targets` copies the packed arrays to the device once, then runs ~10 kernels per chunk of
``chunk_elems`` pixel evaluations plus ~40 others, without host synchronisation (``fill_method="dense"``,
the CUDA default). On a CPU it runs single-threaded torch ops on cache-sized chunks; on a small, busy
machine ``torch.set_num_threads(1)`` is faster than more intra-op threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pyclipper
import torch

# Bump when either implementation changes the maps it produces for the same polygons and
# parameters: it is part of the key of cached batches and of precomputed maps.
TARGETS_VERSION = 1

__all__ = [
    "ARC_TOLERANCE_PX",
    "CLIPPER_SCALE",
    "DBTargetGeometry",
    "geometry_from_arrays",
    "geometry_to_arrays",
    "merge_geometries",
    "prepare_sample_geometry",
    "PreparedPolygon",
    "boundary_distance",
    "make_db_targets",
    "make_db_targets_batch",
    "offset_polygon",
    "pack_db_geometry",
    "pack_prepared",
    "polygon_area_perimeter",
    "polygon_boundary_distance",
    "prepare_polygons",
    "render_db_targets",
]

#: pyclipper works on integers: coordinates are scaled by this (1/65536 px resolution; coordinates up to
#: ~16k px stay in Clipper's fast 64-bit range).
CLIPPER_SCALE: float = float(2**16)
#: max distance between a round join's arc and the chords pyclipper approximates it with (pixels).
ARC_TOLERANCE_PX: float = 0.1
#: sub-pixel bits for cv2.fillPoly in the reference.
FILL_SHIFT: int = 8
#: polygons with |area| below this (px^2) are degenerate.
DEGENERATE_AREA: float = 1e-6

PolygonLike = np.ndarray | Sequence[Sequence[float]]


# ----------------------------------------------------------------------------------------------------
# shared geometry
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedPolygon:
    """Per-polygon geometry shared by both implementations."""

    points: np.ndarray  #: (N, 2) float64, the original polygon
    ignore: bool  #: final decision: don't-care, too small, degenerate, or empty shrink
    distance: float  #: the offset distance D (0.0 when ignored)
    shrunk: np.ndarray | None  #: (M, 2) float64 shrunk polygon (None when ignored)
    dilated: tuple[np.ndarray, ...] = ()  #: pyclipper +D paths (outer ring, possibly holes); () if not computed


def _ring_stats(points: np.ndarray) -> tuple[float, float]:
    """(signed shoelace area, perimeter) of a closed ring; plain Python floats (tiny inputs)."""
    pts = points.tolist()
    x0, y0 = pts[0]  # shifted origin, for precision far from (0, 0)
    twice_area = 0.0
    perimeter = 0.0
    px, py = pts[-1]
    for x, y in pts:
        twice_area += (px - x0) * (y - y0) - (x - x0) * (py - y0)
        perimeter += math.hypot(x - px, y - py)
        px, py = x, y
    return 0.5 * twice_area, perimeter


def polygon_area_perimeter(points: np.ndarray) -> tuple[float, float]:
    """Area and perimeter of a closed polygon ring.

    Same numbers as ``shapely.geometry.Polygon(points).area`` / ``.length`` (shoelace |signed area| and
    the sum of edge lengths), without building a shapely object (which costs ~4x more).
    """
    signed, perimeter = _ring_stats(np.asarray(points, dtype=np.float64).reshape(-1, 2))
    return abs(signed), perimeter


def _signed_area(points: np.ndarray) -> float:
    return _ring_stats(points)[0]


def offset_polygon(points: np.ndarray, delta: float) -> list[np.ndarray]:
    """pyclipper offset (JT_ROUND, ET_CLOSEDPOLYGON) by ``delta`` pixels, float precision preserved.

    Returns the output paths (float64 ``(K, 2)`` each, at least 3 points); [] when empty.
    """
    pco = pyclipper.PyclipperOffset(arc_tolerance=ARC_TOLERANCE_PX * CLIPPER_SCALE)
    pco.AddPath(
        pyclipper.scale_to_clipper(np.asarray(points, dtype=np.float64).tolist(), CLIPPER_SCALE),
        pyclipper.JT_ROUND,
        pyclipper.ET_CLOSEDPOLYGON,
    )
    paths = pco.Execute(delta * CLIPPER_SCALE)
    return [
        np.asarray(pyclipper.scale_from_clipper(path, CLIPPER_SCALE), dtype=np.float64)
        for path in paths
        if len(path) >= 3
    ]


def _shrink_convex(rings: list[np.ndarray], signed_areas: list[float], dists: list[float]) -> list[np.ndarray | None]:
    """Inward offset by ``dists`` of strictly convex rings, vectorised over all of them.

    Shrinking a convex polygon only meets convex corners from the inside, where round joins add no arcs:
    the result is the intersection of the inward-shifted edge lines, i.e. vertex i moves to
    ``p_i + D (n_{i-1} + n_i) / (1 + n_{i-1} . n_i)`` (unit inward normals), as long as no edge vanishes.
    That is the polygon ``pyclipper`` returns (to its 2**-16 px grid), without a pyclipper call per polygon.
    ``None`` for a ring that is not strictly convex or loses an edge (the caller falls back to pyclipper).
    """
    if not rings:
        return []
    a, b, owner, starts = _ring_arrays(rings)
    counts = np.diff(np.append(starts, len(a)))
    last = starts + counts - 1
    prv = np.arange(-1, len(a) - 1)
    prv[starts] = last
    nxt = np.arange(1, len(a) + 1)
    nxt[last] = starts
    e = b - a
    length = np.hypot(e[:, 0], e[:, 1])
    sign = np.sign(np.asarray(signed_areas, dtype=np.float64))[owner]
    with np.errstate(divide="ignore", invalid="ignore"):
        normal = np.stack([-e[:, 1], e[:, 0]], axis=1) * (sign / length)[:, None]  # inward (y down)
        cross = e[prv, 0] * e[:, 1] - e[prv, 1] * e[:, 0]
        convex = (length > 1e-9) & (length[prv] > 1e-9) & (cross * sign > 1e-9 * length * length[prv])
        denom = 1.0 + (normal[prv] * normal).sum(axis=1)
        q = a + np.asarray(dists, dtype=np.float64)[owner][:, None] * (normal[prv] + normal) / denom[:, None]
        keeps_edge = ((q[nxt] - q) * e).sum(axis=1) > 1e-6 * length
    ok = np.logical_and.reduceat(convex & keeps_edge & (denom > 1e-12) & np.isfinite(q).all(axis=1), starts)
    return [q[s : s + c] if good else None for s, c, good in zip(starts, counts, ok)]


def prepare_polygons(
    polygons: Sequence[PolygonLike],
    ignore: Sequence[bool] | None = None,
    shrink_ratio: float = 0.4,
    min_text_size: float = 8,
    *,
    with_dilated: bool = True,
    fast_convex: bool = True,
) -> list[PreparedPolygon]:
    """Steps 1-2 of the definition for each polygon (CPU; pyclipper).

    ``with_dilated=False`` skips the +D offset (the vectorised path does not need it).
    ``fast_convex``: shrink strictly convex polygons (all quads of text lines) in one vectorised numpy
    pass instead of one pyclipper call each (same polygons, see :func:`_shrink_convex`); the others,
    and any convex one that would lose an edge, go through pyclipper.
    """
    if ignore is not None and len(ignore) != len(polygons):
        raise ValueError(f"{len(polygons)} polygons but {len(ignore)} ignore flags")
    out: list[PreparedPolygon] = []
    kept: list[tuple[int, np.ndarray, float, float]] = []  # (index in out, points, D, signed area)
    for k, poly in enumerate(polygons):
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        out.append(PreparedPolygon(pts, True, 0.0, None, ()))
        if (ignore is not None and ignore[k]) or len(pts) < 3:
            continue
        signed, perimeter = _ring_stats(pts)
        area = abs(signed)
        if not (area >= DEGENERATE_AREA and 0.0 < perimeter < math.inf):  # also rejects NaN / inf points
            continue
        (_, _), (rw, rh), _ = cv2.minAreaRect(pts.astype(np.float32))
        if min(rw, rh) < min_text_size:
            continue
        kept.append((k, pts, area * (1.0 - shrink_ratio**2) / perimeter, signed))
    fast = (
        _shrink_convex([p for _, p, _, _ in kept], [s for _, _, _, s in kept], [d for _, _, d, _ in kept])
        if fast_convex
        else [None] * len(kept)
    )
    for (k, pts, distance, _), shrunk in zip(kept, fast):
        if shrunk is None:
            pieces = offset_polygon(pts, -distance)
            if not pieces:
                continue
            shrunk = pieces[0] if len(pieces) == 1 else max(pieces, key=lambda q: abs(_signed_area(q)))
            if len(pieces) > 1 and abs(_signed_area(shrunk)) < DEGENERATE_AREA:
                continue
        dilated = tuple(offset_polygon(pts, distance)) if with_dilated else ()
        out[k] = PreparedPolygon(pts, False, float(distance), shrunk, dilated)
    return out


# ----------------------------------------------------------------------------------------------------
# reference (numpy + OpenCV), one image
# ----------------------------------------------------------------------------------------------------

_FILL_MARGIN = 2  # padded-canvas margin (px) for the reference rasteriser


def _clip_to_rect(paths: Sequence[np.ndarray], x0: float, y0: float, x1: float, y1: float) -> list[np.ndarray]:
    """Exact even-odd intersection of ``paths`` with an axis-aligned rectangle (pyclipper)."""
    pc = pyclipper.Pyclipper()
    rect = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    pc.AddPath(pyclipper.scale_to_clipper(rect, CLIPPER_SCALE), pyclipper.PT_CLIP, True)
    pc.AddPaths([pyclipper.scale_to_clipper(p.tolist(), CLIPPER_SCALE) for p in paths], pyclipper.PT_SUBJECT, True)
    res = pc.Execute(pyclipper.CT_INTERSECTION, pyclipper.PFT_EVENODD, pyclipper.PFT_NONZERO)
    return [np.asarray(pyclipper.scale_from_clipper(r, CLIPPER_SCALE), dtype=np.float64) for r in res if len(r) >= 3]


def _fill_reference(padded: np.ndarray, paths: Sequence[np.ndarray], value: float) -> None:
    """``cv2.fillPoly`` of ``paths`` (even-odd, one call) into a canvas padded by ``_FILL_MARGIN``.

    Paths reaching beyond the map are first clipped (exactly, pyclipper) to the map enlarged by 1 px, so
    OpenCV never clips or overflows; pixel centres inside the map are unaffected by that clip.
    """
    paths = [p for p in paths if len(p) >= 3 and np.isfinite(p).all()]
    if not paths:
        return
    m = _FILL_MARGIN
    height, width = padded.shape[0] - 2 * m, padded.shape[1] - 2 * m
    lo = min(float(p.min()) for p in paths)
    hi_x = max(float(p[:, 0].max()) for p in paths)
    hi_y = max(float(p[:, 1].max()) for p in paths)
    if lo < -1.0 or hi_x > width + 1.0 or hi_y > height + 1.0:
        paths = _clip_to_rect(paths, -1.0, -1.0, width + 1.0, height + 1.0)
        if not paths:
            return
    scale = float(1 << FILL_SHIFT)
    fixed = [np.round((p + (m - 0.5)) * scale).astype(np.int32) for p in paths]
    cv2.fillPoly(padded, fixed, float(value), lineType=cv2.LINE_8, shift=FILL_SHIFT)


def _segment_distance(ax: float, ay: float, bx: float, by: float, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Euclidean distance from points (px, py) (broadcast) to the segment a-b."""
    ex, ey = bx - ax, by - ay
    len2 = ex * ex + ey * ey
    dx, dy = px - ax, py - ay
    if len2 > 0.0:
        t = np.clip((dx * ex + dy * ey) / len2, 0.0, 1.0)
        dx = dx - t * ex
        dy = dy - t * ey
    return np.sqrt(dx * dx + dy * dy)


def boundary_distance(points: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance from the points (px, py) (arrays, broadcast together) to the boundary of
    the closed polygon ``points`` (minimum over its edges of the point-to-segment distance)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    px, py = np.broadcast_arrays(np.asarray(px, dtype=np.float64), np.asarray(py, dtype=np.float64))
    dist = np.full(px.shape, np.inf)
    for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0)):
        np.minimum(dist, _segment_distance(ax, ay, bx, by, px, py), out=dist)
    return dist


def polygon_boundary_distance(points: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Exact distance from the grid points ``(xs[j], ys[i])`` to the polygon boundary: shape (len(ys), len(xs))."""
    return boundary_distance(
        points, np.asarray(xs, dtype=np.float64)[None, :], np.asarray(ys, dtype=np.float64)[:, None]
    )


def _draw_distance(canvas: np.ndarray, points: np.ndarray, distance: float) -> None:
    """canvas = max(canvas, clip(1 - d / D, 0, 1)) over the polygon's dilated bounding box (clipped to the map)."""
    height, width = canvas.shape
    x_lo, y_lo = points.min(axis=0) - distance
    x_hi, y_hi = points.max(axis=0) + distance
    # pixel j's centre j + 0.5 in [x_lo, x_hi]
    j0, j1 = max(0, math.ceil(x_lo - 0.5)), min(width, math.floor(x_hi - 0.5) + 1)
    i0, i1 = max(0, math.ceil(y_lo - 0.5)), min(height, math.floor(y_hi - 0.5) + 1)
    if j0 >= j1 or i0 >= i1:
        return
    xs = np.arange(j0, j1, dtype=np.float64) + 0.5
    ys = np.arange(i0, i1, dtype=np.float64) + 0.5
    dist = polygon_boundary_distance(points, xs, ys)
    value = np.clip(1.0 - dist / distance, 0.0, 1.0)
    np.maximum(canvas[i0:i1, j0:j1], value, out=canvas[i0:i1, j0:j1])


def make_db_targets(
    polygons: Sequence[PolygonLike],
    ignore: Sequence[bool] | None,
    height: int,
    width: int,
    shrink_ratio: float = 0.4,
    thresh_min: float = 0.3,
    thresh_max: float = 0.7,
    min_text_size: float = 8,
) -> dict[str, np.ndarray]:
    """Reference DB targets for one image: float32 ``(height, width)`` arrays ``prob_map``, ``prob_mask``,
    ``thresh_map``, ``thresh_mask``."""
    m = _FILL_MARGIN
    prob_map = np.zeros((height + 2 * m, width + 2 * m), np.float32)
    prob_mask = np.ones((height + 2 * m, width + 2 * m), np.float32)
    thresh_mask = np.zeros((height + 2 * m, width + 2 * m), np.float32)
    canvas = np.zeros((height, width), np.float64)
    for poly in prepare_polygons(polygons, ignore, shrink_ratio, min_text_size, with_dilated=True):
        if poly.ignore:
            _fill_reference(prob_mask, [poly.points], 0.0)
            continue
        _fill_reference(prob_map, [poly.shrunk], 1.0)
        _fill_reference(thresh_mask, poly.dilated, 1.0)
        _draw_distance(canvas, poly.points, poly.distance)
    crop = (slice(m, m + height), slice(m, m + width))
    return {
        "prob_map": np.ascontiguousarray(prob_map[crop]),
        "prob_mask": np.ascontiguousarray(prob_mask[crop]),
        "thresh_map": (canvas * (thresh_max - thresh_min) + thresh_min).astype(np.float32),
        "thresh_mask": np.ascontiguousarray(thresh_mask[crop]),
    }


# ----------------------------------------------------------------------------------------------------
# vectorised (torch), whole batch
# ----------------------------------------------------------------------------------------------------

#: columns per distance tile (see :class:`DBTargetGeometry`)
DEFAULT_TILE: int = 32
#: pixel evaluations per chunk: moderate on the CPU (work buffers stay in cache), large on a GPU (few
#: launches; ~8 bytes of work buffers per evaluation: 2**22 -> ~34 MB)
DEFAULT_CHUNK_ELEMS_CPU: int = 1 << 17
DEFAULT_CHUNK_ELEMS_CUDA: int = 1 << 22
_MAX_PIECES_PER_EDGE = 256


@dataclass
class DBTargetGeometry:
    """Host-side (numpy) packed geometry of a batch: the input of :func:`render_db_targets`.

    *Fill edges* (one entry per polygon edge that crosses at least one row of pixel centres of the map)
    drive an exact pixel-centre winding-number rasterisation of the shrunk polygons (channel 0 ->
    ``prob_map``) and of the ignored polygons (channel 1 -> ``prob_mask``; only when the batch has any).

    *Distance pieces* (pieces of the kept polygons' edges, each with its polygon's ``D``) drive the
    threshold map ``thresh_min + (thresh_max - thresh_min) * max over pieces of clip(1 - dist / D, 0, 1)``
    (over one polygon's pieces that max is ``clip(1 - d / D, 0, 1)``, ``d`` the distance to its boundary).
    A piece is evaluated on every pixel of its bounding box grown by ``D`` (all pixels within ``D`` of it),
    clipped to the map, in *tiles*: runs of ``tile`` pixels of one row, aligned to the map's grid of
    ``tile``-column blocks, so that a tile is one segment of the canvas and all tiles combine with one
    dimension-0 scatter-min per chunk. Tiles overhang the box by up to ``tile - 1`` columns: harmless,
    those pixels get their true value (no contribution outside the grown box), or land in the padding
    columns right of the map.
    """

    batch_size: int
    height: int
    width: int
    n_channels: int  #: fill channels: 1 (shrunk) or 2 (shrunk, ignored)
    tile: int
    # fill edges (E,)
    fill_x: np.ndarray  #: float64, x of the edge at the centre of its first row
    fill_slope: np.ndarray  #: float64, dx/dy
    fill_row0: np.ndarray  #: int64, first row
    fill_rows: np.ndarray  #: int64, number of rows (> 0)
    fill_plane: np.ndarray  #: int64, channel * batch_size + image
    fill_weight: np.ndarray  #: int64, +1/-1 (orientation-normalised: +1 inside every polygon)
    # distance pieces (P,)
    seg_float: np.ndarray  #: float64 (P, 6): ax, ay, ex, ey, 1/|e|^2, 1/D; a relative to the box's first tile
    seg_first: np.ndarray  #: int64 (P,): canvas segment of the first tile, (image * H + row) * blocks + block
    seg_blocks: np.ndarray  #: int64 (P,): tiles per row of the box
    seg_tiles: np.ndarray  #: int64 (P,): rows * tiles per row

    @property
    def blocks_per_row(self) -> int:
        return -(-self.width // self.tile)

    @property
    def n_fill_crossings(self) -> int:
        return int(self.fill_rows.sum())

    @property
    def n_tiles(self) -> int:
        return int(self.seg_tiles.sum())


def _ring_arrays(polys: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated edges of closed rings: start points, end points, owner index, first-vertex index."""
    counts = np.fromiter((len(p) for p in polys), dtype=np.int64, count=len(polys))
    a = np.concatenate(polys).astype(np.float64, copy=False)
    owner = np.repeat(np.arange(len(polys)), counts)
    starts = np.cumsum(counts) - counts
    nxt = np.arange(1, len(a) + 1)
    nxt[starts + counts - 1] = starts
    return a, a[nxt], owner, starts


def _pack_fill(polys: list[np.ndarray], planes: list[int], height: int) -> dict[str, np.ndarray]:
    if not polys:
        z = np.zeros(0, np.int64)
        return dict(fill_x=np.zeros(0), fill_slope=np.zeros(0), fill_row0=z, fill_rows=z, fill_plane=z, fill_weight=z)
    a, b, owner, starts = _ring_arrays(polys)
    first = a[starts][owner]  # per-ring origin, for a precise signed area
    ra, rb = a - first, b - first
    signed = np.bincount(owner, ra[:, 0] * rb[:, 1] - rb[:, 0] * ra[:, 1], minlength=len(polys))
    # an edge adds +1 (y increasing) or -1 to the winding number of the pixels right of its crossing;
    # flipped per ring so that the interior of every ring, whatever its orientation, gets +1
    orient = np.where(signed > 0, -1, 1)[owner]
    ay, by = a[:, 1], b[:, 1]
    weight = np.where(by > ay, 1, -1) * orient
    # rows i whose centre y = i + 0.5 lies in [min(ay, by), max(ay, by))
    y_lo, y_hi = np.minimum(ay, by), np.maximum(ay, by)
    r0 = np.clip(np.ceil(y_lo - 0.5), 0, height).astype(np.int64)
    r1 = np.clip(np.ceil(y_hi - 0.5), 0, height).astype(np.int64)
    keep = r1 > r0
    a, b, r0, r1, weight, owner = a[keep], b[keep], r0[keep], r1[keep], weight[keep], owner[keep]
    slope = (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
    x0 = a[:, 0] + (r0 + 0.5 - a[:, 1]) * slope
    return dict(
        fill_x=x0,
        fill_slope=slope,
        fill_row0=r0,
        fill_rows=r1 - r0,
        fill_plane=np.asarray(planes, dtype=np.int64)[owner],
        fill_weight=weight.astype(np.int64),
    )


def _pack_distance(
    polys: list[np.ndarray],
    dists: list[float],
    images: list[int],
    height: int,
    width: int,
    tile: int,
) -> dict[str, np.ndarray]:
    if not polys:
        z = np.zeros(0, np.int64)
        return dict(seg_float=np.zeros((0, 6)), seg_first=z, seg_blocks=z, seg_tiles=z)
    a, b, owner, _ = _ring_arrays(polys)
    dist = np.asarray(dists, dtype=np.float64)[owner]
    image = np.asarray(images, dtype=np.int64)[owner]
    e = b - a
    # clip the edges to the map grown by D + 1 (Liang-Barsky): a point of an edge outside it is farther
    # than D from every pixel centre, so the clip changes no contribution (and keeps numbers small)
    margin = dist + 1.0
    t0, t1 = np.zeros(len(a)), np.ones(len(a))
    inside = np.ones(len(a), bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for p, q in (
            (-e[:, 0], a[:, 0] + margin),
            (e[:, 0], width + margin - a[:, 0]),
            (-e[:, 1], a[:, 1] + margin),
            (e[:, 1], height + margin - a[:, 1]),
        ):
            r = q / p
            t0 = np.where(p < 0, np.maximum(t0, r), t0)
            t1 = np.where(p > 0, np.minimum(t1, r), t1)
            inside &= (p != 0) | (q >= 0)
    # zero-length edges are vertices of their neighbours: nothing to add
    keep = inside & (t1 > t0) & (e != 0).any(axis=1)
    a, e, dist, image, t0, t1 = a[keep], e[keep], dist[keep], image[keep], t0[keep], t1[keep]
    a = a + t0[:, None] * e
    e = (t1 - t0)[:, None] * e
    # split each edge into n pieces: the evaluated area, about n (|dy|/n + 2D) (|dx|/n + 2D + tile), is
    # smallest at n = sqrt(|dx| |dy| / (2D (2D + tile))) (a long slanted edge would otherwise get a huge,
    # mostly empty box)
    n = np.sqrt(np.abs(e[:, 0] * e[:, 1]) / (2.0 * dist * (2.0 * dist + tile)))
    n = np.clip(np.rint(n), 1, _MAX_PIECES_PER_EDGE).astype(np.int64)
    if (n > 1).any():
        rep = np.repeat(np.arange(len(n)), n)
        k = np.arange(len(rep)) - (np.cumsum(n) - n)[rep]
        nr = n[rep]
        e, dist, image = e[rep], dist[rep], image[rep]
        a = a[rep] + (k / nr)[:, None] * e
        e = e / nr[:, None]
    b = a + e
    lo = np.minimum(a, b) - dist[:, None]
    hi = np.maximum(a, b) + dist[:, None]
    # pixels whose centre lies in [lo, hi], clipped to the map
    c0 = np.clip(np.ceil(lo[:, 0] - 0.5), 0, width).astype(np.int64)
    c1 = np.clip(np.floor(hi[:, 0] - 0.5) + 1, 0, width).astype(np.int64)
    r0 = np.clip(np.ceil(lo[:, 1] - 0.5), 0, height).astype(np.int64)
    r1 = np.clip(np.floor(hi[:, 1] - 0.5) + 1, 0, height).astype(np.int64)
    keep = (c1 > c0) & (r1 > r0)
    a, e, dist, image, c0, c1, r0, r1 = (
        a[keep],
        e[keep],
        dist[keep],
        image[keep],
        c0[keep],
        c1[keep],
        r0[keep],
        r1[keep],
    )
    k0 = c0 // tile
    blocks = -(-c1 // tile) - k0
    ex, ey = e[:, 0], e[:, 1]
    seg_float = np.stack([a[:, 0] - k0 * tile, a[:, 1] - r0, ex, ey, 1.0 / (ex * ex + ey * ey), 1.0 / dist], axis=1)
    nb = -(-width // tile)
    return dict(
        seg_float=seg_float,
        seg_first=(image * height + r0) * nb + k0,
        seg_blocks=blocks,
        seg_tiles=(r1 - r0) * blocks,
    )


def pack_prepared(
    prepared: Sequence[Sequence[PreparedPolygon]],
    height: int,
    width: int,
    *,
    tile: int = DEFAULT_TILE,
) -> DBTargetGeometry:
    """Pack the :func:`prepare_polygons` output of every image of a batch into flat numpy arrays (a few
    vectorised numpy passes per batch). ``tile``: columns per distance tile."""
    tile = int(tile)
    if tile < 1:
        raise ValueError(f"tile must be a positive int, not {tile!r}")
    batch = len(prepared)
    fill: list[tuple[np.ndarray, int, int]] = []  # (ring, image, channel)
    dist_polys: list[np.ndarray] = []
    dists: list[float] = []
    dist_images: list[int] = []
    for img, polys in enumerate(prepared):
        for p in polys:
            if p.ignore:
                if len(p.points) >= 3 and np.isfinite(p.points).all():
                    fill.append((p.points, img, 1))
                continue
            fill.append((p.shrunk, img, 0))
            dist_polys.append(p.points)
            dists.append(p.distance)
            dist_images.append(img)
    packed_fill = _pack_fill([f[0] for f in fill], [f[2] * batch + f[1] for f in fill], height)
    packed_dist = _pack_distance(dist_polys, dists, dist_images, height, width, tile)
    # a plane of ignored polygons only when one of their edges crosses a row of the map (an empty one
    # would change no pixel): the count then follows from the packed edges alone (merge_geometries)
    n_channels = 2 if (packed_fill["fill_plane"] >= batch).any() else 1
    return DBTargetGeometry(
        batch_size=batch,
        height=height,
        width=width,
        n_channels=n_channels,
        tile=tile,
        **packed_fill,
        **packed_dist,
    )


def pack_db_geometry(
    polygons: Sequence[Sequence[PolygonLike]],
    ignore: Sequence[Sequence[bool] | None] | None,
    height: int,
    width: int,
    shrink_ratio: float = 0.4,
    min_text_size: float = 8,
    *,
    tile: int = DEFAULT_TILE,
) -> DBTargetGeometry:
    """Host half of :func:`make_db_targets_batch`: :func:`prepare_polygons` for each image, then
    :func:`pack_prepared`. The result is consumed by :func:`render_db_targets`.

    To take the per-polygon work off the training process, run :func:`prepare_polygons` per sample in
    the DataLoader workers and :func:`pack_prepared` in the collate function.
    """
    batch = len(polygons)
    if ignore is not None and len(ignore) != batch:
        raise ValueError(f"{batch} images of polygons but {len(ignore)} of ignore flags")
    prepared = [
        prepare_polygons(
            polygons[i], None if ignore is None else ignore[i], shrink_ratio, min_text_size, with_dilated=False
        )
        for i in range(batch)
    ]
    return pack_prepared(prepared, height, width, tile=tile)


def prepare_sample_geometry(
    polygons: Sequence[PolygonLike],
    ignore: Sequence[bool] | None,
    height: int,
    width: int,
    shrink_ratio: float = 0.4,
    min_text_size: float = 8,
    *,
    tile: int = DEFAULT_TILE,
) -> DBTargetGeometry:
    """The host half for one image (a geometry of batch size 1): what the loader workers and DALI's
    external source compute next to the pixels, so that the training thread only has
    :func:`merge_geometries` (array concatenation) and :func:`render_db_targets` left."""
    return pack_db_geometry([polygons], [ignore], height, width, shrink_ratio, min_text_size, tile=tile)


_FILL_FIELDS = ("fill_x", "fill_slope", "fill_row0", "fill_rows", "fill_plane", "fill_weight")
_SEG_FIELDS = ("seg_float", "seg_first", "seg_blocks", "seg_tiles")


def merge_geometries(parts: Sequence[DBTargetGeometry]) -> DBTargetGeometry:
    """Per-image geometries (batch size 1 each, same map size and tile) -> the batch's geometry: the
    same arrays :func:`pack_db_geometry` builds for the whole batch (a few concatenations)."""
    if not parts:
        raise ValueError("merge_geometries needs at least one image")
    first = parts[0]
    for g in parts:
        if g.batch_size != 1 or (g.height, g.width, g.tile) != (first.height, first.width, first.tile):
            raise ValueError(
                f"merge_geometries: every part must be one image of {first.height}x{first.width} (tile "
                f"{first.tile}), got batch {g.batch_size} of {g.height}x{g.width} (tile {g.tile})"
            )
    batch = len(parts)
    fill_counts = np.fromiter((len(g.fill_x) for g in parts), dtype=np.int64, count=batch)
    seg_counts = np.fromiter((len(g.seg_first) for g in parts), dtype=np.int64, count=batch)
    fields = {name: np.concatenate([getattr(g, name) for g in parts]) for name in _FILL_FIELDS + _SEG_FIELDS}
    image = np.repeat(np.arange(batch, dtype=np.int64), fill_counts)
    fields["fill_plane"] = fields["fill_plane"] * batch + image  # channel * batch + image
    image = np.repeat(np.arange(batch, dtype=np.int64), seg_counts)
    fields["seg_first"] = fields["seg_first"] + image * (first.height * first.blocks_per_row)
    n_channels = 2 if any(g.n_channels > 1 for g in parts) else 1
    return DBTargetGeometry(batch_size=batch, height=first.height, width=first.width, n_channels=n_channels,
                            tile=first.tile, **fields)


def geometry_to_arrays(geom: DBTargetGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's geometry as four 2-D arrays: fill floats (E, 2) [x, dx/dy], fill ints (E, 4) [first
    row, rows, plane, weight], piece floats (P, 6), piece ints (P, 3) [first segment, blocks, tiles]
    (how DALI's external source hands it on, ``dali_pipelines.source.pack_record``)."""
    if geom.batch_size != 1:
        raise ValueError(f"geometry_to_arrays takes one image, got a batch of {geom.batch_size}")
    fill_f = np.stack([geom.fill_x, geom.fill_slope], axis=1).astype(np.float64).reshape(-1, 2)
    fill_i = np.stack([geom.fill_row0, geom.fill_rows, geom.fill_plane, geom.fill_weight], axis=1)
    seg_i = np.stack([geom.seg_first, geom.seg_blocks, geom.seg_tiles], axis=1)
    return (fill_f, fill_i.astype(np.int64).reshape(-1, 4), geom.seg_float.astype(np.float64).reshape(-1, 6),
            seg_i.astype(np.int64).reshape(-1, 3))


def geometry_from_arrays(arrays: Sequence[np.ndarray], height: int, width: int, tile: int) -> DBTargetGeometry:
    """Inverse of :func:`geometry_to_arrays`."""
    fill_f, fill_i, seg_f, seg_i = (np.asarray(a) for a in arrays)
    fill_f, fill_i = fill_f.reshape(-1, 2), fill_i.reshape(-1, 4)
    seg_f, seg_i = seg_f.reshape(-1, 6), seg_i.reshape(-1, 3)
    return DBTargetGeometry(
        batch_size=1, height=int(height), width=int(width), tile=int(tile),
        n_channels=2 if (fill_i[:, 2] >= 1).any() else 1,
        fill_x=fill_f[:, 0], fill_slope=fill_f[:, 1], fill_row0=fill_i[:, 0], fill_rows=fill_i[:, 1],
        fill_plane=fill_i[:, 2], fill_weight=fill_i[:, 3],
        seg_float=seg_f, seg_first=seg_i[:, 0], seg_blocks=seg_i[:, 1], seg_tiles=seg_i[:, 2],
    )


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) - x


def _upload(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    if device.type == "cuda":
        t = t.pin_memory()  # truly asynchronous copy: no wait for the work already queued on the GPU
    return t.to(device, non_blocking=True)


@dataclass
class _DeviceGeometry:
    """The packed arrays on the device (uploaded before any kernel is queued)."""

    fill_ints: torch.Tensor  #: int64 [E, 4]: row key, first crossing, weight, rows
    fill_floats: torch.Tensor  #: float64 [E, 2]: x at the first row, dx/dy
    seg_ints: torch.Tensor  #: int64 [P, 4]: first segment, tiles per row, first tile, tiles
    seg_floats: torch.Tensor  #: float32 [P, 6]


def _to_device(geom: DBTargetGeometry, device: torch.device) -> _DeviceGeometry:
    row_key = (geom.fill_plane * geom.height + geom.fill_row0) * (geom.width + 1)
    fill_ints = np.stack([row_key, _exclusive_cumsum(geom.fill_rows), geom.fill_weight, geom.fill_rows], axis=1)
    seg_ints = np.stack([geom.seg_first, geom.seg_blocks, _exclusive_cumsum(geom.seg_tiles), geom.seg_tiles], axis=1)
    return _DeviceGeometry(
        fill_ints=_upload(fill_ints.reshape(-1, 4), device, torch.int64),
        fill_floats=_upload(np.stack([geom.fill_x, geom.fill_slope], axis=1).reshape(-1, 2), device, torch.float64),
        seg_ints=_upload(seg_ints.reshape(-1, 4), device, torch.int64),
        seg_floats=_upload(geom.seg_float.reshape(-1, 6), device, torch.float32),
    )


def _fill_crossings(geom: DBTargetGeometry, dev: _DeviceGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """One crossing per (fill edge, row): its flat key into [planes, H, W + 1] (the first pixel whose centre
    is right of the crossing; column W: none in the map) and the edge's winding weight."""
    width, total, device = geom.width, geom.n_fill_crossings, dev.fill_ints.device
    n_edges = len(geom.fill_rows)
    edge = torch.repeat_interleave(torch.arange(n_edges, device=device), dev.fill_ints[:, 3], output_size=total)
    ei = dev.fill_ints.index_select(0, edge)
    ef = dev.fill_floats.index_select(0, edge)
    k = torch.arange(total, device=device) - ei[:, 1]
    x = torch.addcmul(ef[:, 0], k.to(torch.float64), ef[:, 1])  # float64: few, and exact
    # first pixel j with j + 0.5 > x: floor(x + 0.5), clamped to [0, W]
    col = x.add_(0.5).floor_().clamp_(0, width).to(torch.int64)
    return ei[:, 0] + k * (width + 1) + col, ei[:, 2]


def _fill_dense(geom: DBTargetGeometry, dev: _DeviceGeometry) -> torch.Tensor:
    """Winding numbers by a difference array + cumsum over the rows: bool [planes, H, W] (sync-free)."""
    planes, height, width, device = geom.n_channels * geom.batch_size, geom.height, geom.width, dev.fill_ints.device
    if geom.n_fill_crossings == 0:
        return torch.zeros((planes, height, width), dtype=torch.bool, device=device)
    key, weight = _fill_crossings(geom, dev)
    acc = torch.zeros(planes * height * (width + 1), dtype=torch.int32, device=device)
    acc.index_add_(0, key, weight.to(torch.int32))
    return acc.view(planes, height, width + 1).cumsum(-1, dtype=torch.int32)[..., :width] != 0


def _fill_spans(geom: DBTargetGeometry, dev: _DeviceGeometry) -> torch.Tensor:
    """Flat indices into [planes, H, W] of the pixels with a non-zero winding number (sorted crossings:
    between consecutive crossings of a row the winding number is constant). Syncs once (the pixel count)."""
    width, device = geom.width, dev.fill_ints.device
    if geom.n_fill_crossings == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    key, weight = _fill_crossings(geom, dev)
    key, order = torch.sort(key)
    wind = torch.cumsum(weight.index_select(0, order), 0)  # every row sums to zero: restarts at each row
    start = key[:-1]
    length = key[1:] - start
    span = (wind[:-1] != 0) & (length > 0)
    start, length = start[span], length[span]
    n_pix = int(length.sum())
    if n_pix == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    start = start - torch.div(start, width + 1, rounding_mode="floor")  # [planes, H, W + 1] -> [planes, H, W]
    rep = torch.repeat_interleave(torch.arange(len(length), device=device), length, output_size=n_pix)
    offset = start - (torch.cumsum(length, 0) - length)
    return offset.index_select(0, rep).add_(torch.arange(n_pix, device=device))


def _draw_distances(
    geom: DBTargetGeometry, dev: _DeviceGeometry, canvas: torch.Tensor, scale: float, chunk_elems: int
) -> None:
    """canvas [B * H * blocks, tile] (init ``scale**2``) = min over pieces of ``(scale * dist / D)**2``.

    Per pixel and piece: with ``u`` the projection parameter of the pixel centre on the piece (0 and 1 at
    its ends) and ``n`` its distance from the piece's line, ``dist**2 = (|e| relu(|u - 1/2| - 1/2))**2 +
    n**2``; along a tile both are affine in the column, so a pixel costs a few elementwise operations
    and its share of one scatter-min.
    """
    n_tiles = geom.n_tiles
    if n_tiles == 0:
        return
    device, tile, nb = canvas.device, geom.tile, geom.blocks_per_row
    n_pieces = len(geom.seg_tiles)
    piece = torch.repeat_interleave(torch.arange(n_pieces, device=device), dev.seg_ints[:, 3], output_size=n_tiles)
    # per-tile scalars; tile j of a piece: row rho = j // blocks of its box, columns (k0 + k) * tile +
    # [0, tile) with k = j % blocks
    first, blocks, start, _ = dev.seg_ints.index_select(0, piece).unbind(1)
    ax, ay, ex, ey, inv_len2, inv_d = dev.seg_floats.index_select(0, piece).unbind(1)
    j = torch.arange(n_tiles, device=device).sub_(start)
    rho = torch.div(j, blocks, rounding_mode="floor")
    k = j.sub_(rho * blocks)
    segment = (rho * nb).add_(first).add_(k)
    dy = rho.to(torch.float32).add_(0.5).sub_(ay)  # pixel centre - anchor: y, and x at the first column
    dx = k.to(torch.float32).mul_(tile).add_(0.5).sub_(ax)
    inv_len = inv_len2.sqrt()
    s = inv_d.mul_(abs(scale))  # distances below are in units of D / |scale|
    half = (s / inv_len).mul_(0.5)  # s |e| / 2
    s.mul_(inv_len)  # s / |e|
    along_c, along_r = ex * s, ey * s  # s (p - a).e / |e| per column, per row
    along0 = (dx * along_c).addcmul_(dy, along_r).sub_(half)  # ... at the first column, minus s |e| / 2
    normal0 = (dx * ey).sub_(dy * ex).mul_(s)  # s (p - a) x e / |e| at the first column
    normal_c = along_r  # per column
    cols = torch.arange(tile, device=device, dtype=torch.float32)
    step = max(1, min(chunk_elems // tile, n_tiles))
    buf_a = torch.empty((step, tile), dtype=torch.float32, device=device)
    buf_n = torch.empty((step, tile), dtype=torch.float32, device=device)
    for c0 in range(0, n_tiles, step):
        c = slice(c0, min(n_tiles, c0 + step))
        a, n = buf_a[: c.stop - c.start], buf_n[: c.stop - c.start]
        torch.mul(cols, along_c[c, None], out=a)
        a.add_(along0[c, None]).abs_().sub_(half[c, None]).clamp_(min=0.0)  # beyond the piece's ends
        torch.mul(cols, normal_c[c, None], out=n)
        n.add_(normal0[c, None])
        a.mul_(a).addcmul_(n, n)  # (s * dist / D)**2
        with _order_independent_scatter(device):
            canvas.scatter_reduce_(0, segment[c, None].expand(-1, tile), a, reduce="amin")


class _order_independent_scatter:
    """``scatter_reduce_(reduce="amin")`` raises on CUDA under ``torch.use_deterministic_algorithms(True)``
    (PyTorch lists every CUDA scatter_reduce as nondeterministic). A minimum does not depend on the order
    of its operands, so the result is deterministic: the check is suspended around that one call."""

    def __init__(self, device: torch.device):
        self.suspend = device.type != "cpu" and torch.are_deterministic_algorithms_enabled()
        self.warn_only = False

    def __enter__(self) -> None:
        if self.suspend:
            self.warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
            torch.use_deterministic_algorithms(False)

    def __exit__(self, *exc) -> None:
        if self.suspend:
            torch.use_deterministic_algorithms(True, warn_only=self.warn_only)


def render_db_targets(
    geom: DBTargetGeometry,
    device: str | torch.device = "cpu",
    thresh_min: float = 0.3,
    thresh_max: float = 0.7,
    *,
    fill_method: str = "auto",
    chunk_elems: int | None = None,
    out: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Device half of :func:`make_db_targets_batch`: float32 ``[B, 1, H, W]`` maps on ``device``.

    No host synchronisation with ``fill_method="dense"`` (every size is known on the host from ``geom``)
    and a fixed number of kernel launches per chunk of ``chunk_elems`` pixel evaluations.
    ``fill_method``: ``"dense"`` (difference array + cumsum over the map; the CUDA default) or
    ``"spans"`` (sorted crossings -> runs of pixels, one sync; cheaper on the CPU, its default).
    ``out``: optional dict of the four output tensors to overwrite (e.g. the previous batch's), which
    saves the page faults of fresh maps on the CPU.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if fill_method == "auto":
        fill_method = "spans" if device.type == "cpu" else "dense"
    if fill_method not in ("dense", "spans"):
        raise ValueError(f"fill_method must be 'auto', 'dense' or 'spans', not {fill_method!r}")
    if chunk_elems is None:
        chunk_elems = DEFAULT_CHUNK_ELEMS_CPU if device.type == "cpu" else DEFAULT_CHUNK_ELEMS_CUDA
    batch, height, width = geom.batch_size, geom.height, geom.width
    padded_width = geom.blocks_per_row * geom.tile
    # canvas = min over kept polygons of (scale * d / D)**2, saturated at scale**2 (d >= D), so that
    # thresh_map = thresh_max - sign(scale) * sqrt(canvas)
    scale = thresh_max - thresh_min if thresh_max != thresh_min else 1.0
    abs_scale = float(np.float32(abs(scale)))
    far = float(np.float32(abs_scale) * np.float32(abs_scale))  # float32 sqrt(far) == abs_scale exactly
    shape = (batch, 1, height, width)
    if out is None:
        out = {k: torch.empty(shape, dtype=torch.float32, device=device) for k in _KEYS}
    else:
        for k in _KEYS:
            t = out[k]
            if t.shape != shape or t.dtype != torch.float32 or t.device != device or not t.is_contiguous():
                raise ValueError(f"out[{k!r}] must be a contiguous float32 {shape} tensor on {device}")
    dev = _to_device(geom, device)  # every host -> device copy, before any kernel is queued
    if padded_width == width:
        canvas = out["thresh_map"].fill_(far)
    else:
        canvas = torch.full((batch, 1, height, padded_width), far, dtype=torch.float32, device=device)
    _draw_distances(geom, dev, canvas.view(-1, geom.tile), scale, chunk_elems)
    thresh_map, thresh_mask = out["thresh_map"], out["thresh_mask"]
    if padded_width != width:
        thresh_map.copy_(canvas[..., :width])
    torch.lt(thresh_map, far, out=thresh_mask)  # within D of a kept polygon's boundary
    if thresh_max == thresh_min:
        thresh_map.fill_(thresh_min)
    else:
        # thresh_min + sign(scale) * (|scale| - sqrt(canvas)): exactly thresh_min where saturated
        if scale > 0:
            thresh_map.sqrt_().neg_().add_(abs_scale).add_(thresh_min)
        else:
            thresh_map.sqrt_().sub_(abs_scale).add_(thresh_min)
    prob_map, prob_mask = out["prob_map"].zero_(), out["prob_mask"].fill_(1.0)
    bhw = batch * height * width
    if fill_method == "spans":
        pix = _fill_spans(geom, dev)  # ascending; plane = channel * B + image
        split = int(torch.searchsorted(pix, bhw))
        prob_map.view(-1)[pix[:split]] = 1.0
        thresh_mask.view(-1)[pix[:split]] = 1.0  # the shrunk polygon is the rest of the dilated one
        if split < len(pix):
            prob_mask.view(-1)[pix[split:] - bhw] = 0.0
    else:
        inside = _fill_dense(geom, dev).view(geom.n_channels, batch, 1, height, width)
        prob_map.copy_(inside[0])
        torch.maximum(thresh_mask, prob_map, out=thresh_mask)
        if geom.n_channels > 1:
            prob_mask.sub_(inside[1].to(torch.float32))
    return {"prob_map": prob_map, "prob_mask": prob_mask, "thresh_map": thresh_map, "thresh_mask": thresh_mask}


_KEYS = ("prob_map", "prob_mask", "thresh_map", "thresh_mask")


def make_db_targets_batch(
    polygons: Sequence[Sequence[PolygonLike]],
    ignore: Sequence[Sequence[bool] | None] | None,
    height: int,
    width: int,
    device: str | torch.device = "cpu",
    shrink_ratio: float = 0.4,
    thresh_min: float = 0.3,
    thresh_max: float = 0.7,
    min_text_size: float = 8,
    *,
    tile: int = DEFAULT_TILE,
    **render_kwargs,
) -> dict[str, torch.Tensor]:
    """Vectorised DB targets for a batch: ``polygons`` / ``ignore`` are per-image lists (len B) as in
    :func:`make_db_targets` (``ignore`` may be None, or None for an image: nothing ignored); returns the
    same four keys as float32 ``[B, 1, height, width]`` tensors on ``device``.

    Equal to :func:`pack_db_geometry` (host) followed by :func:`render_db_targets` (device);
    ``render_kwargs`` go to the latter.
    """
    geom = pack_db_geometry(polygons, ignore, height, width, shrink_ratio, min_text_size, tile=tile)
    return render_db_targets(geom, device, thresh_min, thresh_max, **render_kwargs)
