"""DB training targets: hand-checkable reference cases, and vectorised-vs-reference agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shapely.geometry import Polygon

from ocr.data.targets import (
    DBTargetGeometry,
    boundary_distance,
    geometry_from_arrays,
    geometry_to_arrays,
    make_db_targets,
    make_db_targets_batch,
    merge_geometries,
    pack_db_geometry,
    polygon_area_perimeter,
    prepare_polygons,
    prepare_sample_geometry,
    render_db_targets,
)

KEYS = ("prob_map", "prob_mask", "thresh_map", "thresh_mask")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # many small ops: on a busy 2-core machine, intra-op threads mostly wait for each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# OpenCV's fillPoly (the reference) also paints the outline: its maps differ from exact pixel-centre
# sampling on pixels up to ~1 px (measured <= 1.05 px) from the polygon boundary
BOUNDARY_TOL_PX = 1.25


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def centres(height, width):
    ys, xs = np.mgrid[0:height, 0:width]
    return xs + 0.5, ys + 0.5


def exact_inside(polys, height, width):
    """Oracle: union of the polygons, pixel centres by an even-odd crossing test (float64)."""
    out = np.zeros((height, width), bool)
    for p in polys:
        p = np.asarray(p, np.float64)
        (x_lo, y_lo), (x_hi, y_hi) = p.min(0), p.max(0)
        j0, j1 = max(0, math.floor(x_lo)), min(width, math.ceil(x_hi) + 1)
        i0, i1 = max(0, math.floor(y_lo)), min(height, math.ceil(y_hi) + 1)
        if j0 >= j1 or i0 >= i1:
            continue
        py, px = np.mgrid[i0:i1, j0:j1] + 0.5
        inside = np.zeros(px.shape, bool)
        for (ax, ay), (bx, by) in zip(p, np.roll(p, -1, axis=0)):
            if ay == by:
                continue
            crosses = (ay <= py) != (by <= py)
            x_cross = ax + (py - ay) * (bx - ax) / (by - ay)
            inside ^= crosses & (px > x_cross)
        out[i0:i1, j0:j1] |= inside
    return out


def near_boundary(mask_yx, polys, tol):
    """For each True pixel of mask_yx: is its centre within tol of the boundary of one of polys?"""
    ys, xs = np.nonzero(mask_yx)
    if len(ys) == 0:
        return np.zeros(0, bool)
    d = np.full(len(ys), np.inf)
    for p in polys:
        if len(p) >= 2 and np.isfinite(p).all():
            np.minimum(d, boundary_distance(p, xs + 0.5, ys + 0.5), out=d)
    return d <= tol


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.0


def rotated_box(rng, cx, cy, w, h, angle):
    c, s = math.cos(angle), math.sin(angle)
    box = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2.0
    return box @ np.array([[c, -s], [s, c]]).T + [cx, cy]


def concave(rng, cx, cy, scale):
    """Random L, U or T shape (6-8 points), rotated and scaled."""
    shapes = [
        [[0, 0], [3, 0], [3, 1], [1, 1], [1, 3], [0, 3]],  # L (6)
        [[0, 0], [3, 0], [3, 3], [2, 3], [2, 1], [1, 1], [1, 3], [0, 3]],  # U (8)
        [[0, 0], [3, 0], [3, 1], [2, 1], [2, 3], [1, 3], [1, 1], [0, 1]],  # T (8)
    ]
    p = np.array(shapes[rng.integers(len(shapes))], np.float64) - 1.5
    p[:, 0] *= rng.uniform(0.6, 1.6)
    a = rng.uniform(0, 2 * np.pi)
    c, s = math.cos(a), math.sin(a)
    p = p @ np.array([[c, -s], [s, c]]).T * scale
    if rng.random() < 0.5:
        p = p[::-1]  # either orientation
    return p + [cx, cy]


def random_image(rng, scenario, height, width):
    """Polygons + ignore flags for one image of a test scenario."""
    polys = []
    n = {"quads": 6, "concave": 5, "tiny": 10, "overlap": 12, "border": 6, "many": 80, "mixed": 10}[scenario]
    for _ in range(n):
        if scenario == "border":  # centred near or beyond the border: partly / fully out of frame
            cx = rng.choice([rng.uniform(-60, 10), rng.uniform(width - 10, width + 60), rng.uniform(0, width)])
            cy = rng.choice([rng.uniform(-60, 10), rng.uniform(height - 10, height + 60)])
        elif scenario == "overlap":
            cx, cy = width / 2 + rng.normal(0, 12), height / 2 + rng.normal(0, 12)
        else:
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        kind = rng.choice(["quad", "concave"]) if scenario in ("mixed", "overlap", "border") else scenario
        if kind == "concave":
            polys.append(concave(rng, cx, cy, rng.uniform(6, 25)))
        elif kind == "tiny":
            polys.append(rotated_box(rng, cx, cy, rng.uniform(2, 30), rng.uniform(2, 12), rng.uniform(0, np.pi)))
        elif kind == "many":
            polys.append(rotated_box(rng, cx, cy, rng.uniform(10, 60), rng.uniform(6, 16), rng.uniform(-0.1, 0.1)))
        else:  # quad: rotated, sometimes skewed
            p = rotated_box(rng, cx, cy, rng.uniform(12, 90), rng.uniform(8, 40), rng.uniform(0, np.pi))
            polys.append(p + rng.normal(0, 1.5, p.shape))
    ignore = [bool(rng.random() < 0.15) for _ in polys]
    return polys, ignore


def check_agreement(polys, ignore, height, width, ref, vec, stats=None):
    """The vectorised maps of one image vs the reference, as promised in ocr/data/targets.py."""
    prepared = prepare_polygons(polys, ignore)
    kept = [p for p in prepared if not p.ignore]
    ignored = [p.points for p in prepared if p.ignore]
    for k in KEYS:
        assert vec[k].shape == (height, width) and vec[k].dtype == np.float32
    # threshold map: same exact distances
    diff = np.abs(ref["thresh_map"] - vec["thresh_map"])
    assert diff.mean() < 1e-3 and diff.max() < 1e-3, (diff.mean(), diff.max())
    # prob map: the vectorised one is exact pixel-centre sampling (float32 crossings)
    shrunk = [p.shrunk for p in kept]
    oracle = exact_inside(shrunk, height, width)
    bad = oracle != (vec["prob_map"] > 0.5)
    assert near_boundary(bad, shrunk, 1e-3).all()
    bad = (ref["prob_map"] > 0.5) != (vec["prob_map"] > 0.5)
    assert near_boundary(bad, shrunk, BOUNDARY_TOL_PX).all()
    # prob mask: 0 inside the ignored polygons
    bad = (ref["prob_mask"] > 0.5) != (vec["prob_mask"] > 0.5)
    assert near_boundary(bad, ignored, BOUNDARY_TOL_PX).all()
    assert near_boundary(exact_inside(ignored, height, width) != (vec["prob_mask"] < 0.5), ignored, 1e-3).all()
    # thresh mask: the dilated polygons (pyclipper's in the reference, exact in the vectorised version)
    dilated = [d for p in kept for d in p.dilated]
    bad = (ref["thresh_mask"] > 0.5) != (vec["thresh_mask"] > 0.5)
    assert near_boundary(bad, dilated, BOUNDARY_TOL_PX).all()
    if stats is not None:
        stats["prob"].append((ref["prob_map"] > 0.5, vec["prob_map"] > 0.5))
        stats["mae"].append(diff.mean())
    for k in ("prob_map", "prob_mask", "thresh_mask"):
        assert set(np.unique(vec[k])) <= {0.0, 1.0}


def vec_numpy(out, i):
    return {k: out[k][i, 0].cpu().numpy() for k in KEYS}


# ----------------------------------------------------------------------------------------------------
# shared geometry
# ----------------------------------------------------------------------------------------------------


def test_area_perimeter_match_shapely():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = rng.integers(3, 12)
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        p = np.stack([np.cos(ang), np.sin(ang)], 1) * rng.uniform(1, 300, (n, 1)) + rng.uniform(-1e3, 1e4, 2)
        area, perim = polygon_area_perimeter(p)
        poly = Polygon(p)
        assert area == pytest.approx(poly.area, rel=1e-9, abs=1e-6)
        assert perim == pytest.approx(poly.length, rel=1e-12)


def test_prepare_rectangle_by_hand():
    x0, y0, x1, y1 = 100.5, 50.5, 300.5, 80.5
    (p,) = prepare_polygons([rect(x0, y0, x1, y1)], [False])
    area, perim = 200.0 * 30.0, 2 * (200.0 + 30.0)
    d = area * (1 - 0.4**2) / perim
    assert not p.ignore and p.distance == pytest.approx(d, rel=1e-12)
    # shrinking a rectangle by D insets every side by D (float precision kept: no integer rounding)
    np.testing.assert_allclose(p.shrunk.min(0), [x0 + d, y0 + d], atol=1e-4)
    np.testing.assert_allclose(p.shrunk.max(0), [x1 - d, y1 - d], atol=1e-4)
    assert len(p.shrunk) == 4
    # dilating grows every side by D, with rounded corners within the arc tolerance
    (outer,) = p.dilated
    np.testing.assert_allclose(outer.min(0), [x0 - d, y0 - d], atol=1e-4)
    np.testing.assert_allclose(outer.max(0), [x1 + d, y1 + d], atol=1e-4)
    dist = boundary_distance(rect(x0, y0, x1, y1), outer[:, 0], outer[:, 1])
    np.testing.assert_allclose(dist, d, atol=1e-3)  # dilated vertices lie on the offset curve
    assert len(outer) > 8  # round joins


def test_prepare_ignore_rules():
    polys = [
        rect(0, 0, 100, 20),  # kept
        rect(0, 0, 100, 20),  # don't care
        rect(0, 0, 100, 5),  # too small: 5 px tall
        rotated_box(None, 50, 50, 100, 7.9, 0.3),  # too small, rotated (minAreaRect side 7.9)
        np.array([[0, 0], [10, 10], [20, 20], [30, 30.0]]),  # degenerate: zero area
        np.array([[0, 0], [10, 0.0]]),  # fewer than 3 points
        np.array([[0, 0], [np.nan, 0], [10, 10], [0, 10]]),  # not finite
    ]
    prepared = prepare_polygons(polys, [False, True, False, False, False, False, False])
    assert [p.ignore for p in prepared] == [False, True, True, True, True, True, True]
    assert all(p.shrunk is None and p.distance == 0.0 for p in prepared[1:])
    assert prepare_polygons(polys[:1], [False], min_text_size=25)[0].ignore
    assert prepare_polygons([], []) == []
    with pytest.raises(ValueError):
        prepare_polygons(polys, [False])


def test_fast_convex_shrink_matches_pyclipper():
    rng = np.random.default_rng(1)
    polys = []
    for _ in range(400):
        if rng.random() < 0.5:  # text-line quads, slightly skewed
            p = rotated_box(
                rng, *rng.uniform(0, 500, 2), rng.uniform(10, 300), rng.uniform(8, 40), rng.uniform(0, np.pi)
            )
            p = p + rng.normal(0, 0.5, p.shape)
        else:  # random convex-ish n-gons, either orientation (some not convex: pyclipper fallback)
            n = rng.integers(3, 10)
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            p = np.stack([np.cos(ang), np.sin(ang) * rng.uniform(0.2, 1)], 1) * rng.uniform(5, 80) + rng.uniform(
                0, 500, 2
            )
        polys.append(p[::-1] if rng.random() < 0.5 else p)
    fast = prepare_polygons(polys, None, with_dilated=False)
    slow = prepare_polygons(polys, None, with_dilated=False, fast_convex=False)
    compared = 0
    for f, s_ in zip(fast, slow):
        assert f.ignore == s_.ignore
        if f.ignore:
            continue
        assert f.distance == s_.distance
        a, b = Polygon(f.shrunk), Polygon(s_.shrunk)
        assert a.symmetric_difference(b).area < 1e-3 * b.length  # same polygon, to pyclipper's grid
        compared += 1
    assert compared > 250


def test_prepare_takes_largest_piece():
    # two squares joined by a thin bridge: shrinking splits it, the larger square's piece wins
    p = np.array(
        [
            [0, 0],
            [40, 0],
            [40, 18],
            [60, 18],
            [60, 5],
            [80, 5],
            [80, 35],
            [60, 35],
            [60, 22],
            [40, 22],
            [40, 40],
            [0, 40.0],
        ]
    )
    (q,) = prepare_polygons([p], [False])
    assert not q.ignore
    assert q.shrunk[:, 0].max() < 40  # the big square, not the small one on the right


# ----------------------------------------------------------------------------------------------------
# reference: hand-checkable shapes
# ----------------------------------------------------------------------------------------------------


def test_reference_rectangle():
    height, width = 120, 400
    x0, y0, x1, y1 = 100.5, 50.5, 300.5, 80.5  # pixel centres j + 0.5 = 100.5 lie on the left edge
    out = make_db_targets([rect(x0, y0, x1, y1)], [False], height, width)
    for k in KEYS:
        assert out[k].shape == (height, width) and out[k].dtype == np.float32
    d = 6000 * 0.84 / 460
    px, py = centres(height, width)
    # thresh_map: 0.7 on the edges, thresh_min far away, linear in between
    on_edge = ((px == x0) | (px == x1)) & (py >= y0) & (py <= y1) | ((py == y0) | (py == y1)) & (px >= x0) & (px <= x1)
    assert on_edge.sum() > 400
    np.testing.assert_allclose(out["thresh_map"][on_edge], 0.7, atol=0.02)
    assert out["thresh_map"][py == y0 - 5][150] == pytest.approx(0.3 + 0.4 * (1 - 5 / d), abs=1e-5)
    assert out["thresh_map"][py == y0 + 5][150] == pytest.approx(0.3 + 0.4 * (1 - 5 / d), abs=1e-5)
    dist = boundary_distance(rect(x0, y0, x1, y1), px, py)
    np.testing.assert_allclose(out["thresh_map"], 0.3 + 0.4 * np.clip(1 - dist / d, 0, 1), atol=1e-6)
    # thresh_mask: the dilated rectangle (rounded corners)
    inside_dilated = (px > x0 - d) & (px < x1 + d) & (py > y0 - d) & (py < y1 + d) & (dist < d) | exact_inside(
        [rect(x0, y0, x1, y1)], height, width
    )
    clear = np.abs(dist - d) > 1.1
    np.testing.assert_array_equal(out["thresh_mask"][clear], inside_dilated[clear])
    # prob_map: 1 inside the shrunk box, 0 outside it (the box's size: D computed by hand)
    sx0, sy0, sx1, sy1 = x0 + d, y0 + d, x1 - d, y1 - d
    inside = (px > sx0 + 1.1) & (px < sx1 - 1.1) & (py > sy0 + 1.1) & (py < sy1 - 1.1)
    outside = (px < sx0 - 1.1) | (px > sx1 + 1.1) | (py < sy0 - 1.1) | (py > sy1 + 1.1)
    assert inside.sum() > 100
    assert (out["prob_map"][inside] == 1).all() and (out["prob_map"][outside] == 0).all()
    assert (out["prob_mask"] == 1).all()


@pytest.mark.parametrize("case", ["dont_care", "tiny"])
def test_reference_ignored_polygon(case):
    height, width = 64, 160
    p = rect(20, 20, 140, 44) if case == "dont_care" else rect(20, 20, 140, 25)  # 5 px tall: too small
    out = make_db_targets([p], [case == "dont_care"], height, width)
    px, py = centres(height, width)
    dist = boundary_distance(p, px, py)
    inside = exact_inside([p], height, width)
    clear = dist > 1.1
    assert (out["prob_mask"][inside & clear] == 0).all() and (out["prob_mask"][~inside & clear] == 1).all()
    assert (out["prob_mask"] == 0).sum() >= (inside & clear).sum()
    assert (out["prob_map"] == 0).all() and (out["thresh_mask"] == 0).all()
    assert (out["thresh_map"] == np.float32(0.3)).all()


def test_reference_empty_and_outside():
    height, width = 40, 50
    for polys in ([], [rect(100, 100, 200, 140)], [rect(-300, -50, -100, -10)]):
        out = make_db_targets(polys, [False] * len(polys), height, width)
        assert (out["prob_map"] == 0).all() and (out["prob_mask"] == 1).all()
        assert (out["thresh_map"] == np.float32(0.3)).all() and (out["thresh_mask"] == 0).all()
    # partly outside: contributes only inside the map, no crash
    out = make_db_targets([rect(-100, 10, 30, 30), rect(40, -1e6, 1e6, 1e6)], [False, True], height, width)
    assert out["prob_map"][:, :20].any() and not out["prob_map"][:, 35:].any()
    assert (out["prob_mask"][:, 41:] == 0).all() and (out["prob_mask"][:, :39] == 1).all()
    assert out["thresh_map"].max() > 0.6  # pixel centres 0.5 px from the edge


# ----------------------------------------------------------------------------------------------------
# vectorised vs reference
# ----------------------------------------------------------------------------------------------------

SCENARIOS = ["quads", "concave", "tiny", "overlap", "border", "many", "mixed"]
SIZES = [(64, 64), (96, 160), (150, 72), (128, 128)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_vectorised_matches_reference(scenario):
    rng = np.random.default_rng(SCENARIOS.index(scenario))
    stats = {"prob": [], "mae": []}
    n_images = 0
    for height, width in SIZES:
        for _ in range(2):
            batch = 5
            data = [random_image(rng, scenario, height, width) for _ in range(batch)]
            data[rng.integers(batch)] = ([], [])  # an empty image in every batch
            polys = [d[0] for d in data]
            ignore = [d[1] for d in data]
            out = make_db_targets_batch(polys, ignore, height, width)
            for k in KEYS:
                assert out[k].shape == (batch, 1, height, width) and out[k].dtype == torch.float32
            for i in range(batch):
                ref = make_db_targets(polys[i], ignore[i], height, width)
                check_agreement(polys[i], ignore[i], height, width, ref, vec_numpy(out, i), stats)
                n_images += 1
    assert n_images == 40
    ref_prob = np.concatenate([r.ravel() for r, _ in stats["prob"]])
    vec_prob = np.concatenate([v.ravel() for _, v in stats["prob"]])
    if scenario not in ("tiny", "border"):
        assert ref_prob.sum() > 0
        # cv2's inclusive fill makes the reference's shrunk polygons ~1 px fatter
        assert iou(ref_prob, vec_prob) > 0.5
    assert (vec_prob <= ref_prob).mean() > 0.999  # the vectorised prob map lies within the reference's


def test_fill_methods_tiles_and_chunks_agree():
    rng = np.random.default_rng(7)
    height, width = 100, 150  # not a multiple of the tile width
    data = [random_image(rng, "mixed", height, width) for _ in range(4)]
    polys, ignore = [d[0] for d in data], [d[1] for d in data]
    base = make_db_targets_batch(polys, ignore, height, width, fill_method="spans")
    variants = [
        dict(fill_method="dense"),
        dict(tile=16),
        dict(tile=7, chunk_elems=5000),
        dict(tile=64, chunk_elems=1 << 24),
    ]
    for kw in variants:
        out = make_db_targets_batch(polys, ignore, height, width, **kw)
        for k in ("prob_map", "prob_mask", "thresh_mask"):
            assert torch.equal(out[k], base[k]), (kw, k)
        torch.testing.assert_close(out["thresh_map"], base["thresh_map"], atol=2e-6, rtol=0)
    # output buffers reused (any previous content is overwritten)
    for w in (width, 128):  # padded and unpadded canvas
        geom = pack_db_geometry(polys, ignore, height, w)
        bufs = {k: torch.full((4, 1, height, w), 0.5) for k in KEYS}
        out = render_db_targets(geom, out=bufs)
        ref = render_db_targets(geom)
        for k in KEYS:
            assert out[k] is bufs[k] and torch.equal(out[k], ref[k])
    with pytest.raises(ValueError):
        render_db_targets(geom, out={k: torch.zeros(4, 1, height, w + 1) for k in KEYS})


@pytest.mark.parametrize("thresh", [(0.3, 0.7), (0.0, 1.0), (0.5, 0.5), (0.8, 0.2)])
def test_vectorised_threshold_range(thresh):
    rng = np.random.default_rng(3)
    height, width = 80, 96
    polys, ignore = random_image(rng, "mixed", height, width)
    lo, hi = thresh
    ref = make_db_targets(polys, ignore, height, width, thresh_min=lo, thresh_max=hi)
    out = make_db_targets_batch([polys], [ignore], height, width, thresh_min=lo, thresh_max=hi)
    check_agreement(polys, ignore, height, width, ref, vec_numpy(out, 0))
    assert out["thresh_map"].min() >= min(lo, hi) - 1e-6 and out["thresh_map"].max() <= max(lo, hi) + 1e-6


def test_vectorised_receipt_like():
    """640 x 640, 50 text lines: the benchmark's workload."""
    rng = np.random.default_rng(11)
    polys, ignore = [], []
    for _ in range(50):
        a = rng.uniform(-0.05, 0.05) if rng.random() < 0.5 else 0.0
        polys.append(
            rotated_box(rng, rng.uniform(0, 640), rng.uniform(0, 640), rng.uniform(40, 400), rng.uniform(10, 30), a)
        )
        ignore.append(bool(rng.random() < 0.05))
    out = make_db_targets_batch([polys], [ignore], 640, 640)
    ref = make_db_targets(polys, ignore, 640, 640)
    stats = {"prob": [], "mae": []}
    check_agreement(polys, ignore, 640, 640, ref, vec_numpy(out, 0), stats)
    assert stats["mae"][0] < 1e-5
    assert iou(*stats["prob"][0]) > 0.75


