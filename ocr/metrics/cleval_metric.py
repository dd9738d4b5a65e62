"""CLEval (character-level) detection metric, computed with the ``cleval`` package (0.1.1).

We call ``cleval.eval_functions.evaluation`` per image -- the same function ``CLEvalMetric.update``
calls -- with detection-only options (``E2E=False``) and the package defaults for everything else
(case-sensitive, granularity penalties 1.0, vertical aspect-ratio threshold 0.5, area-precision
constraint 0.3). Per-image statistics are summed by the evaluator and turned into P/R/H with the
same formula as ``CLEvalMetric.compute`` (``det_p``, ``det_r``, ``det_h``)::

    recall    = max(0, sum tp_recall    - sum gran_recall)    / sum num_char_gt   (0 if no GT chars)
    precision = max(0, sum tp_precision - sum gran_precision) / sum num_char_det  (0 if no det chars)

We do not go through ``CLEvalMetric`` itself because (a) importing ``cleval`` runs its
``__init__``, which imports torchmetrics -> torch + torchvision (~10 s on a cold CLI), and (b) it
switches E2E on whenever GT letters are given, which then requires detection letters. See
:func:`_cleval_modules` for how the core modules are imported without that ``__init__``.

Polygons -> quads (cleval's ``QUAD`` box type takes exactly 4 points)
--------------------------------------------------------------------
* A 4-point polygon that is a valid simple polygon with positive area is used as is.
* Anything else (more than 4 points, self-intersecting / zero-area 4-gons, 1-3 points) is replaced by
  its minimum-area rotated rectangle (``cv2.minAreaRect`` -> ``cv2.boxPoints``). For curved text this
  over-estimates the region; the IoU metric uses the true polygon.
* Non-finite coordinates / no points -> a zero-size quad at the origin (an unmatched detection).
* Every quad is then put in a canonical order: clockwise on screen (y down) and starting at the
  vertex that best matches the top-left corner of its axis-aligned bounding box (min over the four
  rotations of the summed vertex-to-bbox-corner distances). cleval reads the point order: edge 0->1
  is the "top" edge used for the aspect ratio, the pseudo-character centres and the false-positive
  character estimate, so GT and predictions must follow the same convention.
* Coordinates are rounded to integers (cleval truncates them with ``int()`` internally).

Character counts (what cleval does when no transcription is known)
------------------------------------------------------------------
* Counted GT word with a transcription: ``len(transcription)`` characters (pseudo-character centres
  spread evenly along the word's axis).
* Counted GT word without a transcription (``gt_texts`` is None or the text is empty): we estimate
  the length with cleval's own don't-care estimate, ``min(round(0.5 + max(ar, 1/ar)), 10)`` where
  ``ar`` = mean top/bottom edge length / mean left/right edge length of the canonical quad.
* Don't-care GT: cleval sets the text to ``"#" * min(round(0.5 + max(ar, 1/ar)), 10)``; they only
  serve to filter detections (a detection with area precision >= 0.3 against a don't-care region, or
  covering its pseudo-character centres with summed area precision >= 0.3, is excluded).
* Unmatched (false-positive) detection: cleval charges ``min(round(0.5 + 1 / (1e-5 + ar)), 10)``
  characters. Note the ``1 / ar`` (not ``max(ar, 1/ar)``): a *horizontal* false positive (ar >= ~1)
  costs 1 character, a vertical one with height/width = k costs about k characters. So a spurious
  horizontal box hurts CLEval precision much less than the IoU precision. This is the package's
  behaviour and is kept as is.
* Matched detections are charged the number of GT pseudo-character centres they contain.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from shapely.geometry import Polygon

__all__ = ["CLEvalCounts", "cleval_image_counts", "polygon_to_quad", "estimate_num_chars"]

# Detection-only options with CLEvalMetric's defaults (attribute names are what eval_functions reads).
_OPTIONS = types.SimpleNamespace(
    DUMP_SAMPLE_RESULT=False,
    E2E=False,
    ORIENTATION=False,
    CASE_SENSITIVE=True,
    RECALL_GRANULARITY_PENALTY_WEIGHT=1.0,
    PRECISION_GRANULARITY_PENALTY_WEIGHT=1.0,
    VERTICAL_ASPECT_RATIO_THRESH=0.5,
    AREA_PRECISION_CONSTRAINT=0.3,
)

_PLACEHOLDER_CHAR = "x"  # text for GT words whose transcription is unknown (never "#": "###" = don't care)


@functools.lru_cache(maxsize=None)
def _cleval_modules():
    """Return ``(cleval.box_types, cleval.eval_functions)`` without running ``cleval/__init__.py``.

    ``cleval/__init__`` imports ``CLEvalMetric`` -> torchmetrics -> torch/torchvision (~10 s), none of
    which the evaluation code needs. If ``cleval`` is already imported (e.g. inside the trainer) we use
    it; otherwise we register a bare package object just long enough to import the two submodules,
    then remove it again so that a later ``import cleval`` runs the real ``__init__`` (it reuses the
    already-imported submodules from ``sys.modules``).
    """
    if "cleval" in sys.modules:
        return importlib.import_module("cleval.box_types"), importlib.import_module("cleval.eval_functions")
    spec = importlib.util.find_spec("cleval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'cleval' package is not installed")
    stub = types.ModuleType("cleval")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["cleval"] = stub
    try:
        box_types = importlib.import_module("cleval.box_types")
        eval_functions = importlib.import_module("cleval.eval_functions")
    finally:
        if sys.modules.get("cleval") is stub:
            del sys.modules["cleval"]
    return box_types, eval_functions


@dataclass
class CLEvalCounts:
    """cleval detection statistics of one image (or, summed, of a split)."""

    num_char_gt: int = 0
    num_char_det: int = 0
    tp_recall: int = 0
    gran_recall: float = 0.0
    tp_precision: int = 0
    gran_precision: float = 0.0

    def __iadd__(self, other: "CLEvalCounts") -> "CLEvalCounts":
        self.num_char_gt += other.num_char_gt
        self.num_char_det += other.num_char_det
        self.tp_recall += other.tp_recall
        self.gran_recall += other.gran_recall
        self.tp_precision += other.tp_precision
        self.gran_precision += other.gran_precision
        return self

    def recall(self) -> float:
        if self.num_char_gt == 0:
            return 0.0
        return max(0.0, self.tp_recall - self.gran_recall) / self.num_char_gt

    def precision(self) -> float:
        if self.num_char_det == 0:
            return 0.0
        return max(0.0, self.tp_precision - self.gran_precision) / self.num_char_det


_ROTATIONS = (np.arange(4)[:, None] + np.arange(4)[None, :]) % 4  # row k = vertex order starting at k


def _canonical_order(quad: np.ndarray) -> np.ndarray:
    """Clockwise on screen (y down), starting at the vertex closest to the bbox's top-left corner."""
    x, y = quad[:, 0], quad[:, 1]
    signed = float(np.dot(x, y[[1, 2, 3, 0]]) - np.dot(x[[1, 2, 3, 0]], y))
    if signed < 0:  # counter-clockwise on screen
        quad = quad[::-1]
    x0, y0 = quad.min(axis=0)
    x1, y1 = quad.max(axis=0)
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    rotations = quad[_ROTATIONS]  # (4 start vertices, 4, 2)
    costs = np.sqrt(((rotations - corners) ** 2).sum(axis=2)).sum(axis=1)
    return rotations[int(np.argmin(costs))]


