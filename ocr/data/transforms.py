"""CPU image transforms of the baseline backend: decode, warp by M, colour jitter,
normalise. The geometry (M) comes from ``ocr.data.geometry``; the DALI backend applies
the same M and the same jitter formulas in its graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ocr.data import geometry
from ocr.data.geometry import TrainAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bump when any transform changes its output for the same input and parameters:
# it is part of every cache key.
# 2: colour jitter rounds (was: truncated) and clips after brightness/contrast (a LUT);
#    eval canvases of JPEG-reduced decodes end where a full decode's would.
TRANSFORMS_VERSION = 2


@dataclass(frozen=True)
class ColorJitter:
    """Multiplicative jitter, each factor drawn uniformly in [1 - x, 1 + x]:
    out = brightness * (128 + contrast * (in - 128)) (rounded, clipped to uint8), then
    saturation around the grey (0.299 R + 0.587 G + 0.114 B), rounded and clipped."""

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


@dataclass(frozen=True)
class TransformParams:
    """Everything that decides a sample's pixels, in one hashable object."""

    image_size: int = 640
    train: bool = False
    crop_size: int = 0  # training window (0: image_size); text keeps the eval scale
    augment: TrainAugment = field(default_factory=TrainAugment)
    jitter: ColorJitter = field(default_factory=ColorJitter)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    reduced_decode: bool = True  # JPEG DCT-domain downscale when the image is much larger

    @property
    def output_size(self) -> int:
        return self.crop_size if (self.train and self.crop_size) else self.image_size

    def describe(self) -> dict:
        """Plain dict of every parameter (for cache keys and the run summary)."""
        from dataclasses import asdict

        return {**asdict(self), "transforms_version": TRANSFORMS_VERSION}


class ImageDecodeError(RuntimeError):
    pass


def is_jpeg(data: np.ndarray) -> bool:
    return data.size > 2 and data[0] == 0xFF and data[1] == 0xD8


_REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_reduction(matrix: np.ndarray, encoded: np.ndarray, enabled: bool = True) -> int:
    """The largest JPEG DCT reduction (1, 2, 4, 8) that still leaves at least the
    resolution the warp needs (never upsample a reduced image)."""
    if not enabled or not is_jpeg(encoded):
        return 1
    scale = geometry.matrix_scale(matrix)
    for r in (8, 4, 2):
        if scale * r <= 1.0:
            return r
    return 1


