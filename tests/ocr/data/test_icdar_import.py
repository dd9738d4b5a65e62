"""Tests for ocr.data.icdar_import (ICDAR 2015 / SROIE text labels)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from ocr.data.annotations import DONT_CARE, AnnotationError, load_annotations
from ocr.data.icdar_import import import_icdar_txt, parse_icdar_txt

BOM = b"\xef\xbb\xbf"


def _dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    img, lab = tmp_path / "images", tmp_path / "labels"
    img.mkdir()
    lab.mkdir()
    return img, lab, tmp_path / "out" / "ann.json"


def _touch(d: Path, *names: str) -> None:
    for n in names:
        (d / n).write_bytes(b"not really an image")


def test_icdar2015_style(tmp_path):
    img, lab, out = _dirs(tmp_path)
    _touch(img, "img_1.jpg", "img_12.JPG", "notes.txt")
    (lab / "gt_img_1.txt").write_bytes(
        BOM
        + (
            "377,117,463,117,465,130,378,130,Genaxis Theatre\r\n"
            "493,115,519,115,519,131,493,131,[06]\r\n"
            "374,155,409,155,409,170,374,170,###\r\n"
            "\r\n"
            "100,1,200,1,200,50,100,50,1,000,000 \r\n"  # commas in transcription, trailing space
            "   \r\n"
        ).encode("utf-8")
    )
    (lab / "gt_img_12.txt").write_bytes(BOM)  # an image without text

    stats = import_icdar_txt(img, lab, out)
    assert stats["images"] == 2 and stats["words"] == 4 and stats["dont_care"] == 1
    assert stats["skipped_lines"] == 0 and stats["skipped_images"] == 0 and stats["orphan_labels"] == 0

    data = json.loads(out.read_text(encoding="utf-8"))
    assert list(data["images"]) == ["img_1.jpg", "img_12.JPG"]
    words = data["images"]["img_1.jpg"]["words"]
    assert list(words) == ["0001", "0002", "0003", "0004"]
    assert words["0001"] == {
        "points": [[377, 117], [463, 117], [465, 130], [378, 130]],
        "transcription": "Genaxis Theatre",  # no BOM, no CR
    }
    assert words["0003"]["transcription"] == DONT_CARE
    assert words["0004"]["transcription"] == "1,000,000"
    assert data["images"]["img_12.JPG"] == {"words": {}}

    samples = load_annotations(out, img)
    assert [s.name for s in samples] == ["img_1.jpg", "img_12.JPG"]
    assert samples[0].ignore == (False, False, True, False)
    np.testing.assert_array_equal(samples[0].polygons[1], [[493, 115], [519, 115], [519, 131], [493, 131]])


def test_sroie_style_same_stem_and_shared_dir(tmp_path):
    d = tmp_path / "task1"
    d.mkdir()
    _touch(d, "X00016469612.jpg", "X00016469619.jpeg")
    (d / "X00016469612.txt").write_text(
        "72,25,326,25,326,64,72,64,TAN WOON YANN\n"
        "50,82,440,82,440,121,50,121,BOOK TA .K(TAMAN DAYA) SDN BND\n"
        "205,121,285,121,285,139,205,139,789417-W\n",
        encoding="utf-8",
    )
    (d / "X00016469619.txt").write_text("10.5,20,30,20,30,40.25,10,40\n", encoding="utf-8")  # no text
    out = tmp_path / "sroie.json"
    stats = import_icdar_txt(d, d, out)
    assert stats["images"] == 2 and stats["words"] == 4 and stats["dont_care"] == 0
    data = json.loads(out.read_text())
    w = data["images"]["X00016469612.jpg"]["words"]
    assert w["0002"]["transcription"] == "BOOK TA .K(TAMAN DAYA) SDN BND"
    w2 = data["images"]["X00016469619.jpeg"]["words"]["0001"]
    assert w2 == {"points": [[10.5, 20], [30, 20], [30, 40.25], [10, 40]], "transcription": ""}
    assert len(load_annotations(out, d)) == 2


def test_bad_line_raises_with_file_and_line(tmp_path):
    img, lab, out = _dirs(tmp_path)
    _touch(img, "img_1.jpg")
    (lab / "gt_img_1.txt").write_text("1,2,3,4,5,6,7,8,ok\n\n1,2,3,4,5,x,7,8,bad\n", encoding="utf-8")
    with pytest.raises(AnnotationError) as ei:
        import_icdar_txt(img, lab, out)
    msg = str(ei.value)
    assert str(lab / "gt_img_1.txt") in msg and "line 3" in msg and "'x' is not a finite number" in msg
    assert not out.exists()


@pytest.mark.parametrize(
    "line, expected",
    [
        ("1,2,3,4,5,6,7", "expected 8 comma-separated coordinates, found 7"),
        ("just some text", "found 1 field"),
        ("1,2,3,4,5,6,7,nan,x", "'nan' is not a finite number"),
        ("1,2,3,4,5,6,inf,8", "'inf' is not a finite number"),
        ("1,2,3,4,5,6,7,,x", "'' is not a finite number"),
        ("1_0,2,3,4,5,6,7,8", "'1_0' is not a finite number"),
    ],
)
def test_parse_errors(tmp_path, line, expected):
    p = tmp_path / "gt_a.txt"
    p.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(AnnotationError) as ei:
        parse_icdar_txt(p)
    assert expected in str(ei.value) and f"{p}, line 1" in str(ei.value)
    words, problems = parse_icdar_txt(p, on_error="skip")
    assert words == {} and len(problems) == 1


def test_skip_mode_counts_lines_and_unlabelled_images(tmp_path, caplog):
    img, lab, out = _dirs(tmp_path)
    _touch(img, "img_1.jpg", "img_2.png", "img_3.jpg")
    (lab / "gt_img_1.txt").write_text("1,2,3,4,5,6,7,8,a\nbroken\n9,9,9,9,9,9,9\n1,1,2,1,2,2,1,2,b\n", encoding="utf-8")
    (lab / "gt_img_2.txt").write_text("1,2,3,4,5,6,7,8,###\n", encoding="utf-8")
    (lab / "gt_img_99.txt").write_text("1,2,3,4,5,6,7,8,orphan\n", encoding="utf-8")  # no image

    with pytest.raises(AnnotationError, match=r"img_1.txt, line 2"):
        import_icdar_txt(img, lab, out)

    with caplog.at_level(logging.WARNING, logger="ocr.data.icdar_import"):
        stats = import_icdar_txt(img, lab, out, on_error="skip")
    assert stats["images"] == 2
    assert stats["words"] == 3 and stats["dont_care"] == 1
    assert stats["skipped_lines"] == 2
    assert stats["images_without_labels"] == 1 and stats["skipped_images"] == 1
    assert stats["orphan_labels"] == 1
    warnings = [r for r in caplog.records if r.name == "ocr.data.icdar_import" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped_lines=2" in warnings[0].getMessage() and "images_without_labels=1" in warnings[0].getMessage()

    data = json.loads(out.read_text())
    assert list(data["images"]) == ["img_1.jpg", "img_2.png"]
    # word ids are consecutive over the lines that parsed
    assert list(data["images"]["img_1.jpg"]["words"]) == ["0001", "0002"]
    assert data["images"]["img_1.jpg"]["words"]["0002"]["transcription"] == "b"


def test_image_without_label_raises(tmp_path):
    img, lab, out = _dirs(tmp_path)
    _touch(img, "img_1.jpg", "img_2.jpg")
    (lab / "gt_img_1.txt").write_text("1,2,3,4,5,6,7,8,a\n", encoding="utf-8")
    with pytest.raises(AnnotationError) as ei:
        import_icdar_txt(img, lab, out)
    assert str(img / "img_2.jpg") in str(ei.value) and "no label file" in str(ei.value)
    assert "gt_img_2.txt" in str(ei.value)


def test_ambiguous_pairing(tmp_path):
    img, lab, out = _dirs(tmp_path)
    _touch(img, "a.jpg", "b.jpg", "b.png")
    for n in ("a.txt", "gt_a.txt", "b.txt"):
        (lab / n).write_text("1,2,3,4,5,6,7,8,x\n", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"a\.jpg: ambiguous pairing"):
        import_icdar_txt(img, lab, out)
    stats = import_icdar_txt(img, lab, out, on_error="skip")
    assert stats["images"] == 0 and stats["ambiguous_labels"] == 3


def test_unreadable_label_file(tmp_path):
    img, lab, out = _dirs(tmp_path)
    _touch(img, "a.jpg", "b.jpg")
    (lab / "a.txt").write_bytes(b"1,2,3,4,5,6,7,8,caf\xe9\n")  # latin-1, not UTF-8
    (lab / "b.txt").write_text("1,2,3,4,5,6,7,8,ok\n", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"a\.txt: label file is not valid UTF-8"):
        import_icdar_txt(img, lab, out)
    stats = import_icdar_txt(img, lab, out, on_error="skip")
    assert stats["images"] == 1 and stats["unreadable_labels"] == 1


def test_missing_dirs_and_no_images(tmp_path):
    img, lab, out = _dirs(tmp_path)
    with pytest.raises(AnnotationError, match="no images"):
        import_icdar_txt(img, lab, out)
    with pytest.raises(AnnotationError, match="label directory not found"):
        import_icdar_txt(img, tmp_path / "nope", out)