def polygon_to_quad(points) -> np.ndarray:
    """(4, 2) float64 integer-valued quad in canonical order (see the module docstring)."""
    try:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        pts = np.zeros((0, 2))
    if len(pts) == 0 or not np.all(np.isfinite(pts)):
        return np.zeros((4, 2), dtype=np.float64)
    quad = None
    if len(pts) == 4:
        poly = Polygon(pts)
        if poly.is_valid and poly.area > 0:
            quad = pts
    if quad is None:
        quad = cv2.boxPoints(cv2.minAreaRect(pts.astype(np.float32))).astype(np.float64)
    return np.rint(_canonical_order(quad)) + 0.0  # "+ 0.0" turns -0.0 into 0.0


def _aspect_ratio(quad: np.ndarray) -> float:
    """cleval's ``QUAD.aspect_ratio`` (mean of edges 0-1/2-3 over mean of edges 1-2/3-0)."""
    e = np.sqrt(((quad - quad[[1, 2, 3, 0]]) ** 2).sum(axis=1))
    return float(((e[0] + e[2]) / 2 + 1e-5) / ((e[1] + e[3]) / 2 + 1e-5))


def estimate_num_chars(quad: np.ndarray) -> int:
    """cleval's pseudo transcription length of a quad: ``min(round(0.5 + max(ar, 1/ar)), 10)``."""
    ar = _aspect_ratio(np.asarray(quad, dtype=np.float64).reshape(4, 2))
    return int(min(round(0.5 + max(ar, 1.0 / ar)), 10))


def cleval_image_counts(
    gt_polygons: Sequence[np.ndarray],
    gt_ignore: Sequence[bool],
    pred_polygons: Sequence[np.ndarray],
    gt_texts: Sequence[str | None] | None = None,
) -> CLEvalCounts:
    """Run cleval's detection evaluation on one image and return its statistics."""
    box_types, eval_functions = _cleval_modules()
    QUAD = box_types.QUAD

    gt_boxes = []
    for i, poly in enumerate(gt_polygons):
        quad = polygon_to_quad(poly)
        is_dc = bool(gt_ignore[i])
        text = gt_texts[i] if gt_texts is not None else None
        if not is_dc and not text:
            text = _PLACEHOLDER_CHAR * estimate_num_chars(quad)
        # For don't-care boxes QUAD replaces the text with its own "#"-estimate.
        gt_boxes.append(QUAD(quad.reshape(-1).tolist(), confidence=0.0, transcription=text or "", is_dc=is_dc))
    det_boxes = [
        QUAD(polygon_to_quad(p).reshape(-1).tolist(), confidence=0.0, transcription="", is_dc=False)
        for p in pred_polygons
    ]

    res = eval_functions.evaluation(_OPTIONS, gt_boxes, det_boxes)
    det = res.stats.det
    counts = CLEvalCounts(
        num_char_gt=int(det.num_char_gt),
        num_char_det=int(det.num_char_det),
        tp_recall=int(det.num_char_tp_recall),
        gran_recall=float(det.gran_score_recall),
        tp_precision=int(det.num_char_tp_precision),
        gran_precision=float(det.gran_score_precision),
    )
    return counts
