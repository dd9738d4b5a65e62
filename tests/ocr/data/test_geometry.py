import cv2
import numpy as np
import pytest

from ocr.data import geometry
from ocr.data.geometry import TrainAugment
from ocr.data.transforms import warp_to_canvas


def _image_with_blob(h, w, cx, cy, r=6):
    image = np.zeros((h, w, 3), np.uint8)
    cv2.circle(image, (int(cx), int(cy)), r, (255, 255, 255), -1)
    return image


def test_eval_matrix_scales_longer_side_to_image_size():
    m = geometry.eval_matrix(1000, 400, 640)
    corner = geometry.transform_points(m, np.array([[400, 1000]]))[0]
    assert corner == pytest.approx([256.0, 640.0])


def test_inverse_round_trip_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = geometry.train_matrix(900, 1900, [np.array([[10, 10], [200, 10], [200, 40], [10, 40]], float)], [False], 640, rng, TrainAugment())
        pts = rng.uniform(0, 1900, size=(20, 2))
        back = geometry.transform_points(np.linalg.inv(m), geometry.transform_points(m, pts).astype(np.float64))
        np.testing.assert_allclose(back, pts, atol=1e-2)


@pytest.mark.parametrize("seed", range(8))
def test_point_lands_on_same_content_after_train_warp(seed):
    rng = np.random.default_rng(seed)
    h, w = 700, 500
    cx, cy = rng.uniform(100, 400), rng.uniform(100, 600)
    image = _image_with_blob(h, w, cx, cy)
    word = np.array([[cx - 20, cy - 8], [cx + 20, cy - 8], [cx + 20, cy + 8], [cx - 20, cy + 8]])
    m = geometry.train_matrix(h, w, [word], [False], 256, rng, TrainAugment(text_crop_prob=1.0))
    canvas = warp_to_canvas(image, m, 256)
    # pixel centre convention: the blob centre (cx + 0.5, cy + 0.5) in corner coordinates
    px, py = geometry.transform_points(m, np.array([[cx + 0.5, cy + 0.5]]))[0]
    assert 0 <= px < 256 and 0 <= py < 256, "text-biased crop must contain the word"
    assert canvas[int(py), int(px)].mean() > 200
    # and the blob's centre of mass is where M says (sub-pixel accurate)
    ys, xs = np.nonzero(canvas[..., 0] > 127)
    assert abs(xs.mean() + 0.5 - px) < 0.6 and abs(ys.mean() + 0.5 - py) < 0.6


def test_eval_warp_is_antialiased_area_downscale():
    # a 1-px checkerboard downscaled 4x must become flat grey, not alias into stripes
    h, w = 800, 400
    board = ((np.indices((h, w)).sum(0) % 2) * 255).astype(np.uint8)
    image = np.repeat(board[..., None], 3, axis=2)
    canvas = warp_to_canvas(image, geometry.eval_matrix(h, w, 200), 200)
    region = canvas[:200, :100].astype(float)
    assert abs(region.mean() - 127.5) < 2 and region.std() < 2
    assert canvas[:, 100:].max() == 0, "padding right of the image is black"


def test_hflip_and_rotation_compose():
    m = geometry.hflip_matrix(100)
    assert geometry.transform_points(m, np.array([[10.0, 5.0]]))[0] == pytest.approx([90.0, 5.0])
    r = geometry.rotation_matrix(90, 50, 50)
    p = geometry.transform_points(r, np.array([[60.0, 50.0]]))[0]
    assert np.linalg.norm(p - np.array([50.0, 50.0])) == pytest.approx(10.0, abs=1e-5)
