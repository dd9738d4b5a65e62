"""DBNetModule validation through the scoring pool: the epoch record splits validation time,
the pool lives across epochs and is closed at teardown, and the metrics equal serial scoring."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ocr.config import ModelConfig
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
