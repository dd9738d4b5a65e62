"""DBNetModule validation through the scoring pool: the epoch record splits validation time,
the pool lives across epochs and is closed at teardown, the metrics equal serial scoring, and
CLEval counts the split's transcriptions as ``python -m ocr.metrics`` does."""

from __future__ import annotations

import contextlib
import io
import json

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ocr.config import ModelConfig
from ocr.data.annotations import save_annotations
from ocr.metrics.__main__ import main as metrics_cli
from ocr.training.callbacks import EpochTimer, _epoch_line
from ocr.training.device_timer import DeviceTimer
from ocr.training.module import DBNetModule
from ocr.training.scoring import score_serial

SIZE = 64


def _batch(seed: int, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    word = np.array([[10, 10], [90, 10], [90, 30], [10, 30]], np.float32)
    zeros = torch.zeros(n, 1, SIZE, SIZE)
    return {
        "images": torch.randn(n, 3, SIZE, SIZE, generator=g),
        "prob_maps": zeros.clone(), "prob_masks": torch.ones(n, 1, SIZE, SIZE),
        "thresh_maps": zeros.clone(), "thresh_masks": torch.ones(n, 1, SIZE, SIZE),
        "polygons": [[word, word + [0, 40]] for _ in range(n)],
        "ignore": [[False, False] for _ in range(n)],
        "matrices": torch.tensor(np.tile(np.diag([0.5, 0.5, 1.0]), (n, 1, 1))),
        "orig_sizes": torch.tensor([[128, 128]] * n),
        "names": [f"{seed}_{i}.jpg" for i in range(n)],
    }


class _PoolProbe(L.Callback):
    """The module's scoring pool seen at every validation epoch end."""

    def __init__(self) -> None:
        self.seen = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pool = pl_module._scoring
        self.seen.append((id(pool), tuple(w["pid"] for w in pool.worker_info())))


def test_validation_epoch_record_and_pool(tmp_path):
    cfg = OmegaConf.to_container(OmegaConf.structured(ModelConfig))
    cfg.update(inner_channels=16, eval_workers=1, channels_last=False)
    cfg["postprocess"]["box_thresh"] = 0.3
    L.seed_everything(0)
    module = DBNetModule(cfg)
    train = [_batch(0)]
    val = [_batch(1), _batch(2)]
    loader = lambda data: DataLoader(data, batch_size=None, collate_fn=lambda b: b)  # noqa: E731
    timer, probe = EpochTimer(), _PoolProbe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[timer, probe], default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=loader(train), val_dataloaders=loader(val))

    for record in timer.epochs:
        assert record["val_loader_wait_seconds"] >= 0
        assert record["val_forward_seconds"] > 0
        assert record["val_scoring_seconds"] >= 0
        assert record["val_scoring_workers"] == 1
        assert "forward" in _epoch_line(record) and "scoring wait" in _epoch_line(record)
    # one pool (same workers) for both epochs, closed when fitting ended
    assert len(probe.seen) == 2 and probe.seen[0] == probe.seen[1] and len(probe.seen[0][1]) == 1
    assert module._scoring is None

    # the pool's metrics are those of scoring the same predictions serially
    module.eval()
    with torch.no_grad():
        preds = [dict(b, prob_maps=module(b["images"])["prob_map"]) for b in val]
    expected = score_serial(preds, cfg["postprocess"]).compute()
    assert module.last_metrics["val"] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scoring_copies_without_host_sync():
    """On a GPU the maps reach the host by pinned non-blocking copies with an event (no sync in
    the calling thread, checked with torch's sync debug mode), the forward is timed with CUDA
    events, and the result equals serial scoring of the same maps."""
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = OmegaConf.to_container(OmegaConf.structured(ModelConfig))
    cfg.update(inner_channels=16, eval_workers=1)
    module = DBNetModule(cfg).to(device).eval()
    batches = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in _batch(s).items()} for s in (1, 2, 3)]
    pool = module._scoring_pool().start(wait=True)
    timer = DeviceTimer()
    try:
        with torch.no_grad():
            preds = [module(b["images"])["prob_map"] for b in batches]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for b, prob in zip(batches, preds):
                    timer.start(device)
                    module(b["images"])
                    timer.stop()
                    pool.submit(prob, b["matrices"], b["orig_sizes"], b["polygons"], b["ignore"], b["names"])
            finally:
                torch.cuda.set_sync_debug_mode(0)
        result = pool.result()
    finally:
        module.teardown("validate")
    assert timer.seconds() > 0 and timer.count == len(batches)
    host = [dict(b, prob_maps=p.cpu(), matrices=b["matrices"].cpu(), orig_sizes=b["orig_sizes"].cpu())
            for b, p in zip(batches, preds)]
    expected = score_serial(host, cfg["postprocess"])
    assert result.counts() == expected.counts() and list(result._by_key) == list(expected._by_key)


