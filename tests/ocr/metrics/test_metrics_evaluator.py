"""Hand-made cases for DetectionEvaluator (CLEval + ICDAR-2015 IoU hmean), with real numbers.

All GT words are 100 x 25 horizontal boxes with 4-character transcriptions unless stated otherwise,
so both metrics give the same numbers whenever cleval's character estimates do not come into play.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ocr.metrics import DetectionEvaluator, cleval_image_counts, iou_image_counts, polygon_to_quad


def box(x: float, y: float, w: float = 100, h: float = 25) -> np.ndarray:
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)


def box8(x: float, y: float, w: float = 100, h: float = 25, bulge: float = 0.0) -> np.ndarray:
    """8-point polygon tracing a box (top/bottom edges sampled at 4 x positions), like a detector's output."""
    xs = np.linspace(x, x + w, 4)
    top = np.stack([xs, np.array([y, y - bulge, y - bulge, y])], axis=1)
    bottom = np.stack([xs[::-1], np.array([y + h, y + h + bulge, y + h + bulge, y + h])], axis=1)
    return np.concatenate([top, bottom])


A, B, C, D = box(10, 10), box(10, 60), box(10, 110), box(10, 160)
TEXT = "abcd"


def evaluate(gts, preds, ignore=None, texts="default") -> dict:
    ev = DetectionEvaluator()
    ev.add(gts, ignore or [False] * len(gts), preds, [TEXT] * len(gts) if texts == "default" else texts)
    return ev.compute()


def assert_prf(res: dict, p: float, r: float, h: float | None = None, metrics=("cleval", "iou")) -> None:
    h = (0.0 if p + r == 0 else 2 * p * r / (p + r)) if h is None else h
    for m in metrics:
        got = res[m]
        assert got["precision"] == pytest.approx(p), (m, got)
        assert got["recall"] == pytest.approx(r), (m, got)
        assert got["hmean"] == pytest.approx(h), (m, got)


def test_result_layout_is_python_floats():
    res = evaluate([A], [A])
    assert set(res) == {"cleval", "iou"}
    for m in res.values():
        assert set(m) == {"precision", "recall", "hmean"}
        assert all(type(v) is float for v in m.values())


def test_perfect_predictions():
    assert_prf(evaluate([A, B], [A, B]), 1.0, 1.0, 1.0)


def test_perfect_predictions_without_transcriptions():
    assert_prf(evaluate([A, B], [B, A], texts=None), 1.0, 1.0, 1.0)


def test_one_of_two_words_missed():
    for texts in ("default", None):
        res = evaluate([A, B], [A], texts=texts)
        assert_prf(res, 1.0, 0.5)
        for m in ("cleval", "iou"):
            assert round(res[m]["hmean"], 3) == 0.667


def test_detection_on_dont_care_is_not_a_false_positive():
    # B is don't-care: detecting it is neither TP nor FP; it is not counted in recall either.
    res = evaluate([A, B], [A, B], ignore=[False, True], texts=[TEXT, "###"])
    assert_prf(res, 1.0, 1.0, 1.0)
    # slightly off detection on the don't-care word: still ignored
    res = evaluate([A, B], [A, box(14, 62, 90, 22)], ignore=[False, True], texts=[TEXT, "###"])
    assert_prf(res, 1.0, 1.0, 1.0)
    # missing the don't-care word costs nothing
    assert_prf(evaluate([A, B], [A], ignore=[False, True], texts=[TEXT, "###"]), 1.0, 1.0, 1.0)


def test_spurious_detection_halves_precision():
    # A vertical false positive with height/width = 4 is charged 4 characters by CLEval (= the 4 TP
    # characters of A), and counts as one false detection for IoU: precision halves for both.
    spurious = box(500, 10, w=25, h=100)
    assert_prf(evaluate([A], [A, spurious]), 0.5, 1.0)


def test_horizontal_spurious_detection_costs_one_character_in_cleval():
    # cleval charges an unmatched detection min(round(0.5 + 1/aspect_ratio), 10) characters: a wide
    # horizontal box costs 1 character, so CLEval precision is 4 / (4 + 1) while IoU precision halves.
    res = evaluate([A], [A, box(500, 10)])
    assert_prf(res, 0.5, 1.0, metrics=("iou",))
    assert_prf(res, 0.8, 1.0, metrics=("cleval",))


