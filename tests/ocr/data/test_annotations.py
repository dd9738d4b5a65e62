"""Tests for ocr.data.annotations (all data made in tmp_path)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from ocr.data.annotations import (
    DONT_CARE,
    AnnotationError,
    Sample,
    check_annotations,
    load_annotations,
    samples_to_json,
    save_annotations,
)

SQUARE = [[10, 20], [110, 20], [110, 60], [10, 60]]


def _word(points=None, text="hello", **extra):
    w = {"points": SQUARE if points is None else points, "transcription": text}
    w.update(extra)
    return w


def _setup(tmp_path: Path, doc, *, images=None, raw: str | None = None) -> tuple[Path, Path]:
    """Write the JSON (doc or raw text) and empty image files; return (json, image_dir)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if images is None:
        images = list(doc["images"]) if isinstance(doc, dict) and isinstance(doc.get("images"), dict) else []
    for name in images:
        (img_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (img_dir / name).write_bytes(b"fake image")
    jp = tmp_path / "ann.json"
    jp.write_text(raw if raw is not None else json.dumps(doc), encoding="utf-8")
    return jp, img_dir


# --------------------------------------------------------------------------- valid data


def test_load_valid_file(tmp_path):
    doc = {
        "images": {
            "b.jpg": {
                "words": {
                    "0001": _word(text="hello", score=0.9, language="en"),
                    "0002": _word(points=[[0, 0], [5.5, 0], [5.5, 3], [2, 4], [0, 3]], text=DONT_CARE),
                    "0003": {"points": SQUARE},  # no transcription -> ""
                    "0004": _word(text=None),  # null -> ""
                },
                "orientation": 0,
            },
            "a.jpg": {"words": {}},
        }
    }
    jp, img_dir = _setup(tmp_path, doc)
    samples = load_annotations(jp, img_dir)

    assert [s.name for s in samples] == ["a.jpg", "b.jpg"]  # sorted by name
    a, b = samples
    assert a.path == img_dir / "a.jpg"
    assert a.polygons == () and a.ignore == () and a.word_ids == () and a.num_words == 0
    assert b.word_ids == ("0001", "0002", "0003", "0004")  # file order kept
    assert b.transcriptions == ("hello", DONT_CARE, "", "")
    assert b.ignore == (False, True, False, False)
    for poly in b.polygons:
        assert poly.dtype == np.float32 and poly.ndim == 2 and poly.shape[1] == 2
    assert b.polygons[1].shape == (5, 2)
    np.testing.assert_array_equal(b.polygons[0], np.array(SQUARE, np.float32))
    assert b.polygons[1][1, 0] == pytest.approx(5.5)


def test_order_is_sorted_by_name_regardless_of_file_order(tmp_path):
    names = ["img_10.jpg", "img_2.jpg", "a/x.png", "Z.jpg", "img_1.jpg"]
    jp, img_dir = _setup(tmp_path, {"images": {n: {"words": {"1": _word()}} for n in names}})
    assert [s.name for s in load_annotations(jp, img_dir)] == sorted(names)


def test_polygons_are_read_only(tmp_path):
    jp, img_dir = _setup(tmp_path, {"images": {"a.jpg": {"words": {"1": _word()}}}})
    (s,) = load_annotations(jp, img_dir)
    with pytest.raises(ValueError):
        s.polygons[0][0, 0] = 5
    poly = s.polygons[0].copy()  # a copy is writable
    poly *= 2
    assert poly[0, 0] == 20


def test_sample_equality_and_hash(tmp_path):
    jp, img_dir = _setup(tmp_path, {"images": {"a.jpg": {"words": {"1": _word()}}}})
    s1 = load_annotations(jp, img_dir)[0]
    s2 = load_annotations(jp, img_dir)[0]
    assert s1 == s2 and hash(s1) == hash(s2)
    s3 = Sample(s1.name, s1.path, (s1.polygons[0] + 1,), s1.ignore, s1.word_ids, s1.transcriptions)
    assert s1 != s3
    with pytest.raises(ValueError, match="lengths differ"):
        Sample("x", Path("x"), (), (True,), (), ())


def test_utf8_bom_json_is_accepted(tmp_path):
    doc = {"images": {"a.jpg": {"words": {"1": _word(text="ünïcode")}}}}
    jp, img_dir = _setup(tmp_path, doc)
    jp.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc, ensure_ascii=False).encode())
    assert load_annotations(jp, img_dir)[0].transcriptions == ("ünïcode",)


