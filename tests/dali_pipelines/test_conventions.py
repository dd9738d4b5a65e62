"""DALI's pixel conventions, measured (the graphs rely on them).

Our coordinates put pixel (row i, col j) over [j, j+1) x [i, i+1) (centre (j + .5, i + .5)).
Findings: ``fn.warp_affine`` and ``fn.resize`` use exactly these coordinates (no
half-pixel shift, unlike OpenCV's warpAffine, which needs
``geometry.to_pixel_center_convention``); ``fn.resize`` with ``size`` + ``roi_end`` keeps an
exact scale; ``fn.crop_mirror_normalize``'s ``fill_values`` are written after normalisation.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

from dali_pipelines.source import resize_geometry
from ocr.data import geometry


def _const(x):
    return lambda: [x]  # no parameter: DALI would pass the iteration index


def _run(build, *inputs):
    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        nodes = [fn.external_source(source=_const(x), batch=True) for x in inputs]
        return build(*nodes)

    p = pipe()
    p.build()
    return [np.array(out[0]) for out in p.run()]


def _centroid(plane: np.ndarray) -> tuple[float, float]:
    """Intensity centroid in our continuous coordinates (pixel centres at +0.5)."""
    ys, xs = np.nonzero(plane)
    w = plane[ys, xs].astype(np.float64)
    return float((xs * w).sum() / w.sum() + 0.5), float((ys * w).sum() / w.sum() + 0.5)


def test_warp_affine_uses_our_pixel_coordinates():
    image = np.zeros((30, 30, 3), np.uint8)
    image[10, 12] = 200  # covers [12, 13) x [10, 11): centre (12.5, 10.5)
    m = geometry.scale_matrix(2.0)
    inv = np.linalg.inv(m)[:2].astype(np.float32)
    (out,) = _run(lambda img, mat: fn.warp_affine(img, matrix=mat, size=[60, 60], fill_value=0.0, inverse_map=True,
                                                  interp_type=types.INTERP_LINEAR), image, inv)
    # M maps the pixel's centre (12.5, 10.5) to (25, 21): the warped blob is centred there
    assert _centroid(out[..., 0]) == pytest.approx((25.0, 21.0), abs=1e-6)
    # a quarter-pixel shift splits the pixel 3:1 over its two neighbours
    shift = np.linalg.inv(geometry.translation_matrix(5.25, 0.0))[:2].astype(np.float32)
    (out,) = _run(lambda img, mat: fn.warp_affine(img, matrix=mat, size=[30, 30], fill_value=0.0, inverse_map=True,
                                                  interp_type=types.INTERP_LINEAR), image, shift)
    assert out[10, 16:20, 0].tolist() == [0, 150, 50, 0]
    # OpenCV needs the half-pixel conversion to agree
    ref = cv2.warpAffine(image, geometry.to_pixel_center_convention(m)[:2], (60, 60), flags=cv2.INTER_LINEAR)
    (dali,) = _run(lambda img, mat: fn.warp_affine(img, matrix=mat, size=[60, 60], fill_value=0.0, inverse_map=True),
                   image, inv)
    assert np.abs(ref.astype(int) - dali.astype(int)).max() <= 1


@pytest.mark.parametrize("scale", [0.5, 0.37, 0.8])
def test_resize_with_roi_keeps_opencv_size_and_exact_scale(scale):
    h, w = 203, 305  # odd sizes: h * s and w * s are not integers (and 0.5 hits a tie)
    image = np.zeros((h, w, 3), np.uint8)
    cv2.circle(image, (150, 100), 12, (255, 255, 255), -1)
    size, roi = resize_geometry(h, w, scale)
    (out,) = _run(lambda img, sz, r: fn.resize(img, size=sz, roi_start=[0.0, 0.0], roi_end=r, roi_relative=False,
                                               antialias=True, interp_type=types.INTERP_LINEAR),
                  image, np.array(size, np.float32), np.array(roi, np.float32))
    ref = cv2.resize(image, (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    assert out.shape == ref.shape  # OpenCV's size rule (round half to even)
    cx, cy = _centroid(out[..., 0])
    assert cx == pytest.approx(150.5 * scale, abs=0.05) and cy == pytest.approx(100.5 * scale, abs=0.05)


def test_crop_mirror_normalize_fill_values_are_output_values():
    image = np.full((4, 6, 3), 100, np.uint8)
    (out,) = _run(lambda img: fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", crop=(8, 8),
                                                       crop_pos_x=0.0, crop_pos_y=0.0, out_of_bounds_policy="pad",
                                                       fill_values=[7.0, 8.0, 9.0], mean=[10.0, 20.0, 30.0],
                                                       std=[2.0, 2.0, 2.0]), image)
    assert out.shape == (3, 8, 8)
    assert out[:, 0, 0].tolist() == [45.0, 40.0, 35.0]  # image at the top left, normalised
    assert out[:, 7, 7].tolist() == [7.0, 8.0, 9.0]  # padding: the fill values as given


def test_coord_transform_is_m_times_point_plus_t_and_keeps_empty_inputs():
    pts = np.array([[1, 2], [3, 4]], np.float32)
    mt = np.array([[2, 0, 10], [0, 3, 20]], np.float32)
    out, empty = _run(lambda p, m, e: (fn.coord_transform(p, MT=m), fn.coord_transform(e, MT=m)),
                      pts, mt, np.zeros((0, 2), np.float32))
    assert out.tolist() == [[12, 26], [16, 32]]
    assert empty.size == 0
