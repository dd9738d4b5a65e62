"""The geometry rules shared by every backend: the 3x3 matrix M per sample.

Coordinates are continuous pixel coordinates: pixel (row i, col j) covers
x in [j, j+1), y in [i, i+1). ``M`` maps original-image points to network-input
points (homogeneous coordinates). Eval uses ``M = scale(s)``; train composes flip,
scale, rotation and a crop translation. Both the CPU and the DALI backend build ``M``
with the functions here, so for eval they produce the same ``M`` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def scale_matrix(sx: float, sy: float | None = None) -> np.ndarray:
    sy = sx if sy is None else sy
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def translation_matrix(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def rotation_matrix(degrees: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    """Rotation by ``degrees`` (counter-clockwise as seen on screen) about (cx, cy)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    return translation_matrix(cx, cy) @ rot @ translation_matrix(-cx, -cy)


def hflip_matrix(width: float) -> np.ndarray:
    return np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 matrix to (N, 2) points; returns float32 (N, 2)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    homo = pts @ matrix[:2, :2].T + matrix[:2, 2]
    if not np.allclose(matrix[2], (0.0, 0.0, 1.0)):
        w = pts @ matrix[2, :2] + matrix[2, 2]
        homo = homo / w[:, None]
    return homo.astype(np.float32)


def split_rows(array: np.ndarray, lengths) -> list[np.ndarray]:
    """``array`` cut into consecutive row blocks of ``lengths`` (views); much faster than ``np.split``,
    which matters on the training thread (16 images x 50 polygons per batch). All blocks of one
    length (quads, the common case): one reshape."""
    lengths = [int(n) for n in lengths]
    if not lengths:
        return []
    n = lengths[0]
    if n > 0 and lengths.count(n) == len(lengths) and n * len(lengths) == len(array):
        return list(array.reshape(len(lengths), n, *array.shape[1:]))
    ends = np.cumsum(lengths).tolist()
    return [array[end - k : end] for k, end in zip(lengths, ends)]


def transform_polygons(matrix: np.ndarray, polygons) -> list[np.ndarray]:
    """``transform_points`` of every polygon, in one vectorised pass (float32 (N, 2) each)."""
    if not polygons:
        return []
    lengths = [len(p) for p in polygons]
    points = transform_points(matrix, np.concatenate([np.asarray(p).reshape(-1, 2) for p in polygons]))
    return split_rows(points, lengths)


def eval_scale(height: int, width: int, image_size: int) -> float:
    return image_size / max(height, width)


def eval_matrix(height: int, width: int, image_size: int) -> np.ndarray:
    """Eval geometry: longer side scaled to ``image_size``, image at the top left."""
    return scale_matrix(eval_scale(height, width, image_size))


def matrix_scale(matrix: np.ndarray) -> float:
    """The isotropic scale factor of the linear part of an affine matrix."""
    return math.sqrt(abs(np.linalg.det(matrix[:2, :2])))


def to_pixel_center_convention(matrix: np.ndarray) -> np.ndarray:
    """The same mapping for APIs that put pixel centres at integer coordinates
    (OpenCV warpAffine): p_center' = M (p_center + 0.5) - 0.5."""
    return translation_matrix(-0.5, -0.5) @ matrix @ translation_matrix(0.5, 0.5)


@dataclass(frozen=True)
class TrainAugment:
    """Random geometry for training. Scale is relative to the eval scale (longer side to
    ``image_size``), drawn log-uniformly; rotation uniform in +-``max_rotation`` degrees."""

    scale_min: float = 0.75
    scale_max: float = 1.5
    max_rotation: float = 10.0
    hflip_prob: float = 0.5
    text_crop_prob: float = 0.9


def train_matrix(
    height: int,
    width: int,
    polygons: list[np.ndarray],
    ignore: list[bool],
    image_size: int,
    rng: np.random.Generator,
    aug: TrainAugment,
    crop_size: int | None = None,
) -> np.ndarray:
    """Flip, scale (relative to the eval scale for ``image_size``), rotate about the
    image centre, then translate so that a ``crop_size`` square window (default
    ``image_size``) is filled with image, biased to contain text."""
    window = crop_size or image_size
    m = np.eye(3)
    if rng.random() < aug.hflip_prob:
        m = hflip_matrix(width) @ m
    factor = math.exp(rng.uniform(math.log(aug.scale_min), math.log(aug.scale_max)))
    m = scale_matrix(eval_scale(height, width, image_size) * factor) @ m
    angle = rng.uniform(-aug.max_rotation, aug.max_rotation) if aug.max_rotation > 0 else 0.0
    center = transform_points(m, np.array([[width / 2.0, height / 2.0]]))[0]
    m = rotation_matrix(angle, float(center[0]), float(center[1])) @ m

    corners = transform_points(m, np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    # Window origin range that keeps the window inside the image where possible;
    # when the image is smaller than the window, any origin that shows all of it.
    origin_min = np.minimum(lo, hi - window)
    origin_max = np.maximum(lo, hi - window)

    candidates = [i for i, ign in enumerate(ignore) if not ign]
    if candidates and rng.random() < aug.text_crop_prob:
        poly = transform_points(m, polygons[candidates[rng.integers(len(candidates))]])
        p_lo, p_hi = poly.min(axis=0), poly.max(axis=0)
        # Origins that contain the whole word, intersected with the image range.
        text_min = np.maximum(origin_min, p_hi - window)
        text_max = np.minimum(origin_max, p_lo)
        ok = text_min <= text_max
        origin_min = np.where(ok, text_min, origin_min)
        origin_max = np.where(ok, text_max, origin_max)
    origin = rng.uniform(origin_min, origin_max)
    return translation_matrix(-float(origin[0]), -float(origin[1])) @ m
