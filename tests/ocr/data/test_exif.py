"""Tests for ocr.data.exif (EXIF orientation canonicalisation)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ocr.data.exif import ORIENTATION_TAG, canonicalize_exif, read_orientation

MAKE_TAG = 0x010F


def _pattern(h: int = 48, w: int = 96) -> np.ndarray:
    """RGB image with big, distinct blocks so JPEG loss cannot hide a wrong rotation."""
    a = np.full((h, w, 3), 128, np.uint8)
    a[: h // 2, : w // 4] = (255, 0, 0)  # red top-left
    a[h // 2 :, -w // 4 :] = (0, 0, 255)  # blue bottom-right
    a[: h // 2, w // 2 : w // 2 + w // 8] = (0, 255, 0)  # green top middle
    return a


def _save(path: Path, arr: np.ndarray, orientation: int | None, fmt: str = "JPEG", **kw) -> bytes:
    exif = Image.Exif()
    exif[MAKE_TAG] = "TestCam"
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, exif=exif.tobytes(), **kw)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _cv2_decode(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), flags)


def test_jpeg_orientation_6_is_rotated_and_untagged(tmp_path, caplog):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    arr = _pattern()  # stored 48 x 96 (landscape)
    _save(src / "rot.jpg", arr, 6, quality=95)
    assert read_orientation(src / "rot.jpg") == 6

    with caplog.at_level(logging.INFO, logger="ocr.data.exif"):
        stats = canonicalize_exif(src, dst)
    assert stats["rotated"] == 1 and stats["copied"] == 0 and stats["orientations"] == {6: 1}
    assert "1 rotated" in caplog.text

    out = dst / "rot.jpg"
    with Image.open(out) as im:
        assert im.format == "JPEG"
        assert im.size == (48, 96)  # (w, h): now portrait
        exif = im.getexif()
        assert ORIENTATION_TAG not in exif
        assert exif.get(MAKE_TAG) == "TestCam"  # other EXIF kept
        px = np.asarray(im.convert("RGB")).astype(int)
    # orientation 6 = rotate 90 degrees clockwise: the red top-left block is now top-right
    expected = np.rot90(arr, k=-1).astype(int)
    assert np.abs(px - expected).mean() < 4
    assert px[5, -5, 0] > 200 and px[5, -5, 2] < 60  # red at top-right
    assert px[-5, 5, 2] > 200 and px[-5, 5, 0] < 60  # blue at bottom-left

    # any decoder shows the same thing: OpenCV (which honours EXIF) on the original ==
    # OpenCV on the output, and ignoring orientation on the output changes nothing
    a = _cv2_decode(src / "rot.jpg").astype(int)
    b = _cv2_decode(out).astype(int)
    c = _cv2_decode(out, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION).astype(int)
    assert a.shape == b.shape == c.shape == (96, 48, 3)
    assert np.abs(a - b).mean() < 3
    assert np.array_equal(b, c)
    # and the raw (orientation-ignoring) view of the input is what is NOT canonical
    assert _cv2_decode(src / "rot.jpg", cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION).shape == (48, 96, 3)


TRANSFORMS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(TRANSFORMS))
def test_png_all_orientations_exact(tmp_path, orientation):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    arr = _pattern(10, 16)
    _save(src / "p.png", arr, orientation, fmt="PNG")
    assert read_orientation(src / "p.png") == orientation
    stats = canonicalize_exif(src, dst)
    assert stats["rotated"] == 1
    with Image.open(dst / "p.png") as im:
        assert im.format == "PNG"
        assert read_orientation(dst / "p.png") is None
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), TRANSFORMS[orientation](arr))


def test_untagged_and_orientation_1_copied_byte_for_byte_with_json(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst" / "images"
    src.mkdir()
    raw_none = _save(src / "a.jpg", _pattern(), None)
    raw_one = _save(src / "b.JPG", _pattern(), 1)
    raw_png = _save(src / "c.png", _pattern(), None, fmt="PNG")
    _save(src / "d.jpeg", _pattern(), 3)
    (src / "readme.txt").write_text("not an image")
    ann = tmp_path / "ann.json"
    ann.write_bytes(b'{"images": {"a.jpg": {"words": {}}}}\n')
    out_json = tmp_path / "dst" / "ann.json"

    stats = canonicalize_exif(src, dst, json_path=ann, out_json=out_json)
    assert stats["images"] == 4 and stats["rotated"] == 1 and stats["copied"] == 3
    assert stats["orientations"] == {1: 3, 3: 1} and stats["json_copied"] is True
    assert (dst / "a.jpg").read_bytes() == raw_none
    assert (dst / "b.JPG").read_bytes() == raw_one
    assert (dst / "c.png").read_bytes() == raw_png
    assert read_orientation(dst / "d.jpeg") is None
    assert not (dst / "readme.txt").exists()
    assert out_json.read_bytes() == ann.read_bytes()
    # atomic writes leave no temp files
    assert sorted(p.name for p in dst.iterdir()) == ["a.jpg", "b.JPG", "c.png", "d.jpeg"]


def test_in_place(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    raw = _save(d / "keep.jpg", _pattern(), None)
    _save(d / "turn.jpg", _pattern(), 8)
    stats = canonicalize_exif(d, d)
    assert stats["rotated"] == 1 and stats["unchanged_in_place"] == 1 and stats["copied"] == 0
    assert (d / "keep.jpg").read_bytes() == raw
    assert read_orientation(d / "turn.jpg") is None
    with Image.open(d / "turn.jpg") as im:
        assert im.size == (48, 96)
    # idempotent
    assert canonicalize_exif(d, d)["rotated"] == 0


def test_unreadable_image(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    _save(src / "ok.jpg", _pattern(), 6)
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot read image"):
        canonicalize_exif(src, dst)
    stats = canonicalize_exif(src, dst, on_error="skip")
    assert stats["failed"] == 1 and stats["rotated"] == 1
    assert not (dst / "broken.jpg").exists()


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="image directory not found"):
        canonicalize_exif(tmp_path / "nope", tmp_path / "dst")
    with pytest.raises(ValueError, match="together"):
        canonicalize_exif(tmp_path, tmp_path / "dst", json_path=tmp_path / "a.json")
