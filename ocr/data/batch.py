"""The Batch contract (DESIGN.md) and the collate function of the CPU backend.

A Batch is a plain dict:
  images        float [B,3,S,S] normalised RGB
  prob_maps, prob_masks, thresh_maps, thresh_masks   float [B,1,S,S] (when labelled)
  polygons      list (B) of lists of float32 (N,2) arrays, original-image pixels
  net_polygons  list (B) of lists of float32 (N,2) arrays, network-input pixels
  ignore        list (B) of lists of bool
  matrices      float64 [B,3,3], the M of each sample
  orig_sizes    int64 [B,2], (h, w)
  names         list of str
"""

from __future__ import annotations

import numpy as np
import torch

TARGET_KEYS = ("prob_maps", "prob_masks", "thresh_maps", "thresh_masks")
# make_db_targets* return singular keys; the Batch uses plural ones.
TARGET_KEY_OF = {"prob_map": "prob_maps", "prob_mask": "prob_masks", "thresh_map": "thresh_maps", "thresh_mask": "thresh_masks"}
TENSOR_KEYS = ("images", "matrices", "orig_sizes") + TARGET_KEYS
LIST_KEYS = ("polygons", "net_polygons", "ignore", "names")


def collate_samples(samples: list[dict]) -> dict:
    """Samples from ``ValidatedOCRDataset`` -> Batch (on the CPU)."""
    batch = {
        "images": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "matrices": torch.from_numpy(np.stack([s["matrix"] for s in samples]).astype(np.float64)),
        "orig_sizes": torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),
    }
    for key in LIST_KEYS:
        batch[key] = [s[key] for s in samples]
    if "prob_maps" in samples[0]:
        for key in TARGET_KEYS:
            batch[key] = torch.from_numpy(np.stack([s[key] for s in samples])[:, None])
    return batch


def attach_targets(batch: dict, target_kwargs: dict) -> dict:
    """Compute the DB targets of a whole batch with the vectorised implementation on
    the device of ``batch["images"]`` (CPU or CUDA) from its network-pixel polygons."""
    from ocr.data.targets import make_db_targets_batch

    images = batch["images"]
    maps = make_db_targets_batch(batch["net_polygons"], batch["ignore"], images.shape[-2], images.shape[-1],
                                 device=images.device, **target_kwargs)
    batch.update({TARGET_KEY_OF[k]: v for k, v in maps.items()})
    return batch


def needs_targets(batch: dict) -> bool:
    return "prob_maps" not in batch and "net_polygons" in batch


class Collator:
    """collate_samples, then (``vectorized``) the batch's targets in the same worker."""

    def __init__(self, target_mode: str, target_kwargs: dict):
        self.target_mode = target_mode
        self.target_kwargs = dict(target_kwargs)

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate_samples(samples)
        if self.target_mode == "vectorized" and needs_targets(batch):
            attach_targets(batch, self.target_kwargs)
        return batch


def batch_size(batch: dict) -> int:
    return int(batch["images"].shape[0])


def batch_to(batch: dict, device: torch.device | str, non_blocking: bool = False) -> dict:
    """Move the tensor entries of a Batch to ``device`` (lists stay where they are)."""
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
