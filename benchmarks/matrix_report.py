"""Benchmark matrix results: figures from each run's run_summary.json, speed-ups against
the baseline cell, and the outputs (results.json / .csv, report.md, speedup.png), for one
machine or merged across machines (one row group per tier)."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

COLUMNS = [
    ("tier", "tier"), ("cell", "cell"), ("status", "status"),
    ("train_s", "train s/epoch"), ("val_s_first", "val s (epoch 0)"), ("val_s_later", "val s (epoch 1+)"),
    ("img_s", "train img/s"), ("cache_hit_rate", "cache hit %"), ("hmean", "hmean"),
    ("peak_gpu_gb", "peak GPU GB"), ("peak_host_gb", "peak host GB"),
    ("epoch_s", "s/epoch"), ("speedup", "speed-up"), ("note", "note"),
]


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


def figures_from_summary(summary: dict) -> dict:
    epochs = summary.get("epochs", [])
    train = [e.get("train_seconds") for e in epochs]
    val = [e.get("val_seconds") for e in epochs]
    epoch_totals = [(t or 0) + (v or 0) for t, v in zip(train, val)]
    later = epoch_totals[1:] or epoch_totals
    final = (summary.get("final_metrics") or {}).get("val") or {}
    memory = summary.get("memory") or {}
    return {
        "epochs": len(epochs),
        "train_s": _mean(train),
        "val_s_first": val[0] if val else None,
        "val_s_later": _mean(val[1:]),
        "val_loader_s_first": epochs[0].get("val_loader_wait_seconds") if epochs else None,
        "val_loader_s_later": _mean([e.get("val_loader_wait_seconds") for e in epochs[1:]]),
        "img_s": _mean([e.get("train_img_s") for e in epochs]),
        "epoch_s": _mean(epoch_totals),
        "epoch_s_later": _mean(later),
        "hmean": (final.get("cleval") or {}).get("hmean"),
        "iou_hmean": (final.get("iou") or {}).get("hmean"),
        "cache_hit_rate": _hit_rate(summary),
        **_peak_gpu(memory),
        "peak_host_gb": memory.get("peak_host_rss_gb"),
        "run_wall_s": summary.get("wall_seconds"),
        "backend": summary.get("backend"),
        "precision_used": summary.get("precision"),
    }


def add_speedups(rows: list[dict]) -> None:
    """speed-up = baseline s/epoch / cell s/epoch, within each tier (steady state too)."""
    by_tier: dict[str, dict] = {}
    for row in rows:
        if row.get("baseline") and row.get("status") == "ok":
            by_tier[row["tier"]] = row
    for row in rows:
        base = by_tier.get(row["tier"])
        ok = base and row.get("status") == "ok" and row.get("epoch_s")
        row["speedup"] = round(base["epoch_s"] / row["epoch_s"], 2) if ok else None
        ok_later = ok and row.get("epoch_s_later")
        row["speedup_steady"] = round(base["epoch_s_later"] / row["epoch_s_later"], 2) if ok_later else None


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key)
            if key == "speedup" and value is not None:
                value = f"{value:.2f}x"
            if key == "status" and row.get("reason"):
                value = f"{value}: {row['reason']}"
            if key == "peak_gpu_gb" and value is not None and row.get("peak_gpu_source") in GPU_SOURCE_MARKS:
                value = f"{_fmt(value)}{GPU_SOURCE_MARKS[row['peak_gpu_source']]}"
            cells.append(_fmt(value).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(out_dir: Path, rows: list[dict], header: dict, title: str) -> dict:
    """results.json, results.csv, report.md and speedup.png under ``out_dir``."""
    out_dir = Path(out_dir)
    _atomic_write_text(out_dir / "results.json", json.dumps({**header, "rows": rows}, indent=2, default=str))
    keys = sorted({k for row in rows for k in row if not isinstance(row[k], (dict, list))})
    csv_path = out_dir / "results.csv"
    with open(csv_path.with_suffix(".csv.tmp"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(csv_path.with_suffix(".csv.tmp"), csv_path)
    table = markdown_table(rows)
    lines = [f"# {title}", ""]
    for key in ("hardware_label", "device", "settings", "caveat"):
        if header.get(key):
            lines.append(f"- {key.replace('_', ' ')}: {header[key]}")
    lines += ["", table, "",
              "s/epoch = train + validation seconds per epoch (mean over epochs); speed-up = baseline cell "
              "(cpu loader, 32-true, cache off) s/epoch / this cell's, measured in the same matrix run.",
              "peak GPU GB = the process's GPU memory from NVML (torch's allocator, DALI's pools, the CUDA "
              "context), the largest figure at the end of a train or validation phase; \"(device)\": NVML had no "
              "per-process figure (containers) and the device-wide used memory is shown; \"(torch)\": only "
              "torch's allocator peak was recorded.", ""]
    _atomic_write_text(out_dir / "report.md", "\n".join(lines))
    plot_speedups(rows, out_dir / "speedup.png", title)
    return {"table": table, "out_dir": str(out_dir)}


def plot_speedups(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("speedup")]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok) + 2), 4.5))
    if ok:
        tiers = sorted({r["tier"] for r in ok})
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        labels = [f"{r['cell']}\n[{r['tier']}]" if len(tiers) > 1 else r["cell"] for r in ok]
        bars = ax.bar(range(len(ok)), [r["speedup"] for r in ok],
                      color=[colours[tiers.index(r["tier"]) % len(colours)] for r in ok])
        ax.bar_label(bars, labels=[f"{r['speedup']:.2f}x" for r in ok], fontsize=8)
        ax.set_xticks(range(len(ok)), labels, rotation=45, ha="right", fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
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
