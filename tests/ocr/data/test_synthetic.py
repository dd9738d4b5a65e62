"""Tests for the built-in synthetic receipt dataset (ocr.data.synthetic)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from ocr.data import synthetic as S
from ocr.data.annotations import load_annotations

REPO = Path(__file__).resolve().parents[3]
COUNTS = dict(num_train=6, num_val=3, num_test=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "jsons" / f"{split}.json").read_text(encoding="utf-8"))["images"]


def _min_side(points) -> float:
    q = np.asarray(points, np.float64)
    e = np.linalg.norm(np.roll(q, -1, axis=0) - q, axis=1)
    return float(min(e[0], e[2], e[1], e[3]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "receipts"
    out = S.generate_dataset(root, seed=0, progress=False, **COUNTS)
    assert Path(out) == root
    return root


# --------------------------------------------------------------------------- layout / contract


def test_layout_and_marker(dataset: Path):
    marker = json.loads((dataset / "DATASET.json").read_text())
    assert marker["generator"] == "synthetic_receipts"
    assert marker["version"] == S.GENERATOR_VERSION and isinstance(S.GENERATOR_VERSION, int)
    assert marker["seed"] == 0
    assert marker["counts"] == {"train": 6, "val": 3, "test": 3}
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        files = sorted(p.name for p in (dataset / "images" / split).iterdir())
        assert files == [f"{split}_{i:05d}.jpg" for i in range(n)]
        assert sorted(_load(dataset, split)) == files
    # nothing but the dataset itself is left next to it (no temp dirs)
    assert [p.name for p in dataset.parent.iterdir() if p.name.startswith(".receipts.tmp")] == []


def test_json_contract(dataset: Path):
    n_words = 0
    for split in S.SPLITS:
        for name, entry in _load(dataset, split).items():
            img = cv2.imread(str(dataset / "images" / split / name))
            assert img is not None and img.dtype == np.uint8 and img.ndim == 3
            h, w = img.shape[:2]
            assert 500 <= w <= 800 and max(w, h) <= 1400 and 1.2 <= h / w <= 2.2
            assert set(entry) == {"words"}
            words = entry["words"]
            assert list(words) == [f"{k:04d}" for k in range(1, len(words) + 1)]
            assert 10 <= len(words) <= 50
            for wid, word in words.items():
                assert set(word) == {"points", "transcription"}
                t = word["transcription"]
                assert isinstance(t, str) and t and (t == "###" or " " not in t)
                pts = word["points"]
                assert len(pts) == 4
                for p in pts:
                    assert len(p) == 2 and all(isinstance(v, float) for v in p)
                    assert 0.0 <= p[0] <= w and 0.0 <= p[1] <= h, (name, wid, p)
                q = np.asarray(pts)
                # clockwise on screen (y down) == positive shoelace area; TL first
                area = 0.5 * np.sum(q[:, 0] * np.roll(q[:, 1], -1) - np.roll(q[:, 0], -1) * q[:, 1])
                assert area > 0
                assert q[0, 0] < q[1, 0] and q[0, 1] < q[3, 1]
                n_words += 1
    assert n_words > 100


def test_annotation_loader_accepts_it(dataset: Path):
    for split in S.SPLITS:
        samples = load_annotations(dataset / "jsons" / f"{split}.json", dataset / "images" / split)
        assert len(samples) == {"train": 6, "val": 3, "test": 3}[split]
        assert all(s.num_words > 0 for s in samples)


def test_dont_care_words_occur(dataset: Path):
    total = dc = 0
    for split in S.SPLITS:
        for entry in _load(dataset, split).values():
            for word in entry["words"].values():
                total += 1
                dc += word["transcription"] == "###"
    assert dc >= 3
    assert dc / total < 0.15


# --------------------------------------------------------------------------- geometry / pixels


def test_min_box_side_at_512(dataset: Path):
    sides = []
    for split in S.SPLITS:
        for name, entry in _load(dataset, split).items():
            h, w = cv2.imread(str(dataset / "images" / split / name)).shape[:2]
            k = 512.0 / max(h, w)
            sides += [_min_side(wd["points"]) * k for wd in entry["words"].values() if wd["transcription"] != "###"]
    # plus more receipts straight from the renderer
    for i in range(16):
        img, words = S.render_receipt(np.random.default_rng([123, 9, i]))
        k = 512.0 / max(img.shape[:2])
        sides += [_min_side(wd["points"]) * k for wd in words if wd["transcription"] != "###"]
    assert len(sides) > 300
    assert min(sides) >= S.MIN_SIDE_AT_512 == 10.0


def _poly_mask(shape, quads, dilate: int = 0) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for q in quads:
        cv2.fillPoly(m, [np.round((np.asarray(q) - 0.5) * 16).astype(np.int32)], 255, cv2.LINE_8, 4)
    if dilate:
        m = cv2.dilate(m, np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8))
    return m > 0


@pytest.mark.parametrize("index", range(8))
def test_ink_inside_words_paper_outside(index: int):
    img, words, extras = S._render_full(np.random.default_rng([7, 0, index]))
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    dark = 255.0 - gray.astype(np.float32)
    shape = gray.shape
    paper = _poly_mask(shape, [extras["paper"]])
    paper = cv2.erode(paper.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0  # away from paper edges
    readable = [w["points"] for w in words if w["transcription"] != "###"]
    inside = _poly_mask(shape, readable)
    covered = _poly_mask(shape, [w["points"] for w in words], dilate=3) | _poly_mask(shape, extras["separators"], dilate=3)
    outside = paper & ~covered
    assert inside.sum() > 0 and outside.sum() > 0.2 * paper.sum()

    # words are much darker on average than the bare paper
    assert dark[inside].mean() > dark[outside].mean() + 15

    # every readable word has ink: strong contrast between its darkest pixels and its paper
    for w in words:
        if w["transcription"] == "###":
            continue
        m = _poly_mask(shape, [w["points"]])
        vals = dark[m]
        assert np.percentile(vals, 97) - np.median(vals) > 40, w

    # outside the words and separators: paper only (no ink-like pixels against the local background)
    background = cv2.medianBlur(gray, 21).astype(np.float32)
    inkish = (background - gray.astype(np.float32)) > 50
    assert inkish[outside].mean() < 0.003


def test_render_receipt_api():
    img, words = S.render_receipt(np.random.default_rng(0))
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert isinstance(words, list) and words
    for w in words:
        assert set(w) == {"points", "transcription"} and len(w["points"]) == 4
    # same generator state -> same receipt
    img2, words2 = S.render_receipt(np.random.default_rng(0))
    assert np.array_equal(img, img2) and words == words2


# --------------------------------------------------------------------------- determinism / atomicity


def test_deterministic_and_per_image_seeds(tmp_path: Path):
    a = S.generate_dataset(tmp_path / "a", num_train=3, num_val=2, num_test=1, seed=3, progress=False)
    b = S.generate_dataset(tmp_path / "b", num_train=3, num_val=2, num_test=1, seed=3, progress=False)
    fa, fb = _files(Path(a)), _files(Path(b))
    assert fa.keys() == fb.keys() and len(fa) == 3 + 2 + 1 + 3 + 1
    assert all(fa[k] == fb[k] for k in fa)
    # images do not depend on the counts of the other splits
    c = S.generate_dataset(tmp_path / "c", num_train=1, num_val=2, num_test=2, seed=3, progress=False)
    fc = _files(Path(c))
    for k in ("images/train/train_00000.jpg", "images/val/val_00000.jpg", "images/val/val_00001.jpg",
              "images/test/test_00000.jpg"):
        assert fc[k] == fa[k]
    # another seed -> other images
    d = S.generate_dataset(tmp_path / "d", num_train=1, num_val=0, num_test=0, seed=4, progress=False)
    assert _files(Path(d))["images/train/train_00000.jpg"] != fa["images/train/train_00000.jpg"]


def test_atomic_on_failure(tmp_path: Path, monkeypatch):
    root = tmp_path / "ds"
    real = S.render_receipt
    calls = {"n": 0}

    def flaky(rng):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(rng)

    monkeypatch.setattr(S, "render_receipt", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        S.generate_dataset(root, num_train=4, num_val=1, num_test=1, seed=0, progress=False)
    assert not root.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    # a failing rebuild leaves the previous complete dataset untouched
    monkeypatch.setattr(S, "render_receipt", real)
    S.generate_dataset(root, num_train=2, num_val=1, num_test=1, seed=0, progress=False)
    before = _files(root)
    calls["n"] = 0
    monkeypatch.setattr(S, "render_receipt", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        S.generate_dataset(root, num_train=4, num_val=1, num_test=1, seed=1, progress=False)
    assert _files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["ds"]


def test_ensure_dataset_regenerates_when_stale(tmp_path: Path, monkeypatch, caplog):
    root = tmp_path / "ds"
    runs = []
    real = S._generate_unlocked
    monkeypatch.setattr(S, "_generate_unlocked", lambda *a, **k: runs.append(a) or real(*a, **k))
    kw = dict(num_train=2, num_val=1, num_test=1, progress=False)

    assert Path(S.ensure_dataset(root, seed=0, **kw)) == root
    assert len(runs) == 1
    S.ensure_dataset(root, seed=0, **kw)  # complete and matching: kept
    assert len(runs) == 1

    marker = json.loads((root / "DATASET.json").read_text())
    marker["seed"] = 7
    (root / "DATASET.json").write_text(json.dumps(marker))
    with caplog.at_level(logging.INFO, logger="ocr.data.synthetic"):
        S.ensure_dataset(root, seed=0, **kw)
    assert len(runs) == 2
    assert json.loads((root / "DATASET.json").read_text())["seed"] == 0
    assert any(r.name == "ocr.data.synthetic" and "seed" in r.getMessage() for r in caplog.records)

    # other counts / version / a missing image also trigger a rebuild
    S.ensure_dataset(root, seed=0, num_train=3, num_val=1, num_test=1, progress=False)
    assert len(runs) == 3
    monkeypatch.setattr(S, "GENERATOR_VERSION", S.GENERATOR_VERSION + 1)
    S.ensure_dataset(root, seed=0, num_train=3, num_val=1, num_test=1, progress=False)
    assert len(runs) == 4
    (root / "images" / "val" / "val_00000.jpg").unlink()
    S.ensure_dataset(root, seed=0, num_train=3, num_val=1, num_test=1, progress=False)
    assert len(runs) == 5 and (root / "images" / "val" / "val_00000.jpg").is_file()


def test_ensure_dataset_concurrent_calls_generate_once(tmp_path: Path, monkeypatch):
    root = tmp_path / "ds"
    runs = []
    real = S._generate_unlocked
    monkeypatch.setattr(S, "_generate_unlocked", lambda *a, **k: runs.append(a) or real(*a, **k))
    errors = []

    def call():
        try:
            S.ensure_dataset(root, num_train=2, num_val=1, num_test=1, seed=0, progress=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(runs) == 1
    assert json.loads((root / "DATASET.json").read_text())["counts"] == {"train": 2, "val": 1, "test": 1}


def test_foreign_directories_are_not_deleted(tmp_path: Path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="refusing"):
        S.generate_dataset(root, num_train=1, num_val=0, num_test=0, progress=False)
    assert (root / "notes.txt").read_text() == "keep me"
    # ensure_dataset moves such a directory aside instead of deleting it
    S.ensure_dataset(root, num_train=1, num_val=0, num_test=0, progress=False)
    assert (root / "DATASET.json").is_file()
    assert (tmp_path / "mine.orphaned-0" / "notes.txt").read_text() == "keep me"


def test_cli(tmp_path: Path):
    root = tmp_path / "cli"
    cmd = [sys.executable, str(REPO / "scripts" / "make_synthetic_data.py"), "--root", str(root),
           "--num-train", "1", "--num-val", "1", "--num-test", "0", "--seed", "2", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    marker = json.loads((root / "DATASET.json").read_text())
    assert marker["seed"] == 2 and marker["counts"] == {"train": 1, "val": 1, "test": 0}
    mtime = (root / "DATASET.json").stat().st_mtime_ns
    r = subprocess.run(cmd + ["--force"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (root / "DATASET.json").stat().st_mtime_ns != mtime


# --------------------------------------------------------------------------- exact geometry


_STYLES = ([S._Style("hershey", f | it, sc, t) for f in S._HERSHEY_FACES + S._HERSHEY_SCRIPT
            for it in (0, cv2.FONT_ITALIC) for sc, t in ((0.7, 1), (1.3, 3))]
           + ([S._Style("face", n, sz, w) for n in S._FACE_NAMES for sz, w in ((18, 300), (40, 800))]
              if S._HAS_FONTFACE else []))


@pytest.mark.parametrize("style", _STYLES, ids=lambda st: f"{st.renderer}-{st.face}-{st.size}-{st.weight}")
def test_word_box_is_tight_on_flat_paper(style):
    """On the flat paper a word box contains all the word's ink and hugs it: horizontally the
    ink +- pad, vertically the style's ascender..descender band + pad."""
    for text in ("TOTAL", "Shopping", "12.50", "$7.99", "gjpqy", "(A)", "#1234", "jeff/", "Wy"):
        paper = S._Paper(600, 200, 10, 590)
        paper.draw_word(text, 40, 50, style, style.box_h)
        x0, y0, x1, y1 = paper.words[0]["box"]
        ys, xs = np.nonzero(paper.mask >= 64)
        # pixel (row i, col j) covers [j, j+1) x [i, i+1)
        assert x0 <= xs.min() and xs.max() + 1 <= x1 and y0 <= ys.min() and ys.max() + 1 <= y1, (text, style)
        if x1 - x0 > 0.86 * (y1 - y0):  # (very narrow words are widened on purpose)
            assert xs.min() - x0 <= style.pad and x1 - (xs.max() + 1) <= style.pad
        slack = style.pad + max(3.0, 0.15 * style.box_h)
        assert ys.min() - y0 <= slack  # all these reach (about) the ascender line
        if text in ("gjpqy", "Shopping"):  # and these the descender line
            assert y1 - (ys.max() + 1) <= slack
        assert y1 - y0 >= style.box_h


