"""ICDAR-2015 style IoU detection metric (per-image counts; aggregation lives in the evaluator).

Protocol (follows the official ICDAR 2015 Challenge 4 script, with two documented deviations):

* Ground-truth words marked don't-care (``transcription == "###"``) are not counted.
* A detection whose area lies mostly inside don't-care regions -- ``area(det & union(dont-care GT))
  / area(det) > dont_care_overlap`` -- is dropped: neither a true nor a false positive.
  *Deviation 1:* the official script tests each don't-care region on its own; we test the union of
  them, so a detection spanning two adjacent don't-care words is dropped too.
* Remaining detections and counted GT words are matched one-to-one when ``IoU > iou_threshold``
  (strict, as in the official script). *Deviation 2:* the official script matches greedily in
  (GT index, detection index) order; we match greedily by descending IoU (ties broken by GT then
  detection index), which never yields fewer matches for the common one-candidate case and does
  not depend on the order of the input lists.
* Per image we return ``(counted GT, counted detections, matches)``; precision / recall are formed
  from the sums over the whole split by the caller.

Geometry is done with shapely. Invalid polygons (self-intersecting "bow ties", repeated points)
are repaired with ``shapely.make_valid`` (keeping only the polygonal parts); polygons that end up
with zero area (collinear / coincident points, non-finite coordinates, < 3 points) are kept as
empty geometries: such a detection can never match nor be dropped as don't-care, so it counts as a
false positive, and such a GT word counts as a miss (unless it is don't-care).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import shapely
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

__all__ = ["IoUCounts", "IoUMatches", "iou_image_counts", "iou_image_matches", "to_shapely"]

_POLYGONAL = ("Polygon", "MultiPolygon")


@dataclass
class IoUCounts:
    """Counts of one image (or, summed, of a split)."""

    num_gt: int = 0  # counted (non-don't-care) GT words
    num_det: int = 0  # counted detections (not dropped as don't-care)
    num_matched: int = 0  # one-to-one matches with IoU > threshold

    def __iadd__(self, other: "IoUCounts") -> "IoUCounts":
        self.num_gt += other.num_gt
        self.num_det += other.num_det
        self.num_matched += other.num_matched
        return self


def _as_points(points) -> np.ndarray | None:
    """(N, 2) float64 array, or None when it cannot describe a region (non-finite / < 3 points)."""
    try:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        return None
    if len(pts) < 3 or not np.all(np.isfinite(pts)):
        return None
    return pts


def to_shapely(points) -> BaseGeometry:
    """A valid polygonal shapely geometry for ``points`` (possibly empty, never invalid)."""
    pts = _as_points(points)
    if pts is None:
        return Polygon()
    poly = Polygon(pts)
    if poly.is_valid:
        return poly
    fixed = shapely.make_valid(poly)
    if fixed.geom_type in _POLYGONAL:
        return fixed
    parts = [g for g in shapely.get_parts(fixed) if g.geom_type in _POLYGONAL]
    if not parts:
        return Polygon()
    merged = shapely.union_all(parts)
    return merged if merged.geom_type in _POLYGONAL else MultiPolygon()


def _safe_intersection_area(a: BaseGeometry, b: BaseGeometry) -> float:
    try:
        return float(a.intersection(b).area)
    except GEOSException:  # pragma: no cover - rare GEOS topology failure on valid input
        try:
            return float(a.buffer(0).intersection(b.buffer(0)).area)
        except GEOSException:
            return 0.0


def _pairwise_intersection_areas(gts: Sequence[BaseGeometry], dets: Sequence[BaseGeometry]) -> np.ndarray:
    """(len(gts), len(dets)) intersection areas; only bbox-overlapping pairs are intersected."""
    out = np.zeros((len(gts), len(dets)), dtype=np.float64)
    if not gts or not dets:
        return out
    gb = shapely.bounds(np.asarray(gts, dtype=object))  # NaN for empty geometries
    db = shapely.bounds(np.asarray(dets, dtype=object))
    with np.errstate(invalid="ignore"):
        overlap = (
            (gb[:, None, 0] <= db[None, :, 2])
            & (db[None, :, 0] <= gb[:, None, 2])
            & (gb[:, None, 1] <= db[None, :, 3])
            & (db[None, :, 1] <= gb[:, None, 3])
        )
    gi, di = np.nonzero(overlap)
    if len(gi) == 0:
        return out
    g_arr = np.asarray(gts, dtype=object)[gi]
    d_arr = np.asarray(dets, dtype=object)[di]
    try:
        out[gi, di] = shapely.area(shapely.intersection(g_arr, d_arr))
    except GEOSException:  # pragma: no cover - fall back pair by pair
        for g, d in zip(gi, di):
            out[g, d] = _safe_intersection_area(gts[g], dets[d])
    return out


@dataclass
class IoUMatches:
    """How one image's words were matched; indices into the caller's GT / detection lists."""

    care_gt: list[int]  # counted GT words (not don't-care)
    care_det: list[int]  # counted detections (not dropped as don't-care)
    pairs: list[tuple[int, int]]  # one-to-one (GT, detection) matches, IoU > threshold

    def counts(self) -> IoUCounts:
        return IoUCounts(num_gt=len(self.care_gt), num_det=len(self.care_det), num_matched=len(self.pairs))


def iou_image_counts(
    gt_polygons: Sequence[np.ndarray],
    gt_ignore: Sequence[bool],
    pred_polygons: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
    dont_care_overlap: float = 0.5,
) -> IoUCounts:
    """ICDAR-2015 counts for one image (see the module docstring for the protocol)."""
    return iou_image_matches(gt_polygons, gt_ignore, pred_polygons, iou_threshold, dont_care_overlap).counts()


def iou_image_matches(
    gt_polygons: Sequence[np.ndarray],
    gt_ignore: Sequence[bool],
    pred_polygons: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
    dont_care_overlap: float = 0.5,
) -> IoUMatches:
    """The matching behind :func:`iou_image_counts` (which words count, which pairs match)."""
    gt_geoms = [to_shapely(p) for p in gt_polygons]
    det_geoms = [to_shapely(p) for p in pred_polygons]
    ignore = np.asarray([bool(x) for x in gt_ignore], dtype=bool)
    care_gt = np.flatnonzero(~ignore)

    det_areas = np.array([g.area for g in det_geoms], dtype=np.float64)
    det_keep = np.ones(len(det_geoms), dtype=bool)
    dc_idx = np.flatnonzero(ignore)
    if len(dc_idx) and len(det_geoms):
        dc_parts = [gt_geoms[i] for i in dc_idx if not gt_geoms[i].is_empty]
        if dc_parts:
            try:
                dc_union = shapely.union_all(dc_parts)
            except GEOSException:  # pragma: no cover
                dc_union = shapely.union_all([p.buffer(0) for p in dc_parts])
            inter = _pairwise_intersection_areas([dc_union], det_geoms)[0]
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = np.where(det_areas > 0, inter / np.where(det_areas > 0, det_areas, 1.0), 0.0)
            det_keep = ~(frac > dont_care_overlap)
    care_det = np.flatnonzero(det_keep)

    matches = IoUMatches(care_gt=[int(i) for i in care_gt], care_det=[int(i) for i in care_det], pairs=[])
    if len(care_gt) == 0 or len(care_det) == 0:
        return matches

    g_list = [gt_geoms[i] for i in care_gt]
    d_list = [det_geoms[i] for i in care_det]
    inter = _pairwise_intersection_areas(g_list, d_list)
    g_area = np.array([g.area for g in g_list], dtype=np.float64)
    d_area = det_areas[care_det]
    union = g_area[:, None] + d_area[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)

    gi, di = np.nonzero(iou > iou_threshold)
    # Descending IoU; np.lexsort uses the last key as primary -> ties by GT then detection index.
    order = np.lexsort((di, gi, -iou[gi, di]))
    used_g: set[int] = set()
    used_d: set[int] = set()
    for k in order:
        g, d = int(gi[k]), int(di[k])
        if g in used_g or d in used_d:
            continue
        used_g.add(g)
        used_d.add(d)
        matches.pairs.append((int(care_gt[g]), int(care_det[d])))
    return matches
