"""What the data tests share: a small config composed from the real configs, and tiny
generated datasets (imported by the test modules beside it)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from ocr.config import register_configs
from ocr.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[3]
VAL = "datasets.val_dataset.config"
SMALL = ("data.image_size=64", "data.targets.min_text_size=3", "loader.batch_size=2", "loader.eval_batch_size=2",
         "loader.num_workers=0", "loader.backend=cpu", "loader.device=cpu")


def compose_small(root, *overrides, name: str = "train", output_dir="/tmp/unused"):
    """``configs/<name>.yaml`` on the dataset at ``root`` at 64 px, batches of 2, CPU backend."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name=name, overrides=[f"data.root={root}", *SMALL, *overrides, f"output_dir={output_dir}"])


def tiny_dataset(tmp_path_factory, name: str, seed: int, num_val: int, num_train: int = 1) -> Path:
    root = tmp_path_factory.mktemp(name) / "receipts"
    generate_dataset(root, num_train=num_train, num_val=num_val, num_test=1, seed=seed, progress=False)
    return root
