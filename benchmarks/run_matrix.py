"""Benchmark matrix: CPU vs DALI loaders, precisions and caches on this machine.

    uv run python benchmarks/run_matrix.py [--quick] [--loaders cpu,dali-gpu,dali-cpu]
        [--precisions 32-true,16-mixed] [--caches off,on] [--epochs 3] [--repeats 3]
        [--limit-train-batches N] [--limit-val-batches N] [--emulate-tier entry|mid]
        [--force] [--out DIR] [hydra.overrides=...]
    uv run python benchmarks/run_matrix.py --loader-only [--root DIR]
    uv run python benchmarks/run_matrix.py report DIR [DIR ...] [--out DIR]

Each cell is a separate runners/train.py process with the same seed, epochs and batch
limits, run --repeats times (round the whole matrix); its run_summary.json gives the
figures. The headline is the steady state (epochs 1+, median over the runs, with min..max);
epoch 0, the warm-up, has its own column. Cells this machine cannot run are listed as
skipped with the reason; a failing cell is recorded and the matrix goes on. A finished run
is reused on a re-run only when its overrides, commit, dirty flag and library versions are
the same (the report marks it, with the date it ran), unless --force.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matrix_plan import (  # noqa: E402
    DEFAULT_CACHES, DEFAULT_LOADERS, DEFAULT_PRECISIONS, PlanError, PlannedCell, emulation_overrides, plan_cells,
)
from matrix_report import (  # noqa: E402
    add_speedups, aggregate_runs, figures_from_summary, markdown_table, merge_results, write_outputs,
)

from ocr.versions import stack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# --quick: epochs 1-2 are the steady state; one validation batch (an untrained model's validation
# time is mostly post-processing of noise maps, see the caveat). Explicit flags win over these.
QUICK = {"epochs": 3, "limit_train_batches": "3", "limit_val_batches": "1", "repeats": 1}
FULL = {"epochs": 3, "limit_train_batches": "1.0", "limit_val_batches": "1.0", "repeats": 3}


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"short cells: {QUICK} (else {FULL})")
    p.add_argument("--loaders", type=_csv, default=list(DEFAULT_LOADERS))
    p.add_argument("--precisions", type=_csv, default=list(DEFAULT_PRECISIONS))
    p.add_argument("--caches", type=_csv, default=list(DEFAULT_CACHES))
    p.add_argument("--epochs", type=int, default=None, help="epoch 0 is the warm-up; the speed-ups are from epochs 1+")
    p.add_argument("--limit-train-batches", default=None)
    p.add_argument("--limit-val-batches", default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=None, help="runs per cell; the report gives median and spread")
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


def _started(summary: dict, summary_path: Path) -> str:
    """When a run started (its summary's ``started_at``, else the summary file's time)."""
    return summary.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(summary_path.stat().st_mtime))


def run_cell(planned: PlannedCell, common: list[str], cells_dir: Path, *, versions: dict, repeat: int = 0,
             force: bool = False, timeout: int = 3600) -> dict:
    """Run (or reuse) one run of one cell; returns its figures or the failure. A finished run
    is reused only from the folder of the same key (overrides, code and library versions, repeat)."""
    run_dir = cells_dir / planned.key(common, versions, repeat)
    summary_path = run_dir / "run_summary.json"
    if not force and summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("status") == "finished":
            return {"status": "ok", "reused": True, "run_dir": str(run_dir),
                    "started_at": _started(summary, summary_path), **figures_from_summary(summary)}
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "runners" / "train.py"), f"hydra.run.dir={run_dir}",
           f"exp_name=matrix_{planned.cell.name}", *planned.overrides(common)]
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n", encoding="utf-8")
    (run_dir / "key.json").write_text(json.dumps({"overrides": planned.overrides(common), "versions": versions,
                                                  "repeat": repeat}, indent=2, default=str), encoding="utf-8")
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
        return {"status": "ok", "reused": False, "run_dir": str(run_dir), "process_wall_s": wall,
                "started_at": _started(summary, summary_path), **figures_from_summary(summary)}
    tail = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
    reason = f"exit {code}: {summary.get('error') or tail[0]}"[:300]
    return {"status": "failed", "reason": reason, "run_dir": str(run_dir), "process_wall_s": wall}


def cell_row(runs: list[dict]) -> dict:
    """A cell's row from its runs: failed if one failed, else the runs' medians and spread,
    which runs were reused (and when they ran)."""
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        return {"status": "failed", "reason": failed[0]["reason"], "runs": runs}
    meta = ("status", "reused", "run_dir", "started_at", "process_wall_s")
    figures = aggregate_runs([{k: v for k, v in r.items() if k not in meta} for r in runs])
    return {"status": "ok", **figures, "runs": runs, "reused_dates": [r["started_at"] for r in runs if r["reused"]]}


def _settings(args) -> tuple[int, str, str, int]:
    """(epochs, limit_train_batches, limit_val_batches, repeats): the flags given, else the
    defaults of --quick or of a full matrix."""
    defaults = QUICK if args.quick else FULL
    return tuple(defaults[key] if getattr(args, key) is None else getattr(args, key)
                 for key in ("epochs", "limit_train_batches", "limit_val_batches", "repeats"))


def run_matrix(args, command: str) -> int:
    info = machine()
    hw = info["hardware"]
    tier = hw["tier"] if not args.emulate_tier else f"emulated-{args.emulate_tier}"
    label = hw["tier"] if not args.emulate_tier else f"{args.emulate_tier} (emulated on {hw['tier']}: {hw['device']})"
    epochs, ltb, lvb, repeats = _settings(args)
    if epochs < 2:
        print(f"warning: {epochs} epoch per cell: epoch 0 is the warm-up, so there is no steady-state figure "
              "and no steady speed-up (use --epochs 2 or more)", file=sys.stderr, flush=True)
    common = [f"seed={args.seed}", f"trainer.max_epochs={epochs}", f"trainer.limit_train_batches={ltb}",
              f"trainer.limit_val_batches={lvb}", "trainer.enable_progress_bar=false", "logger.wandb.enabled=false",
              *args.overrides]
    if args.emulate_tier:
        gpu_total = max((g["memory_total_gb"] for g in hw["gpus"]), default=None)
        common += emulation_overrides(args.emulate_tier, gpu_total)
    plan = plan_cells(args.loaders, args.precisions, args.caches, cuda=info["cuda"], dali=info["dali"])
    versions = stack()
    out_dir = args.out or RESULTS / tier / time.strftime("%Y%m%d-%H%M%S")
    cells_dir = args.cells_dir or RESULTS / tier / "cells"
    runnable = [c for c in plan if not c.skip_reason]
    print(f"Benchmark matrix on {hw['device']} (tier {label}): {len(plan)} cells, {len(runnable)} runnable x "
          f"{repeats} run(s), {len(plan) - len(runnable)} skipped; results -> {out_dir}", flush=True)

    # Repeats go round the whole matrix, so a slow spell of a shared machine is spread over the cells.
    runs: dict[str, list[dict]] = {c.cell.name: [] for c in runnable}
    durations, started, total, done = [], time.perf_counter(), len(runnable) * repeats, 0
    for repeat in range(repeats):
        for planned in runnable:
            name = planned.cell.name
            if any(r["status"] != "ok" for r in runs[name]):
                total -= 1
                continue
            done += 1
            elapsed = time.perf_counter() - started
            eta = sum(durations) / len(durations) * (total - done + 1) / 60 if durations else None
            eta = f", ~{eta:.1f} min remaining" if eta is not None else ""
            print(f"[{done}/{total}] {name} run {repeat + 1}/{repeats} (elapsed {elapsed / 60:.1f} min{eta})",
                  flush=True)
            t0 = time.perf_counter()
            run = run_cell(planned, common, cells_dir, versions=versions, repeat=repeat, force=args.force,
                           timeout=args.timeout)
            if not run.get("reused"):
                durations.append(time.perf_counter() - t0)
            runs[name].append(run)
            print(f"      {_run_line(run)}", flush=True)

    rows = []
    for order, planned in enumerate(plan):
        row = {"tier": label, "order": order, "baseline": planned.cell.is_baseline, **planned.to_dict(),
               "cell": planned.cell.name, "emulated": bool(args.emulate_tier), "command": command, "stack": versions}
        if planned.skip_reason:
            row.update(status="skipped", reason=planned.skip_reason)
        else:
            row.update(cell_row(runs[planned.cell.name]))
        rows.append(row)
    add_speedups(rows)
    header = {"kind": "matrix", "hardware_label": label, "device": hw["device"], "hardware": hw, "command": command,
              "caveat": ("--quick: a few batches of an untrained model; validation time is then mostly "
                         "post-processing of noise maps and hmean is 0, so read the train columns and the cache "
                         "hit rate, not the validation speed-ups") if args.quick else None,
              "settings": {"epochs": epochs, "steady_epochs": max(0, epochs - 1), "limit_train_batches": ltb,
                           "limit_val_batches": lvb, "repeats": repeats, "seed": args.seed, "overrides": common},
              "versions": versions, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result = write_outputs(out_dir, rows, header, f"Benchmark matrix: {label}")
    print("\n" + result["table"] + f"\n\nWritten: {out_dir}/report.md, results.json, results.csv, speedup.png", flush=True)
    return 0 if all(r["status"] != "failed" for r in rows) else 1


def _run_line(run: dict) -> str:
    if run["status"] != "ok":
        return f"failed: {run.get('reason', '')}"
    steady = run.get("epoch_s_later")
    steady = f"{steady:.1f} s/epoch steady" if steady is not None else "no steady epoch"
    reused = f" (reused, run {run['started_at']})" if run.get("reused") else ""
    return f"ok{reused}: {steady}, warm-up epoch {run['epoch_s_first'] or 0:.1f} s"


def run_loader_only(args, command: str) -> int:
    from loader_bench import format_table, run_loader_bench

    from ocr.data.synthetic import ensure_dataset

    root = Path(args.root) if args.root else ensure_dataset(REPO / "data" / "synthetic_receipts")
    info = machine()
    tier = info["hardware"]["tier"]
    out_dir = args.out or RESULTS / tier / f"loader-{time.strftime('%Y%m%d-%H%M%S')}"
    rows, tables = [], []
    for split in ("train", "val"):
        print(f"Loader benchmark: {split} split of {root}", flush=True)
        result = run_loader_bench(root, split)
        # each row carries its decode reference and the ratio from its own round (loader_bench.py)
        rows += [{"tier": tier, "cell": f"{r['name']}-{split}", "status": "ok", **r} for r in result["results"]]
        tables.append(format_table(result, markdown=True))
    header = {"kind": "loader-only", "hardware_label": tier, "device": info["hardware"]["device"],
              "hardware": info["hardware"], "command": command, "settings": {"root": str(root)}, "versions": stack()}
    lines = ["\n\n".join(tables)]
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
    if args.repeats is not None and args.repeats < 1:
        print(f"error: --repeats {args.repeats}: must be 1 or more", file=sys.stderr)
        return 2
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"error: not a Hydra override (key=value): {' '.join(bad)}", file=sys.stderr)
        return 2
    try:
        command = shlex.join(["benchmarks/run_matrix.py", *argv])
        return run_loader_only(args, command) if args.loader_only else run_matrix(args, command)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
