"""The DALI graphs: one for training, one for evaluation, each a plain function of
``device`` ("gpu": ``fn.decoders.image(device="mixed")`` and every pixel operator on the
GPU; "cpu": DALI's CPU operators) under a thin ``@pipeline_def`` wrapper.

Geometry is the CPU backend's (``ocr.data.transforms.warp_to_canvas``), with DALI's
conventions measured in ``tests/dali_pipelines``:

* ``fn.warp_affine`` and ``fn.resize`` use the same continuous pixel coordinates as
  ``ocr.data.geometry`` (pixel (row i, col j) covers [j, j+1) x [i, i+1)), so ``M`` is
  passed as is (inverted: ``inverse_map`` maps destination to source); no half-pixel shift.
* ``fn.resize(antialias=True)`` with an explicit ``size`` and ``roi_end`` applies exactly
  the scale OpenCV applies for ``fx=fy=s`` (``cv2.resize`` rounds the size half to even,
  DALI half up: the source computes the size OpenCV's way and the region that keeps the
  scale). Its antialiasing filter is a triangle (OpenCV ``INTER_AREA`` is a box), hence the
  small pixel differences the parity tests bound.
* ``fn.crop_mirror_normalize``'s ``fill_values`` are output (normalised) values: black
  padding is ``-mean / std``.

Outputs (both graphs): images float ``[3, S, S]`` (normalised, CHW, on ``device``), then
the pass-through sample record computed by the source (CPU, ``source.pack_record``): index,
M, the network-pixel vertices, lengths, ignore flags and the packed DB target geometry. The polygons are
transformed in the source, not with ``fn.coord_transform``, because the target geometry
(shrink, packing) needs them there, in the external-source workers, off the training thread.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types
import nvidia.dali.math as dmath

from dali_pipelines.source import PARAM_SLICES, PASS_THROUGH, SOURCE_DTYPES, SOURCE_NDIMS, DaliBatchSource
from ocr.data.transforms import TransformParams

OUTPUTS = ("images", *PASS_THROUGH)
DEVICES = ("cpu", "gpu")


_DALI_DTYPES = {"uint8": types.UINT8, "int32": types.INT32, "int64": types.INT64, "float32": types.FLOAT,
                "float64": types.FLOAT64}


def _inputs(source: DaliBatchSource, parallel: bool, prefetch: int) -> dict:
    """The source's outputs by name, with the per-sample arguments sliced out of ``params`` (one
    output instead of four: each output costs the thread that runs the pipeline ~0.15 ms per batch)."""
    n = len(source.outputs)
    kwargs = dict(num_outputs=n, batch=True, batch_info=True, parallel=parallel,
                  dtype=[_DALI_DTYPES[d] for d in SOURCE_DTYPES[:n]], ndim=list(SOURCE_NDIMS[:n]))
    if parallel:
        kwargs["prefetch_queue_depth"] = prefetch
    inp = dict(zip(source.outputs, fn.external_source(source=source, **kwargs)))
    params = inp.pop("params")
    names = ("resize_size", "resize_roi", "warp", "jitter") if source.params.train else ("resize_size", "resize_roi")
    for name in names:
        start, stop = PARAM_SLICES[name]
        inp[name] = params[start:stop]
    if "warp" in inp:
        inp["warp"] = fn.reshape(inp["warp"], shape=[2, 3])
    return inp


def _decode(encoded, device: str):
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "gpu":
        # fancy upsampling: the GPU decoder's chroma upsampling then matches libjpeg's (the CPU decoders'),
        # so both backends agree on colour edges
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=True)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


def _normalize(images, params: TransformParams, crop: int | None = None):
    """uint8/float HWC -> float CHW, (x - 255 mean) / (255 std); with ``crop``: an S x S window at
    the top left, the part beyond the image black (0 before normalisation)."""
    mean = [255.0 * m for m in params.mean]
    std = [255.0 * s for s in params.std]
    kwargs = {}
    if crop is not None:
        kwargs = dict(crop=(crop, crop), crop_pos_x=0.0, crop_pos_y=0.0, out_of_bounds_policy="pad",
                      fill_values=[-m / s for m, s in zip(mean, std)])
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, **kwargs)


def _antialiased_resize(images, inp):
    return fn.resize(images, size=inp["resize_size"], roi_start=[0.0, 0.0], roi_end=inp["resize_roi"],
                     roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True)


def _sample_outputs(inp):
    return tuple(inp[name] for name in PASS_THROUGH)


def eval_graph(source: DaliBatchSource, params: TransformParams, device: str = "gpu", parallel: bool = False,
               prefetch: int = 2):
    """Decode, resize by M's scale (antialiased), pad to S x S at the top left, normalise."""
    inp = _inputs(source, parallel, prefetch)
    images = _antialiased_resize(_decode(inp["encoded"], device), inp)
    images = _normalize(images, params, crop=params.output_size)
    return (images, *_sample_outputs(inp))


def train_graph(source: DaliBatchSource, params: TransformParams, device: str = "gpu", parallel: bool = False,
                prefetch: int = 2):
    """Decode, antialiased resize by M's isotropic scale (when it shrinks), warp by the
    residual onto the S x S window (black outside), colour jitter, normalise."""
    inp = _inputs(source, parallel, prefetch)
    images = _antialiased_resize(_decode(inp["encoded"], device), inp)
    size = params.output_size
    images = fn.warp_affine(images, matrix=inp["warp"], size=[size, size], fill_value=0.0, inverse_map=True,
                            interp_type=types.INTERP_LINEAR)
    brightness, contrast, saturation = inp["jitter"][0], inp["jitter"][1], inp["jitter"][2]
    # ocr.data.transforms.apply_jitter: brightness/contrast rounded and clipped to uint8,
    # then saturation around the grey, clipped
    images = fn.brightness_contrast(images, brightness=brightness, contrast=contrast, contrast_center=128.0,
                                    dtype=types.UINT8)
    images = fn.saturation(images, saturation=saturation, dtype=types.FLOAT)
    images = dmath.clamp(images, 0.0, 255.0)
    images = _normalize(images, params)
    return (images, *_sample_outputs(inp))


@pipeline_def(enable_conditionals=False)
def eval_pipeline(source: DaliBatchSource, params: TransformParams, device: str = "gpu", parallel: bool = False,
                  prefetch: int = 2):
    return eval_graph(source, params, device, parallel, prefetch)


@pipeline_def(enable_conditionals=False)
def train_pipeline(source: DaliBatchSource, params: TransformParams, device: str = "gpu", parallel: bool = False,
                   prefetch: int = 2):
    return train_graph(source, params, device, parallel, prefetch)


def build_pipeline(source: DaliBatchSource, params: TransformParams, device: str, batch_size: int, num_threads: int,
                   device_id: int | None, parallel: bool = False, py_num_workers: int = 1, prefetch: int = 2):
    """The split's pipeline (train graph when ``params.train``), not yet built."""
    make = train_pipeline if params.train else eval_pipeline
    kwargs = dict(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                  prefetch_queue_depth=prefetch, seed=0)
    if parallel:
        kwargs.update(py_num_workers=max(1, py_num_workers), py_start_method="spawn")
    return make(source, params, device, parallel, prefetch, **kwargs)
