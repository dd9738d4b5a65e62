"""The validation scoring pool: identical to serial scoring, JIT paid in the worker initializer."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from ocr.metrics import DetectionEvaluator
from ocr.training.scoring import ScoringPool, resolve_workers, score_batches, score_serial

PP = {"thresh": 0.3, "box_thresh": 0.4, "unclip_ratio": 1.5, "max_candidates": 1000, "min_size": 3, "output": "quad"}
MAP = 96  # network-input size of the synthetic probability maps

# cleval's kernels that a detection-only evaluation calls (lcs is end-to-end only)
DETECTION_KERNELS = ("one_to_one_match", "one_to_many_match", "many_to_one_match", "get_gran_score", "harmonic_mean")


def _rect(x: float, y: float, w: float, h: float) -> np.ndarray:
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float32)


def make_batches(num_batches: int = 3, batch: int = 3, seed: int = 0) -> list[dict]:
    """Batches of (probability map, GT) pairs with known polygons: each GT word (original
    pixels) is drawn shrunk into the map at scale ``MAP / max(h, w)``; some words are missed,
    one is don't care, and one spurious blob per image is a false positive."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(num_batches):
        probs = np.zeros((batch, 1, MAP, MAP), np.float32)
        mats = np.zeros((batch, 3, 3))
        sizes = np.zeros((batch, 2), np.int64)
        polygons, ignore, names = [], [], []
        for i in range(batch):
            h, w = int(rng.integers(150, 220)), int(rng.integers(120, 200))
            s = MAP / max(h, w)
            mats[i] = np.diag([s, s, 1.0])
            sizes[i] = (h, w)
            words = [_rect(float(rng.uniform(5, 20)) + 60 * col, 12 + 28 * row, float(rng.uniform(35, 50)), 16)
                     for row in range(h // 28 - 1) for col in range(w // 60 - 1 or 1)]
            flags = [k == 1 for k in range(len(words))]  # word 1: don't care
            prob = np.full((MAP, MAP), 0.02, np.float32)
            for k, word in enumerate(words):
                if k % 5 == 3:
                    continue  # missed
                q = word * s
                c = q.mean(0)
                q = c + (q - c) * np.array([0.8, 0.5])
                cv2.fillPoly(prob, [np.round(q).astype(np.int32)], float(rng.uniform(0.6, 0.95)))
            x0, y0 = int(rng.integers(0, MAP - 20)), int(rng.integers(MAP // 2, MAP - 8))
            cv2.rectangle(prob, (x0, y0), (x0 + 12, y0 + 4), 0.9, -1)
            probs[i, 0] = cv2.GaussianBlur(prob, (3, 3), 0.8)
            polygons.append(words)
            ignore.append(flags)
            names.append(f"img_{b}_{i}.jpg")
        out.append({"prob_maps": probs, "matrices": mats, "orig_sizes": sizes, "polygons": polygons,
                    "ignore": ignore, "names": names})
    return out


@pytest.fixture(scope="module")
def batches():
    return make_batches()


@pytest.fixture(scope="module")
def reference(batches):
    return score_serial(batches, PP)


@pytest.fixture(scope="module")
def pool():
    pool = ScoringPool(PP, workers=2).start(wait=True)
    yield pool
    pool.close()


def _same(a: DetectionEvaluator, b: DetectionEvaluator) -> bool:
    return a.counts() == b.counts() and a.compute() == b.compute() and list(a._by_key) == list(b._by_key)


def test_reference_is_not_trivial(reference, batches):
    res = reference.compute()
    assert len(reference) == sum(len(b["names"]) for b in batches)
    assert 0.3 < res["cleval"]["recall"] < 1.0  # missed words
    assert 0.3 < res["cleval"]["precision"] < 1.0  # spurious blobs
    assert 0.3 < res["iou"]["hmean"] < 1.0


@pytest.mark.parametrize("shared_memory,chunk", [(True, 1), (True, 2), (False, 1)])
def test_pool_result_is_identical_to_serial(pool, batches, reference, shared_memory, chunk):
    pool.shared_memory, pool.chunk = shared_memory, chunk
    try:
        result = score_batches(batches, PP, pool=pool)
    finally:
        pool.shared_memory, pool.chunk = True, 1
    assert _same(result, reference)


def test_pool_accepts_tensors_and_is_reused_across_rounds(pool, batches, reference):
    import torch

    as_tensors = [dict(b, prob_maps=torch.from_numpy(b["prob_maps"]), matrices=torch.from_numpy(b["matrices"]),
                       orig_sizes=torch.from_numpy(b["orig_sizes"])) for b in batches]
    pids = [w["pid"] for w in pool.worker_info()]
    before = pool.wait_seconds
    for _ in range(2):  # two "epochs" on the same workers
        for b in as_tensors:
            pool.submit(b["prob_maps"], b["matrices"], b["orig_sizes"], b["polygons"], b["ignore"], b["names"])
        assert pool.pending == len(as_tensors)
        assert _same(pool.result(), reference)
        assert pool.pending == 0
    assert [w["pid"] for w in pool.worker_info()] == pids
    assert pool.wait_seconds > before


def test_backpressure_keeps_order(batches, reference, pool):
    pool.max_pending = 1  # submit waits for the previous batch every time
    try:
        assert _same(score_batches(batches, PP, pool=pool), reference)
    finally:
        pool.max_pending = pool.workers + 2


def test_cleval_jit_is_paid_in_the_worker_initializer(pool, batches):
    score_batches(batches, PP, pool=pool)
    workers = pool.worker_info()
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    for w in workers:
        compiled = {name.rsplit(".", 1)[1]: n for name, n in w["kernels_after_warmup"].items()}
        assert all(compiled[k] >= 1 for k in DETECTION_KERNELS), compiled
        # scoring real images compiled nothing more: the first validation batch pays no JIT
        assert w["kernels_now"] == w["kernels_after_warmup"]
        assert w["warmup_seconds"] > 0
        assert not w["torch_imported_now"]  # workers stay light: no torch / torchvision


def test_serial_path(batches, reference):
    pool = ScoringPool(PP, workers=0)
    result = score_batches(batches, PP, pool=pool)
    assert _same(result, reference)
    assert pool.wait_seconds > 0  # serial: the scoring itself is the wait
    assert pool.worker_info() == []


def test_resolve_workers():
    assert resolve_workers(0) == 0 and resolve_workers(3) == 3
    assert resolve_workers(-1, cpus=16) == 4
    assert resolve_workers(-1, cpus=2) == 2
    assert resolve_workers(-1, cpus=1) == 0  # a single CPU: serial
    assert resolve_workers(-1, cpus=16, processes_per_node=8) == 2  # DDP: CPUs per rank
    with pytest.raises(ValueError):
        resolve_workers(-2)


def test_fork_is_refused():
    with pytest.raises(ValueError, match="spawn"):
        ScoringPool(PP, workers=1, start_method="fork")


def with_texts(batches: list[dict], length: int = 24) -> list[dict]:
    """The batches with line-level transcriptions (``length`` characters, far more than the
    3-4 characters CLEval would guess from the words' shapes); the don't-care word is ``###``."""
    return [dict(b, texts=[["###" if dc else f"{k:02d}".ljust(length, "x") for k, dc in enumerate(flags)]
                           for flags in b["ignore"]]) for b in batches]


def test_pool_scores_with_the_transcriptions(pool, batches, reference):
    texted = with_texts(batches)
    serial = score_serial(texted, PP)
    assert _same(score_batches(texted, PP, pool=pool), serial)
    assert _same(score_batches(texted, PP, pool=ScoringPool(PP, workers=0)), serial)
    # the characters counted are the transcriptions' (24 per counted word), not the shapes' guess
    counted = sum(not dc for b in batches for flags in b["ignore"] for dc in flags)
    assert serial.counts()["cleval"]["num_char_gt"] == 24 * counted
    assert reference.counts()["cleval"]["num_char_gt"] < 8 * counted


def test_close_removes_slot_files(pool, batches):  # last: closes the shared pool (it would restart on use)
    score_batches(batches, PP, pool=pool)
    mine = lambda: [f for f in os.listdir("/dev/shm") if f.startswith(f"ocr_scoring_{os.getpid()}_")]  # noqa: E731
    assert mine()
    pool.close()
    assert not mine() and not pool.started