def test_check_images_false_does_not_need_files(tmp_path):
    jp, img_dir = _setup(tmp_path, {"images": {"a.jpg": {"words": {}}}}, images=[])
    with pytest.raises(AnnotationError, match="image file not found"):
        load_annotations(jp, img_dir)
    (s,) = load_annotations(jp, img_dir, check_images=False)
    assert s.path == img_dir / "a.jpg"


def test_invalid_on_error_value(tmp_path):
    jp, img_dir = _setup(tmp_path, {"images": {}})
    with pytest.raises(ValueError, match="on_error"):
        load_annotations(jp, img_dir, on_error="ignore")


# --------------------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path):
    jp = tmp_path / "nope.json"
    with pytest.raises(AnnotationError, match="annotation file not found") as ei:
        load_annotations(jp, tmp_path)
    assert str(jp) in str(ei.value)


def test_not_json_reports_line_and_column(tmp_path):
    jp, img_dir = _setup(tmp_path, None, raw='{\n  "images": {\n    "a.jpg": {"words": {,}}\n  }\n}')
    with pytest.raises(AnnotationError) as ei:
        load_annotations(jp, img_dir)
    msg = str(ei.value)
    assert str(jp) in msg and "not valid JSON" in msg and "line 3, column" in msg
    # file-level problems raise even in skip mode
    with pytest.raises(AnnotationError, match="not valid JSON"):
        load_annotations(jp, img_dir, on_error="skip")


def test_not_utf8(tmp_path):
    jp, img_dir = _setup(tmp_path, {"images": {}})
    jp.write_bytes(b'{"images": {"\xff.jpg": {"words": {}}}}')
    with pytest.raises(AnnotationError, match="not valid UTF-8"):
        load_annotations(jp, img_dir)


@pytest.mark.parametrize(
    "doc, expected",
    [
        ([1, 2], "top level must be an object"),
        ({"imgs": {}}, 'top-level key "images" is missing'),
        ({"images": []}, 'top-level "images" must be an object'),
        ({"images": None}, 'top-level "images" must be an object'),
    ],
)
def test_top_level_errors(tmp_path, doc, expected):
    jp, img_dir = _setup(tmp_path, doc)
    for mode in ("raise", "skip"):
        with pytest.raises(AnnotationError) as ei:
            load_annotations(jp, img_dir, on_error=mode)
        assert expected in str(ei.value) and str(jp) in str(ei.value)


def test_duplicate_images_key_at_top_level(tmp_path):
    jp, img_dir = _setup(tmp_path, None, raw='{"images": {}, "images": {}}')
    with pytest.raises(AnnotationError, match='"images" appears more than once'):
        load_annotations(jp, img_dir)


# --------------------------------------------------------------------------- image / word errors

IMG = "im1.jpg"

