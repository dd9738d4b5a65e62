"""Benchmark matrix results: figures from each run's run_summary.json, speed-ups against
the baseline cell, and the outputs (results.json / .csv, report.md, speedup.png), for one
machine or merged across machines (one row group per tier)."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path

COLUMNS = [
    ("tier", "tier"), ("cell", "cell"), ("status", "status"),
    ("epoch_s_later", "steady s/epoch (epochs 1+)"), ("speedup", "steady speed-up"),
    ("epoch_s_first", "warm-up s (epoch 0)"), ("speedup_first", "warm-up speed-up"),
    ("train_s_later", "train s/epoch (1+)"), ("val_s_first", "val s (epoch 0)"), ("val_s_later", "val s (epoch 1+)"),
    ("img_s_later", "train img/s (1+)"), ("cache_hit_rate", "cache hit %"), ("hmean", "hmean"),
    ("peak_gpu_gb", "peak GPU GB"), ("peak_host_gb", "peak host GB"), ("rests_on", "rests on"), ("note", "note"),
]
# figures shown as "median (min..max)" when a cell ran more than once
SPREAD = ("epoch_s_later", "epoch_s_first")


# peak GPU GB cells not from NVML's per-process figure are marked (see the note under the table)
GPU_SOURCE_MARKS = {"nvml-device": " (device)", "torch-allocated": " (torch)"}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _hit_rate(summary: dict) -> float | None:
    """Validation cache hit rate (%) over the epochs after the first (None: no cache)."""
    rate = _mean([e.get("val_cache_hit_rate") for e in summary.get("epochs", [])[1:]])
    return None if rate is None else 100.0 * rate


def _peak_gpu(memory: dict) -> dict:
    """Peak GPU memory of the run: the process's figure from NVML (torch's allocator, DALI's
    pools, the CUDA context) where the summary has it, else torch's allocator peak."""
    process = memory.get("peak_gpu_process_gb")
    if process is not None:
        source = memory.get("peak_gpu_process_source") or "nvml-process"
    else:
        process, source = memory.get("peak_gpu_allocated_gb"), "torch-allocated"
    return {"peak_gpu_gb": process, "peak_gpu_source": source if process is not None else None,
            "peak_gpu_torch_gb": memory.get("peak_gpu_allocated_gb")}


def _epoch_s(epoch: dict) -> float:
    return (epoch.get("train_seconds") or 0) + (epoch.get("val_seconds") or 0)


def figures_from_summary(summary: dict) -> dict:
    """One run's figures. Epoch 0 is the warm-up (DALI pipeline start, cuDNN autotune, the
    validation cache recording, first-touch allocations): ``*_first``. The steady state is the
    mean over epochs 1+ (``*_later``; None for a one-epoch run)."""
    epochs = summary.get("epochs", [])
    first = epochs[0] if epochs else {}
    later = epochs[1:]
    last = epochs[-1] if epochs else {}
    final = (summary.get("final_metrics") or {}).get("val") or {}
    memory = summary.get("memory") or {}
    return {
        "epochs": len(epochs),
        "steady_epochs": len(later),
        "train_batches": last.get("train_batches"),
        "val_batches": last.get("val_batches"),
        "epoch_s_first": _epoch_s(first) if epochs else None,
        "epoch_s_later": _mean([_epoch_s(e) for e in later]),
        "train_s_first": first.get("train_seconds"),
        "train_s_later": _mean([e.get("train_seconds") for e in later]),
        "val_s_first": first.get("val_seconds"),
        "val_s_later": _mean([e.get("val_seconds") for e in later]),
        "val_loader_s_first": first.get("val_loader_wait_seconds"),
        "val_loader_s_later": _mean([e.get("val_loader_wait_seconds") for e in later]),
        "img_s_later": _mean([e.get("train_img_s") for e in later]),
        "hmean": (final.get("cleval") or {}).get("hmean"),
        "iou_hmean": (final.get("iou") or {}).get("hmean"),
        "cache_hit_rate": _hit_rate(summary),
        **_peak_gpu(memory),
        "peak_host_gb": memory.get("peak_host_rss_gb"),
        "run_wall_s": summary.get("wall_seconds"),
        "backend": summary.get("backend"),
        "precision_used": summary.get("precision"),
    }


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate_runs(runs: list[dict]) -> dict:
    """A cell's figures from its repeated runs: the median of each numeric figure (other
    values from the first run), and min / max of the steady and warm-up s/epoch."""
    out = {"repeats": len(runs)}
    for key in runs[0]:
        values = [r.get(key) for r in runs if r.get(key) is not None]
        numbers = values and all(_number(v) for v in values) and len(set(values)) > 1
        out[key] = statistics.median(values) if numbers else runs[0].get(key)
    for key in SPREAD:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[f"{key}_min"], out[f"{key}_max"] = (min(values), max(values)) if values else (None, None)
    return out


