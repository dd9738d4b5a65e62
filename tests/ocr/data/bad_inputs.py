"""A corpus of bad and unusual inputs (issue 11 part 2), one case per image, written as a
dataset folder: ``<root>/images/{train,val}/`` + ``<root>/jsons/{train,val}.json``.

Every image case is small (64 x 48 px) except ``huge_scan``: an 8000 x 12000 mostly blank
grayscale JPEG (about 0.6 MB, cheap to write; decoded at 1/8 size by the CPU backend).
``CASES`` says what each case is and what should happen to it: ``"ok"`` (decodes and
trains) or the ``reason`` key of the problem the run reports (the sample is skipped
under ``on_error=skip``).

Annotation-file-level cases (not JSON, wrong top-level type, empty split) replace a
whole split's JSON: :func:`write_bad_json`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

W, H = 64, 48
BOX = [[8, 10], [40, 10], [40, 22], [8, 22]]


def _picture(width: int = W, height: int = H) -> np.ndarray:
    """RGB uint8 image: grey background, a dark 'word' where BOX is, a colour gradient."""
    image = np.full((height, width, 3), 200, np.uint8)
    image[..., 0] = np.linspace(120, 250, width, dtype=np.uint8)[None, :]
    image[10:22, 8:40] = 30
    return image


def _pil_bytes(mode: str, fmt: str, **kwargs) -> bytes:
    im = Image.fromarray(_picture())
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _jpeg() -> bytes:
    return _pil_bytes("RGB", "JPEG", quality=90)


def _truncated_jpeg() -> bytes:
    """A noisy JPEG (mostly entropy-coded data) cut at 70%: the header is intact, the scan is not."""
    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    return data[: int(len(data) * 0.7)]


def _png16() -> bytes:
    image16 = _picture().astype(np.uint16) * 257
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image16, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _exif_rotated() -> bytes:
    """Stored 48 wide x 64 high with orientation 6 (rotate 90 degrees clockwise to display):
    displayed W x H like every other case, with the word where BOX says."""
    stored = Image.fromarray(_picture()).transpose(Image.Transpose.ROTATE_90)  # undone by orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def _huge_scan() -> bytes:
    page = np.full((12000, 8000), 255, np.uint8)
    page[100:1500, 100:6000] = 0  # one big "word" (HUGE_BOX)
    ok, buf = cv2.imencode(".jpg", page, [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert ok
    return buf.tobytes()


HUGE_BOX = [[100, 100], [6000, 100], [6000, 1500], [100, 1500]]

#: name -> (file name, bytes maker or None for "no file", words, expected outcome)
CASES: dict[str, tuple[str, object, dict, str]] = {}


def _case(name: str, file_name: str, make, expect: str = "ok", words: dict | None = None) -> None:
    CASES[name] = (file_name, make, {"0001": {"points": BOX, "transcription": "word"}} if words is None else words,
                   expect)


_case("control", "control.jpg", _jpeg)
_case("truncated_jpeg", "truncated.jpg", _truncated_jpeg, "truncated_image")
_case("zero_byte", "zero_byte.jpg", lambda: b"", "unreadable_image")
_case("text_as_jpg", "text_as.jpg", lambda: b"this is a text file, not a JPEG\n", "unreadable_image")
_case("png_alpha", "alpha.png", lambda: _pil_bytes("RGBA", "PNG"))
_case("grayscale_png", "gray.png", lambda: _pil_bytes("L", "PNG"))
_case("grayscale_jpeg", "gray.jpg", lambda: _pil_bytes("L", "JPEG"))
_case("cmyk_jpeg", "cmyk.jpg", lambda: _pil_bytes("CMYK", "JPEG"))
_case("png_16bit", "png16.png", _png16)
_case("webp", "lossless.webp", lambda: _pil_bytes("RGB", "WEBP", lossless=True))
_case("bmp", "plain.bmp", lambda: _pil_bytes("RGB", "BMP"))
_case("tiff", "plain.tiff", lambda: _pil_bytes("RGB", "TIFF"))
_case("exif_rotated", "exif_rotated.jpg", _exif_rotated)
_case("missing_file", "missing.jpg", None, "missing_image_file")
_case("name_with_spaces", "name with spaces.jpg", _jpeg)
_case("non_ascii_name", "ünïcödé 名前.jpg", _jpeg)
_case("no_words", "no_words.jpg", _jpeg, words={})
_case("self_intersecting", "bowtie.jpg", _jpeg,
      words={"0001": {"points": [[8, 10], [40, 22], [40, 10], [8, 22]], "transcription": "x"}})
_case("far_outside", "far_outside.jpg", _jpeg,
      words={"0001": {"points": BOX, "transcription": "kept"},
             "0002": {"points": [[1e6, 10], [1e6 + 30, 10], [1e6 + 30, 22], [1e6, 22]], "transcription": "far"}})
#: word-level annotation problems: the word is dropped under skip, the image stays
_case("too_few_points", "few_points.jpg", _jpeg,
      words={"0001": {"points": BOX, "transcription": "kept"}, "0002": {"points": [[1, 1], [5, 5]]}})
_case("wrong_types", "wrong_types.jpg", _jpeg,
      words={"0001": {"points": BOX, "transcription": "kept"}, "0002": {"points": "1,2,3,4"},
             "0003": {"points": BOX, "transcription": 7}})
_case("nan_inf", "nan_inf.jpg", _jpeg,
      words={"0001": {"points": BOX, "transcription": "kept"},
             "0002": {"points": [[float("nan"), 1], [5, 1], [5, 5], [1, 5]]},
             "0003": {"points": [[float("inf"), 1], [5, 1], [5, 5], [1, 5]]}})
_case("huge_scan", "huge_scan.jpg", _huge_scan, words={"0001": {"points": HUGE_BOX, "transcription": "big"}})

#: word-level problems (the image stays, the bad words go): case -> problem reasons
WORD_PROBLEMS = {
    "too_few_points": ["too_few_points"],
    "wrong_types": ["bad_points", "bad_transcription"],
    "nan_inf": ["non_finite_coordinate", "non_finite_coordinate"],
    "far_outside": ["point_outside_image"],
}
#: cases the run drops under on_error=skip (reason of the image-level problem)
BAD_IMAGES = {name: case[3] for name, case in CASES.items() if case[3] != "ok"}


def write_corpus(root: Path, cases=None, splits=("train", "val")) -> Path:
    """Write ``cases`` (default: all but ``huge_scan``) into every split of ``root``."""
    root = Path(root)
    cases = [c for c in CASES if c != "huge_scan"] if cases is None else list(cases)
    made: dict[object, bytes] = {}
    for split in splits:
        image_dir = root / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images = {}
        for name in cases:
            file_name, make, words, _ = CASES[name]
            if make is not None:
                if make not in made:
                    made[make] = make()
                (image_dir / file_name).write_bytes(made[make])
            images[file_name] = {"words": words}
        (root / "jsons").mkdir(exist_ok=True)
        # allow_nan: the NaN / Infinity literals Python's json (and many exporters) write
        (root / "jsons" / f"{split}.json").write_text(json.dumps({"images": images}, ensure_ascii=False),
                                                      encoding="utf-8")
    return root


BAD_JSON = {
    "not_json": "{\"images\": {\"a.jpg\": {\"words\": {}}",  # truncated
    "top_level_list": "[1, 2, 3]",
    "images_not_object": "{\"images\": [\"a.jpg\"]}",
    "empty_split": "{\"images\": {}}",
}


def write_bad_json(root: Path, kind: str, split: str = "train") -> Path:
    """Replace ``split``'s annotation file with the ``BAD_JSON[kind]`` text; returns its path."""
    path = Path(root) / "jsons" / f"{split}.json"
    path.write_text(BAD_JSON[kind], encoding="utf-8")
    return path
