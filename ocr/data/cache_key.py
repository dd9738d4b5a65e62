"""Cache keys: one digest per component of everything that decides a cached output.

A key is a set of named components (``dataset``, ``annotations``, ``transforms``,
``targets``, ``loader``, ``format``), each a plain JSON-able dict of parameters. Each
component is digested on its own and the key is the digest of the component digests, so
when a key changes the components that changed say why (``dataset changed``,
``transforms changed (image_size: 640 -> 256)``, ...). Manifests store the components
so that the reason can be computed against an entry written by an earlier run, and so
that the cache manager can tell whether the dataset on disk changed since.

The dataset fingerprint is, by default, the file names, sizes and modification times
of the split's images plus the image folder (cheap: one ``stat`` per file); with
``content_hash`` it is the SHA-256 of every file's bytes instead (the folder then does
not matter: the same bytes anywhere are the same data).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# Bump when the layout of a cached entry or the meaning of a key component changes.
FORMAT_VERSION = 1

COMPONENTS = ("dataset", "annotations", "transforms", "targets", "loader", "format")
_CHUNK = 1 << 20


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode("utf-8")


def _json_default(obj: Any):
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, numpy scalars numbers (what a manifest holds)."""
    return json.loads(canonical_json(obj))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def bytes_sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ dataset


def stat_records(image_dir: Path, names: Sequence[str]) -> list[list]:
    """[name, size, mtime_ns] per file; a missing file is [name, -1, -1]."""
    records = []
    for name in names:
        try:
            st = os.stat(image_dir / name)
            records.append([name, st.st_size, st.st_mtime_ns])
        except OSError:
            records.append([name, -1, -1])
    return records


def stat_digest(image_dir: Path, names: Sequence[str]) -> str:
    return digest(stat_records(image_dir, names))


def dataset_component(image_dir: str | os.PathLike, names: Sequence[str], content_hash: bool = False,
                      encoded: Callable[[int], bytes] | None = None) -> tuple[dict, dict]:
    """(params, info) of the ``dataset`` component for the images ``names`` in ``image_dir``.

    ``encoded(i)`` returns the bytes of image i when they are already in memory (preloaded):
    the content hash is then computed from RAM, which is what the loader will read."""
    folder = Path(image_dir).resolve()
    if content_hash:
        hashes = []
        for i, name in enumerate(names):
            try:
                hashes.append([name, bytes_sha256(encoded(i)) if encoded is not None else file_sha256(folder / name)])
            except OSError:
                hashes.append([name, None])
        params = {"mode": "content", "num_files": len(names), "files": digest(hashes)}
    else:
        params = {"mode": "stat", "image_dir": str(folder), "num_files": len(names),
                  "files": stat_digest(folder, names)}
    info = {"image_dir": str(folder), "names": list(names)}
    return params, info


def recompute_dataset_component(params: dict, info: dict) -> dict | None:
    """The dataset component as it would be computed now from the files on disk (for
    the cache manager's staleness check); None when the image folder is gone."""
    folder = Path(info.get("image_dir", ""))
    if not folder.is_dir():
        return None
    now, _ = dataset_component(folder, info.get("names", []), content_hash=params.get("mode") == "content")
    return now


def annotations_component(annotation_path: str | os.PathLike, on_error: str = "raise") -> tuple[dict, dict]:
    path = Path(annotation_path).resolve()
    return {"sha256": file_sha256(path), "on_error": on_error}, {"path": str(path)}


def recompute_annotations_component(params: dict, info: dict) -> dict | None:
    path = Path(info.get("path", ""))
    if not path.is_file():
        return None
    now, _ = annotations_component(path, params.get("on_error", "raise"))
    return now


# ---------------------------------------------------------------------------------- key


@dataclass(frozen=True)
class CacheKey:
    """The key of one cached thing (``kind``: tensors | maps) of one split."""

    kind: str
    split: str
    components: dict[str, dict]
    info: dict[str, dict] = field(default_factory=dict)  # not digested: where things are, for people and health

    @property
    def digests(self) -> dict[str, str]:
        return {name: digest(params) for name, params in sorted(self.components.items())}

    @property
    def hexdigest(self) -> str:
        return digest({"kind": self.kind, "components": self.digests})

    @property
    def short(self) -> str:
        return self.hexdigest[:16]

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "split": self.split, "key": self.hexdigest,
                "components": plain(self.components), "digests": self.digests, "info": plain(self.info)}

    @classmethod
    def from_manifest(cls, manifest: dict) -> "CacheKey":
        return cls(kind=manifest["kind"], split=manifest.get("split", ""), components=manifest["components"],
                   info=manifest.get("info", {}))

    def changes_since(self, old: "CacheKey") -> list[str]:
        """Why ``old`` is not this key: one phrase per changed component."""
        reasons = []
        old_digests, new_digests = old.digests, self.digests
        for name in sorted(set(old_digests) | set(new_digests), key=_component_order):
            if old_digests.get(name) != new_digests.get(name):
                reasons.append(_reason(name, old.components.get(name), self.components.get(name), old.info.get(name, {}),
                                       self.info.get(name, {})))
        if not reasons and old.kind != self.kind:
            reasons.append(f"kind changed ({old.kind} -> {self.kind})")
        return reasons


def _component_order(name: str) -> int:
    return COMPONENTS.index(name) if name in COMPONENTS else len(COMPONENTS)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _diff(old: dict | None, new: dict | None, limit: int = 3) -> str:
    a, b = _flatten(plain(old or {})), _flatten(plain(new or {}))
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    parts = [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in changed[:limit]]
    if len(changed) > limit:
        parts.append(f"{len(changed) - limit} more")
    return ", ".join(parts)


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:16] + "..." + s[-8:]


def _reason(name: str, old: dict | None, new: dict | None, old_info: dict, new_info: dict) -> str:
    if name == "dataset":
        old, new = old or {}, new or {}
        if old_info.get("image_dir") != new_info.get("image_dir"):
            return f"dataset changed (image folder {old_info.get('image_dir')} -> {new_info.get('image_dir')})"
        if old.get("num_files") != new.get("num_files"):
            return f"dataset changed ({old.get('num_files')} -> {new.get('num_files')} images)"
        if old.get("mode") != new.get("mode"):
            return f"dataset changed (fingerprint {old.get('mode')} -> {new.get('mode')})"
        return "dataset changed (image files differ: " + ("content" if new.get("mode") == "content" else "size or modification time") + ")"
    if name == "annotations":
        return "annotations changed"
    if name == "format":
        return f"cache format changed ({_diff(old, new)})"
    detail = _diff(old, new)
    return f"{name} changed" + (f" ({detail})" if detail else "")