# (id, words or image entry, expected message part, reason, word id or None, field or None)
ERROR_CASES = [
    ("image_not_object", {"images": {IMG: []}}, "image entry must be an object", "bad_image_entry", None, None),
    ("no_words", {"images": {IMG: {"wrds": {}}}}, 'has no "words" key', "missing_words", None, None),
    ("words_list", {"images": {IMG: {"words": []}}}, "must be an object mapping word ids", "bad_words", None, "words"),
    ("word_not_object", {"images": {IMG: {"words": {"0007": SQUARE}}}}, "word must be an object", "bad_word", "0007", None),
    ("no_points", {"images": {IMG: {"words": {"0007": {"transcription": "x"}}}}}, 'word has no "points"', "missing_points", "0007", "points"),
    ("points_not_list", {"images": {IMG: {"words": {"0007": _word(points="1,2,3,4")}}}}, "expected an array of [x, y] points", "bad_points", "0007", "points"),
    ("three_points", {"images": {IMG: {"words": {"0007": _word(points=SQUARE[:3])}}}}, "has 3 point(s), a polygon needs at least 4", "too_few_points", "0007", "points"),
    ("empty_points", {"images": {IMG: {"words": {"0007": _word(points=[])}}}}, "has 0 point(s)", "too_few_points", "0007", "points"),
    ("point_triple", {"images": {IMG: {"words": {"0007": _word(points=[[1, 2, 3]] + SQUARE[1:])}}}}, "point 0 is not a pair of numbers", "bad_point", "0007", "points"),
    ("point_scalar", {"images": {IMG: {"words": {"0007": _word(points=SQUARE[:3] + [5])}}}}, "point 3 is not a pair of numbers", "bad_point", "0007", "points"),
    ("coord_string", {"images": {IMG: {"words": {"0007": _word(points=[["10", 20]] + SQUARE[1:])}}}}, "point 0 has a non-numeric x coordinate", "non_numeric_coordinate", "0007", "points"),
    ("coord_bool", {"images": {IMG: {"words": {"0007": _word(points=[[10, True]] + SQUARE[1:])}}}}, "point 0 has a non-numeric y coordinate", "non_numeric_coordinate", "0007", "points"),
    ("coord_null", {"images": {IMG: {"words": {"0007": _word(points=SQUARE[:2] + [[None, 1]] + SQUARE[3:])}}}}, "point 2 has a non-numeric x coordinate", "non_numeric_coordinate", "0007", "points"),
    ("coord_nan", {"images": {IMG: {"words": {"0007": _word(points=[[float("nan"), 1]] + SQUARE[1:])}}}}, "point 0 has a non-finite x coordinate", "non_finite_coordinate", "0007", "points"),
    ("coord_inf", {"images": {IMG: {"words": {"0007": _word(points=SQUARE[:1] + [[1, float("-inf")]] + SQUARE[2:])}}}}, "point 1 has a non-finite y coordinate", "non_finite_coordinate", "0007", "points"),
    ("coord_float32_overflow", {"images": {IMG: {"words": {"0007": _word(points=[[1e300, 1]] + SQUARE[1:])}}}}, "non-finite x coordinate", "non_finite_coordinate", "0007", "points"),
    ("transcription_number", {"images": {IMG: {"words": {"0007": _word(text=42)}}}}, "must be a string, got number", "bad_transcription", "0007", "transcription"),
    ("name_dotdot", {"images": {"../im1.jpg": {"words": {}}}}, "must not contain '..'", "bad_image_name", None, None),
    ("name_absolute", {"images": {"/etc/im1.jpg": {"words": {}}}}, "must be a path relative", "bad_image_name", None, None),
]


@pytest.mark.parametrize(
    "doc, expected, reason, word_id, field",
    [c[1:] for c in ERROR_CASES],
    ids=[c[0] for c in ERROR_CASES],
)
def test_entry_errors_raise_with_location(tmp_path, doc, expected, reason, word_id, field):
    jp, img_dir = _setup(tmp_path, doc, images=[IMG])
    with pytest.raises(AnnotationError) as ei:
        load_annotations(jp, img_dir)
    msg = str(ei.value)
    assert expected in msg
    assert msg.startswith(str(jp))
    image = next(iter(doc["images"]))
    assert f"image {image!r}" in msg
    if word_id is not None:
        assert f"word {word_id!r}" in msg
    if field is not None:
        assert f"field {field!r}" in msg

    # skip mode: the problem is collected with the same message and a reason
    samples, problems = check_annotations(jp, img_dir)
    assert [p.reason for p in problems] == [reason]
    assert problems[0].message == msg
    assert problems[0].image == image and problems[0].word_id == word_id
    if word_id is None:  # image-level: image dropped
        assert samples == [] and problems[0].level == "image"
    else:  # word-level: image kept, word dropped
        assert [s.name for s in samples] == [IMG] and samples[0].num_words == 0
        assert problems[0].level == "word"


def test_missing_image_file(tmp_path):
    jp, img_dir = _setup(tmp_path, {"images": {"there.jpg": {"words": {}}, "gone.jpg": {"words": {}}}}, images=["there.jpg"])
    with pytest.raises(AnnotationError) as ei:
        load_annotations(jp, img_dir)
    msg = str(ei.value)
    assert str(jp) in msg and "image 'gone.jpg'" in msg and "image file not found" in msg
    assert str(img_dir / "gone.jpg") in msg
    samples = load_annotations(jp, img_dir, on_error="skip")
    assert [s.name for s in samples] == ["there.jpg"]


