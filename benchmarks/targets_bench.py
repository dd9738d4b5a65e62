"""Benchmark the DB training targets: numpy/OpenCV reference vs the vectorised torch version.

    uv run python benchmarks/targets_bench.py [--batch 16] [--polygons 50] [--size 640]
                                              [--device cpu|cuda] [--threads 2] [--json out.json]

Inputs are receipt-like: per image ``--polygons`` text lines, axis-aligned or slightly rotated boxes
40-400 px long and 10-30 px tall, a few marked don't-care, some crossing the border.

nanoGPT ``bench.py`` style: warm up, then time ``--repeats`` runs (synchronising on CUDA) and report
the median (and min) per run. The reference runs one image at a time; the vectorised version one batch
at a time, split into ``pack`` (host: prepare_polygons + numpy packing) and ``render`` (device).
Agreement is measured on the same batch: threshold-map mean/max absolute difference, IoU of each
binary map, and how far from the relevant polygon boundary the differing prob pixels are.
"""

from __future__ import annotations

import argparse
import json
import os
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--polygons", type=int, default=50, help="text lines per image")
    ap.add_argument("--size", type=int, default=640, help="map height and width")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ref-images", type=int, default=None, help="images timed for the reference (default: batch)")
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE, help="columns per distance tile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-agreement", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

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

    # --- reference, per image
    n_ref = min(args.ref_images or args.batch, args.batch)
    make_db_targets(polys[0], ignore[0], size, size)  # warm-up
    ref_wall, ref_cpu = _time(
        lambda: [make_db_targets(polys[i], ignore[i], size, size) for i in range(n_ref)],
        max(1, args.repeats // 2),
        torch.device("cpu"),
    )

    # --- vectorised, per batch
    geom = pack_db_geometry(polys, ignore, size, size, tile=tile)
    for _ in range(args.warmup):
        render_db_targets(pack_db_geometry(polys, ignore, size, size, tile=tile), device)
    _sync(device)
    cpu_dev = torch.device("cpu")
    pack_wall, pack_cpu = _time(lambda: pack_db_geometry(polys, ignore, size, size, tile=tile), args.repeats, cpu_dev)
    prep_wall, _ = _time(
        lambda: [prepare_polygons(p, i, with_dilated=False) for p, i in zip(polys, ignore)], args.repeats, cpu_dev
    )
    render_wall, render_cpu = _time(lambda: render_db_targets(geom, device), args.repeats, device)
    buffers = render_db_targets(geom, device)
    reuse_wall, _ = _time(lambda: render_db_targets(geom, device, out=buffers), args.repeats, device)
    total_wall, total_cpu = _time(
        lambda: render_db_targets(pack_db_geometry(polys, ignore, size, size, tile=tile), device), args.repeats, device
    )
    med = lambda ts: statistics.median(ts) * 1e3  # noqa: E731
    b = args.batch
    ref_ms = med(ref_wall) / n_ref
    result = {
        "config": {
            "batch": b,
            "polygons_per_image": args.polygons,
            "size": size,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(),
            "tile": tile,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
        },
        "reference_ms_per_image": ref_ms,
        "reference_ms_per_image_min": min(ref_wall) * 1e3 / n_ref,
        "reference_cpu_ms_per_image": med(ref_cpu) / n_ref,
        "vectorised_ms_per_batch": med(total_wall),
        "vectorised_ms_per_image": med(total_wall) / b,
        "vectorised_ms_per_image_min": min(total_wall) * 1e3 / b,
        "vectorised_cpu_ms_per_image": med(total_cpu) / b,
        "pack_ms_per_batch": med(pack_wall),
        "prepare_polygons_ms_per_batch": med(prep_wall),
        "render_ms_per_batch": med(render_wall),
        "render_ms_per_batch_min": min(render_wall) * 1e3,
        "render_reused_outputs_ms_per_batch": med(reuse_wall),
        "speedup_per_image": ref_ms / (med(total_wall) / b),
        "speedup_per_image_cpu_time": (med(ref_cpu) / n_ref) / (med(total_cpu) / b),
        "pixel_evaluations_per_image": geom.n_tiles * geom.tile / b,
    }
    if not args.no_agreement:
        out = render_db_targets(geom, device)
        ref = [make_db_targets(p, i, size, size) for p, i in zip(polys, ignore)]
        result["agreement"] = agreement(polys, ignore, ref, out)

    c = result["config"]
    print(
        f"DB targets: batch {b} x {args.polygons} polygons, {size}x{size}, device {c['device_name']}, "
        f"torch threads {c['torch_threads']}, tile {tile}, {c['cpus']} CPUs, load average {c['load_average_1min']:.1f}"
    )
    print(
        f"  reference   {ref_ms:8.2f} ms/image   (min {result['reference_ms_per_image_min']:.2f}; "
        f"CPU time {result['reference_cpu_ms_per_image']:.2f})"
    )
    print(
        f"  vectorised  {result['vectorised_ms_per_image']:8.2f} ms/image   (min "
        f"{result['vectorised_ms_per_image_min']:.2f}; CPU time {result['vectorised_cpu_ms_per_image']:.2f})   "
        f"{result['vectorised_ms_per_batch']:.2f} ms/batch"
    )
    print(
        f"    pack (host) {result['pack_ms_per_batch']:.2f} ms/batch, of which prepare_polygons "
        f"{result['prepare_polygons_ms_per_batch']:.2f}; render ({device.type}) "
        f"{result['render_ms_per_batch']:.2f} ms/batch (min {result['render_ms_per_batch_min']:.2f}; "
        f"{result['render_reused_outputs_ms_per_batch']:.2f} writing into the previous batch's outputs)"
    )
    print(
        f"  speed-up    {result['speedup_per_image']:8.1f} x per image (wall-clock medians; "
        f"{result['speedup_per_image_cpu_time']:.1f} x in CPU time)"
    )
    if "agreement" in result:
        a = result["agreement"]
        print(
            f"  agreement   thresh MAE {a['thresh_mae']:.2e} (max {a['thresh_max_abs']:.2e}), "
            f"prob IoU {a['prob_map_iou']:.4f} (differing pixels <= "
            f"{a['prob_diff_max_boundary_dist_px']:.2f} px from a shrunk boundary), "
            f"thresh_mask IoU {a['thresh_mask_iou']:.4f}, ignored-region IoU {a['prob_mask_iou_of_masked']:.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"  wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