def test_eight_point_prediction_matches_four_point_gt():
    res = evaluate([A, B], [box8(11, 11, 98, 24, bulge=1.5), box8(10, 60)])
    assert_prf(res, 1.0, 1.0, 1.0)
    # and the other way round: 8-point GT, 4-point prediction
    assert_prf(evaluate([box8(10, 10), B], [A, B]), 1.0, 1.0, 1.0)


def test_polygon_to_quad_is_canonical():
    expected = box(10, 10)
    for variant in (A, A[::-1], np.roll(A, 1, axis=0), np.roll(A[::-1], 2, axis=0), box8(10, 10)):
        np.testing.assert_array_equal(polygon_to_quad(variant), expected)
    # a tall box starts at its top-left corner too (edge 0->1 is the short top edge)
    np.testing.assert_array_equal(polygon_to_quad(np.roll(box(0, 0, 25, 100), 3, axis=0)), box(0, 0, 25, 100))


DEGENERATE = [
    np.zeros((4, 2)),  # all points coincide
    np.array([[0, 0], [10, 0], [20, 0], [30, 0]], dtype=np.float64),  # collinear, zero area
    np.array([[10, 10], [110, 35], [110, 10], [10, 35]], dtype=np.float64),  # self-intersecting bow tie on A
    np.array([[np.nan, 0], [1, 1], [2, 2], [3, 3]]),  # non-finite
    np.array([[5.0, 5.0]]),  # single point
    np.array([[0, 0], [50, 0], [50, 10]], dtype=np.float64),  # triangle (3 points)
    np.zeros((0, 2)),  # empty
]


def test_degenerate_predictions_do_not_crash():
    res = evaluate([A, B], [B, *DEGENERATE])
    for m in res.values():
        for v in m.values():
            assert math.isfinite(v) and 0.0 <= v <= 1.0
    # IoU: B matches; the bow tie becomes two triangles of half A's area (IoU 0.5, not > 0.5): every
    # other polygon is an unmatched detection.
    assert res["iou"]["recall"] == pytest.approx(0.5)
    assert res["iou"]["precision"] == pytest.approx(1 / 8)
    # Degenerate polygons only as input, with and without don't-care GT:
    evaluate([A], DEGENERATE, ignore=[True], texts=["###"])
    evaluate(DEGENERATE[:3], DEGENERATE, texts=None)


def test_degenerate_gt_does_not_crash():
    res = evaluate([A, np.zeros((4, 2))], [A], texts=None)
    assert res["iou"]["recall"] == pytest.approx(0.5)
    assert res["iou"]["precision"] == pytest.approx(1.0)


def test_aggregation_over_images_not_mean_of_per_image_hmeans():
    ev = DetectionEvaluator()
    ev.add([A], [False], [A], [TEXT])  # per-image hmean 1.0
    ev.add([A, B, C], [False] * 3, [], [TEXT] * 3)  # per-image hmean 0.0
    res = ev.compute()
    # summed counts: 1 of 4 words (4 of 16 characters) found, 1 of 1 detection correct
    assert_prf(res, 1.0, 0.25, 0.4)
    assert len(ev) == 2  # (mean of per-image hmeans would be 0.5)


def test_empty_image_contributes_nothing_and_len_counts_images():
    ev = DetectionEvaluator()
    ev.add([A, B], [False, False], [A], [TEXT, TEXT])
    before = ev.compute()
    ev.add([], [], [])
    assert len(ev) == 2
    assert ev.compute() == before


def test_reset_and_empty_split():
    ev = DetectionEvaluator()
    ev.add([A], [False], [A])
    ev.reset()
    assert len(ev) == 0
    assert_prf(ev.compute(), 0.0, 0.0, 0.0)
    ev.add([], [], [A])  # detections but no GT: precision 0, recall 0 (no counted GT)
    assert_prf(ev.compute(), 0.0, 0.0, 0.0)


def test_merge_equals_single_evaluator():
    one, a, b = DetectionEvaluator(), DetectionEvaluator(), DetectionEvaluator()
    for ev in (one, a):
        ev.add([A, B], [False, False], [A])
    for ev in (one, b):
        ev.add([C], [False], [C, D])
    a.merge(b)
    assert a.compute() == one.compute() and len(a) == 2


def test_an_image_repeated_across_ranks_counts_once():
    # DDP pads a rank's shard by repeating samples: image "x" is scored on both ranks
    one, rank0, rank1 = DetectionEvaluator(), DetectionEvaluator(), DetectionEvaluator()
    for ev in (one, rank0):
        ev.add([A, B], [False, False], [A], key="a.jpg")
    for ev in (one, rank1):
        ev.add([C], [False], [C, D], key="x.jpg")
    rank0.add([C], [False], [C, D], key="x.jpg")
    rank1.add([C], [False], [C, D], key="x.jpg")  # twice on one rank too
    rank0.merge(rank1)
    assert len(rank0) == 2 and rank0.compute() == one.compute()
    assert rank0.counts() == one.counts()