def test_duplicate_image_names(tmp_path):
    raw = (
        '{"images": {"a.jpg": {"words": {"1": {"points": [[0,0],[1,0],[1,1],[0,1]], "transcription": "first"}}},'
        ' "b.jpg": {"words": {}},'
        ' "a.jpg": {"words": {"1": {"points": [[0,0],[2,0],[2,2],[0,2]], "transcription": "second"}}}}}'
    )
    jp, img_dir = _setup(tmp_path, None, raw=raw, images=["a.jpg", "b.jpg"])
    with pytest.raises(AnnotationError) as ei:
        load_annotations(jp, img_dir)
    msg = str(ei.value)
    assert str(jp) in msg and "image 'a.jpg'" in msg and "appears 2 times" in msg
    samples, problems = check_annotations(jp, img_dir)
    assert [p.reason for p in problems] == ["duplicate_image"]
    assert [s.name for s in samples] == ["a.jpg", "b.jpg"]
    assert samples[0].transcriptions == ("first",)  # first entry kept


def test_duplicate_word_ids(tmp_path):
    raw = (
        '{"images": {"a.jpg": {"words": {'
        '"0001": {"points": [[0,0],[1,0],[1,1],[0,1]], "transcription": "one"},'
        '"0002": {"points": [[0,0],[1,0],[1,1],[0,1]], "transcription": "two"},'
        '"0001": {"points": [[0,0],[1,0],[1,1],[0,1]], "transcription": "dup"}}}}}'
    )
    jp, img_dir = _setup(tmp_path, None, raw=raw, images=["a.jpg"])
    with pytest.raises(AnnotationError) as ei:
        load_annotations(jp, img_dir)
    msg = str(ei.value)
    assert str(jp) in msg and "image 'a.jpg'" in msg and "word '0001'" in msg
    assert "word id appears 2 times" in msg
    samples, problems = check_annotations(jp, img_dir)
    assert [p.reason for p in problems] == ["duplicate_word_id"]
    assert samples[0].word_ids == ("0001", "0002")
    assert samples[0].transcriptions == ("one", "two")


def test_duplicate_field_in_word(tmp_path):
    raw = '{"images": {"a.jpg": {"words": {"9": {"points": [[0,0],[1,0],[1,1],[0,1]], "points": []}}}}}'
    jp, img_dir = _setup(tmp_path, None, raw=raw, images=["a.jpg"])
    with pytest.raises(AnnotationError, match=r"word '9', field 'points': key appears more than once"):
        load_annotations(jp, img_dir)


def test_nan_and_infinity_json_literals(tmp_path):
    raw = '{"images": {"a.jpg": {"words": {"1": {"points": [[NaN,0],[1,0],[1,1],[0,1]]}, "2": {"points": [[0,0],[Infinity,0],[1,1],[0,1]]}}}}}'
    jp, img_dir = _setup(tmp_path, None, raw=raw, images=["a.jpg"])
    with pytest.raises(AnnotationError, match="word '1', field 'points': point 0 has a non-finite x"):
        load_annotations(jp, img_dir)
    _, problems = check_annotations(jp, img_dir)
    assert [p.word_id for p in problems] == ["1", "2"]


# --------------------------------------------------------------------------- skip mode


