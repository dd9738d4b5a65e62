"""Text-detection metrics: CLEval (via the ``cleval`` package) and the ICDAR-2015 IoU hmean.

Typical use in a validation loop::

    evaluator = DetectionEvaluator()
    for each image:
        evaluator.add(gt_polygons, gt_ignore, pred_polygons, gt_texts)
    evaluator.compute()  # {"cleval": {"precision", "recall", "hmean"}, "iou": {...}}

Command line: ``python -m ocr.metrics --gt GT.json --pred PRED.json``.
"""

from ocr.metrics.cleval_metric import CLEvalCounts, cleval_image_counts, polygon_to_quad
from ocr.metrics.evaluator import AnnotationError, DetectionEvaluator, evaluate_files, hmean, load_words
from ocr.metrics.iou_metric import IoUCounts, iou_image_counts

__all__ = [
    "AnnotationError",
    "CLEvalCounts",
    "DetectionEvaluator",
    "IoUCounts",
    "cleval_image_counts",
    "evaluate_files",
    "hmean",
    "iou_image_counts",
    "load_words",
    "polygon_to_quad",
]