def add_speedups(rows: list[dict]) -> None:
    """Within each tier, against the baseline cell: ``speedup`` = steady s/epoch (epochs 1+;
    ``speedup_low`` / ``_high`` from the cell's slowest / fastest repeat), ``speedup_first`` = the
    warm-up epoch's."""
    by_tier: dict[str, dict] = {}
    for row in rows:
        if row.get("baseline") and row.get("status") == "ok":
            by_tier[row["tier"]] = row
    for row in rows:
        base = by_tier.get(row["tier"]) if row.get("status") == "ok" else None
        base = base or {}
        row["speedup"] = _ratio(base.get("epoch_s_later"), row.get("epoch_s_later"))
        row["speedup_low"] = _ratio(base.get("epoch_s_later"), row.get("epoch_s_later_max"))
        row["speedup_high"] = _ratio(base.get("epoch_s_later"), row.get("epoch_s_later_min"))
        row["speedup_first"] = _ratio(base.get("epoch_s_first"), row.get("epoch_s_first"))


def _ratio(base, value):
    return round(base / value, 2) if base and value else None


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _date(started_at) -> str:
    """'2026-12-06T14:29:05+0000' -> '2026-12-06 14:29'."""
    return str(started_at)[:16].replace("T", " ") if started_at else "?"


def _status(row: dict) -> str:
    status = row.get("status", "?")
    if row.get("reason"):
        return f"{status}: {row['reason']}"
    dates = sorted(_date(d) for d in row.get("reused_dates") or [])
    if dates:
        span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} .. {dates[-1]}"
        status += f", reused {len(dates)}/{row.get('repeats', len(dates))} (run {span})"
    return status


