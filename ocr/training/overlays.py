"""Prediction overlays (``runners/predict.py overlays=FOLDER``): each input image with its detected
boxes drawn, in original pixels. With ground truth (``gt_json=``) the boxes are matched by the IoU
metric's own rule (:func:`ocr.metrics.iou_metric.iou_image_matches`, as ``python -m ocr.metrics``
with its default thresholds) and coloured by outcome."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from ocr.data.annotations import AnnotationError, atomic_write_bytes
from ocr.metrics import evaluator
from ocr.metrics.iou_metric import iou_image_matches

log = logging.getLogger(__name__)

#: BGR colour of each kind of box (the README's colour key).
COLOURS = {
    "detected": (0, 200, 0),  # green: a detection (with ground truth: one matched to a GT word)
    "false": (0, 0, 255),  # red: a detection no GT word matches
    "missed": (255, 96, 0),  # blue: a GT word no detection matches
    "dont_care": (255, 0, 255),  # magenta: a "###" GT word, and detections ignored inside one
}


def load_ground_truth(gt_json: str | Path, names: list[str]) -> dict[str, list[evaluator.Word]]:
    """The GT words of ``names`` from an annotation file (read as ``python -m ocr.metrics`` reads
    it). An image missing from the file is drawn without ground truth (one warning); a file that
    has none of the images is an error."""
    try:
        words = evaluator.load_words(gt_json)
    except evaluator.AnnotationError as exc:
        raise AnnotationError(f"gt_json: {exc}") from None
    missing = [n for n in names if n not in words]
    if len(missing) == len(names):
        raise AnnotationError(f"gt_json: {gt_json} has none of the {len(names)} input images (e.g. {names[0]!r})")
    if missing:
        log.warning("gt_json: %d of %d images are not in %s (e.g. %r): their overlays show the detections only",
                    len(missing), len(names), gt_json, missing[0])
    return {n: words[n] for n in names if n in words}


def classify(detections: list[np.ndarray], gt_words: list[evaluator.Word] | None) -> list[tuple[np.ndarray, str]]:
    """(polygon, kind) for every box to draw, GT words first (detections are drawn over them)."""
    if gt_words is None:
        return [(d, "detected") for d in detections]
    ignore = [w.transcription == evaluator.DONT_CARE for w in gt_words]
    matches = iou_image_matches([w.points for w in gt_words], ignore, detections)
    matched_gt = {g for g, _ in matches.pairs}
    matched_det = {d for _, d in matches.pairs}
    counted_det = set(matches.care_det)
    boxes = [(w.points, "dont_care") for w, dc in zip(gt_words, ignore) if dc]
    boxes += [(gt_words[g].points, "missed") for g in matches.care_gt if g not in matched_gt]
    for i, d in enumerate(detections):
        kind = "detected" if i in matched_det else "false" if i in counted_det else "dont_care"
        boxes.append((d, kind))
    return boxes


def read_image(path: Path) -> np.ndarray:
    """BGR pixels as the loaders see them (EXIF orientation applied: the frame of the polygons).
    Read as bytes: ``cv2.imread`` cannot open non-ASCII paths on some platforms."""
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise AnnotationError(f"{path}: cannot decode the image for its overlay")
    return image


def draw(image: np.ndarray, boxes: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """A copy of ``image`` with each box outlined in its kind's colour."""
    out = image.copy()
    height, width = image.shape[:2]
    thickness = max(2, round(max(height, width) / 500))  # visible on a 2000 px receipt photo
    for points, kind in boxes:
        # a box may end on the image's far edge (x = width): draw it on the last pixel to keep it visible
        pts = np.clip(np.rint(np.asarray(points, dtype=np.float64)), 0, [width - 1, height - 1])
        pts = pts.astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(out, [pts], isClosed=True, color=COLOURS[kind], thickness=thickness, lineType=cv2.LINE_AA)
    return out


def write_overlays(folder: Path, paths: list[Path], predictions: dict, gt: dict[str, list] | None) -> int:
    """One overlay per input image in ``folder``, under the image's own name and format (written
    atomically). ``predictions``: predict's ``{name: {"words": {id: {"points": ...}}}}``."""
    for path in paths:
        words = predictions.get(path.name, {}).get("words", {})
        detections = [np.asarray(w["points"], dtype=np.float64) for w in words.values()]
        gt_words = gt.get(path.name) if gt is not None else None
        image = draw(read_image(path), classify(detections, gt_words))
        ok, encoded = cv2.imencode(path.suffix.lower(), image)
        if not ok:
            raise AnnotationError(f"{path}: cannot encode its overlay as {path.suffix}")
        atomic_write_bytes(folder / path.name, encoded.tobytes())
    log.info("Overlays of %d images written to %s%s", len(paths), folder, " (with ground truth)" if gt is not None else "")
    return len(paths)
