"""Split-level detection evaluation: CLEval + ICDAR-2015 IoU hmean.

:class:`DetectionEvaluator` is fed one image at a time (``add``) and reports both metrics at the end
(``compute``). Both metrics are aggregated over the whole split: per-image *counts* are summed and
P/R/H are formed once from the sums (never a mean of per-image scores).

Conventions for empty denominators (same as the official scripts / ``CLEvalMetric``): precision is 0
when there are no counted detections, recall is 0 when there are no counted GT words (characters
for CLEval), hmean is 0 when P + R == 0. An image with no GT and no predictions adds nothing, so it
does not change the result; an all-empty split reports 0 everywhere.

:func:`evaluate_files` runs the evaluator on a GT and a prediction JSON file in the project's
annotation format::

    {"images": {"<file name>": {"words": {"0001": {"points": [[x, y], ...], "transcription": "..."}}}}}

``transcription == "###"`` marks a don't-care GT word; transcriptions (optional in predictions) give
CLEval its character counts. Predictions may carry an optional numeric ``"score"`` (validated, not
used). A prediction file may omit images (= no detections there); an image that is not in the GT is
an error. Any malformed input raises :class:`AnnotationError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ocr.metrics.cleval_metric import CLEvalCounts, cleval_image_counts
from ocr.metrics.iou_metric import IoUCounts, iou_image_counts

__all__ = ["AnnotationError", "DetectionEvaluator", "Word", "evaluate_files", "hmean", "load_words"]

DONT_CARE = "###"


def hmean(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)


def _prf(precision: float, recall: float) -> dict[str, float]:
    return {"precision": float(precision), "recall": float(recall), "hmean": float(hmean(precision, recall))}


class DetectionEvaluator:
    """Accumulates CLEval and ICDAR-2015 IoU counts image by image.

    Args:
        iou_threshold: a GT/detection pair matches when IoU > this (IoU metric only).
        dont_care_overlap: a detection with more than this fraction of its area inside don't-care
            GT regions is ignored (IoU metric only; CLEval has its own rule, see cleval_metric).
    """

    def __init__(self, iou_threshold: float = 0.5, dont_care_overlap: float = 0.5):
        self.iou_threshold = float(iou_threshold)
        self.dont_care_overlap = float(dont_care_overlap)
        self.reset()

    def reset(self) -> None:
        self._iou = IoUCounts()  # images added without a key
        self._cleval = CLEvalCounts()
        self._num_images = 0
        self._by_key: dict[str, tuple[IoUCounts, CLEvalCounts]] = {}  # images added with a key

    def __len__(self) -> int:
        return self._num_images + len(self._by_key)

    def add(
        self,
        gt_polygons: Sequence[np.ndarray],
        gt_ignore: Sequence[bool],
        pred_polygons: Sequence[np.ndarray],
        gt_texts: Sequence[str] | None = None,
        key: str | None = None,
    ) -> None:
        """Add one image. Polygons are (N, 2) arrays (N >= 4 expected) in the same pixel frame.

        ``gt_ignore[i]`` marks GT word i as don't-care. ``gt_texts`` (optional) gives CLEval the
        character count of each GT word; without it (or for an empty text) the count is estimated
        from the word's aspect ratio. An image added with a ``key`` (its file name) counts once
        however often it is added here or in merged evaluators: DDP pads each rank's shard by
        repeating samples.
        """
        if key is not None and key in self._by_key:
            return
        self.add_counts(*self.image_counts(gt_polygons, gt_ignore, pred_polygons, gt_texts), key=key)

    def image_counts(
        self,
        gt_polygons: Sequence[np.ndarray],
        gt_ignore: Sequence[bool],
        pred_polygons: Sequence[np.ndarray],
        gt_texts: Sequence[str] | None = None,
    ) -> tuple[IoUCounts, CLEvalCounts]:
        """The counts ``add`` would add for one image, without adding them (a worker process
        computes them, the evaluator that owns the split adds them with ``add_counts``)."""
        gt_polygons = list(gt_polygons)
        gt_ignore = [bool(x) for x in gt_ignore]
        pred_polygons = list(pred_polygons)
        if len(gt_ignore) != len(gt_polygons):
            raise ValueError(f"gt_ignore has {len(gt_ignore)} entries for {len(gt_polygons)} GT polygons")
        if gt_texts is not None:
            gt_texts = list(gt_texts)
            if len(gt_texts) != len(gt_polygons):
                raise ValueError(f"gt_texts has {len(gt_texts)} entries for {len(gt_polygons)} GT polygons")
        iou, cleval = IoUCounts(), CLEvalCounts()
        if gt_polygons or pred_polygons:
            iou = iou_image_counts(gt_polygons, gt_ignore, pred_polygons, self.iou_threshold, self.dont_care_overlap)
            cleval = cleval_image_counts(gt_polygons, gt_ignore, pred_polygons, gt_texts)
        return iou, cleval

    def add_counts(self, iou: IoUCounts, cleval: CLEvalCounts, key: str | None = None) -> None:
        """Add one image's counts (from ``image_counts``); the same key rule as ``add``. Adding
        images in the same order as ``add`` would gives a bit-identical result."""
        if key is not None:
            self._by_key.setdefault(key, (iou, cleval))
            return
        self._num_images += 1
        self._iou += iou
        self._cleval += cleval

    def merge(self, other: "DetectionEvaluator") -> None:
        """Add the counts of another evaluator (e.g. one per data-loader worker / rank)."""
        self._iou += other._iou
        self._cleval += other._cleval
        self._num_images += other._num_images
        for key, value in other._by_key.items():
            self._by_key.setdefault(key, value)

    def _totals(self) -> tuple[IoUCounts, CLEvalCounts]:
        iou, cleval = IoUCounts(), CLEvalCounts()
        iou += self._iou
        cleval += self._cleval
        # in key (image name) order: the float sums then do not depend on the order the images
        # arrived in (under DDP, rank by rank), so one process and N ranks give the same bits
        for key in sorted(self._by_key):
            image_iou, image_cleval = self._by_key[key]
            iou += image_iou
            cleval += image_cleval
        return iou, cleval

    def compute(self) -> dict[str, dict[str, float]]:
        """``{"cleval": {"precision", "recall", "hmean"}, "iou": {...}}`` as Python floats."""
        iou, cleval = self._totals()
        iou_p = iou.num_matched / iou.num_det if iou.num_det else 0.0
        iou_r = iou.num_matched / iou.num_gt if iou.num_gt else 0.0
        return {
            "cleval": _prf(cleval.precision(), cleval.recall()),
            "iou": _prf(iou_p, iou_r),
        }

    def counts(self) -> dict[str, dict[str, float]]:
        """The raw summed counts (for logging / debugging)."""
        iou, cleval = self._totals()
        return {"cleval": dict(vars(cleval)), "iou": dict(vars(iou)), "images": len(self)}


# --------------------------------------------------------------------------------------------------
# JSON loading (minimal, self-contained: only what evaluate_files / the CLI need)


class AnnotationError(ValueError):
    """Missing or malformed annotation / prediction file; the message names the file and field."""


@dataclass
class Word:
    points: np.ndarray  # (N, 2) float64
    transcription: str | None = None
    score: float | None = None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_points(value: Any, where: str, path: str) -> np.ndarray:
    if not isinstance(value, list):
        raise AnnotationError(f"{path}: {where}.points must be a list of [x, y] pairs, got {type(value).__name__}")
    if len(value) < 4:
        raise AnnotationError(f"{path}: {where}.points has {len(value)} points, need at least 4")
    for j, pt in enumerate(value):
        if not (isinstance(pt, (list, tuple)) and len(pt) == 2 and all(_is_number(c) for c in pt)):
            raise AnnotationError(f"{path}: {where}.points[{j}] must be [x, y] with finite numbers, got {pt!r}")
    return np.asarray(value, dtype=np.float64)


def _parse_word(value: Any, where: str, path: str) -> Word:
    if not isinstance(value, dict):
        raise AnnotationError(f"{path}: {where} must be an object, got {type(value).__name__}")
    if "points" not in value:
        raise AnnotationError(f"{path}: {where} has no 'points' field")
    points = _parse_points(value["points"], where, path)
    text = value.get("transcription")
    if text is not None and not isinstance(text, str):
        raise AnnotationError(f"{path}: {where}.transcription must be a string, got {type(text).__name__}")
    score = value.get("score")
    if score is not None and not _is_number(score):
        raise AnnotationError(f"{path}: {where}.score must be a finite number, got {score!r}")
    return Word(points=points, transcription=text, score=None if score is None else float(score))


def load_words(path: str | Path) -> dict[str, list[Word]]:
    """Load ``{"images": {name: {"words": {id: {...}}}}}`` -> ``{name: [Word, ...]}`` (file order)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read file: {exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict) or "images" not in data:
        raise AnnotationError(f"{path}: top-level object must have an 'images' field")
    images = data["images"]
    if not isinstance(images, dict):
        raise AnnotationError(f"{path}: 'images' must be an object mapping file name -> entry")
    out: dict[str, list[Word]] = {}
    for name, entry in images.items():
        where = f"images[{name!r}]"
        if not isinstance(entry, dict):
            raise AnnotationError(f"{path}: {where} must be an object, got {type(entry).__name__}")
        if "words" not in entry:
            raise AnnotationError(f"{path}: {where} has no 'words' field")
        words = entry["words"]
        if not isinstance(words, dict):
            raise AnnotationError(f"{path}: {where}.words must be an object mapping word id -> word")
        out[name] = [_parse_word(w, f"{where}.words[{key!r}]", str(path)) for key, w in words.items()]
    return out


def evaluate_files(
    gt_json: str | Path, pred_json: str | Path, iou_threshold: float = 0.5, dont_care_overlap: float = 0.5
) -> dict[str, dict[str, float]]:
    """Evaluate a prediction file against a GT file (same format); returns ``DetectionEvaluator.compute()``."""
    gt = load_words(gt_json)
    pred = load_words(pred_json)
    unknown = sorted(set(pred) - set(gt))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise AnnotationError(f"{pred_json}: image {unknown[0]!r} is not in the ground truth {gt_json}{more}")
    evaluator = DetectionEvaluator(iou_threshold=iou_threshold, dont_care_overlap=dont_care_overlap)
    for name in sorted(gt):
        gt_words = gt[name]
        evaluator.add(
            gt_polygons=[w.points for w in gt_words],
            gt_ignore=[w.transcription == DONT_CARE for w in gt_words],
            pred_polygons=[w.points for w in pred.get(name, [])],
            gt_texts=[w.transcription or "" for w in gt_words],
        )
    return evaluator.compute()