def decode_rgb(encoded: np.ndarray, reduction: int = 1, name: str = "") -> np.ndarray:
    """Decode to RGB uint8 honouring EXIF orientation; grayscale, alpha and 16-bit
    inputs become 3-channel 8-bit. ``reduction`` > 1 decodes a JPEG at 1/reduction size."""
    image = cv2.imdecode(encoded, _REDUCED_FLAGS[reduction]) if encoded.size else None  # imdecode asserts on b""
    if image is None:
        raise ImageDecodeError(f"{name or 'image'}: cannot decode image data ({encoded.size} bytes)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def warp_to_canvas(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Render ``image`` through ``matrix`` onto a size x size canvas (black outside).
    Downscaling is antialiased: the isotropic part of the scale is done by an area
    resize first, the rest by a bilinear warp, so the composition is exactly ``matrix``."""
    scale = geometry.matrix_scale(matrix)
    if scale < 1.0:
        image = cv2.resize(image, (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        matrix = matrix @ geometry.scale_matrix(1.0 / scale)
    if np.allclose(matrix, np.eye(3), atol=1e-9):
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        h, w = min(size, image.shape[0]), min(size, image.shape[1])
        canvas[:h, :w] = image[:h, :w]
        return canvas
    affine = geometry.to_pixel_center_convention(matrix)[:2]
    return cv2.warpAffine(image, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def draw_jitter(rng: np.random.Generator, jitter: ColorJitter) -> tuple[float, float, float]:
    return tuple(float(rng.uniform(1 - x, 1 + x)) for x in (jitter.brightness, jitter.contrast, jitter.saturation))


def brightness_contrast_lut(brightness: float, contrast: float) -> np.ndarray:
    """uint8 -> uint8 table of ``brightness * (128 + contrast * (v - 128))``, rounded and clipped."""
    values = brightness * (128.0 + contrast * (np.arange(256, dtype=np.float64) - 128.0))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def apply_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Colour jitter of a uint8 RGB image (see :class:`ColorJitter`): a lookup table for
    brightness/contrast, then ``grey + saturation * (x - grey)`` (OpenCV, saturating)."""
    out = cv2.LUT(image, brightness_contrast_lut(brightness, contrast))
    if saturation != 1.0:
        grey = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        out = cv2.addWeighted(out, float(saturation), grey, float(1.0 - saturation), 0.0)
    return out


def normalization_affine(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel so that ``x * scale + shift == (x / 255 - mean) / std``."""
    std255 = np.asarray(std, dtype=np.float64) * 255.0
    scale = 1.0 / std255
    shift = -np.asarray(mean, dtype=np.float64) * 255.0 / std255
    return scale.astype(np.float32), shift.astype(np.float32)


def normalize_chw(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW, (x / 255 - mean) / std."""
    out = np.empty((image.shape[2], image.shape[0], image.shape[1]), dtype=np.float32)
    normalize_into(out, image, mean, std)
    return out


def normalize_into(out, image: np.ndarray, mean, std) -> None:
    """Write the normalised CHW float version of the uint8 HWC ``image`` into ``out`` (a
    contiguous float32 [3, H, W] torch tensor or NumPy array): OpenCV splits the channels
    and converts each with one fused multiply-add, in place."""
    planes = cv2.split(np.ascontiguousarray(image))
    dst = out.numpy() if hasattr(out, "numpy") else out
    scale, shift = normalization_affine(mean, std)
    for c, plane in enumerate(planes):
        cv2.addWeighted(plane, float(scale[c]), plane, 0.0, float(shift[c]), dst=dst[c], dtype=cv2.CV_32F)


def sample_matrix(params: TransformParams, height: int, width: int, polygons, ignore, rng) -> np.ndarray:
    if params.train:
        return geometry.train_matrix(height, width, list(polygons), list(ignore), params.image_size, rng, params.augment, params.crop_size or None)
    return geometry.eval_matrix(height, width, params.image_size)


def _is_pure_scale(matrix: np.ndarray) -> bool:
    return bool(matrix[0, 1] == 0 and matrix[1, 0] == 0 and matrix[0, 2] == 0 and matrix[1, 2] == 0
                and matrix[0, 0] == matrix[1, 1] and np.array_equal(matrix[2], (0.0, 0.0, 1.0)))


def render_sample(params: TransformParams, encoded: np.ndarray, matrix: np.ndarray, height: int, width: int,
                  rng: np.random.Generator | None, name: str = "") -> np.ndarray:
    """Encoded bytes -> uint8 RGB canvas (size x size) through ``matrix`` (+ jitter in training)."""
    reduction = decode_reduction(matrix, encoded, params.reduced_decode)
    image = decode_rgb(encoded, reduction, name)
    expected = (-(-height // reduction), -(-width // reduction))
    if image.shape[:2] != expected:
        raise ImageDecodeError(
            f"{name}: decoded size {image.shape[1]}x{image.shape[0]} does not match the header size "
            f"{width}x{height} (reduction {reduction})"
        )
    return render_decoded(params, image, reduction, matrix, height, width, rng)


def render_decoded(params: TransformParams, image: np.ndarray, reduction: int, matrix: np.ndarray, height: int,
                   width: int, rng: np.random.Generator | None) -> np.ndarray:
    """A decoded RGB image (at 1/``reduction`` of the displayed ``height`` x ``width``) ->
    uint8 canvas through ``matrix`` (+ jitter in training): the rest of :func:`render_sample`,
    shared with renders from preloaded decoded arrays."""
    canvas = warp_to_canvas(image, matrix @ geometry.scale_matrix(reduction), params.output_size)
    if reduction > 1 and _is_pure_scale(matrix):
        # a reduced decode has ceil(size / r) pixels, the last one reaching past the image:
        # keep the content to the size a full decode gives (round(size * s)), as DALI does
        s = matrix[0, 0]
        canvas[int(np.rint(height * s)):] = 0
        canvas[:, int(np.rint(width * s)):] = 0
    if params.train and rng is not None:
        canvas = apply_jitter(canvas, *draw_jitter(rng, params.jitter))
    return canvas
