"""DBNet model, loss and post-processing.

The names are imported on first use (PEP 562), so that ``ocr.models.postprocess`` can be
imported without torch and torchvision: the validation scoring workers
(``ocr.training.scoring``) need only the post-processing, and the network would cost each
of them ~9 s and ~0.9 GB.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "BACKBONE_CHANNELS": "backbone",
    "ResNetBackbone": "backbone",
    "DBNet": "dbnet",
    "DBHeadBranch": "head",
    "DBLoss": "loss",
    "balanced_bce_with_logits": "loss",
    "dice_loss": "loss",
    "masked_l1_loss": "loss",
    "DBFPN": "neck",
    "db_weights_init": "neck",
    "DBPostProcessor": "postprocess",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ocr.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
