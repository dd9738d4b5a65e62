"""DBPostProcessor on synthetic probability maps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ocr.models import DBPostProcessor


def _unclip_distance(w: float, h: float, ratio: float = 1.5) -> float:
    return w * h * ratio / (2 * (w + h))


def _bounds(poly: np.ndarray) -> tuple[float, float, float, float]:
    return float(poly[:, 0].min()), float(poly[:, 1].min()), float(poly[:, 0].max()), float(poly[:, 1].max())


def _sorted_by_x(polys):
    return sorted(polys, key=lambda p: p[:, 0].min())


def _two_rects(h: int = 160, w: int = 200) -> np.ndarray:
    prob = np.zeros((h, w), np.float32)
    prob[20:40, 20:60] = 0.9  # cols 20..59, rows 20..39 -> area [20,60]x[20,40]
    prob[90:120, 100:180] = 0.9  # area [100,180]x[90,120]
    return prob


# (x0, y0, x1, y1) pixel-area rectangles of _two_rects
RECTS = [(20, 20, 60, 40), (100, 90, 180, 120)]


def test_two_rectangles_quads() -> None:
    polys, scores = DBPostProcessor()(_two_rects()[None, None])[0]
    assert len(polys) == 2 and len(scores) == 2
    for poly, score, (x0, y0, x1, y1) in zip(_sorted_by_x(polys), scores, RECTS):
        assert poly.shape == (4, 2) and poly.dtype == np.float32
        assert score == pytest.approx(0.9, abs=1e-4)
        d = _unclip_distance(x1 - x0, y1 - y0)
        np.testing.assert_allclose(_bounds(poly), (x0 - d, y0 - d, x1 + d, y1 + d), atol=1.0)
        # order tl, tr, br, bl
        assert poly[0, 0] < poly[1, 0] and poly[1, 1] < poly[2, 1] and poly[3, 0] < poly[2, 0]


def test_undoing_unclip_recovers_pixel_area() -> None:
    # with unclip_ratio=0 the box is exactly the pixel area of cols 20..59 / rows 20..39
    polys, _ = DBPostProcessor(unclip_ratio=0.0)(_two_rects()[None, None])[0]
    for poly, rect in zip(_sorted_by_x(polys), RECTS):
        np.testing.assert_allclose(_bounds(poly), rect, atol=0.05)


def test_polygon_output() -> None:
    polys, scores = DBPostProcessor(output="polygon")(_two_rects()[None, None])[0]
    assert len(polys) == 2
    for poly, (x0, y0, x1, y1) in zip(_sorted_by_x(polys), RECTS):
        assert poly.ndim == 2 and poly.shape[1] == 2 and poly.dtype == np.float32
        d = _unclip_distance(x1 - x0, y1 - y0)
        np.testing.assert_allclose(_bounds(poly), (x0 - d, y0 - d, x1 + d, y1 + d), atol=1.0)


def test_polygon_output_keeps_long_thin_lines() -> None:
    # a receipt line's kernel: 250 x 6 px. 1% of its perimeter (5 px) as approxPolyDP's epsilon
    # collapsed it to 2 points and the line was dropped; the output must match the quad's box.
    prob = np.zeros((60, 300), np.float32)
    prob[27:33, 25:275] = 0.9
    (quad,), _ = DBPostProcessor()(prob[None])[0]
    polys, _ = DBPostProcessor(output="polygon")(prob[None])[0]
    assert len(polys) == 1 and len(polys[0]) >= 4
    np.testing.assert_allclose(_bounds(polys[0]), _bounds(quad), atol=1.0)


def test_weak_blob_dropped_by_box_thresh() -> None:
    prob = _two_rects()
    rng = np.random.default_rng(0)
    prob[130:150, 20:80] = 0.35 + rng.uniform(-0.03, 0.03, (20, 60)).astype(np.float32)
    polys, scores = DBPostProcessor()(prob[None])[0]  # default box_thresh 0.4
    assert len(polys) == 2
    polys, scores = DBPostProcessor(box_thresh=0.3)(prob[None])[0]
    assert len(polys) == 3
    assert min(scores) == pytest.approx(0.35, abs=0.01)


def test_tiny_blob_dropped_by_min_size() -> None:
    prob = _two_rects()
    prob[140:142, 10:12] = 0.9  # 2x2 pixels
    assert len(DBPostProcessor()(prob[None])[0][0]) == 2
    assert len(DBPostProcessor(min_size=0)(prob[None])[0][0]) == 3


def test_non_identity_matrix_maps_back() -> None:
    # original image 320 x 400 (h, w); network input = 0.5 * original + (10, 5)
    s, tx, ty = 0.5, 10.0, 5.0
    M = np.array([[s, 0, tx], [0, s, ty], [0, 0, 1]], np.float64)
    prob = _two_rects()
    ident = DBPostProcessor()(prob[None])[0][0]
    mapped, _ = DBPostProcessor()(
        torch.from_numpy(prob)[None, None], torch.from_numpy(M)[None], torch.tensor([[320, 400]])
    )[0]
    assert len(mapped) == 2
    for a, b in zip(_sorted_by_x(ident), _sorted_by_x(mapped)):
        expect = np.stack([(a[:, 0] - tx) / s, (a[:, 1] - ty) / s], axis=1)
        np.testing.assert_allclose(b, np.clip(expect, 0, [400, 320]), atol=1e-3)
    # the first rectangle is area [20,60]x[20,40] in the input -> [20,100]x[30,70] in the original
    d = _unclip_distance(40, 20)
    np.testing.assert_allclose(
        _bounds(_sorted_by_x(mapped)[0]), ((20 - d - tx) / s, (20 - d - ty) / s, (60 + d - tx) / s, (40 + d - ty) / s),
        atol=2.0,
    )


def test_clipped_to_original_size() -> None:
    prob = np.zeros((64, 64), np.float32)
    prob[0:20, 30:64] = 0.9  # touches the top and right border
    polys, _ = DBPostProcessor()(prob[None], np.eye(3)[None], [(64, 64)])[0]
    assert len(polys) == 1
    x0, y0, x1, y1 = _bounds(polys[0])
    assert y0 == 0.0 and x1 == 64.0
    # a smaller original image (scale 2: input = 2 * original) clips to its own size
    M = np.diag([2.0, 2.0, 1.0])
    polys, _ = DBPostProcessor()(prob[None], M[None], [(32, 32)])[0]
    assert _bounds(polys[0])[2] == 32.0


def test_detections_in_the_padding_are_dropped() -> None:
    # a 64x32 (h, w) original scaled 1:1 onto a 64x64 canvas: columns 32-63 are padding
    prob = np.zeros((64, 64), np.float32)
    prob[10:30, 2:28] = 0.9  # on the image
    prob[40:60, 46:62] = 0.9  # in the padding, even after unclipping
    polys, scores = DBPostProcessor()(prob[None], np.eye(3)[None], [(64, 32)])[0]
    assert len(polys) == len(scores) == 1
    assert _bounds(polys[0])[0] < 5 and _bounds(polys[0])[2] == 32.0  # the one on the image, clipped to it


def test_all_zero_map_and_batch() -> None:
    probs = np.stack([np.zeros((96, 96), np.float32), _two_rects(96, 200)[:, :96]])[:, None]
    out = DBPostProcessor()(torch.from_numpy(probs))
    assert len(out) == 2
    assert out[0] == ([], [])
    assert len(out[1][0]) == 1


def test_rotated_rectangle() -> None:
    prob = np.zeros((200, 200), np.float32)
    rect = ((100.0, 100.0), (90.0, 24.0), 30.0)
    cv2.fillPoly(prob, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 0.9)
    polys, scores = DBPostProcessor()(prob[None])[0]
    assert len(polys) == 1 and scores[0] > 0.8
    (cx, cy), (w, h), _ = cv2.minAreaRect(polys[0])
    long_side, short_side = max(w, h), min(w, h)
    n_pixels = float((prob > 0).sum())
    d = _unclip_distance(90, n_pixels / 90)
    assert long_side == pytest.approx(90 + 2 * d, abs=3.0)
    assert short_side == pytest.approx(n_pixels / 90 + 2 * d, abs=3.0)
    assert (cx, cy) == pytest.approx((100.5, 100.5), abs=1.5)


def test_max_candidates() -> None:
    prob = np.zeros((100, 100), np.float32)
    for i in range(5):
        prob[5 + 18 * i : 15 + 18 * i, 10:90] = 0.9
    assert len(DBPostProcessor()(prob[None])[0][0]) == 5
    assert len(DBPostProcessor(max_candidates=2)(prob[None])[0][0]) == 2


def test_bad_output_kind() -> None:
    with pytest.raises(ValueError):
        DBPostProcessor(output="mask")
