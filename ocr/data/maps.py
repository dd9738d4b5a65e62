"""Precomputed DB target maps of evaluation splits (``load_maps``).

``uv run python scripts/preprocess_data.py maps --split val [overrides]`` computes the
DB targets of every sample of a split at the eval geometry (``M = scale(image_size /
max(h, w))``) with the reference ``make_db_targets`` or the vectorised
``make_db_targets_batch`` and writes them as one entry ``<cache_dir>/maps/<split>-<key>/``
(one compressed ``.npz`` per sample, binary maps as uint8, SHA-256 per file in the
manifest, written atomically like the tensor cache's entries). One process writes a key at
a time: a second one waits for the first (up to ``wait_s``, default 30 min) and returns
its entry; when the wait times out it writes the entry as well (the first complete copy
is kept).

The key has the tensor cache's components that decide a sample's maps: the dataset
fingerprint, the annotation file's hash, the eval geometry (image size, transforms
version), the target parameters and the generator, and the format version.

In training, :class:`MapFiller` wraps an evaluation split's loader (built without
targets) in the main process and fills ``prob_maps`` ... ``thresh_masks`` by sample name
from the entry (``cache_maps``: keep what was read in RAM; ``preload_maps``: read all
at start). A sample the entry lacks (or whose file fails its checksum) is computed on
the fly and counted: ``Fallback to on-the-fly generation: X/Y samples (Z%)``. When there
is no entry for the key at all, the split's loader computes its targets as usual and
that line says 100%.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ocr.data import geometry
from ocr.data.batch import TARGET_KEY_OF, TARGET_KEYS
from ocr.data.cache import (MANIFEST, CacheEntryError, EntryWriter, entry_path, lock_or_wait, read_file_verified,
                            read_manifest, rebuild_reason, touch_last_used, verify_entry)
from ocr.data.cache_key import FORMAT_VERSION, CacheKey
from ocr.data.targets import TARGETS_VERSION
from ocr.data.transforms import TRANSFORMS_VERSION

log = logging.getLogger(__name__)

GENERATORS = ("reference", "vectorized")
WAIT_S = 1800.0  # how long a second writer of the same maps waits for the first one
_MAP_NAMES = ("prob_map", "prob_mask", "thresh_map", "thresh_mask")


def maps_key(split: str, dataset: tuple[dict, dict], annotations: tuple[dict, dict], image_size: int, target_kwargs: dict,
             generator: str) -> CacheKey:
    """The key of a split's maps; ``dataset`` / ``annotations`` are the (params, info)
    pairs of ``ocr.data.cache_key.dataset_component`` / ``annotations_component``."""
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    return CacheKey(
        kind="maps", split=split,
        components={
            "dataset": dataset[0],
            "annotations": annotations[0],
            "transforms": {"image_size": int(image_size), "geometry": "eval", "transforms_version": TRANSFORMS_VERSION},
            "targets": {**{k: float(v) for k, v in target_kwargs.items()}, "generator": generator,
                        "targets_version": TARGETS_VERSION},
            "format": {"format_version": FORMAT_VERSION, "kind": "maps"},
        },
        info={"dataset": dataset[1], "annotations": annotations[1]},
    )


def eval_net_polygons(sample, height: int, width: int, image_size: int) -> list[np.ndarray]:
    matrix = geometry.eval_matrix(height, width, image_size)
    return [geometry.transform_points(matrix, p) for p in sample.polygons]


def compute_maps(net_polygons: Sequence[Sequence[np.ndarray]], ignore: Sequence[Sequence[bool]], size: int,
                 target_kwargs: dict, generator: str, device: str | torch.device = "cpu") -> list[dict[str, np.ndarray]]:
    """DB targets of several samples as float32 ``(size, size)`` arrays per map."""
    if generator == "reference":
        from ocr.data.targets import make_db_targets

        return [make_db_targets(list(p), list(ig), size, size, **target_kwargs) for p, ig in zip(net_polygons, ignore)]
    from ocr.data.targets import make_db_targets_batch

    out = make_db_targets_batch([list(p) for p in net_polygons], [list(ig) for ig in ignore], size, size, device=device,
                                **target_kwargs)
    return [{k: out[k][i, 0].detach().cpu().numpy() for k in _MAP_NAMES} for i in range(len(net_polygons))]


def encode_maps(maps: dict[str, np.ndarray]) -> bytes:
    """Compressed npz; maps whose values are exactly 0/1 are stored as uint8 (lossless)."""
    arrays = {}
    for k in _MAP_NAMES:
        a = np.asarray(maps[k], dtype=np.float32)
        if np.all((a == 0) | (a == 1)):
            arrays[k] = a.astype(np.uint8)
        else:
            arrays[k] = a
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def decode_maps(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k].astype(np.float32) for k in _MAP_NAMES}


def write_maps_entry(cache_dir: str | os.PathLike, key: CacheKey, source, image_size: int, target_kwargs: dict,
                     generator: str, batch_size: int = 8, progress: bool = True,
                     wait_s: float = WAIT_S) -> tuple[Path, dict]:
    """Compute and write the maps of every sample of ``source`` (see the module doc). An
    existing entry of the same key is rewritten (the caller asked for it), unless another
    process wrote it while this one waited for it."""
    from tqdm.auto import tqdm

    final = entry_path(cache_dir, key)
    lock, published = lock_or_wait(final, wait_s)
    if published:
        manifest = read_manifest(final)
        log.info("maps %s: %s was written by process %s while this one waited; using it", key.split, final,
                 manifest.get("writer_pid", "?"))
        return final, {"entry": str(final), "samples": int(manifest.get("num_samples", 0)),
                       "bytes": int(manifest.get("bytes", 0)), "generator": manifest.get("generator", generator),
                       "image_size": int(manifest.get("image_size", image_size)), "key": key.short}
    writer = EntryWriter(final, lock)
    files: dict[str, str] = {}
    try:
        n = len(source)
        bar = tqdm(total=n, desc=f"maps {key.split}", unit="img", disable=not progress, leave=False)
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            polys = [eval_net_polygons(source.samples[i], *source.sizes[i], image_size) for i in idx]
            ignore = [list(source.samples[i].ignore) for i in idx]
            for i, maps in zip(idx, compute_maps(polys, ignore, image_size, target_kwargs, generator)):
                fname = f"{i:06d}.npz"
                writer.add(fname, encode_maps(maps))
                files[source.samples[i].name] = fname
            bar.update(len(idx))
        bar.close()
        manifest = {**key.to_manifest(), "samples": files, "num_samples": n, "image_size": int(image_size),
                    "generator": generator}
        # the old entry stays readable until this instant; without the lock (the wait timed out) the
        # first complete copy is kept
        writer.commit(manifest, replace=lock is not None)
    except BaseException:
        writer.abort()
        raise
    return final, {"entry": str(final), "samples": n, "bytes": writer.nbytes, "generator": generator,
                   "image_size": int(image_size), "key": key.short}


class MapStore:
    """A verified maps entry: ``get(name)`` -> the four float32 maps, or None."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.files: dict[str, str] = manifest.get("samples", {})
        self.image_size = int(manifest.get("image_size", 0))
        self._warned = False

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, key: CacheKey) -> tuple["MapStore | None", str]:
        """(store, why): the store for ``key``, or None and why not."""
        path = entry_path(cache_dir, key)
        if not (path / MANIFEST).is_file():
            return None, f"no precomputed maps for this key ({rebuild_reason(cache_dir, key)})"
        try:
            manifest = read_manifest(path)
            if manifest.get("key") != key.hexdigest:
                raise CacheEntryError(f"{path}: manifest key does not match")
            problems = verify_entry(path, manifest, checksums=False)
            if problems:
                raise CacheEntryError(f"{path}: " + "; ".join(problems[:3]))
        except CacheEntryError as exc:
            log.warning("Maps entry is damaged, not using it: %s", exc)
            return None, f"damaged entry ({exc})"
        touch_last_used(path)
        return cls(path, manifest), f"entry {path}"

    def __len__(self) -> int:
        return len(self.files)

    def raw(self, name: str) -> bytes | None:
        """The verified (SHA-256) encoded maps of sample ``name``, or None."""
        fname = self.files.get(name)
        if fname is None:
            return None
        try:
            return read_file_verified(self.path, fname, self.manifest)
        except (CacheEntryError, OSError) as exc:
            if not self._warned:
                log.warning("Maps entry %s: %s (those samples are computed on the fly)", self.path, exc)
                self._warned = True
            return None

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        data = self.raw(name)
        if data is None:
            return None
        try:
            return decode_maps(data)
        except (ValueError, OSError, KeyError) as exc:
            if not self._warned:
                log.warning("Maps entry %s: cannot decode the maps of %s (%s)", self.path, name, exc)
                self._warned = True
            return None

    def load_all(self, names: Sequence[str]) -> dict[str, bytes]:
        """Every sample's encoded maps (compressed, verified), to keep in RAM."""
        from tqdm.auto import tqdm

        out = {}
        for name in tqdm(names, desc="Preloading maps", unit="img", leave=False):
            data = self.raw(name)
            if data is not None:
                out[name] = data
        log.info("Preloaded %d/%d maps into RAM (%.1f%%), %.1f MB", len(out), len(names),
                 100.0 * len(out) / max(1, len(names)), sum(len(b) for b in out.values()) / 2**20)
        return out

    def estimated_bytes(self) -> int:
        return sum(int(m["bytes"]) for n, m in self.manifest["files"].items() if n.endswith(".npz"))