def test_vectorised_edge_cases():
    h, w = 30, 40
    # no images, no polygons, ignore=None, only ignored polygons, everything outside
    assert make_db_targets_batch([], None, h, w)["prob_map"].shape == (0, 1, h, w)
    out = make_db_targets_batch([[], [rect(-50, -50, -10, -10)], [rect(2, 2, 30, 20)]], [None, None, [True]], h, w)
    assert (out["prob_map"] == 0).all() and (out["thresh_mask"] == 0).all()
    assert (out["thresh_map"] == np.float32(0.3)).all()
    assert (out["prob_mask"][:2] == 1).all() and (out["prob_mask"][2] == 0).sum() == 28 * 18
    # a huge polygon covering the map, and one with a vertex far away
    big = rect(-1e5, -1e5, 1e5, 1e5)
    far = np.array([[-5e4, 10.0], [35, 5], [35, 25], [5, 25]])
    long = rect(-1e4, 9.3, 1e4, 21.7)  # thin and long: D ~ 5, edges far beyond the map
    slanted = rotated_box(None, 20, 15, 2e4, 14, 0.0007)
    cases = [big, far, long, slanted]
    out = make_db_targets_batch([[p] for p in cases], [[False]] * len(cases), h, w)
    for i, p in enumerate(cases):
        check_agreement([p], [False], h, w, make_db_targets([p], [False], h, w), vec_numpy(out, i))
    assert (out["prob_map"][0] == 1).all() and out["prob_map"][2:].any(dim=-1).sum() == 3
    with pytest.raises(ValueError):
        make_db_targets_batch([[]], [[], []], h, w)
    with pytest.raises(ValueError):
        render_db_targets(pack_db_geometry([[]], None, h, w), fill_method="nope")


