#!/usr/bin/env python
"""Generate the built-in synthetic receipt dataset (thin CLI over ocr.data.synthetic).

    uv run python scripts/make_synthetic_data.py --root data/synthetic_receipts \
        --num-train 200 --num-val 40 --num-test 40 --seed 0 [--force]

Without --force an existing complete dataset with the same seed / counts / generator
version is kept; with --force it is always rebuilt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

try:
    import ocr  # noqa: F401  (installed editable by uv)
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ocr.data.synthetic import GENERATOR_VERSION, SPLITS, ensure_dataset, generate_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/synthetic_receipts", help="dataset root (default: %(default)s)")
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-val", type=int, default=40)
    p.add_argument("--num-test", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate even if a matching dataset exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("num_train", "num_val", "num_test"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kw = dict(num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
              seed=args.seed, progress=not args.no_progress)
    t0 = time.perf_counter()
    try:
        root = (generate_dataset if args.force else ensure_dataset)(args.root, **kw)
    except RuntimeError as e:  # e.g. refusing to overwrite a foreign directory
        print(f"error: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    root = Path(root)
    n_words = n_dc = 0
    for split in SPLITS:
        data = json.loads((root / "jsons" / f"{split}.json").read_text(encoding="utf-8"))
        for entry in data["images"].values():
            for w in entry["words"].values():
                n_words += 1
                n_dc += w["transcription"] == "###"
    print(f"{root}: train={args.num_train} val={args.num_val} test={args.num_test} seed={args.seed} "
          f"(generator v{GENERATOR_VERSION}); {n_words} words ({n_dc} '###'); {dt:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
