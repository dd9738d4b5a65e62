"""Tests for scripts/preprocess_data.py (import / canonicalize / validate)."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "preprocess_data.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("preprocess_data_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pp = _load_module()


def _jpeg(path: Path, orientation: int | None = None, size=(64, 32)) -> None:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG", exif=exif.tobytes())
    path.write_bytes(buf.getvalue())


@pytest.fixture
def icdar(tmp_path):
    img, lab = tmp_path / "images", tmp_path / "labels"
    img.mkdir()
    lab.mkdir()
    _jpeg(img / "img_1.jpg")
    _jpeg(img / "img_2.jpg", orientation=6)
    (lab / "gt_img_1.txt").write_bytes(
        b"\xef\xbb\xbf1,1,20,1,20,10,1,10,hello, world\r\n30,1,60,1,60,10,30,10,###\r\n"
    )
    (lab / "gt_img_2.txt").write_text("1,1,20,1,20,60,1,60,tall\n", encoding="utf-8")
    return img, lab


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_import_then_validate(icdar, tmp_path, capsys):
    img, lab = icdar
    out = tmp_path / "ann.json"
    assert pp.main(["import", "--images", str(img), "--labels", str(lab), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images: 2" in printed and "words: 3" in printed and "dont_care: 1" in printed
    data = json.loads(out.read_text())
    assert data["images"]["img_1.jpg"]["words"]["0001"]["transcription"] == "hello, world"

    assert pp.main(["validate", "--images", str(img), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images: 2" in printed
    assert "words: 3" in printed
    assert "don't-care words: 1" in printed
    assert "errors: 0" in printed
    # img_2 is 64x32 stored but displayed 32x64 (orientation 6): its tall box fits
    assert "words outside the (displayed) image: 0" in printed


def test_import_error_exits_2_with_one_line(icdar, tmp_path, capsys):
    img, lab = icdar
    (lab / "gt_img_2.txt").write_text("1,1,20,1,20,60,1\n", encoding="utf-8")
    out = tmp_path / "ann.json"
    args = ["import", "--images", str(img), "--labels", str(lab), "--out", str(out)]
    assert pp.main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "gt_img_2.txt, line 1" in line
    assert not out.exists()

    assert pp.main(args + ["--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "skipped_lines: 1" in printed
    assert json.loads(out.read_text())["images"]["img_2.jpg"] == {"words": {}}


def test_canonicalize(icdar, tmp_path, capsys):
    img, _ = icdar
    ann = tmp_path / "ann.json"
    ann.write_text('{"images": {"img_1.jpg": {"words": {}}, "img_2.jpg": {"words": {}}}}')
    out_img, out_json = tmp_path / "canon" / "images", tmp_path / "canon" / "ann.json"
    rc = pp.main(
        ["canonicalize", "--images", str(img), "--out-images", str(out_img),
         "--json", str(ann), "--out-json", str(out_json)]
    )
    assert rc == 0
    assert "rotated: 1" in capsys.readouterr().out
    assert (out_img / "img_1.jpg").read_bytes() == (img / "img_1.jpg").read_bytes()
    with Image.open(out_img / "img_2.jpg") as im:
        assert im.size == (32, 64) and 0x0112 not in im.getexif()
    assert out_json.read_bytes() == ann.read_bytes()


def test_canonicalize_json_without_out_json(icdar, tmp_path, capsys):
    img, _ = icdar
    rc = pp.main(["canonicalize", "--images", str(img), "--out-images", str(tmp_path / "o"),
                  "--json", str(tmp_path / "a.json")])
    assert rc == 2
    assert "--out-json" in _one_error_line(capsys.readouterr().err)


def test_validate_reports_problems(icdar, tmp_path, capsys):
    img, _ = icdar
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps({"images": {
        "img_1.jpg": {"words": {"1": {"points": [[0, 0], [1, 0], [1, 1]]},
                                "2": {"points": [[0, 0], [500, 0], [500, 5], [0, 5]], "transcription": "###"}}},
        "missing.jpg": {"words": {}},
    }}))
    assert pp.main(["validate", "--images", str(img), "--json", str(ann)]) == 1
    printed = capsys.readouterr().out
    assert "images: 1" in printed and "words: 1" in printed and "don't-care words: 1" in printed
    assert "errors: 2" in printed
    assert "[too_few_points]" in printed and "[missing_image_file]" in printed
    assert "words outside the (displayed) image: 1" in printed

    assert pp.main(["validate", "--images", str(img), "--json", str(ann), "--no-check-images"]) == 1
    assert "errors: 1" in capsys.readouterr().out


def test_validate_missing_or_broken_json_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert pp.main(["validate", "--images", str(tmp_path), "--json", str(missing)]) == 2
    assert str(missing) in _one_error_line(capsys.readouterr().err)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": \n  {"a": ]}')
    assert pp.main(["validate", "--images", str(tmp_path), "--json", str(broken)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(broken) in line and "line 2" in line


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as ei:
        pp.main([])
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        pp.main(["import", "--images", "x"])
    assert ei.value.code == 2


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    missing = tmp_path / "nope.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "validate", "--images", str(tmp_path), "--json", str(missing)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert r.returncode == 2
    assert str(missing) in _one_error_line(r.stderr)
    assert r.stdout == ""
