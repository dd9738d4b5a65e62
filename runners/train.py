"""Train DBNet: uv run python runners/train.py [overrides]."""

import hydra
from omegaconf import DictConfig

from ocr.config import register_configs
from ocr.training.entry import main as run_main, run_safely

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_safely("train", cfg)  # validates the config before torch and Lightning load


if __name__ == "__main__":
    run_main(main)  # a command line that does not compose: one line, exit code 2
