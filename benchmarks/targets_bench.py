"""Benchmark the DB training targets: numpy/OpenCV reference vs the vectorised torch version.

    uv run python benchmarks/targets_bench.py [--batch 16] [--polygons 50] [--size 640]
        [--device cpu|cuda] [--threads 1] [--repeats 10] [--markdown] [--json out.json]

Inputs are receipt-like: per image ``--polygons`` text lines, axis-aligned or slightly rotated boxes
40-400 px long and 10-30 px tall, a few marked don't-care, some crossing the border.

Defaults are training's: each loader thread (and each DataLoader worker) computes its batches'
targets with one torch thread (``--threads 1``); the training process runs several such threads
side by side, so per-thread time is what sets the loader's throughput.

nanoGPT ``bench.py`` style: ``--warmup`` untimed runs, then ``--repeats`` timed runs of each
implementation (the same number for both; synchronising on CUDA); the median and the min per image
are reported, and the speed-up from each. The reference runs one image at a time; the vectorised
version one batch at a time, split into ``pack`` (host: prepare_polygons + numpy packing) and
``render`` (device). Agreement is measured on the same batch: threshold-map mean/max absolute
difference, IoU of each binary map, and how far from the relevant polygon boundary the differing
prob pixels are. ``--markdown`` prints the summary table as markdown (pasted unchanged into the
README); the JSON records the command, the stack (``ocr.versions.stack``) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ocr.data.targets import (  # noqa: E402
    DEFAULT_TILE,
    boundary_distance,
    make_db_targets,
    pack_db_geometry,
    prepare_polygons,
    render_db_targets,
)


def receipt_polygons(
    rng: np.random.Generator, n: int, height: int, width: int, ignore_frac: float = 0.05
) -> tuple[list[np.ndarray], list[bool]]:
    """``n`` receipt-like text-line quads: 40-400 x 10-30 px, half axis-aligned, half rotated by <= 3 deg."""
    polys = []
    for _ in range(n):
        w, h = rng.uniform(40, 400), rng.uniform(10, 30)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        a = np.deg2rad(rng.uniform(-3, 3)) if rng.random() < 0.5 else 0.0
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        box = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2.0
        polys.append(box @ rot.T + [cx, cy])
    return polys, [bool(rng.random() < ignore_frac) for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeats: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of ``repeats`` calls (CPU time: robust to a busy machine, but
    it sums all threads)."""
    wall, cpu = [], []
    for _ in range(repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def agreement(polys, ignore, ref: list[dict], vec: dict) -> dict:
    """Reference vs vectorised on one batch."""
    stats: dict[str, float] = {}
    r = {k: np.stack([x[k] for x in ref]) for k in ref[0]}
    v = {k: t[:, 0].float().cpu().numpy() for k, t in vec.items()}
    diff = np.abs(r["thresh_map"] - v["thresh_map"])
    stats["thresh_mae"] = float(diff.mean())
    stats["thresh_max_abs"] = float(diff.max())
    for key in ("prob_map", "thresh_mask"):
        stats[f"{key}_iou"] = _iou(r[key] > 0.5, v[key] > 0.5)
        stats[f"{key}_diff_frac"] = float(((r[key] > 0.5) != (v[key] > 0.5)).mean())
    stats["prob_mask_iou_of_masked"] = _iou(r["prob_mask"] < 0.5, v["prob_mask"] < 0.5)
    # how far are the differing prob pixels from the nearest shrunk-polygon boundary?
    worst = 0.0
    for img, (p, i) in enumerate(zip(polys, ignore)):
        bad = np.argwhere((r["prob_map"][img] > 0.5) != (v["prob_map"][img] > 0.5))
        if not len(bad):
            continue
        d = np.full(len(bad), np.inf)
        for q in prepare_polygons(p, i):
            if not q.ignore:
                np.minimum(d, boundary_distance(q.shrunk, bad[:, 1] + 0.5, bad[:, 0] + 0.5), out=d)
        worst = max(worst, float(d.max()))
    stats["prob_diff_max_boundary_dist_px"] = worst
    return stats


def _timings(wall: list[float], cpu: list[float], images: int) -> dict:
    """Median and min wall-clock ms per image, median CPU ms per image, of ``images`` per call."""
    return {"ms_per_image": statistics.median(wall) * 1e3 / images, "ms_per_image_min": min(wall) * 1e3 / images,
            "cpu_ms_per_image": statistics.median(cpu) * 1e3 / images, "runs_ms": [1e3 * t for t in wall]}


def summary_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The headline table: reference, vectorised and the speed-up, median and min."""
    ref, vec = result["reference"], result["vectorised"]
    header = ["DB targets", "ms/image (median)", "ms/image (min)", "CPU ms/image (median)"]
    rows = [
        ["reference (NumPy/OpenCV, per image)", f"{ref['ms_per_image']:.2f}", f"{ref['ms_per_image_min']:.2f}",
         f"{ref['cpu_ms_per_image']:.2f}"],
        ["vectorised (torch, per batch)", f"{vec['ms_per_image']:.2f}", f"{vec['ms_per_image_min']:.2f}",
         f"{vec['cpu_ms_per_image']:.2f}"],
        ["speed-up", f"{result['speedup_per_image']:.1f}x", f"{result['speedup_per_image_min']:.1f}x",
         f"{result['speedup_per_image_cpu_time']:.1f}x"],
    ]
    return header, rows


def heading(result: dict) -> str:
    c, s = result["config"], result["stack"]
    load = ", ".join(f"{x:.2f}" for x in result["loadavg_start"]) + " -> " + ", ".join(
        f"{x:.2f}" for x in result["loadavg_end"])
    dirty = " (uncommitted changes)" if s.get("dirty") else ""
    return (f"`{result['command']}` on {c['device_name']} ({c['cpus']} CPUs), {result['date']}: batch {c['batch']} x "
            f"{c['polygons_per_image']} polygons, {c['size']}x{c['size']}, torch threads {c['torch_threads']}, "
            f"tile {c['tile']}, {c['repeats']} timed runs of each after {c['warmup']} warm-up runs; load average "
            f"{load}; torch {s.get('torch')}, commit {(s.get('commit') or '?')[:10]}{dirty}")


def format_summary(result: dict, markdown: bool = False) -> str:
    header, rows = summary_rows(result)
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in (header, ["---"] * len(header), *rows)]
    else:
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        lines = ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
                 for line in (header, *rows)]
    return "\n".join([heading(result), "", *lines])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--polygons", type=int, default=50, help="text lines per image")
    ap.add_argument("--size", type=int, default=640, help="map height and width")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: each training loader thread computes targets with one)")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs of each implementation")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs of each implementation first")
    ap.add_argument("--ref-images", type=int, default=None, help="images per reference run (default: batch)")
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE, help="columns per distance tile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-agreement", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="print the summary table as markdown (for the README)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be at least 1 and --warmup at least 0")

    from ocr.hardware import probe
    from ocr.versions import stack

    loadavg_start = list(os.getloadavg())
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    rng = np.random.default_rng(args.seed)
    size = args.size
    data = [receipt_polygons(rng, args.polygons, size, size) for _ in range(args.batch)]
    polys = [d[0] for d in data]
    ignore = [d[1] for d in data]
    tile = args.tile
    cpu_dev = torch.device("cpu")

    # --- reference, per image (as training's loader threads run it: one sample at a time)
    n_ref = min(args.ref_images or args.batch, args.batch)
    reference = lambda: [make_db_targets(polys[i], ignore[i], size, size) for i in range(n_ref)]  # noqa: E731
    for _ in range(args.warmup):
        reference()
    ref_wall, ref_cpu = _time(reference, args.repeats, cpu_dev)

    # --- vectorised, per batch
    geom = pack_db_geometry(polys, ignore, size, size, tile=tile)
    vectorised = lambda: render_db_targets(pack_db_geometry(polys, ignore, size, size, tile=tile), device)  # noqa: E731
    for _ in range(args.warmup):
        vectorised()
    _sync(device)
    total_wall, total_cpu = _time(vectorised, args.repeats, device)
    pack_wall, _ = _time(lambda: pack_db_geometry(polys, ignore, size, size, tile=tile), args.repeats, cpu_dev)
    prep_wall, _ = _time(
        lambda: [prepare_polygons(p, i, with_dilated=False) for p, i in zip(polys, ignore)], args.repeats, cpu_dev
    )
    render_wall, _ = _time(lambda: render_db_targets(geom, device), args.repeats, device)
    buffers = render_db_targets(geom, device)
    reuse_wall, _ = _time(lambda: render_db_targets(geom, device, out=buffers), args.repeats, device)
    med = lambda ts: statistics.median(ts) * 1e3  # noqa: E731
    b = args.batch
    ref = _timings(ref_wall, ref_cpu, n_ref)
    vec = {**_timings(total_wall, total_cpu, b), "ms_per_batch": med(total_wall)}
    result = {
        "command": shlex.join(["python", "benchmarks/targets_bench.py", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "stack": stack(),
        "config": {
            "batch": b,
            "polygons_per_image": args.polygons,
            "size": size,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else probe().cpu_model,
            "torch_threads": torch.get_num_threads(),
            "tile": tile,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "reference_images_per_run": n_ref,
            "cpus": os.cpu_count(),
        },
        "loadavg_start": loadavg_start,
        "reference": ref,
        "vectorised": vec,
        "pack_ms_per_batch": med(pack_wall),
        "prepare_polygons_ms_per_batch": med(prep_wall),
        "render_ms_per_batch": med(render_wall),
        "render_ms_per_batch_min": min(render_wall) * 1e3,
        "render_reused_outputs_ms_per_batch": med(reuse_wall),
        "speedup_per_image": ref["ms_per_image"] / vec["ms_per_image"],
        "speedup_per_image_min": ref["ms_per_image_min"] / vec["ms_per_image_min"],
        "speedup_per_image_cpu_time": ref["cpu_ms_per_image"] / vec["cpu_ms_per_image"],
        "pixel_evaluations_per_image": geom.n_tiles * geom.tile / b,
    }
    if not args.no_agreement:
        out = render_db_targets(geom, device)
        refs = [make_db_targets(p, i, size, size) for p, i in zip(polys, ignore)]
        result["agreement"] = agreement(polys, ignore, refs, out)
    result["loadavg_end"] = list(os.getloadavg())

    print(format_summary(result, markdown=args.markdown))
    print(
        f"\nvectorised: {vec['ms_per_batch']:.2f} ms/batch; pack (host) {result['pack_ms_per_batch']:.2f} ms/batch, "
        f"of which prepare_polygons {result['prepare_polygons_ms_per_batch']:.2f}; render ({device.type}) "
        f"{result['render_ms_per_batch']:.2f} ms/batch (min {result['render_ms_per_batch_min']:.2f}; "
        f"{result['render_reused_outputs_ms_per_batch']:.2f} writing into the previous batch's outputs)"
    )
    if "agreement" in result:
        a = result["agreement"]
        print(
            f"agreement: thresh MAE {a['thresh_mae']:.2e} (max {a['thresh_max_abs']:.2e}), "
            f"prob IoU {a['prob_map_iou']:.4f} (differing pixels <= "
            f"{a['prob_diff_max_boundary_dist_px']:.2f} px from a shrunk boundary), "
            f"thresh_mask IoU {a['thresh_mask_iou']:.4f}, ignored-region IoU {a['prob_mask_iou_of_masked']:.4f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.json)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