def _cell_text(row: dict, key: str) -> str:
    value = row.get(key)
    if key == "status":
        return _status(row)
    if key in SPREAD and value is not None and row.get("repeats", 1) > 1 and row.get(key + "_min") is not None:
        return f"{_fmt(value)} ({_fmt(row.get(key + '_min'))}..{_fmt(row.get(key + '_max'))})"
    if key == "speedup" and value is not None:
        spread = row.get("repeats", 1) > 1 and row.get("speedup_low") is not None
        return f"{value:.2f}x" + (f" ({row['speedup_low']:.2f}..{row['speedup_high']:.2f})" if spread else "")
    if key == "speedup_first" and value is not None:
        return f"{value:.2f}x"
    if key == "rests_on":
        if row.get("status") != "ok":
            return "-"
        return (f"{row.get('repeats', 1)} x {_fmt(row.get('steady_epochs'))} ep x "
                f"{_fmt(row.get('train_batches'))}+{_fmt(row.get('val_batches'))} b")
    if key == "peak_gpu_gb" and value is not None and row.get("peak_gpu_source") in GPU_SOURCE_MARKS:
        return f"{_fmt(value)}{GPU_SOURCE_MARKS[row['peak_gpu_source']]}"
    return _fmt(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell_text(row, key).replace("|", "/") for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def _csv_row(row: dict) -> dict:
    """Scalars as they are, one level of dicts (the stack) as ``key.sub``; lists (the runs) left out."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
        elif not isinstance(value, list):
            out[key] = value
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    from ocr.data.annotations import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


NOTES = [
    "steady s/epoch = train + validation seconds per epoch, mean over epochs 1+ of a run (median over the "
    "cell's runs, min..max in brackets); warm-up = epoch 0 alone (DALI pipeline start, cuDNN autotune, the "
    "validation cache recording, first allocations). Speed-up = baseline cell (cpu loader, 32-true, cache off) "
    "figure / this cell's, within the same matrix run; the steady speed-up is the headline, its brackets come "
    "from the cell's slowest and fastest run.",
    "rests on = runs x steady epochs per run x (train + validation batches per epoch); the warm-up figure rests "
    "on one epoch of each run.",
    "reused: the run folder of an earlier matrix run with the same overrides, commit, dirty flag and library "
    "versions; the date is when that run started.",
    "peak GPU GB = the process's GPU memory from NVML (torch's allocator, DALI's pools, the CUDA "
    "context), the largest figure at the end of a train or validation phase; \"(device)\": NVML had no "
    "per-process figure (containers) and the device-wide used memory is shown; \"(torch)\": only "
    "torch's allocator peak was recorded.",
]


def write_outputs(out_dir: Path, rows: list[dict], header: dict, title: str) -> dict:
    """results.json, results.csv, report.md and speedup.png under ``out_dir``."""
    out_dir = Path(out_dir)
    _atomic_write_text(out_dir / "results.json", json.dumps({**header, "rows": rows}, indent=2, default=str))
    flat = [_csv_row(row) for row in rows]
    keys = sorted({k for row in flat for k in row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(flat)
    _atomic_write_text(out_dir / "results.csv", buffer.getvalue())
    table = markdown_table(rows)
    lines = [f"# {title}", ""]
    for key in ("hardware_label", "device", "command", "settings", "versions", "caveat"):
        if header.get(key):
            lines.append(f"- {key.replace('_', ' ')}: {header[key]}")
    lines += ["", table, "", "\n\n".join(NOTES), ""]
    _atomic_write_text(out_dir / "report.md", "\n".join(lines))
    plot_speedups(rows, out_dir / "speedup.png", title)
    return {"table": table, "out_dir": str(out_dir)}


def plot_speedups(rows: list[dict], path: Path, title: str) -> None:
    """Two bars per finished cell: the steady-state speed-up (with its min..max over runs)
    and the warm-up epoch's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and (r.get("speedup") or r.get("speedup_first"))]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ok) + 2), 4.5))
    if ok:
        multi_tier = len({r["tier"] for r in ok}) > 1
        labels = [f"{r['cell']}\n[{r['tier']}]" if multi_tier else r["cell"] for r in ok]
        x = list(range(len(ok)))
        steady = [r.get("speedup") or 0 for r in ok]
        errors = [[s - (r.get("speedup_low") or s) for s, r in zip(steady, ok)],
                  [(r.get("speedup_high") or s) - s for s, r in zip(steady, ok)]]
        bars = ax.bar([i - 0.2 for i in x], steady, 0.4, yerr=errors, capsize=3,
                      label="steady state (epochs 1+; whiskers: min..max over runs)")
        ax.bar_label(bars, labels=[f"{r['speedup']:.2f}x" if r.get("speedup") else "-" for r in ok], fontsize=7)
        bars = ax.bar([i + 0.2 for i in x], [r.get("speedup_first") or 0 for r in ok], 0.4, label="warm-up (epoch 0)")
        ax.bar_label(bars, labels=[f"{r['speedup_first']:.2f}x" if r.get("speedup_first") else "-" for r in ok],
                     fontsize=7)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished cells", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("speed-up vs baseline (s/epoch)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def merge_results(dirs: list[Path]) -> tuple[list[dict], list[dict]]:
    """Rows of several results folders (one per machine / tier), grouped by tier."""
    rows, headers = [], []
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a benchmark results folder (results.json missing)")
        data = json.loads(path.read_text(encoding="utf-8"))
        headers.append({k: v for k, v in data.items() if k != "rows"})
        rows.extend(data.get("rows", []))
    rows.sort(key=lambda r: (r.get("tier", ""), r.get("order", 0)))
    return rows, headers
