"""evaluate_files + the ``python -m ocr.metrics`` CLI on temporary JSON files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ocr.metrics import AnnotationError, evaluate_files
from ocr.metrics.__main__ import main

REPO_ROOT = Path(__file__).resolve().parents[3]


def rect(x, y, w=100, h=25):
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]


GT = {
    "images": {
        "a.jpg": {
            "words": {
                "0001": {"points": rect(10, 10), "transcription": "abcd"},
                "0002": {"points": rect(10, 60), "transcription": "efgh"},
                "0003": {"points": rect(10, 110), "transcription": "###"},
            }
        },
        "b.jpg": {"words": {"0001": {"points": rect(10, 10), "transcription": "ijkl"}}},
        "c.jpg": {"words": {}},
    }
}

# a.jpg: word 1 found (8-point polygon with a score), word 2 missed, the don't-care word detected;
# b.jpg: omitted (= no detections); c.jpg: nothing on either side.
PRED = {
    "images": {
        "a.jpg": {
            "words": {
                "0001": {
                    "points": [[10, 10], [43, 10], [77, 10], [110, 10], [110, 35], [77, 35], [43, 35], [10, 35]],
                    "score": 0.9,
                },
                "0002": {"points": rect(10, 110), "score": 0.5},
            }
        },
        "c.jpg": {"words": {}},
    }
}

# 1 of 3 counted words found, 1 of 1 counted detection correct (the don't-care hit is dropped).
EXPECTED = {"precision": 1.0, "recall": 1 / 3, "hmean": 0.5}


def write(tmp_path: Path, name: str, obj) -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def check(result: dict) -> None:
    assert set(result) == {"cleval", "iou"}
    for metric in result.values():
        assert metric == pytest.approx(EXPECTED)


def test_evaluate_files(tmp_path):
    check(evaluate_files(write(tmp_path, "gt.json", GT), write(tmp_path, "pred.json", PRED)))


def test_main_prints_one_json_object(tmp_path, capsys):
    gt, pred = write(tmp_path, "gt.json", GT), write(tmp_path, "pred.json", PRED)
    assert main(["--gt", str(gt), "--pred", str(pred)]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    check(json.loads(out))


def test_cli_subprocess(tmp_path):
    gt, pred = write(tmp_path, "gt.json", GT), write(tmp_path, "pred.json", PRED)
    cmd = [sys.executable, "-m", "ocr.metrics", "--gt", str(gt), "--pred", str(pred)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1
    check(json.loads(proc.stdout))

    bad = write(tmp_path, "bad.json", "{not json")
    cmd = [sys.executable, "-m", "ocr.metrics", "--gt", str(gt), "--pred", str(bad)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "bad.json" in proc.stderr


def _word(points, **extra):
    return {"images": {"a.jpg": {"words": {"0001": {"points": points, **extra}}}}}


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "invalid JSON"),
        ([], "'images'"),
        ({"imgs": {}}, "'images'"),
        ({"images": []}, "'images'"),
        ({"images": {"a.jpg": {}}}, "'a.jpg'"),
        ({"images": {"a.jpg": {"words": []}}}, "words"),
        ({"images": {"a.jpg": {"words": {"0001": {"transcription": "x"}}}}}, "'points'"),
        (_word(rect(0, 0)[:3]), "at least 4"),
        (_word([[0, 0], [1, 1], [2, 2], ["x", 3]]), "points[3]"),
        (_word([[0, 0], [1, 1], [2, 2], [3]]), "points[3]"),
        (_word(rect(0, 0), transcription=5), "transcription"),
        (_word(rect(0, 0), score="high"), "score"),
    ],
)
def test_malformed_prediction_file(tmp_path, capsys, content, needle):
    gt, pred = write(tmp_path, "gt.json", GT), write(tmp_path, "pred.json", content)
    with pytest.raises(AnnotationError) as info:
        evaluate_files(gt, pred)
    assert "pred.json" in str(info.value) and needle in str(info.value)
    assert main(["--gt", str(gt), "--pred", str(pred)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "pred.json" in captured.err


def test_malformed_gt_file_is_named(tmp_path):
    gt = write(tmp_path, "gt.json", {"images": {"a.jpg": {"words": {"7": {"points": "nope"}}}}})
    with pytest.raises(AnnotationError, match=r"gt\.json.*'7'.*points"):
        evaluate_files(gt, write(tmp_path, "pred.json", {"images": {}}))


def test_missing_file(tmp_path, capsys):
    gt = write(tmp_path, "gt.json", GT)
    missing = tmp_path / "nowhere.json"
    assert main(["--gt", str(gt), "--pred", str(missing)]) == 2
    assert "nowhere.json" in capsys.readouterr().err
    assert main(["--gt", str(missing), "--pred", str(gt)]) == 2
    assert "nowhere.json" in capsys.readouterr().err


def test_prediction_for_unknown_image(tmp_path, capsys):
    gt = write(tmp_path, "gt.json", GT)
    pred = write(tmp_path, "pred.json", {"images": {"zzz.jpg": {"words": {}}}})
    with pytest.raises(AnnotationError, match="zzz.jpg"):
        evaluate_files(gt, pred)
    assert main(["--gt", str(gt), "--pred", str(pred)]) == 2
    assert "zzz.jpg" in capsys.readouterr().err