class MapFiller:
    """Wraps an eval loader built without targets: fills each batch's DB targets from
    the map store (``memory``: a dict name -> encoded maps kept in RAM, filled as they
    are read; None: read from the entry every time), computing missing ones."""

    def __init__(self, loader, store: MapStore, split: str, generator: str, target_kwargs: dict,
                 memory: dict | None, pass_info: Callable[[int], tuple[int, bool, int | None]]):
        self.loader = loader
        self.store = store
        self.split = split
        self.generator = generator
        self.target_kwargs = dict(target_kwargs)
        self.memory = memory
        self.pass_info = pass_info
        self.loaded = 0
        self.fallback = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        n, counted, _epoch = self.pass_info(len(self.loader))
        return self._iterate(n, counted)

    def _iterate(self, n: int, counted: bool) -> Iterator[dict]:
        total = fallback = 0
        for i, batch in enumerate(self.loader):
            missing = self.fill(batch)
            total += len(batch["names"])
            fallback += missing
            if i == n - 1 or i == len(self.loader) - 1:
                if counted:
                    self._end_pass(total, fallback)
                    counted = False
            yield batch
            if i >= n - 1:
                return

    def _end_pass(self, total: int, fallback: int) -> None:
        self.loaded += total - fallback
        self.fallback += fallback
        if fallback:
            log.warning("Fallback to on-the-fly generation: %d/%d samples (%.1f%%) of the %s split (maps entry %s)",
                        fallback, total, 100.0 * fallback / max(1, total), self.split, self.store.path)

    def fill(self, batch: dict) -> int:
        """Set the batch's target maps; returns how many were computed on the fly."""
        images = batch["images"]
        size = int(images.shape[-1])
        names = batch["names"]
        per_sample: list[dict | None] = []
        for name in names:
            data = self.memory.get(name) if self.memory is not None else None
            if data is None:
                data = self.store.raw(name)
                if data is not None and self.memory is not None:
                    self.memory[name] = data
            maps = None
            if data is not None:
                try:
                    maps = decode_maps(data)
                except (ValueError, OSError, KeyError):
                    maps = None
            if maps is not None and maps["prob_map"].shape != (size, size):
                maps = None
            per_sample.append(maps)
        missing = [j for j, m in enumerate(per_sample) if m is None]
        if missing:
            computed = compute_maps([batch["net_polygons"][j] for j in missing], [batch["ignore"][j] for j in missing],
                                    size, self.target_kwargs, self.generator)
            for j, maps in zip(missing, computed):
                per_sample[j] = maps
        for key in _MAP_NAMES:
            stacked = torch.from_numpy(np.stack([m[key] for m in per_sample])[:, None].astype(np.float32, copy=False))
            batch[TARGET_KEY_OF[key]] = stacked.to(images.device, non_blocking=True)
        assert all(k in batch for k in TARGET_KEYS)
        return len(missing)

    def to_dict(self) -> dict:
        total = self.loaded + self.fallback
        return {"entry": str(self.store.path), "loaded": self.loaded, "fallback": self.fallback,
                "fallback_rate": round(self.fallback / total, 4) if total else None}