def test_keyed_images_sum_to_the_same_bits_in_any_arrival_order():
    """Under DDP the images arrive rank by rank (0, 2, 4, 1, 3): the sums must not depend on it,
    even when the per-image counts are floats that do not add associatively."""
    from ocr.metrics.cleval_metric import CLEvalCounts
    from ocr.metrics.iou_metric import IoUCounts

    penalties = [0.1, 0.2, 0.3, 1e16, -1e16, 0.7, 1 / 3]
    names = [f"img{i}.jpg" for i in range(len(penalties))]
    results = []
    for order in (range(len(names)), [0, 2, 4, 6, 1, 3, 5], reversed(range(len(names)))):
        ev = DetectionEvaluator()
        for i in order:
            ev.add_counts(IoUCounts(), CLEvalCounts(num_char_gt=10, num_char_det=10, tp_recall=10, tp_precision=10,
                                                    gran_recall=penalties[i], gran_precision=penalties[i]), key=names[i])
        results.append(ev.counts())
    assert results[0] == results[1] == results[2]


def test_iou_threshold_is_strict_and_configurable():
    shifted = box(30, 10)  # IoU with A = 80*25 / (120*25) = 2/3
    assert iou_image_counts([A], [False], [shifted]).num_matched == 1
    assert iou_image_counts([A], [False], [shifted], iou_threshold=0.7).num_matched == 0
    half = box(10, 10, 50, 25)  # IoU exactly 0.5 -> not a match (strict >)
    assert iou_image_counts([A], [False], [half]).num_matched == 0


def test_one_to_one_matching_by_descending_iou():
    # Two detections on A (IoU 0.8 and 0.96) and one GT: one match, the other is a false positive.
    counts = iou_image_counts([A], [False], [box(30, 10), box(12, 10, 96, 25)])
    assert (counts.num_gt, counts.num_det, counts.num_matched) == (1, 2, 1)
    # A detection covering two GT words matches at most one.
    counts = iou_image_counts([box(10, 10, 50, 25), box(62, 10, 48, 25)], [False, False], [A])
    assert counts.num_matched == 0  # IoU ~0.5 / ~0.48 each, and never two matches for one detection


def test_dont_care_overlap_uses_union_of_dont_care_regions():
    dc1, dc2 = box(10, 10, 50, 25), box(60, 10, 50, 25)
    counts = iou_image_counts([dc1, dc2, C], [True, True, False], [A, C])  # A lies half on each
    assert (counts.num_gt, counts.num_det, counts.num_matched) == (1, 1, 1)


def test_cleval_counts_split_detection_penalty():
    # Two detections each covering half of A: all 4 characters found, granularity penalty 1 -> (4-1)/4.
    counts = cleval_image_counts([A], [False], [box(8, 8, 52, 29), box(60, 8, 52, 29)], [TEXT])
    assert counts.recall() == pytest.approx(0.75)
    assert counts.precision() == pytest.approx(1.0)


def test_input_length_mismatch_is_an_error():
    ev = DetectionEvaluator()
    with pytest.raises(ValueError, match="gt_ignore"):
        ev.add([A, B], [False], [])
    with pytest.raises(ValueError, match="gt_texts"):
        ev.add([A], [False], [], ["a", "b"])
    assert len(ev) == 0


def test_image_counts_then_add_counts_equals_add():
    """A scoring worker computes ``image_counts``; the owner adds them with ``add_counts``: the
    same result as ``add``, bit for bit, keyed or not, duplicate keys counted once."""
    images = [([A, B], [False, False], [A, box(300, 300, 30, 90)]),  # a vertical false positive
              ([A, B, C], [False, True, False], [box(10, 60, 100, 25), box8(10, 110, bulge=3)]),
              ([], [], [D])]
    for keyed in (False, True):
        direct, split = DetectionEvaluator(), DetectionEvaluator()
        for k, (gts, ignore, preds) in enumerate(images + images[:1]):  # the first image twice
            key = f"img{k % len(images)}" if keyed else None
            direct.add(gts, ignore, preds, key=key)
            split.add_counts(*DetectionEvaluator().image_counts(gts, ignore, preds), key=key)
        assert split.counts() == direct.counts() and split.compute() == direct.compute()
        assert len(split) == (3 if keyed else 4)
