#!/usr/bin/env python
"""Data preparation: import ICDAR text labels, canonicalise EXIF orientation, validate.

    uv run python scripts/preprocess_data.py import --images DIR --labels DIR --out JSON [--skip-bad]
    uv run python scripts/preprocess_data.py canonicalize --images DIR --out-images DIR \\
        [--json JSON --out-json JSON] [--quality 95] [--skip-bad]
    uv run python scripts/preprocess_data.py validate --images DIR --json JSON [--no-check-images]
    uv run python scripts/preprocess_data.py maps --split val [--generator auto|reference|vectorized] \\
        [--cache-dir DIR] [--force] [OVERRIDE ...]   (the training run's Hydra overrides, e.g. data.image_size=512)

Exit codes: 0 success; 1 ``validate`` found problems in the data; 2 error (bad
arguments, missing/malformed file in raise mode, ...) with a one-line message.

Adding a subcommand: write ``add_<name>_parser(subparsers)`` that registers the
parser with ``set_defaults(func=cmd_<name>)``, and ``cmd_<name>(args) -> int``; then
list the adder in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import ocr  # noqa: F401
except ImportError:  # run from a checkout without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ocr.data.annotations import AnnotationError, check_annotations  # noqa: E402

log = logging.getLogger("preprocess_data")

MAX_SHOWN_PROBLEMS = 20


def _print_stats(title: str, stats: dict) -> None:
    print(title)
    for k, v in stats.items():
        print(f"  {k}: {v}")


# ----------------------------------------------------------------------------- import


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="convert ICDAR-format .txt labels (ICDAR 2015, SROIE) to one annotation JSON",
        description="One .txt per image (<stem>.txt or gt_<stem>.txt), lines "
        "x1,y1,...,x4,y4[,transcription].",
    )
    p.add_argument("--images", required=True, type=Path, help="image directory")
    p.add_argument("--labels", required=True, type=Path, help="label (.txt) directory")
    p.add_argument("--out", required=True, type=Path, help="output annotation JSON")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unparseable lines and unlabelled images (counted) instead of failing",
    )
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from ocr.data.icdar_import import import_icdar_txt

    stats = import_icdar_txt(
        args.images, args.labels, args.out, on_error="skip" if args.skip_bad else "raise"
    )
    _print_stats(f"imported {args.labels} -> {args.out}", stats)
    return 0


# ----------------------------------------------------------------------- canonicalize


def add_canonicalize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "canonicalize",
        help="apply EXIF orientation to the pixels and drop the tag (copy of the image folder)",
    )
    p.add_argument("--images", required=True, type=Path, help="source image directory")
    p.add_argument("--out-images", required=True, type=Path, help="destination image directory")
    p.add_argument("--json", type=Path, help="annotation JSON to copy along (unchanged)")
    p.add_argument("--out-json", type=Path, help="where to copy --json")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for rotated images")
    p.add_argument(
        "--skip-bad", action="store_true", help="leave out unreadable images instead of failing"
    )
    p.set_defaults(func=cmd_canonicalize)


def cmd_canonicalize(args: argparse.Namespace) -> int:
    from ocr.data.exif import canonicalize_exif

    if (args.json is None) != (args.out_json is None):
        raise ValueError("--json and --out-json must be given together")
    stats = canonicalize_exif(
        args.images,
        args.out_images,
        json_path=args.json,
        out_json=args.out_json,
        quality=args.quality,
        on_error="skip" if args.skip_bad else "raise",
    )
    _print_stats(f"canonicalised {args.images} -> {args.out_images}", stats)
    return 0


# --------------------------------------------------------------------------- validate


def _display_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF orientation applied), None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - reported as a count, not fatal
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def add_validate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="load an annotation JSON and report counts and problems")
    p.add_argument("--images", required=True, type=Path, help="image directory")
    p.add_argument("--json", required=True, type=Path, help="annotation JSON")
    p.add_argument(
        "--no-check-images",
        action="store_true",
        help="do not check that image files exist (and skip the bounds check)",
    )
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    samples, problems = check_annotations(
        args.json, args.images, check_images=not args.no_check_images
    )
    words = sum(s.num_words for s in samples)
    dont_care = sum(sum(s.ignore) for s in samples)
    print(f"{args.json}:")
    print(f"  images: {len(samples)}")
    print(f"  images without words: {sum(1 for s in samples if s.num_words == 0)}")
    print(f"  words: {words}")
    print(f"  don't-care words: {dont_care}")
    if not args.no_check_images:
        outside = unreadable = 0
        tol = 1.0
        for s in samples:
            size = _display_size(s.path)
            if size is None:
                unreadable += 1
                continue
            w, h = size
            for poly in s.polygons:
                if (
                    poly[:, 0].min() < -tol
                    or poly[:, 1].min() < -tol
                    or poly[:, 0].max() > w + tol
                    or poly[:, 1].max() > h + tol
                ):
                    outside += 1
        print(f"  words outside the (displayed) image: {outside}")
        print(f"  unreadable images: {unreadable}")
    print(f"  errors: {len(problems)}")
    for p in problems[:MAX_SHOWN_PROBLEMS]:
        print(f"    - [{p.reason}] {p.message}")
    if len(problems) > MAX_SHOWN_PROBLEMS:
        print(f"    ... and {len(problems) - MAX_SHOWN_PROBLEMS} more")
    return 1 if problems else 0


# ------------------------------------------------------------------------------- maps


def add_maps_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "maps",
        help="precompute the DB target maps of an evaluation split (read by load_maps=true)",
        description="Compose the training config (configs/<config-name>.yaml with the given Hydra "
        "overrides, exactly as the run will), compute the DB targets of every sample of the split at "
        "the eval geometry and write them under <cache_dir>/maps/<split>-<key>/, keyed like the "
        "training run looks them up (dataset fingerprint, annotations, image size, target "
        "parameters, generator). Pass the same data overrides as the training run.",
    )
    p.add_argument("--split", default="val", choices=["val", "test"], help="evaluation split (default: val)")
    p.add_argument(
        "--generator",
        default="auto",
        choices=["auto", "reference", "vectorized"],
        help="target implementation; auto: what the run's loader uses (loader.targets)",
    )
    p.add_argument("--cache-dir", type=Path, help="default: the split's cache_config.cache_dir")
    p.add_argument("--config-name", default="train", help="Hydra config to compose (default: train)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per vectorised call (default: 8)")
    p.add_argument("--force", action="store_true", help="recompute even when an entry for the key exists")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training run (key=value)")
    p.set_defaults(func=cmd_maps)


def compose_config(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from ocr.config import register_configs

    register_configs()
    config_dir = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        return compose(config_name=config_name, overrides=[*overrides, "output_dir=unused"])


def cmd_maps(args: argparse.Namespace) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ocr.data.backends import choose_backend
    from ocr.data.cache import MANIFEST, entry_path
    from ocr.data.cache_key import annotations_component, dataset_component
    from ocr.data.datamodule import (
        ensure_builtin_dataset,
        load_split_source,
        split_config,
        target_kwargs,
        transform_params,
    )
    from ocr.data.maps import maps_key, write_maps_entry

    try:
        cfg = compose_config(args.config_name, list(args.overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(f"config: {e}") from e
    ensure_builtin_dataset(cfg.data)
    dcfg = split_config(cfg, args.split)
    generator = args.generator
    if generator == "auto":
        generator = choose_backend(cfg.loader).targets
    cache_dir = args.cache_dir or Path(dcfg.cache_config.cache_dir)
    source = load_split_source(cfg, args.split)
    size = transform_params(cfg.data, train=False).output_size
    tk = target_kwargs(cfg.data)
    names = [s.name for s in source.samples]
    key = maps_key(
        args.split,
        dataset_component(dcfg.image_path, names, bool(dcfg.cache_config.content_hash)),
        annotations_component(dcfg.annotation_path, dcfg.on_error),
        size,
        tk,
        generator,
    )
    final = entry_path(cache_dir, key)
    if (final / MANIFEST).is_file() and not args.force:
        print(f"up to date: {final} ({len(names)} samples, {generator} targets at {size} px)")
        return 0
    path, stats = write_maps_entry(cache_dir, key, source, size, tk, generator, batch_size=args.batch_size,
                                   progress=not args.quiet)
    _print_stats(f"maps of the {args.split} split -> {path}", stats)
    return 0


# ------------------------------------------------------------------------------- main

SUBCOMMANDS = [add_import_parser, add_canonicalize_parser, add_validate_parser, add_maps_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: SystemExit(2) from argparse
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.WARNING if args.quiet else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
        )
    try:
        return int(args.func(args))
    except (AnnotationError, ValueError, OSError) as e:
        msg = " | ".join(line.strip() for line in str(e).splitlines() if line.strip()) or repr(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
