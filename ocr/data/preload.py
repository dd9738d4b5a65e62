"""Preloading a split into RAM before any loader worker starts: encoded bytes
(``preload_images`` / ``cache_images``, both backends) or decoded arrays
(``preload_decoded``, CPU backend), each only after checking that it fits in the
available host memory (else one warning and the split streams from disk).

``cache_images`` means the same as ``preload_images``: the main process holds the
split's encoded bytes (one buffer shared with every loader process, see
``ocr.data.source``). A cache filled lazily inside DataLoader workers would be one cache
per worker, rebuilt whenever workers restart, which is what this project does not do.

Decoded arrays are read by the CPU backend's dataset through ``SampleSource.decoded``.
Eval splits are decoded at exactly the JPEG DCT reduction the streaming path would use,
so their pixels are identical; the train split is decoded at the reduction its largest
augmentation scale allows (its pixels can differ slightly from the streaming path's,
both antialiased).
"""

from __future__ import annotations

import logging

import numpy as np

from ocr.data import geometry
from ocr.data.memory import MemoryProbe, gb
from ocr.data.source import SampleSource
from ocr.data.transforms import TransformParams, decode_reduction

log = logging.getLogger(__name__)

_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def _max_scale(params: TransformParams, height: int, width: int) -> float:
    scale = geometry.eval_scale(height, width, params.image_size)
    return scale * params.augment.scale_max if params.train else scale


def decode_reduction_for(params: TransformParams, height: int, width: int, encoded: np.ndarray) -> int:
    """The reduction to keep image (height, width) at: what ``render_sample`` uses for the
    eval geometry, and for training the one its largest scale still allows."""
    return decode_reduction(geometry.scale_matrix(_max_scale(params, height, width)), encoded, params.reduced_decode)


def expected_reduction(params: TransformParams, source: SampleSource, index: int) -> int:
    """:func:`decode_reduction_for` from the header size and file name only (for estimates)."""
    if not params.reduced_decode or source.samples[index].path.suffix.lower() not in _JPEG_SUFFIXES:
        return 1
    scale = _max_scale(params, *source.sizes[index])
    for r in (8, 4, 2):
        if scale * r <= 1.0:
            return r
    return 1


def fits_in_host(estimate: int, probe: MemoryProbe, fraction: float) -> tuple[bool, str]:
    available, total = probe.host()
    usable = int(available * fraction)
    return estimate <= usable, f"needs {gb(estimate)}, {gb(usable)} usable of {gb(available)} available host RAM"


def preload_source(source: SampleSource, split: str, want_bytes: bool, want_decoded: bool, params: TransformParams,
                   probe: MemoryProbe, fraction: float) -> dict:
    """Preload what the config asks for when it fits; returns what was done (for the run summary)."""
    info = {"preloaded_bytes": 0, "decoded_bytes": 0, "skipped": None}
    if want_decoded:
        estimate = source.decoded_estimate(lambda i: expected_reduction(params, source, i))
        ok, detail = fits_in_host(estimate, probe, fraction)
        if ok:
            source.preload_decoded(lambda i, enc: decode_reduction_for(params, *source.sizes[i], enc))
            info["decoded_bytes"] = source.decoded_bytes
            if want_bytes:
                log.info("%s split: decoded arrays preloaded, so the encoded bytes are not kept as well", split)
            return info
        log.warning("Not preloading decoded %s images: %s; trying encoded bytes instead", split, detail)
        info["skipped"] = f"decoded: {detail}"
        want_bytes = True
    if want_bytes:
        estimate = source.file_bytes()
        ok, detail = fits_in_host(estimate, probe, fraction)
        if ok:
            source.preload()
            info["preloaded_bytes"] = source.preloaded_bytes
        else:
            log.warning("Not preloading %s images into RAM: %s; reading them from disk", split, detail)
            info["skipped"] = f"bytes: {detail}"
    return info
