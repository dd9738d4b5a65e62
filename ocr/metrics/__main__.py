"""CLI: ``python -m ocr.metrics --gt GT.json --pred PRED.json``.

Prints exactly one JSON object on stdout::

    {"cleval": {"precision": .., "recall": .., "hmean": ..}, "iou": {"precision": .., "recall": .., "hmean": ..}}

Exit codes: 0 on success, 2 for missing / malformed input (one-line message on stderr naming the file).
"""

from __future__ import annotations

import argparse
import json
import sys

from ocr.metrics.evaluator import AnnotationError, evaluate_files


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ocr.metrics",
        description="Detection metrics (CLEval and ICDAR-2015 IoU hmean) of a prediction JSON against a GT JSON.",
    )
    p.add_argument("--gt", required=True, help="ground-truth JSON ({'images': {name: {'words': {...}}}})")
    p.add_argument("--pred", required=True, help="prediction JSON, same format (optional 'score' per word)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="IoU metric: match when IoU > this (0.5)")
    p.add_argument(
        "--dont-care-overlap",
        type=float,
        default=0.5,
        help="IoU metric: drop detections with more than this fraction of their area on don't-care GT (0.5)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse itself exits with 2 on bad usage
    try:
        result = evaluate_files(args.gt, args.pred, args.iou_threshold, args.dont_care_overlap)
    except AnnotationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