# --------------------------------------------------------------------------------------------------
# CLEval with the split's transcriptions, as python -m ocr.metrics scores it

LINE = "TOTAL AMOUNT DUE 12.345,67 EUR"  # 30 characters


class _FixedProbMap(torch.nn.Module):
    """Stands in for the network: the same probability map for every image (the scoring
    after the network is what these tests are about)."""

    def __init__(self, prob: np.ndarray):
        super().__init__()
        self.register_buffer("prob", torch.from_numpy(prob)[None, None])

    def forward(self, images: torch.Tensor) -> dict:
        return {"prob_map": self.prob.expand(len(images), -1, -1, -1)}


def _rect(x: float, y: float, w: float, h: float) -> np.ndarray:
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float32)


def _issue_example() -> tuple[dict, np.ndarray, dict]:
    """One 30-character line (missed), two 3-character words (found) and a don't-care word
    with a detection on it; identity matrix, 160 px. CLEval's shape guess: 10 characters for
    the line (120 x 12 px, capped), 3 for each word (30 x 12 px)."""
    gt = [_rect(20, 20, 120, 12), _rect(20, 60, 30, 12), _rect(70, 60, 30, 12), _rect(20, 100, 30, 12)]
    texts = (LINE, "abc", "xyz", "###")
    prob = np.zeros((160, 160), np.float32)
    for x, y, w, h in ((20, 60, 30, 12), (70, 60, 30, 12), (20, 100, 30, 12)):  # the DB kernels (shrunk)
        prob[y + 3:y + h - 3, x + 3:x + w - 3] = 0.9
    batch = {
        "images": torch.zeros(1, 3, 160, 160), "polygons": [gt], "ignore": [[t == "###" for t in texts]],
        "matrices": torch.eye(3, dtype=torch.float64)[None], "orig_sizes": torch.tensor([[160, 160]]),
        "names": ["receipt.jpg"],
    }
    return batch, prob, {"receipt.jpg": texts}


def _validate(batch: dict, prob: np.ndarray, transcriptions: dict | None, tmp_path) -> tuple[DBNetModule, dict]:
    cfg = OmegaConf.to_container(OmegaConf.structured(ModelConfig))
    cfg.update(inner_channels=16, eval_workers=0, channels_last=False)
    module = DBNetModule(cfg)
    module.model = _FixedProbMap(prob)
    if transcriptions is not None:
        module.set_transcriptions("val", transcriptions)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.validate(module, dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda b: b), verbose=False)
    return module, module.last_metrics["val"]


def test_validation_cleval_counts_the_transcriptions(tmp_path):
    """The issue's example: recall 6/36 with the transcriptions (the CLI's figure), not 6/16."""
    batch, prob, texts = _issue_example()
    module, metrics = _validate(batch, prob, texts, tmp_path)
    assert metrics["cleval"]["recall"] == pytest.approx(6 / 36)
    assert metrics["cleval"]["precision"] == pytest.approx(1.0)  # the detection on "###" is not counted

    # python -m ocr.metrics on the same ground truth and the module's own boxes: the same figures
    (polygons, _), = module.postprocess(torch.from_numpy(prob)[None, None], batch["matrices"], batch["orig_sizes"])
    assert len(polygons) == 3
    gt_words = zip(batch["polygons"][0], texts["receipt.jpg"])
    save_annotations(tmp_path / "gt.json", {"receipt.jpg": {"words": {
        f"{k:04d}": {"points": p.tolist(), "transcription": t} for k, (p, t) in enumerate(gt_words)}}})
    save_annotations(tmp_path / "pred.json", {"receipt.jpg": {"words": {
        f"{k:04d}": {"points": np.asarray(p, float).tolist()} for k, p in enumerate(polygons)}}})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert metrics_cli(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json")]) == 0
    cli = json.loads(out.getvalue())
    for family in ("cleval", "iou"):
        for name in ("precision", "recall", "hmean"):
            assert metrics[family][name] == pytest.approx(cli[family][name], abs=1e-9), (family, name)


def test_validation_without_transcriptions_guesses_from_shapes(tmp_path, caplog):
    """No datamodule and no set_transcriptions: the shape guess (recall 6/16), with a warning."""
    batch, prob, _ = _issue_example()
    with caplog.at_level("WARNING", logger="ocr.training.module"):
        _, metrics = _validate(batch, prob, None, tmp_path)
    assert metrics["cleval"]["recall"] == pytest.approx(6 / 16)
    assert "no GT transcriptions" in caplog.text


def test_validation_refuses_an_image_without_transcriptions(tmp_path):
    batch, prob, _ = _issue_example()
    with pytest.raises(KeyError, match="receipt.jpg"):
        _validate(batch, prob, {"other.jpg": ("abc",)}, tmp_path)
    with pytest.raises(ValueError, match="4 GT polygons in its batch but 3 transcriptions"):
        _validate(batch, prob, {"receipt.jpg": (LINE, "abc", "xyz")}, tmp_path)
