"""DALI's CPU operators vs the CPU backend, image by image.

Eval: same images -> the same M exactly, the same geometry, images within a stated
tolerance and the same targets. Tolerances are in normalised units (ImageNet std ~0.225, so
one grey level ~0.017) per batch, set from measured differences (see EVAL_TOLERANCE).
The only pixel difference is the antialiasing filter: OpenCV's INTER_AREA (a box, which
still aliases fine gratings) vs DALI's antialiased linear resize (a triangle, blurrier);
it shows on sharp text edges only.

Train: both backends draw the same M and jitter for a sample (seed, epoch, index), so the
polygons land on the same pixels; with a fixed matrix the warped text stays inside its
transformed polygon in both.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from dali_pipelines.graphs import OUTPUTS, build_pipeline
from dali_pipelines.source import unpack_record
from dali_pipelines.loader import DaliLoader
from dali_pipelines.source import DaliBatchSource, EpochControl
from ocr.data import geometry
from ocr.data.batch import attach_targets, collate_samples
from ocr.data.dataset import ThreadedLoader, ValidatedOCRDataset
from ocr.data.sampling import EpochPlan
from ocr.data.transforms import TransformParams, apply_jitter, decode_reduction, warp_to_canvas

from dali_helpers import MemorySource, text_image

TARGET_KW = dict(min_text_size=3)
# (mean, 99.9th percentile, max) of |DALI - CPU backend| per batch, by data.reduced_decode.
# Measured on this module's val_source at 160 px (3 batches; DALI 1.x CPU operators, OpenCV 4.x):
#   full decode:    mean 0.016-0.023, p99.9 0.37-0.46, max 0.49-0.77
#   reduced decode: mean 0.011-0.013, p99.9 0.22-0.38, max 0.35-0.60
# The reduced decode is closer to DALI than the full one: the CPU backend's JPEG DCT-scaled
# decode (1/2..1/8) is itself a smooth low-pass, nearer DALI's triangle filter than
# INTER_AREA's box. Bounds: ~1.3-1.6x the worst batch, so a real change of the resize or
# decode path (a lost antialiasing step, an off-by-one-pixel scale) fails while library
# rounding does not.
EVAL_TOLERANCE = {False: (0.03, 0.5, 1.0), True: (0.02, 0.5, 0.8)}


def _cpu_eval_batches(source, params, batch_size):
    ds = ValidatedOCRDataset(source, params, with_targets=False)
    for start in range(0, len(source), batch_size):
        batch = collate_samples([ds[i] for i in range(start, min(len(source), start + batch_size))], params.mean,
                                params.std)
        yield attach_targets(batch, TARGET_KW)


def _compare_images(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    return {"mean": float(d.mean()), "p999": float(torch.quantile(d.flatten()[::7], 0.999)), "max": float(d.max())}


@pytest.mark.parametrize("reduced_decode", [False, True])
def test_eval_parity_with_cpu_backend(val_source, reduced_decode):
    params = TransformParams(image_size=160, train=False, reduced_decode=reduced_decode)
    dali = DaliLoader(val_source, params, TARGET_KW, batch_size=2, shuffle=False, drop_last=False, seed=0, device="cpu",
                      num_threads=2)
    stats, reductions = [], []
    index = {s.name: i for i, s in enumerate(val_source.samples)}
    try:
        for got, want in zip(dali, _cpu_eval_batches(val_source, params, 2), strict=True):
            assert got["names"] == want["names"]
            assert got["matrices"].dtype == torch.float64 and torch.equal(got["matrices"], want["matrices"])
            assert torch.equal(got["orig_sizes"], want["orig_sizes"])
            assert got["ignore"] == want["ignore"]
            for pg, pw in zip(got["polygons"], want["polygons"]):
                assert all(np.array_equal(a, b) for a, b in zip(pg, pw, strict=True))
            # the same transform (geometry.transform_polygons) in both: the same float32 vertices
            for ng, nw in zip(got["net_polygons"], want["net_polygons"]):
                assert all(a.dtype == b.dtype == np.float32 and np.array_equal(a, b) for a, b in zip(ng, nw, strict=True))
            assert got["images"].shape == want["images"].shape == (len(got["names"]), 3, 160, 160)
            stats.append(_compare_images(got["images"], want["images"]))
            reductions += [decode_reduction(m.numpy(), val_source.encoded_array(index[n]), reduced_decode)
                           for m, n in zip(got["matrices"], got["names"])]
            # padding is black (0 before normalisation) in both
            assert torch.allclose(got["images"][:, :, -1, -1], want["images"][:, :, -1, -1], atol=1e-5)
            # targets: the geometry prepared in DALI's external source and in the CPU backend's
            # workers is the same, and so are the maps, bit for bit
            for key in ("prob_maps", "prob_masks", "thresh_maps", "thresh_masks"):
                assert torch.equal(got[key], want[key]), key
            assert got["prob_maps"].sum() > 0
    finally:
        dali.close()
    # every image here is decoded at 1/4 by the CPU backend when reduced_decode is on
    assert set(reductions) == ({4} if reduced_decode else {1}), reductions
    mean_tol, p999_tol, max_tol = EVAL_TOLERANCE[reduced_decode]
    assert max(s["mean"] for s in stats) <= mean_tol, stats
    assert max(s["p999"] for s in stats) <= p999_tol, stats
    assert max(s["max"] for s in stats) <= max_tol, stats


def test_train_batches_draw_the_same_geometry_in_both_backends(train_source):
    params = TransformParams(image_size=160, train=True, reduced_decode=False)
    kw = dict(batch_size=3, shuffle=True, drop_last=False, seed=5)
    dali = DaliLoader(train_source, params, TARGET_KW, device="cpu", num_threads=2, **kw)
    cpu = ThreadedLoader(ValidatedOCRDataset(train_source, params, target_kwargs=TARGET_KW, target_mode="vectorized"),
                         num_threads=2, **kw)
    try:
        for epoch in range(2):
            diffs = []
            for got, want in zip(dali, cpu, strict=True):
                assert got["names"] == want["names"]
                assert torch.equal(got["matrices"], want["matrices"])
                for ng, nw in zip(got["net_polygons"], want["net_polygons"]):
                    assert all(np.array_equal(a, b) for a, b in zip(ng, nw, strict=True))
                diffs.append(_compare_images(got["images"], want["images"]))
                for key in ("prob_maps", "prob_masks", "thresh_maps", "thresh_masks"):
                    assert torch.equal(got[key], want[key]), key
            # same geometry and jitter; pixels differ by the resize filter, jitter rounding and
            # bilinear rounding
            assert max(d["mean"] for d in diffs) < 0.03, diffs
    finally:
        dali.close()
        cpu.close()


class _FixedGeometry(DaliBatchSource):
    def __init__(self, *args, matrix, **kwargs):
        super().__init__(*args, **kwargs)
        self.matrix = matrix

    def geometry(self, index, epoch):
        return self.matrix, (1.0, 1.0, 1.0)


def _run_train_graph(source, params, matrix):
    plan = EpochPlan(len(source), len(source))
    control = EpochControl()
    control.start(0, 0)
    try:
        callback = _FixedGeometry(source, params, plan, control, matrix=matrix)
        pipe = build_pipeline(callback, params, "cpu", len(source), 2, None)
        pipe.build()
        return dict(zip(OUTPUTS, pipe.run()))
    finally:
        control.close()


def _inside(polygon: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    # pixel (i, j) is inside when its centre (j + .5, i + .5) is: fillPoly samples integer points
    cv2.fillPoly(mask, [np.round((polygon - 0.5) * 256).astype(np.int32)], 1, shift=8)
    return mask.astype(bool)


@pytest.mark.parametrize("angle,scale", [(8.0, 0.45), (-6.0, 1.3), (0.0, 0.3)])
def test_fixed_matrix_polygons_and_text_land_on_the_same_pixels(angle, scale):
    h, w, size = 300, 420, 192
    box = (120.0, 140.0, 300.0, 170.0)
    polygon = np.array([[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]], np.float32)
    source = MemorySource([text_image(h, w, box)], [[polygon]])
    m = geometry.scale_matrix(scale) @ geometry.rotation_matrix(angle, w / 2, h / 2)
    centre = geometry.transform_points(m, np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]]))[0]
    m = geometry.translation_matrix(size / 2 - centre[0], size / 2 - centre[1]) @ m
    params = TransformParams(image_size=size, train=True, reduced_decode=False)

    out = _run_train_graph(source, params, m)
    record = unpack_record(np.array(out["record"][0]))
    np.testing.assert_allclose(record["net_vertices"], geometry.transform_points(m, polygon), atol=1e-3)
    assert np.array_equal(record["matrix"], m)

    dali_img = np.array(out["images"][0])  # normalised CHW
    cpu_canvas = warp_to_canvas(source_image := cv2.cvtColor(cv2.imdecode(source.encoded_array(0), cv2.IMREAD_COLOR),
                                                            cv2.COLOR_BGR2RGB), m, size)
    assert source_image.shape[:2] == (h, w)
    bright_threshold = (140 / 255 - params.mean[0]) / params.std[0]
    dali_text = dali_img[0] > bright_threshold
    cpu_text = cpu_canvas[..., 0] > 140
    inside = _inside(geometry.transform_points(m, polygon), size)
    grown = cv2.dilate(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # 1 px of blur
    for text in (dali_text, cpu_text):
        assert text.sum() > 0.1 * inside.sum()  # the text survived the warp
        assert text[grown].sum() >= 0.99 * text.sum()  # ... and it is inside its polygon
    iou = (dali_text & cpu_text).sum() / (dali_text | cpu_text).sum()
    assert iou > 0.85, iou


@pytest.mark.parametrize("factors", [(1.15, 0.85, 1.2), (0.8, 1.2, 0.8), (1.0, 1.0, 1.0)])
def test_colour_jitter_formulas_agree(factors):
    """DALI's brightness_contrast (contrast_center 128, uint8) + saturation vs the CPU
    backend's apply_jitter, and both vs the float formula of ColorJitter."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    b, c, s = factors
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (64, 96, 3)).astype(np.uint8), (0, 0), 2.0)
    image[:8] = 250
    image[8:16] = (250, 10, 10)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: [image], batch=True, layout="HWC")
        x = fn.brightness_contrast(x, brightness=b, contrast=c, contrast_center=128.0, dtype=types.UINT8)
        return dmath.clamp(fn.saturation(x, saturation=s, dtype=types.FLOAT), 0.0, 255.0)

    p = pipe()
    p.build()
    dali = np.array(p.run()[0][0]).astype(np.float64)
    cpu = apply_jitter(image, b, c, s).astype(np.float64)
    # ColorJitter's definition: brightness/contrast rounded and clipped to uint8, then saturation
    exact = np.clip(np.rint(b * (128.0 + c * (image.astype(np.float64) - 128.0))), 0, 255)
    grey = exact @ np.array([0.299, 0.587, 0.114])
    exact = np.clip(grey[..., None] + s * (exact - grey[..., None]), 0, 255)
    assert np.abs(dali - cpu).max() <= 1.0 and np.abs(dali - cpu).mean() < 0.3
    assert np.abs(cpu - exact).max() <= 1.0 and np.abs(cpu - exact).mean() < 0.5
