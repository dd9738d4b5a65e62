"""The training runner's code with the DALI loader on DALI's CPU operators, on tiny data:
sanity check, limited (abandoned) train and val epochs, two epochs."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from ocr.config import register_configs
from ocr.training.run import train

REPO = Path(__file__).resolve().parents[2]


def test_train_with_dali_on_cpu(tiny_root, tmp_path):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose(config_name="train", overrides=[
            f"data.root={tiny_root}", "data.image_size=64", "data.train_crop_size=0", "data.targets.min_text_size=3",
            "loader.backend=dali", "loader.device=cpu", "loader.batch_size=2", "loader.eval_batch_size=2",
            "loader.dali_threads=2", "model.inner_channels=32", "trainer.max_epochs=2",
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=1",
            "trainer.precision=32-true", "trainer.enable_progress_bar=false", "seed=3", f"output_dir={tmp_path}"])
    summary = json.loads(Path(train(cfg)).read_text())
    assert summary["status"] == "finished"
    assert summary["backend"]["backend"] == "dali" and summary["backend"]["device"] == "cpu"
    epochs = summary["epochs"]
    assert len(epochs) == 2
    assert all(e["train_images"] == 4 and e["val_images"] == 4 for e in epochs)
    assert set(summary["final_metrics"]["val"]) == {"cleval", "iou"}