def test_pack_is_numpy_and_sized():
    rng = np.random.default_rng(5)
    polys, ignore = random_image(rng, "quads", 64, 64)
    geom = pack_db_geometry([polys], [ignore], 64, 64, tile=16)
    assert isinstance(geom, DBTargetGeometry) and geom.blocks_per_row == 4
    assert geom.n_fill_crossings == geom.fill_rows.sum() > 0 and (geom.fill_rows > 0).all()
    assert geom.n_tiles == geom.seg_tiles.sum() > 0


def _mixed_batch(seed: int, n: int = 5, h: int = 72, w: int = 104):
    rng = np.random.default_rng(seed)
    data = [random_image(rng, kind, h, w) for kind in ("mixed", "quads", "many", "mixed", "quads")[:n]]
    polys, ignore = [d[0] for d in data], [d[1] for d in data]
    polys[1] = []  # an image without text
    ignore[1] = []
    ignore[2] = [True] * len(polys[2])  # only don't-care words
    return polys, ignore, h, w


def test_per_sample_geometry_merges_into_the_batch_geometry():
    """What the loader workers prepare per sample, concatenated on the training thread, is exactly the
    batch geometry (so the maps are unchanged, TARGETS_VERSION with them)."""
    polys, ignore, h, w = _mixed_batch(21)
    whole = pack_db_geometry(polys, ignore, h, w, tile=16)
    parts = [prepare_sample_geometry(p, i, h, w, tile=16) for p, i in zip(polys, ignore)]
    merged = merge_geometries(parts)
    assert (merged.batch_size, merged.n_channels) == (whole.batch_size, whole.n_channels) == (5, 2)
    for name in ("fill_x", "fill_slope", "fill_row0", "fill_rows", "fill_plane", "fill_weight", "seg_float",
                 "seg_first", "seg_blocks", "seg_tiles"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name)), name
    a, b = render_db_targets(merged), render_db_targets(whole)
    for k in KEYS:
        assert torch.equal(a[k], b[k]), k
    # DALI transport: four arrays per sample and back, bit for bit
    back = merge_geometries([geometry_from_arrays(geometry_to_arrays(g), h, w, 16) for g in parts])
    c = render_db_targets(back)
    for k in KEYS:
        assert torch.equal(c[k], b[k]), k
    with pytest.raises(ValueError, match="one image"):
        merge_geometries([whole])
    with pytest.raises(ValueError, match="one image"):
        merge_geometries([parts[0], prepare_sample_geometry(polys[0], ignore[0], h + 1, w, tile=16)])


