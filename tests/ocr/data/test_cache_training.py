"""End to end through the training runner's code: with the batch cache on, validation
metrics are identical to the cache-off run (CPU, fp32, same seed), epochs after the first
replay every batch, the loader wait of validation collapses, and the run summary carries
the statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from small_data import VAL, compose_small, tiny_dataset

from ocr.training.run import train

METRICS = ("val_loss", "val_hmean", "val_cleval_precision", "val_cleval_recall", "val_iou_precision", "val_iou_recall",
           "val_iou_hmean")


def run(root, out, *overrides) -> dict:
    cfg = compose_small(root, "model.inner_channels=16", "trainer.max_epochs=2", "trainer.limit_train_batches=1",
                        "trainer.precision=32-true", "trainer.enable_progress_bar=false", "model.scheduler.warmup_epochs=0",
                        "seed=7", f"{VAL}.load_maps=false", *overrides, output_dir=out)
    return json.loads(Path(train(cfg)).read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory, "d", seed=4, num_val=6, num_train=2)


@pytest.mark.slow
def test_cached_validation_is_identical_and_cheap(data, tmp_path):
    off = run(data, tmp_path / "off", f"{VAL}.cache_config.cache_transformed_tensors=false")
    on = run(data, tmp_path / "on", f"{VAL}.cache_config.cache_transformed_tensors=true", f"{VAL}.cache_config.store=host")
    assert len(off["epochs"]) == len(on["epochs"]) == 2
    for e_off, e_on in zip(off["epochs"], on["epochs"]):
        for key in METRICS:
            assert e_off[key] == e_on[key], (e_off["epoch"], key)
        assert e_on["val_images"] == 6
    assert off["final_metrics"] == on["final_metrics"]

    assert [e["val_cache_action"] for e in on["epochs"]] == ["record", "replay"]
    assert [e["val_cache_hit_rate"] for e in on["epochs"]] == [0.0, 1.0]
    assert "val_cache_action" not in off["epochs"][0]
    wait0 = on["epochs"][0]["val_loader_wait_seconds"]
    for e in on["epochs"][1:]:
        assert e["val_loader_wait_seconds"] <= max(0.05 * wait0, 0.002), (wait0, e["val_loader_wait_seconds"])

    tensors = on["cache"]["val"]["tensors"]
    assert tensors["store"] == "host" and tensors["hits"] == 6 and tensors["misses"] == 6
    assert on["cache"]["val"]["preload"]["preloaded_bytes"] > 0
    assert off["cache"]["val"]["preload"]["preloaded_bytes"] > 0 and "tensors" not in off["cache"]["val"]