def test_skip_mode_drops_bad_words_and_images_and_logs_one_warning(tmp_path, caplog):
    doc = {
        "images": {
            "ok.jpg": {"words": {"1": _word(), "2": _word(text=DONT_CARE)}},
            "mixed.jpg": {
                "words": {
                    "1": _word(text="good"),
                    "2": _word(points=SQUARE[:3]),
                    "3": {"transcription": "no points"},
                    "4": _word(points=[["a", 1]] + SQUARE[1:]),
                    "5": _word(points=SQUARE[:2]),
                }
            },
            "badwords.jpg": {"words": "nope"},
            "nofile.jpg": {"words": {"1": _word()}},
        }
    }
    jp, img_dir = _setup(tmp_path, doc, images=["ok.jpg", "mixed.jpg", "badwords.jpg"])
    with caplog.at_level(logging.WARNING, logger="ocr.data.annotations"):
        samples = load_annotations(jp, img_dir, on_error="skip")

    assert [s.name for s in samples] == ["mixed.jpg", "ok.jpg"]
    mixed, ok = samples
    assert mixed.word_ids == ("1",) and mixed.transcriptions == ("good",)
    assert ok.ignore == (False, True)

    records = [r for r in caplog.records if r.name == "ocr.data.annotations"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    text = records[0].getMessage()
    assert "6 problem(s)" in text
    for part in (
        "too_few_points=2",
        "missing_points=1",
        "non_numeric_coordinate=1",
        "bad_words=1",
        "missing_image_file=1",
        "dropped 2 image",
    ):
        assert part in text, part
    # the first few full messages are included, then a count of the rest
    assert "word '2'" in text and "... and 1 more" in text

    _, problems = check_annotations(jp, img_dir)
    assert len(problems) == 6
    assert sorted({p.level for p in problems}) == ["image", "word"]


def test_clean_file_logs_nothing(tmp_path, caplog):
    jp, img_dir = _setup(tmp_path, {"images": {"a.jpg": {"words": {"1": _word()}}}})
    with caplog.at_level(logging.DEBUG, logger="ocr.data.annotations"):
        load_annotations(jp, img_dir, on_error="skip")
    assert not [r for r in caplog.records if r.name == "ocr.data.annotations"]


# --------------------------------------------------------------------------- saving


def test_round_trip_samples(tmp_path):
    doc = {
        "images": {
            "b.jpg": {"words": {"0001": _word(points=[[0.1, 0.25], [100, 0], [100.5, 33.3], [0, 40]]), "0002": _word(text=DONT_CARE)}},
            "a.jpg": {"words": {}},
        }
    }
    jp, img_dir = _setup(tmp_path, doc)
    samples = load_annotations(jp, img_dir)
    out = tmp_path / "sub" / "out.json"
    save_annotations(out, samples)
    again = load_annotations(out, img_dir)
    assert again == samples
    assert samples_to_json(again) == samples_to_json(samples)

    text = out.read_text(encoding="utf-8")
    data = json.loads(text)
    # plain numbers: ints stay ints, float32 values use the shortest repr
    assert data["images"]["b.jpg"]["words"]["0001"]["points"] == [[0.1, 0.25], [100, 0], [100.5, 33.3], [0, 40]]
    assert "100.0" not in text and "0.10000000149" not in text
    assert list(data["images"]) == ["a.jpg", "b.jpg"]
    # no temp files left behind
    assert [p.name for p in out.parent.iterdir()] == ["out.json"]


def test_save_mapping_keeps_extra_fields_and_accepts_numpy(tmp_path):
    images = {
        "x.png": {
            "words": {
                "0001": {"points": np.array(SQUARE, dtype=np.float32), "transcription": "hi", "score": 0.5},
                "0002": {"points": np.array(SQUARE, dtype=np.int64), "transcription": DONT_CARE},
            },
            "language": "en",
        }
    }
    out = tmp_path / "m.json"
    save_annotations(out, images)
    data = json.loads(out.read_text())
    w = data["images"]["x.png"]["words"]
    assert w["0001"] == {"points": SQUARE, "transcription": "hi", "score": 0.5}
    assert w["0002"]["points"] == SQUARE
    assert data["images"]["x.png"]["language"] == "en"
    (s,) = load_annotations(out, tmp_path, check_images=False)
    assert s.ignore == (False, True)

    # the full document form is accepted too
    out2 = tmp_path / "m2.json"
    save_annotations(out2, data)
    assert json.loads(out2.read_text()) == data


def test_save_overwrites_atomically_and_rejects_nan(tmp_path):
    out = tmp_path / "a.json"
    save_annotations(out, {"a.jpg": {"words": {}}})
    before = out.read_bytes()
    bad = {"a.jpg": {"words": {"1": {"points": [[float("nan"), 0], [1, 0], [1, 1], [0, 1]]}}}}
    with pytest.raises(ValueError, match="not finite"):
        save_annotations(out, bad)
    assert out.read_bytes() == before  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    save_annotations(out, {"b.jpg": {"words": {}}})
    assert json.loads(out.read_text()) == {"images": {"b.jpg": {"words": {}}}}


def test_save_rejects_garbage(tmp_path):
    with pytest.raises(TypeError):
        save_annotations(tmp_path / "x.json", [{"name": "a.jpg"}])
    with pytest.raises(ValueError, match="words"):
        save_annotations(tmp_path / "x.json", {"a.jpg": {"wrds": {}}})
