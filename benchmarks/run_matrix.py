"""Benchmark matrix: CPU vs DALI loaders, precisions and caches on this machine.

    uv run python benchmarks/run_matrix.py [--quick] [--loaders cpu,dali-gpu,dali-cpu]
        [--precisions 32-true,16-mixed] [--caches off,on] [--epochs 3]
        [--limit-train-batches N] [--limit-val-batches N] [--emulate-tier entry|mid]
        [--force] [--out DIR] [hydra.overrides=...]
    uv run python benchmarks/run_matrix.py --loader-only [--root DIR]
    uv run python benchmarks/run_matrix.py report DIR [DIR ...] [--out DIR]

Each cell is a separate runners/train.py process with the same seed, epochs and batch
limits; its run_summary.json gives the figures. Cells this machine cannot run are listed
as skipped with the reason; a failing cell is recorded and the matrix goes on; finished
cells are reused on a re-run (same overrides) unless --force.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matrix_plan import (  # noqa: E402
    DEFAULT_CACHES, DEFAULT_LOADERS, DEFAULT_PRECISIONS, PlanError, PlannedCell, emulation_overrides, plan_cells,
)
from matrix_report import add_speedups, figures_from_summary, markdown_table, merge_results, write_outputs  # noqa: E402

from ocr.versions import stack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
QUICK = {"epochs": 2, "limit_train_batches": 3, "limit_val_batches": 3}


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"short cells: {QUICK}")
    p.add_argument("--loaders", type=_csv, default=list(DEFAULT_LOADERS))
    p.add_argument("--precisions", type=_csv, default=list(DEFAULT_PRECISIONS))
    p.add_argument("--caches", type=_csv, default=list(DEFAULT_CACHES))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit-train-batches", default="1.0")
    p.add_argument("--limit-val-batches", default="1.0")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--emulate-tier", choices=["entry", "mid"], default=None)
    p.add_argument("--force", action="store_true", help="re-run cells that finished before")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<tier>/<time>)")
    p.add_argument("--cells-dir", type=Path, default=None,
                   help="where cell runs live and are reused from (default benchmarks/results/<tier>/cells)")
    p.add_argument("--loader-only", action="store_true", help="no model: loader images/s per backend + raw decode bound")
    p.add_argument("--root", default=None, help="--loader-only: dataset root (default: the built-in synthetic data)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides passed to every cell (key=value)")
    return p


def machine() -> dict:
    import torch

    from ocr.hardware import probe

    info = probe().to_dict()
    try:
        import nvidia.dali  # noqa: F401

        dali = True
    except ImportError:
        dali = False
    return {"hardware": info, "cuda": torch.cuda.is_available(), "dali": dali}


def run_cell(planned: PlannedCell, common: list[str], cells_dir: Path, force: bool, timeout: int) -> dict:
    """Run (or reuse) one cell; returns its row (figures or the failure)."""
    key = planned.key(common)
    run_dir = cells_dir / key
    summary_path = run_dir / "run_summary.json"
    overrides = planned.overrides(common)
    if not force and summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("status") == "finished":
            return {"status": "ok", "reused": True, "run_dir": str(run_dir), **figures_from_summary(summary)}
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "runners" / "train.py"), f"hydra.run.dir={run_dir}",
           f"exp_name=matrix_{planned.cell.name}", *overrides]
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n", encoding="utf-8")
    started = time.perf_counter()
    with open(run_dir / "train.log", "w", encoding="utf-8") as log_file:
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = round(time.perf_counter() - started, 1)
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    if code == 0 and summary.get("status") == "finished":
        return {"status": "ok", "reused": False, "run_dir": str(run_dir), "process_wall_s": wall, **figures_from_summary(summary)}
    tail = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
    reason = f"exit {code}: {summary.get('error') or tail[0]}"[:300]
    return {"status": "failed", "reason": reason, "run_dir": str(run_dir), "process_wall_s": wall}


def run_matrix(args) -> int:
    info = machine()
    hw = info["hardware"]
    tier = hw["tier"] if not args.emulate_tier else f"emulated-{args.emulate_tier}"
    label = hw["tier"] if not args.emulate_tier else f"{args.emulate_tier} (emulated on {hw['tier']}: {hw['device']})"
    epochs, ltb, lvb = args.epochs, args.limit_train_batches, args.limit_val_batches
    if args.quick:
        epochs, ltb, lvb = QUICK["epochs"], QUICK["limit_train_batches"], QUICK["limit_val_batches"]
    common = [f"seed={args.seed}", f"trainer.max_epochs={epochs}", f"trainer.limit_train_batches={ltb}",
              f"trainer.limit_val_batches={lvb}", "trainer.enable_progress_bar=false", "logger.wandb.enabled=false",
              *args.overrides]
    if args.emulate_tier:
        gpu_total = max((g["memory_total_gb"] for g in hw["gpus"]), default=None)
        common += emulation_overrides(args.emulate_tier, gpu_total)
    plan = plan_cells(args.loaders, args.precisions, args.caches, cuda=info["cuda"], dali=info["dali"])
    out_dir = args.out or RESULTS / tier / time.strftime("%Y%m%d-%H%M%S")
    cells_dir = args.cells_dir or RESULTS / tier / "cells"
    runnable = [c for c in plan if not c.skip_reason]
    print(f"Benchmark matrix on {hw['device']} (tier {label}): {len(plan)} cells, {len(runnable)} runnable, "
          f"{len(plan) - len(runnable)} skipped; results -> {out_dir}", flush=True)

    rows, durations, started = [], [], time.perf_counter()
    done = 0
    for order, planned in enumerate(plan):
        row = {"tier": label, "order": order, "baseline": planned.cell.is_baseline, **planned.to_dict(),
               "cell": planned.cell.name, "emulated": bool(args.emulate_tier)}
        if planned.skip_reason:
            row.update(status="skipped", reason=planned.skip_reason)
            print(f"  - {planned.cell.name}: skipped ({planned.skip_reason})", flush=True)
            rows.append(row)
            continue
        done += 1
        elapsed = time.perf_counter() - started
        remaining = (sum(durations) / len(durations)) * (len(runnable) - done + 1) if durations else None
        eta = f", ~{remaining / 60:.1f} min remaining" if remaining is not None else ""
        print(f"[{done}/{len(runnable)}] {planned.cell.name} (elapsed {elapsed / 60:.1f} min{eta})", flush=True)
        t0 = time.perf_counter()
        row.update(run_cell(planned, common, cells_dir, args.force, args.timeout))
        if not row.get("reused"):
            durations.append(time.perf_counter() - t0)
        status = row["status"] + (" (reused)" if row.get("reused") else "")
        figures = f"{row['epoch_s']:.1f} s/epoch, hmean {row.get('hmean') or 0:.3f}" if row["status"] == "ok" else row.get("reason", "")
        print(f"      {status}: {figures}", flush=True)
        rows.append(row)
    add_speedups(rows)
    header = {"kind": "matrix", "hardware_label": label, "device": hw["device"], "hardware": hw,
              "caveat": ("--quick: a few batches of an untrained model; validation time is then mostly "
                         "post-processing of noise maps and hmean is 0, so read the train columns and the cache "
                         "hit rate, not the validation speed-ups") if args.quick else None,
              "settings": {"epochs": epochs, "limit_train_batches": ltb, "limit_val_batches": lvb,
                           "seed": args.seed, "overrides": common}, "versions": stack(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result = write_outputs(out_dir, rows, header, f"Benchmark matrix: {label}")
    print("\n" + result["table"] + f"\n\nWritten: {out_dir}/report.md, results.json, results.csv, speedup.png", flush=True)
    return 0 if all(r["status"] != "failed" for r in rows) else 1


def run_loader_only(args) -> int:
    from loader_bench import run_loader_bench

    from ocr.data.synthetic import ensure_dataset

    root = Path(args.root) if args.root else ensure_dataset(REPO / "data" / "synthetic_receipts")
    info = machine()
    tier = info["hardware"]["tier"]
    out_dir = args.out or RESULTS / tier / f"loader-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for split in ("train", "val"):
        print(f"Loader benchmark: {split} split of {root}", flush=True)
        result = run_loader_bench(root, split)
        bound = result["raw_bound_img_s"]
        for r in result["results"]:
            rows.append({"tier": tier, "cell": f"{r['backend']}-{r['device']}-{split}", "status": "ok", **r,
                         "raw_bound_img_s": bound, "ratio_to_raw": round(r["img_s"] / bound, 3) if bound else None})
    header = {"kind": "loader-only", "hardware_label": tier, "device": info["hardware"]["device"],
              "hardware": info["hardware"], "settings": {"root": str(root)}, "versions": stack()}
    lines = ["| split | backend | device | img/s | raw bound img/s | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['split']} | {r['backend']} | {r['device']} | {r['img_s']:.1f} | {r['raw_bound_img_s']:.1f} | "
              f"{r['ratio_to_raw']:.2f} |" for r in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({**header, "rows": rows}, indent=2, default=str), encoding="utf-8")
    (out_dir / "report.md").write_text(f"# Loader benchmark: {tier}\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines) + f"\n\nWritten: {out_dir}/report.md", flush=True)
    return 0


def run_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run_matrix.py report", description="Merge results folders of several machines")
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        rows, headers = merge_results(args.dirs)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    add_speedups(rows)
    out_dir = args.out or RESULTS / "merged" / time.strftime("%Y%m%d-%H%M%S")
    header = {"kind": "merged", "sources": [str(d) for d in args.dirs],
              "hardware_label": ", ".join(h.get("hardware_label", "?") for h in headers)}
    result = write_outputs(out_dir, rows, header, "Benchmark matrix across machines")
    print(markdown_table(rows) + f"\n\nWritten: {result['out_dir']}/report.md, speedup.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        return run_report(argv[1:])
    args = build_parser().parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"error: not a Hydra override (key=value): {' '.join(bad)}", file=sys.stderr)
        return 2
    try:
        return run_loader_only(args) if args.loader_only else run_matrix(args)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