def test_rendering_works_under_deterministic_algorithms():
    polys, ignore, h, w = _mixed_batch(4)
    want = make_db_targets_batch(polys, ignore, h, w)
    torch.use_deterministic_algorithms(True)
    try:
        got = make_db_targets_batch(polys, ignore, h, w)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    for k in KEYS:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rendering_under_deterministic_algorithms_is_repeatable():
    polys, ignore, h, w = _mixed_batch(8)
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        first = make_db_targets_batch(polys, ignore, h, w, device="cuda")
        second = make_db_targets_batch(polys, ignore, h, w, device="cuda")
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    for k in KEYS:
        assert torch.equal(first[k], second[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vectorised_cuda_matches_cpu():
    rng = np.random.default_rng(9)
    data = [random_image(rng, "mixed", 96, 160) for _ in range(6)] + [
        random_image(rng, "many", 96, 160) for _ in range(2)
    ]
    polys, ignore = [d[0] for d in data], [d[1] for d in data]
    cpu = make_db_targets_batch(polys, ignore, 96, 160)
    for method in ("dense", "spans"):
        gpu = make_db_targets_batch(polys, ignore, 96, 160, device="cuda", fill_method=method)
        for k in KEYS:
            assert gpu[k].device.type == "cuda" and gpu[k].shape == cpu[k].shape
        torch.testing.assert_close(gpu["thresh_map"].cpu(), cpu["thresh_map"], atol=1e-5, rtol=0)
        for k in ("prob_map", "prob_mask", "thresh_mask"):
            assert (gpu[k].cpu() != cpu[k]).float().mean() < 1e-3, k  # float32 ties on boundaries only
    # memory bound: 16 images x 100 polygons at 640 px
    big = [
        [rotated_box(rng, *rng.uniform(0, 640, 2), rng.uniform(40, 400), rng.uniform(10, 30), 0.02) for _ in range(100)]
        for _ in range(16)
    ]
    geom = pack_db_geometry(big, None, 640, 640)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = render_db_targets(geom, "cuda")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 1 << 30
    del out