def test_warp_maps_points_exactly():
    """The image warp and the polygon transform agree (same homography, same pixel convention)."""
    img = np.zeros((300, 200), np.uint8)
    img[100:104, 60:64] = 255  # a 4x4 square covering [60, 64) x [100, 104): centre (62, 102)
    src = np.float32([[0, 0], [200, 0], [200, 300], [0, 300]])
    dst = np.float32([[10, 5], [205, 12], [198, 310], [3, 296]])
    m = cv2.getPerspectiveTransform(src, dst).astype(np.float64)
    out = S._warp(img, m, (260, 340)).astype(np.float64)
    out[out < 0] = 0
    ys, xs = np.mgrid[0:out.shape[0], 0:out.shape[1]]
    cx = (out * (xs + 0.5)).sum() / out.sum()
    cy = (out * (ys + 0.5)).sum() / out.sum()
    ex, ey = S._apply_h(m, np.array([[62.0, 102.0]]))[0]
    assert abs(cx - ex) < 0.1 and abs(cy - ey) < 0.1


def test_image_without_words_is_written_validly(tmp_path: Path, monkeypatch):
    real = S.render_receipt

    def sometimes_blank(rng):
        img, words = real(rng)
        return (img, []) if len(words) % 2 else (img, words)

    monkeypatch.setattr(S, "render_receipt", sometimes_blank)
    root = S.generate_dataset(tmp_path / "ds", num_train=4, num_val=0, num_test=0, progress=False)
    images = _load(Path(root), "train")
    assert len(images) == 4 and any(entry == {"words": {}} for entry in images.values())
