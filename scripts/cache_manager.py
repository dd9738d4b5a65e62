#!/usr/bin/env python
"""Inspect and clean the on-disk caches: batch-cache entries (store=disk) and precomputed
maps, under the directory training writes to (cache_config.cache_dir, default .cache/dbnet).

    uv run python scripts/cache_manager.py status
    uv run python scripts/cache_manager.py clear (--all | --type tensors|maps | --stale) [--dry-run]
    uv run python scripts/cache_manager.py health
    uv run python scripts/cache_manager.py validate
    (--cache-dir DIR before or after the command to look elsewhere)

status    every entry: kind, split, key, size, age, last use, dataset
health    corrupt entries (unreadable manifest, missing or resized files, checksum
          mismatches; --quick skips the checksums), orphans (temporary directories and
          lock files of interrupted writes, half-deleted entries, stray files; those
          of a live writer are not orphans) and stale entries (the
          dataset or annotations on disk changed since the entry was written, or an
          older cache format)
validate  verifies the SHA-256 of every file of every entry, entry by entry
clear     removes what is selected and reports the bytes freed (--dry-run: only lists)

Exit codes: 0 ok; 1 problems found (health, validate); 2 usage or I/O error, with a
one-line message. In-memory caches (store=gpu/pinned/host) live and die with their
training process and are not on disk.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import ocr  # noqa: F401
except ImportError:  # run from a checkout without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ocr.config import CacheConfig  # noqa: E402
from ocr.data.cache import (  # noqa: E402
    KINDS,
    LOCK_PREFIX,
    TMP_PREFIX,
    TRASH_PREFIX,
    EntryInfo,
    last_used,
    live_writer,
    remove_tree,
    scan_cache,
    tree_size,
    verify_entry,
)
from ocr.data.cache_key import (  # noqa: E402
    FORMAT_VERSION,
    CacheKey,
    recompute_annotations_component,
    recompute_dataset_component,
)

DEFAULT_CACHE_DIR = CacheConfig().cache_dir


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _other_kind(path: Path) -> str:
    if path.name.startswith(TMP_PREFIX):
        return "temporary directory of an interrupted write"
    if path.name.startswith(TRASH_PREFIX):
        return "half-deleted entry"
    if path.name.startswith(LOCK_PREFIX):
        return "lock file of a writer"
    return "not a cache entry"


def _items(e: EntryInfo) -> str:
    m = e.manifest or {}
    if e.kind == "tensors":
        return f"{m.get('num_batches', '?')} batches/{m.get('num_samples', '?')} img"
    return f"{m.get('num_samples', '?')} samples"


def staleness(e: EntryInfo) -> str | None:
    """Why the entry no longer matches the data on disk (None: it still does)."""
    m = e.manifest or {}
    if m.get("format_version") != FORMAT_VERSION:
        return f"cache format v{m.get('format_version')} (current v{FORMAT_VERSION})"
    try:
        key = CacheKey.from_manifest(m)
    except (KeyError, TypeError):
        return "manifest has no usable key"
    comps = key.components
    info = key.info
    reasons = []
    if "dataset" in comps:
        now = recompute_dataset_component(comps["dataset"], info.get("dataset", {}))
        if now is None:
            reasons.append(f"image folder {info.get('dataset', {}).get('image_dir')} is gone")
        elif now != comps["dataset"]:
            reasons.append("dataset changed since the entry was written (image files differ)")
    if "annotations" in comps:
        now = recompute_annotations_component(comps["annotations"], info.get("annotations", {}))
        if now is None:
            reasons.append(f"annotation file {info.get('annotations', {}).get('path')} is gone")
        elif now != comps["annotations"]:
            reasons.append("annotations changed since the entry was written")
    return "; ".join(reasons) or None


def _scan(args) -> tuple[list[EntryInfo], list[Path]]:
    root = Path(args.cache_dir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    return scan_cache(root)


# ------------------------------------------------------------------------------ status


def cmd_status(args) -> int:
    entries, others = _scan(args)
    root = Path(args.cache_dir)
    if not entries and not others:
        print(f"{root}: no cache entries on disk. The default store (cache_config.store=auto) keeps the "
              f"validation batches in memory (GPU or host RAM) for the length of the run only.")
        print("To keep them across runs: datasets.val_dataset.config.cache_config.store=disk (written under "
              "cache_config.cache_dir); to precompute the eval target maps: "
              "uv run python scripts/preprocess_data.py maps --split val")
        return 0
    now = time.time()
    sizes = {e.path: tree_size(e.path) for e in entries}
    other_sizes = {p: tree_size(p) for p in others}
    total = sum(sizes.values()) + sum(other_sizes.values())
    print(f"{root}: {len(entries)} entries, {human_bytes(total)}")
    header = f"{'KIND':<8} {'SPLIT':<6} {'KEY':<16} {'SIZE':>9} {'ITEMS':<22} {'AGE':>5} {'USED':>5}  DATASET"
    print(header)
    for e in entries:
        m = e.manifest or {}
        created = m.get("created_unix") or last_used(e.path)
        dataset = (m.get("info", {}).get("dataset", {}) or {}).get("image_dir", "?") if m else f"(unreadable: {e.error})"
        print(f"{e.kind:<8} {e.split:<6} {e.key[:16] or '?':<16} {human_bytes(sizes[e.path]):>9} {_items(e):<22} "
              f"{human_age(now - created):>5} {human_age(now - last_used(e.path)):>5}  {dataset}")
    for p in others:
        print(f"{'other':<8} {'':<6} {p.name[:16]:<16} {human_bytes(other_sizes[p]):>9} {_other_kind(p)}")
    return 0


# ------------------------------------------------------------------------------ health


def health_problems(entries: list[EntryInfo], others: list[Path], checksums: bool = True) -> list[tuple[Path, str, str]]:
    """(path, category, message): category corrupt | stale | orphan."""
    problems = []
    for e in entries:
        if e.manifest is None:
            problems.append((e.path, "corrupt", e.error or "unreadable manifest"))
            continue
        if e.kind != e.manifest.get("kind"):
            problems.append((e.path, "corrupt", f"a {e.manifest.get('kind')} entry under {e.kind}/"))
            continue
        files = verify_entry(e.path, e.manifest, checksums=checksums)
        if files:
            problems.append((e.path, "corrupt", "; ".join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")))
            continue
        why = staleness(e)
        if why:
            problems.append((e.path, "stale", why))
    for p in others:
        if live_writer(p) is None:  # a running process's write in progress is not an orphan
            problems.append((p, "orphan", _other_kind(p)))
    return problems


def cmd_health(args) -> int:
    entries, others = _scan(args)
    problems = health_problems(entries, others, checksums=not args.quick)
    for path, category, message in problems:
        print(f"{category}: {path}: {message}")
    n_ok = len(entries) - len({p for p, c, _ in problems if c != "orphan"})
    print(f"health: {len(entries)} entries ({n_ok} ok), {len(problems)} problems under {args.cache_dir}")
    return 1 if problems else 0


# ---------------------------------------------------------------------------- validate


def cmd_validate(args) -> int:
    entries, _others = _scan(args)
    failed = 0
    for e in entries:
        if e.manifest is None:
            print(f"FAILED {e.path}: {e.error}")
            failed += 1
            continue
        problems = verify_entry(e.path, e.manifest, checksums=True)
        if problems:
            print(f"FAILED {e.path}: " + "; ".join(problems))
            failed += 1
        else:
            print(f"ok     {e.path} ({len(e.manifest['files'])} files)")
    print(f"validate: {len(entries) - failed}/{len(entries)} entries pass their checksums")
    return 1 if failed else 0


# ------------------------------------------------------------------------------- clear


def cmd_clear(args) -> int:
    root = Path(args.cache_dir)
    entries, others = _scan(args)
    if args.all:
        targets = [(e.path, f"{e.kind} {e.split}") for e in entries] + [(p, _other_kind(p)) for p in others]
    elif args.type:
        targets = [(e.path, f"{e.kind} {e.split}") for e in entries if e.kind == args.type]
        targets += [(p, _other_kind(p)) for p in others if p.parent.name == args.type]
    else:  # --stale
        targets = [(p, f"{c}: {m}") for p, c, m in health_problems(entries, others, checksums=True)]
        for p in others:
            pid = live_writer(p)
            if pid is not None:
                print(f"kept {p} (process {pid} is still writing it)")
    if not targets:
        print(f"{root}: nothing to clear")
        return 0
    total = 0
    for path, what in targets:
        size = tree_size(path)
        if args.dry_run:
            print(f"would remove {path} ({what}, {human_bytes(size)})")
            total += size
        else:
            freed = remove_tree(path)
            total += freed
            print(f"removed {path} ({what}, {human_bytes(freed)})")
    if args.dry_run:
        print(f"dry run: {len(targets)} items, {human_bytes(total)} would be freed ({total} bytes)")
    else:
        print(f"freed {human_bytes(total)} ({total} bytes) in {len(targets)} items")
    return 0


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cache_manager.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"cache directory (default: {DEFAULT_CACHE_DIR})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, func):
        p = sub.add_parser(name, help=help)
        p.add_argument("--cache-dir", default=argparse.SUPPRESS, help="cache directory")
        p.set_defaults(func=func)
        return p

    add("status", "list the entries", cmd_status)
    p = add("health", "find corrupt, orphaned and stale entries (exit 1 if any)", cmd_health)
    p.add_argument("--quick", action="store_true", help="skip the checksums (sizes and presence only)")
    add("validate", "verify every file's checksum (exit 1 on a mismatch)", cmd_validate)
    p = add("clear", "remove entries and report the bytes freed", cmd_clear)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="everything under the cache directory")
    which.add_argument("--type", choices=KINDS, help="only batch-cache entries (tensors) or precomputed maps")
    which.add_argument("--stale", action="store_true", help="what health reports: corrupt, orphaned and stale entries")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors: SystemExit(2) from argparse
    try:
        return int(args.func(args))
    except (OSError, ValueError) as e:
        msg = " | ".join(line.strip() for line in str(e).splitlines() if line.strip()) or repr(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
