"""EXIF-orientation canonicalisation of an image folder.

Annotation polygons are in *displayed* coordinates (EXIF orientation applied). Decoders
disagree on whether they honour the EXIF orientation tag (OpenCV's ``imread``/``imdecode``
do, raw JPEG decoders such as nvJPEG / DALI's ``fn.decoders.image`` or PIL without
``exif_transpose`` do not), so a training pipeline could see rotated pixels under
unrotated polygons. :func:`canonicalize_exif` writes a copy of the folder in which
every image's pixels are stored in display orientation and no orientation tag is left,
so every decoder shows the same thing.

* Images without an orientation tag, or with orientation 1, are copied byte-for-byte.
* Orientations 2..8 are applied to the pixels (``PIL.ImageOps.exif_transpose``) and
  the image is re-encoded in its own format (JPEG at quality 95), keeping the rest of
  the EXIF data and the ICC profile, without the orientation tag.
* Orientation values outside 1..8 are ignored by every decoder; such files are copied
  unchanged and counted (``invalid_orientation``).

The annotation JSON does not change; it is copied along when given.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from pathlib import Path

from PIL import Image, ImageOps

from .annotations import atomic_write_bytes
from .icdar_import import list_images

__all__ = ["ORIENTATION_TAG", "canonicalize_exif", "read_orientation"]

log = logging.getLogger("ocr.data.exif")

ORIENTATION_TAG = 0x0112
_ROTATING = frozenset(range(2, 9))
# Pillow opens multi-picture JPEGs (phones) as "MPO"; we write the primary image as JPEG
_SAVE_FORMAT = {"MPO": "JPEG"}


def read_orientation(path_or_bytes: str | os.PathLike | bytes) -> int | None:
    """The EXIF (or XMP) orientation value of an image, or None when there is none."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        value = im.getexif().get(ORIENTATION_TAG)
    return int(value) if isinstance(value, int) else None


def _reencode(im: Image.Image, quality: int) -> bytes:
    fmt = _SAVE_FORMAT.get(im.format or "", im.format)
    if fmt not in ("JPEG", "PNG"):
        raise ValueError(f"unsupported image format {im.format!r} for re-encoding")
    out = ImageOps.exif_transpose(im)
    exif = out.getexif()
    exif.pop(ORIENTATION_TAG, None)
    kwargs: dict = {}
    if len(exif):
        kwargs["exif"] = exif.tobytes()
    for key in ("icc_profile", "dpi"):
        if im.info.get(key) is not None:
            kwargs[key] = im.info[key]
    if fmt == "JPEG":
        kwargs.update(quality=quality)
        if out.info.get("xmp"):  # exif_transpose already removed tiff:Orientation from it
            kwargs["xmp"] = out.info["xmp"]
        if out.mode not in ("L", "RGB", "CMYK"):
            out = out.convert("RGB")
    buf = io.BytesIO()
    out.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def canonicalize_exif(
    src_image_dir: str | os.PathLike,
    dst_image_dir: str | os.PathLike,
    *,
    json_path: str | os.PathLike | None = None,
    out_json: str | os.PathLike | None = None,
    quality: int = 95,
    on_error: str = "raise",
) -> dict:
    """Write every image of ``src_image_dir`` (.jpg/.jpeg/.png, non-recursive) to
    ``dst_image_dir`` with its EXIF orientation applied to the pixels and no
    orientation tag; unrotated images are copied byte-for-byte. ``dst_image_dir`` may
    equal ``src_image_dir`` (in place: only rotated images are rewritten). All writes
    are atomic. ``json_path`` is copied byte-for-byte to ``out_json`` (both or neither).

    An image Pillow cannot read raises ``ValueError`` naming it (``on_error="raise"``)
    or is left out and counted as ``failed`` (``on_error="skip"``).

    Returns stats: ``images``, ``rotated``, ``copied``, ``unchanged_in_place``,
    ``invalid_orientation``, ``failed``, ``orientations`` (value -> count, 1 for
    untagged), ``json_copied``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if (json_path is None) != (out_json is None):
        raise ValueError("json_path and out_json must be given together")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    src_dir, dst_dir = Path(src_image_dir), Path(dst_image_dir)
    if not src_dir.is_dir():
        raise ValueError(f"{src_dir}: image directory not found")
    if json_path is not None and not Path(json_path).is_file():
        raise ValueError(f"{json_path}: annotation file not found")
    dst_dir.mkdir(parents=True, exist_ok=True)
    in_place = src_dir.resolve() == dst_dir.resolve()

    stats: Counter[str] = Counter()
    orientations: Counter[int] = Counter()
    failures: list[str] = []
    images = list_images(src_dir)
    for src in images:
        dst = dst_dir / src.name
        data = src.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                value = im.getexif().get(ORIENTATION_TAG)
                orientation = int(value) if isinstance(value, int) else 1
                encoded = _reencode(im, quality) if orientation in _ROTATING else None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            msg = f"{src}: cannot read image: {e}"
            if on_error == "raise":
                raise ValueError(msg) from e
            failures.append(msg)
            stats["failed"] += 1
            continue
        orientations[orientation] += 1
        if encoded is not None:
            atomic_write_bytes(dst, encoded)
            stats["rotated"] += 1
            continue
        if not 1 <= orientation <= 8:
            stats["invalid_orientation"] += 1
        if in_place:
            stats["unchanged_in_place"] += 1
        else:
            atomic_write_bytes(dst, data)
            stats["copied"] += 1

    json_copied = False
    if json_path is not None and out_json is not None:
        if Path(json_path).resolve() != Path(out_json).resolve():
            atomic_write_bytes(out_json, Path(json_path).read_bytes())
        json_copied = True

    if failures:
        log.warning(
            "%s: %d unreadable image(s) left out:\n%s",
            src_dir,
            len(failures),
            "\n".join(f"  - {m}" for m in failures[:5]),
        )
    if stats["invalid_orientation"]:
        log.warning(
            "%s: %d image(s) with an invalid orientation value copied unchanged",
            src_dir,
            stats["invalid_orientation"],
        )
    log.info(
        "canonicalised %d image(s) from %s to %s: %d rotated, %d unchanged",
        len(images),
        src_dir,
        dst_dir,
        stats["rotated"],
        stats["copied"] + stats["unchanged_in_place"],
    )
    return {
        "images": len(images),
        "rotated": stats["rotated"],
        "copied": stats["copied"],
        "unchanged_in_place": stats["unchanged_in_place"],
        "invalid_orientation": stats["invalid_orientation"],
        "failed": stats["failed"],
        "orientations": dict(sorted(orientations.items())),
        "json_copied": json_copied,
    }
