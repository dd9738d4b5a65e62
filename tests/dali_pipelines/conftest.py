"""Shared fixtures: a tiny generated receipt dataset.

DALI is a hard dependency (pyproject.toml): a broken or missing install fails these tests
at collection instead of skipping them."""

from __future__ import annotations

from pathlib import Path

import nvidia.dali  # noqa: F401 - fail, not skip, when DALI does not import
import pytest
import torch

from ocr.data.annotations import load_annotations
from ocr.data.source import SampleSource
from ocr.data.synthetic import generate_dataset


def cuda_usable() -> bool:
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not cuda_usable(), reason="needs CUDA")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dali") / "receipts"
    generate_dataset(root, num_train=7, num_val=5, num_test=1, seed=11, progress=False)
    return root


def load_source(root: Path, split: str) -> SampleSource:
    return SampleSource(load_annotations(root / "jsons" / f"{split}.json", root / "images" / split), split=split)


@pytest.fixture(scope="session")
def train_source(tiny_root) -> SampleSource:
    return load_source(tiny_root, "train")


@pytest.fixture(scope="session")
def val_source(tiny_root) -> SampleSource:
    return load_source(tiny_root, "val")
