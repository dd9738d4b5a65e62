"""The Batch contract (DESIGN.md) and the collate function of the CPU backend.

Dataset items carry uint8 HWC canvases (4x less to move than float); the collate
function normalises them into the batch tensor, so every backend hands the model the
same normalised float images.

A Batch is a plain dict:
  images        float [B,3,S,S] normalised RGB
  prob_maps, prob_masks, thresh_maps, thresh_masks   float [B,1,S,S] (when labelled)
  polygons      list (B) of lists of float32 (N,2) arrays, original-image pixels
  net_polygons  list (B) of lists of float32 (N,2) arrays, network-input pixels
  ignore        list (B) of lists of bool
  matrices      float64 [B,3,3], the M of each sample
  orig_sizes    int64 [B,2], (h, w)
  names         list of str
  target_geometry  (until the targets are rendered) the batch's packed DB target geometry,
                prepared per sample by the loader workers (``ocr.data.targets``)
"""

from __future__ import annotations

import numpy as np
import torch

from ocr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_into

TARGET_KEYS = ("prob_maps", "prob_masks", "thresh_maps", "thresh_masks")
# make_db_targets* return singular keys; the Batch uses plural ones.
TARGET_KEY_OF = {"prob_map": "prob_maps", "prob_mask": "prob_masks", "thresh_map": "thresh_maps", "thresh_mask": "thresh_masks"}
TENSOR_KEYS = ("images", "matrices", "orig_sizes") + TARGET_KEYS
LIST_KEYS = ("polygons", "net_polygons", "ignore", "names")
#: Batch key of the packed target geometry (``ocr.data.targets.DBTargetGeometry``) that the loader
#: workers prepared; consumed (popped) when the targets are rendered.
GEOMETRY_KEY = "target_geometry"
#: ``target_kwargs`` entries that shape the geometry (the rest shape the rendered maps).
GEOMETRY_KWARGS = ("shrink_ratio", "min_text_size")


#: Batch keys holding one list of (N, 2) polygon arrays per image.
POLYGON_KEYS = ("polygons", "net_polygons")


def _split_rows(flat: np.ndarray, lengths: np.ndarray) -> "PolygonList":
    from ocr.data.geometry import split_rows

    return PolygonList(split_rows(flat, lengths.tolist()))


class PolygonList(list):
    """One image's polygons: a plain list of (N, 2) arrays that pickles as one array and its lengths.
    A DataLoader worker process hands every batch to the training process pickled; unpickling 800
    small arrays per batch (16 images x 50 lines, twice) cost the training thread ~1.4 ms, slicing
    one array ~0.3 ms."""

    def __reduce__(self):
        arrays = [np.asarray(p) for p in self]
        if not arrays or any(a.ndim != 2 or a.dtype != arrays[0].dtype for a in arrays):
            return (PolygonList, (list(self),))
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        return (_split_rows, (np.concatenate(arrays), lengths))


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A fresh CPU tensor; in a DataLoader worker process, directly in shared memory (as
    ``default_collate`` does), so sending it to the main process copies nothing."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(nbytes)  # (the TypedStorage route warns: deprecated)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def stack_images(images: list[np.ndarray], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Items' images -> float ``[B,3,H,W]``: uint8 HWC canvases are normalised (one pass
    each, into the batch tensor); float CHW arrays (already normalised) are stacked."""
    first = images[0]
    if first.dtype == np.uint8 and first.ndim == 3 and first.shape[-1] == 3:
        h, w = first.shape[:2]
        out = _empty((len(images), 3, h, w), torch.float32)
        for k, image in enumerate(images):
            normalize_into(out[k], image, mean, std)
        return out
    out = _empty((len(images), *first.shape), torch.float32)
    for k, image in enumerate(images):
        out[k].copy_(torch.from_numpy(np.asarray(image)))
    return out


def collate_samples(samples: list[dict], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """Samples from ``ValidatedOCRDataset`` -> Batch (on the CPU); ``mean``/``std`` normalise
    uint8 canvases."""
    batch = {
        "images": stack_images([s["image"] for s in samples], mean, std),
        "matrices": torch.from_numpy(np.stack([s["matrix"] for s in samples]).astype(np.float64)),
        "orig_sizes": torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),
    }
    for key in LIST_KEYS:
        batch[key] = [s[key] for s in samples]
    for key in POLYGON_KEYS:
        batch[key] = [PolygonList(polys) for polys in batch[key]]
    if "prob_maps" in samples[0]:
        for key in TARGET_KEYS:
            batch[key] = torch.from_numpy(np.stack([s[key] for s in samples])[:, None])
    elif GEOMETRY_KEY in samples[0]:
        from ocr.data.targets import merge_geometries

        batch[GEOMETRY_KEY] = merge_geometries([s[GEOMETRY_KEY] for s in samples])
    return batch


def geometry_kwargs(target_kwargs: dict) -> dict:
    return {k: target_kwargs[k] for k in GEOMETRY_KWARGS if k in target_kwargs}


def render_kwargs(target_kwargs: dict) -> dict:
    return {k: v for k, v in target_kwargs.items() if k not in GEOMETRY_KWARGS}


def sample_geometry(net_polygons, ignore, size: int, target_kwargs: dict):
    """The host half of one sample's targets, computed where its pixels are (loader workers)."""
    from ocr.data.targets import prepare_sample_geometry

    return prepare_sample_geometry(net_polygons, ignore, size, size, **geometry_kwargs(target_kwargs))


def attach_targets(batch: dict, target_kwargs: dict) -> dict:
    """Render the DB targets of a whole batch with the vectorised implementation on the device of
    ``batch["images"]`` (CPU or CUDA), from the geometry the workers prepared (``GEOMETRY_KEY``,
    removed from the batch) or, without it, from its network-pixel polygons."""
    from ocr.data.targets import pack_db_geometry, render_db_targets

    images = batch["images"]
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    geom = batch.pop(GEOMETRY_KEY, None)
    if geom is None:
        geom = pack_db_geometry(batch["net_polygons"], batch["ignore"], h, w, **geometry_kwargs(target_kwargs))
    out = None
    if images.device.type == "cpu":
        out = {k: _empty((b, 1, h, w), torch.float32) for k in TARGET_KEY_OF}
    maps = render_db_targets(geom, images.device, out=out, **render_kwargs(target_kwargs))
    batch.update({TARGET_KEY_OF[k]: v for k, v in maps.items()})
    return batch


def needs_targets(batch: dict) -> bool:
    return "prob_maps" not in batch and (GEOMETRY_KEY in batch or "net_polygons" in batch)


class Collator:
    """collate_samples (normalising with ``mean``/``std``; the items' target geometries merged into the
    batch's), then (``vectorized``) the batch's targets in the same worker."""

    def __init__(self, target_mode: str, target_kwargs: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.target_mode = target_mode
        self.target_kwargs = dict(target_kwargs)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate_samples(samples, self.mean, self.std)
        if self.target_mode == "vectorized" and needs_targets(batch):
            attach_targets(batch, self.target_kwargs)
        return batch


def batch_size(batch: dict) -> int:
    return int(batch["images"].shape[0])


def batch_to(batch: dict, device: torch.device | str, non_blocking: bool = False) -> dict:
    """Move the tensor entries of a Batch to ``device`` (lists stay where they are)."""
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
