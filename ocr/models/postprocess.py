"""DB post-processing: probability map -> text boxes/polygons in original-image pixels.

Pixel convention
----------------
Continuous coordinates: pixel ``(row i, col j)`` covers ``[j, j+1) x [i, i+1)`` in
``(x, y)``; its centre is ``(j + 0.5, i + 0.5)``. ``cv2.findContours`` returns pixel
*indices* of the boundary pixels, so a filled block of columns 10..49 has contour
x-indices 10 and 49. Before unclipping we convert the candidate to the outline of
the pixel *area* (here x in [10, 50]): the quad's min-area rectangle of the pixel
indices is moved by +0.5 and grown by 1 px in both sides; a polygon is moved by +0.5
and offset by 0.5 px (mitred corners). The unclip distance ``D = A * unclip_ratio / L``
is then computed from that area (for the block above, 40 x 20 px: D = 800*1.5/120 = 10,
giving x in [0, 60]). Scores are computed on the pixel grid as in the DB reference
(mask = pixels whose indices are inside the index-space box/polygon, cv2.fillPoly).

The sample's 3x3 matrix ``M`` maps original-image continuous coordinates to
network-input continuous coordinates (homogeneous, ``[x', y', w'] = M @ [x, y, 1]``),
so output points are ``M^-1`` applied to the input-space points, then clipped to
``[0, w] x [0, h]`` of the original image.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pyclipper

if TYPE_CHECKING:
    import torch

__all__ = ["DBPostProcessor"]

_CLIPPER_SCALE = 1024.0  # fixed-point scale for pyclipper (1/1024 px precision)
MIN_ORIGINAL_AREA = 1.0
POLYGON_EPSILON_MAX_THICKNESS = 0.25  # approxPolyDP epsilon <= this x the candidate's shorter side  # px^2 in the original image: less is a detection outside the image


def _to_numpy(x: Any, dtype=np.float32) -> np.ndarray:
    # torch is not imported here: validation-scoring worker processes load this module without
    # it (ocr.training.scoring). A tensor argument means torch is already imported.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32 if dtype == np.float32 else torch.float64).numpy()
    return np.asarray(x, dtype=dtype)


def batch_arrays(prob_maps, matrices=None, orig_sizes=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host tensors / arrays -> ``probs`` float32 ``[B,H,W]``, ``matrices`` float64 ``[B,3,3]`` (identity
    when None), ``sizes`` float64 ``[B,2]`` (the map's size when None)."""
    probs = _to_numpy(prob_maps, np.float32)
    if probs.ndim == 4:
        if probs.shape[1] != 1:
            raise ValueError(f"prob_maps must be [B,1,H,W] or [B,H,W], got {probs.shape}")
        probs = probs[:, 0]
    if probs.ndim != 3:
        raise ValueError(f"prob_maps must be [B,1,H,W] or [B,H,W], got {probs.shape}")
    b, h, w = probs.shape
    mats = np.tile(np.eye(3), (b, 1, 1)) if matrices is None else _to_numpy(matrices, np.float64).reshape(b, 3, 3)
    sizes = np.tile([h, w], (b, 1)) if orig_sizes is None else _to_numpy(orig_sizes, np.float64).reshape(b, 2)
    return probs, mats, sizes


def _mini_box(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Min-area rectangle as 4 points ordered (tl, tr, br, bl) like the DB reference,
    and its shorter side."""
    rect = cv2.minAreaRect(points.reshape(-1, 1, 2).astype(np.float32))
    return _order_box(cv2.boxPoints(rect)), float(min(rect[1]))


def _order_box(pts: np.ndarray) -> np.ndarray:
    pts = sorted(list(pts), key=lambda p: p[0])
    i1, i4 = (0, 1) if pts[1][1] > pts[0][1] else (1, 0)
    i2, i3 = (2, 3) if pts[3][1] > pts[2][1] else (3, 2)
    return np.array([pts[i1], pts[i2], pts[i3], pts[i4]], dtype=np.float32)


def _offset(points: np.ndarray, delta: float, join: int) -> list[np.ndarray]:
    """Offset a closed polygon by ``delta`` px (float precision via scale_to_clipper)."""
    pco = pyclipper.PyclipperOffset(arc_tolerance=0.05 * _CLIPPER_SCALE)
    pco.AddPath(pyclipper.scale_to_clipper(points.astype(np.float64).tolist(), _CLIPPER_SCALE),
                join, pyclipper.ET_CLOSEDPOLYGON)
    out = pco.Execute(delta * _CLIPPER_SCALE)
    return [np.asarray(pyclipper.scale_from_clipper(p, _CLIPPER_SCALE), dtype=np.float32) for p in out if len(p)]


def _polygon_area_length(points: np.ndarray) -> tuple[float, float]:
    p = points.reshape(-1, 2).astype(np.float64)
    q = np.roll(p, -1, axis=0)
    area = 0.5 * abs(float(np.sum(p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1])))
    length = float(np.sum(np.hypot(*(q - p).T)))
    return area, length


class DBPostProcessor:
    """Turn DB probability maps into text boxes in original-image pixels.

    Args:
        thresh: binarisation threshold on the probability map.
        box_thresh: minimum mean probability inside a candidate's box/polygon (the DB paper: 0.6; 0.4
            finds many more lines at the same precision with our from-scratch models, see README).
        unclip_ratio: the expansion ``D = A * unclip_ratio / L``.
        max_candidates: contours considered per image.
        min_size: a candidate whose min-area rectangle (pixel indices) has a shorter
            side ``< min_size`` is dropped before scoring, and one whose unclipped
            rectangle has a shorter side ``< min_size + 2`` afterwards (as in DB).
        output: ``"quad"`` (min-area rectangle of the unclipped box, 4 points ordered
            tl, tr, br, bl) or ``"polygon"`` (unclipped ``approxPolyDP`` contour).
        polygon_epsilon: ``approxPolyDP`` epsilon as a fraction of the contour length, at most a
            quarter of the candidate's shorter side
            (``"polygon"`` only; DB reference 0.01).

    Call: ``pp(prob_maps, matrices=None, orig_sizes=None)`` with ``prob_maps``
    ``[B, 1, H, W]`` (or ``[B, H, W]``) tensor/array of probabilities, ``matrices``
    ``[B, 3, 3]`` (original -> network input; ``None``: identity) and ``orig_sizes``
    ``[B, 2]`` as (h, w) (``None``: the map size). Returns a list of length B of
    ``(polygons, scores)``: ``polygons`` a list of float32 ``(N, 2)`` arrays (x, y) in
    original pixels, ``scores`` a list of floats.
    """

    def __init__(
        self,
        thresh: float = 0.3,
        box_thresh: float = 0.4,
        unclip_ratio: float = 1.5,
        max_candidates: int = 1000,
        min_size: float = 3,
        output: str = "quad",
        polygon_epsilon: float = 0.01,
    ) -> None:
        if output not in ("quad", "polygon"):
            raise ValueError(f"output must be 'quad' or 'polygon', got {output!r}")
        self.thresh = thresh
        self.box_thresh = box_thresh
        self.unclip_ratio = unclip_ratio
        self.max_candidates = max_candidates
        self.min_size = min_size
        self.output = output
        self.polygon_epsilon = polygon_epsilon

    # ------------------------------------------------------------------ API
    def __call__(
        self,
        prob_maps: torch.Tensor | np.ndarray,
        matrices: torch.Tensor | np.ndarray | Sequence | None = None,
        orig_sizes: torch.Tensor | np.ndarray | Sequence | None = None,
    ) -> list[tuple[list[np.ndarray], list[float]]]:
        probs, mats, sizes = batch_arrays(prob_maps, matrices, orig_sizes)
        return [self.process_single(probs[i], mats[i], (float(sizes[i, 0]), float(sizes[i, 1])))
                for i in range(len(probs))]

    def process_single(
        self, prob: np.ndarray, matrix: np.ndarray | None = None, orig_hw: tuple[float, float] | None = None
    ) -> tuple[list[np.ndarray], list[float]]:
        """One ``[H, W]`` float32 probability map -> ``(polygons, scores)``."""
        prob = np.ascontiguousarray(prob, dtype=np.float32)
        h, w = prob.shape
        inv = np.linalg.inv(np.eye(3) if matrix is None else np.asarray(matrix, np.float64))
        oh, ow = (h, w) if orig_hw is None else orig_hw

        bitmap = (prob > self.thresh).astype(np.uint8)
        # RETR_LIST as in the DB reference (hole contours are candidates too).
        contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        polys: list[np.ndarray] = []
        scores: list[float] = []
        for contour in contours[: self.max_candidates]:
            if self.output == "quad":
                res = self._quad(prob, contour)
            else:
                res = self._polygon(prob, contour)
            if res is None:
                continue
            pts, score = res
            pts = self._to_original(pts, inv, oh, ow)
            if abs(cv2.contourArea(pts)) < MIN_ORIGINAL_AREA:
                continue  # found in the padding: clipped flat onto the image border
            polys.append(pts)
            scores.append(score)
        return polys, scores

    # ------------------------------------------------------------ internals
    def _quad(self, prob: np.ndarray, contour: np.ndarray) -> tuple[np.ndarray, float] | None:
        rect = cv2.minAreaRect(contour)
        if min(rect[1]) < self.min_size:
            return None
        score = self._box_score(prob, cv2.boxPoints(rect))
        if score < self.box_thresh:
            return None
        # pixel indices -> outline of the pixel area (centre +0.5, each side +1 px)
        (cx, cy), (rw, rh), angle = rect
        area_box = cv2.boxPoints(((cx + 0.5, cy + 0.5), (rw + 1.0, rh + 1.0), angle))
        expanded = self._unclip(area_box)
        if expanded is None:
            return None
        box, sside = _mini_box(expanded)
        if sside < self.min_size + 2:
            return None
        return box, score

    def _polygon(self, prob: np.ndarray, contour: np.ndarray) -> tuple[np.ndarray, float] | None:
        # The DB reference's epsilon (a fraction of the perimeter) exceeds half the thickness of a
        # long text line's kernel (1% of a 250 x 6 px contour is 5 px), and approxPolyDP then
        # collapses the line to 2 points: capped at a quarter of the kernel's thickness.
        thickness = min(cv2.minAreaRect(contour)[1])
        eps = min(self.polygon_epsilon * cv2.arcLength(contour, True), POLYGON_EPSILON_MAX_THICKNESS * thickness)
        approx = cv2.approxPolyDP(contour, eps, True).reshape(-1, 2)
        if approx.shape[0] < 4:
            return None
        if min(cv2.minAreaRect(approx)[1]) < self.min_size:
            return None
        score = self._box_score(prob, approx)
        if score < self.box_thresh:
            return None
        area = _offset(approx.astype(np.float32) + 0.5, 0.5, pyclipper.JT_MITER)
        if not area:
            return None
        expanded = self._unclip(max(area, key=lambda p: _polygon_area_length(p)[0]))
        if expanded is None:
            return None
        _, sside = _mini_box(expanded)
        if sside < self.min_size + 2:
            return None
        return expanded, score

    def _unclip(self, points: np.ndarray) -> np.ndarray | None:
        area, length = _polygon_area_length(points)
        if length <= 0 or area <= 0:
            return None
        out = _offset(points, area * self.unclip_ratio / length, pyclipper.JT_ROUND)
        if not out:
            return None
        # an outward offset of a simple polygon gives one polygon; keep the largest otherwise
        return max(out, key=lambda p: _polygon_area_length(p)[0])

    @staticmethod
    def _box_score(prob: np.ndarray, pts: np.ndarray) -> float:
        """Mean probability over the pixels inside ``pts`` (pixel-index coords), computed
        on the bounding-box crop only (DB reference ``box_score_fast``)."""
        h, w = prob.shape
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        xmin = int(np.clip(np.floor(pts[:, 0].min()), 0, w - 1))
        xmax = int(np.clip(np.ceil(pts[:, 0].max()), 0, w - 1))
        ymin = int(np.clip(np.floor(pts[:, 1].min()), 0, h - 1))
        ymax = int(np.clip(np.ceil(pts[:, 1].max()), 0, h - 1))
        mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
        local = np.round(pts - [xmin, ymin]).astype(np.int32)
        cv2.fillPoly(mask, [local.reshape(-1, 1, 2)], 1)
        return float(cv2.mean(prob[ymin : ymax + 1, xmin : xmax + 1], mask)[0])

    @staticmethod
    def _to_original(pts: np.ndarray, inv: np.ndarray, oh: float, ow: float) -> np.ndarray:
        hom = np.concatenate([pts.astype(np.float64), np.ones((len(pts), 1))], axis=1) @ inv.T
        den = hom[:, 2:3]
        den = np.where(np.abs(den) < 1e-12, 1e-12, den)
        xy = hom[:, :2] / den
        xy[:, 0] = np.clip(xy[:, 0], 0, ow)
        xy[:, 1] = np.clip(xy[:, 1], 0, oh)
        return xy.astype(np.float32)
