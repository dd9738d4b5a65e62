"""Loader-only benchmark: images/s of the train and eval loaders of each backend, DB targets
included, against the raw decode bound measured in the same run.

    uv run python benchmarks/loader_bench.py --root /path/to/dataset --split train|val
        [--image-size 640] [--batches 40] [--warmup 4] [--batch-size 8] [--json out.json]

* Raw decode bound: one process per usable core, each decoding its share of the split's
  images (full-resolution ``cv2.imdecode``) and resizing them so the longer side is
  ``--image-size`` (``INTER_AREA``), single-threaded, from memory; total images / wall time.
* Loaders: what ``ocr.data.backends.build_loader`` returns for each configuration (CPU
  backend with 1..cores DataLoader workers, DALI on the CPU, DALI on the GPU when CUDA is
  usable), over the same images (preloaded into RAM), each as a train loader (random
  geometry + jitter, shuffled) and an eval loader, targets included. Warm-up batches
  (worker start, first epoch) are not timed; timing runs over epochs until ``--batches``
  batches were delivered; on CUDA it synchronises before reading the clock.

The function API :func:`run_loader_bench` returns the same dict the ``--json`` file holds:
``raw_bound_img_s`` and ``results`` (a list of ``{backend, device, split, img_s, ratio, ...}``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOADER_SPLITS = ("train", "eval")


# ----------------------------------------------------------------------------- raw decode bound
def _raw_worker(paths: list[str], image_size: int, passes: int, barrier, results) -> None:
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    data = [np.fromfile(p, dtype=np.uint8) for p in paths]
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    count = 0
    for _ in range(passes):
        for buf in data:
            image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            h, w = image.shape[:2]
            s = image_size / max(h, w)
            cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))),
                       interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
            count += 1
    results.put((count, time.perf_counter() - t0, time.process_time() - c0))


def raw_decode_bound(paths: list[str], image_size: int, processes: int | None = None, min_images: int = 200) -> dict:
    """Images/s of full decode + resize to ``image_size``, one single-threaded process per core."""
    from ocr.hardware import usable_cpus

    processes = processes or usable_cpus()
    passes = max(1, -(-min_images // max(1, len(paths))))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    shares = [paths[i::processes] for i in range(processes)]
    procs = [ctx.Process(target=_raw_worker, args=(share, image_size, passes, barrier, results)) for share in shares]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    images = sum(c for c, _, _ in out)
    seconds = max(t for _, t, _ in out)
    cpu = sum(c for _, _, c in out)
    return {"img_s": images / seconds, "images": images, "seconds": seconds, "processes": processes,
            "cpu_ms_per_img": 1e3 * cpu / images}


# ----------------------------------------------------------------------------- loaders
def default_configs(cuda: bool, cpus: int) -> list[dict]:
    configs = [{"backend": "cpu", "device": "cpu", "cpu_loader": "processes", "num_workers": cpus}]
    configs += [{"backend": "cpu", "device": "cpu", "cpu_loader": "threads", "num_workers": w} for w in (cpus, cpus + 1)]
    configs.append({"backend": "dali", "device": "cpu", "dali_threads": cpus})
    if cuda:
        configs.append({"backend": "dali", "device": "gpu", "dali_threads": min(4, cpus)})
    return configs


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader / DALI workers)."""
    import psutil

    proc = psutil.Process()
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def _endless(loader):
    """Batches across epochs (each ``iter()`` is a new epoch), forever."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the loader yields no batches")


def _time_batches(stream, batches: int, cuda: bool) -> dict:
    import torch

    if cuda:
        torch.cuda.synchronize()
    c0, t0 = _cpu_seconds(), time.perf_counter()
    images = 0
    for _ in range(batches):
        batch = next(stream)
        assert "prob_maps" in batch and batch["images"].dtype == torch.float32
        images += int(batch["images"].shape[0])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"img_s": images / seconds, "images": images, "seconds": seconds,
            "cpu_ms_per_img": 1e3 * (_cpu_seconds() - c0) / images}


def make_loader(config: dict, source, image_size: int, batch_size: int, seed: int, split: str):
    from ocr.data.backends import BackendChoice, build_loader
    from ocr.data.transforms import TransformParams

    train = split == "train"
    kwargs = dict(backend=config["backend"], device=config["device"], targets=config.get("targets", "vectorized"),
                  num_workers=config.get("num_workers", 0), dali_threads=config.get("dali_threads", 1),
                  reason="loader benchmark")
    if "cpu_loader" in getattr(BackendChoice, "__dataclass_fields__", {}):
        kwargs["cpu_loader"] = config.get("cpu_loader", "threads")
    choice = BackendChoice(**kwargs)
    params = TransformParams(image_size=image_size, train=train, crop_size=config.get("crop_size", 0))
    return build_loader(choice, source, params, {}, batch_size=batch_size, shuffle=train,
                        drop_last=train and len(source) > batch_size, seed=seed, with_targets=True)


def bench_config(config: dict, source, image_size: int, batch_size: int, batches: int, warmup: int, seed: int,
                 split: str, rounds: int, raw_fn) -> dict:
    """``rounds`` x (raw decode bound, then ``batches`` timed batches of the loader); the
    ratio of each round is taken against the bound measured just before it (the machine
    may be shared) and the medians are reported."""
    import statistics

    import torch

    cuda = config["device"] == "gpu" and torch.cuda.is_available()
    loader = make_loader(config, source, image_size, batch_size, seed, split)
    runs = []
    try:
        stream = _endless(loader)
        for _ in range(warmup):  # worker start-up, first decode, allocator warm-up
            next(stream)
        for _ in range(rounds):
            raw = raw_fn()
            run = _time_batches(stream, batches, cuda)
            run["raw_img_s"] = raw["img_s"]
            run["raw_cpu_ms_per_img"] = raw["cpu_ms_per_img"]
            run["ratio"] = run["img_s"] / raw["img_s"]
            runs.append(run)
        stream.close()
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
        del loader
    # a window too short for the CPU clock's resolution measures 0 CPU ms: no ratio then
    cpu_ratios = [r["raw_cpu_ms_per_img"] / r["cpu_ms_per_img"] for r in runs if r["cpu_ms_per_img"] > 0]
    return {**config, "split": split,
            "img_s": statistics.median(r["img_s"] for r in runs),
            "ratio": statistics.median(r["ratio"] for r in runs),
            "cpu_ms_per_img": statistics.median(r["cpu_ms_per_img"] for r in runs),
            # CPU-time efficiency against the raw bound's (robust to a shared machine)
            "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
            "rounds": runs}


def _load_source(root: Path, split: str, preload: bool):
    from ocr.data.annotations import load_annotations
    from ocr.data.source import SampleSource

    json_path, image_dir = root / "jsons" / f"{split}.json", root / "images" / split
    if not json_path.is_file() or not image_dir.is_dir():
        raise SystemExit(f"{root}: expected jsons/{split}.json and images/{split}/")
    return SampleSource(load_annotations(json_path, image_dir), preload=preload, split=split)


def run_loader_bench(root: str | Path, split: str = "train", image_size: int = 640, batches: int = 30, warmup: int = 4,
                     batch_size: int = 8, configs: list[dict] | None = None, loader_splits=LOADER_SPLITS,
                     preload: bool = True, seed: int = 0, rounds: int = 3, log=print) -> dict:
    """Measure every loader configuration against the raw decode bound; returns the JSON dict
    (``raw_bound_img_s``: the median of every bound measured in the run; ``results``: one
    entry per configuration and loader split with median img/s and median ratio)."""
    import statistics

    import torch

    from ocr.hardware import usable_cpus

    root = Path(root)
    source = _load_source(root, split, preload)
    cpus = usable_cpus()
    cuda = torch.cuda.is_available()
    configs = configs if configs is not None else default_configs(cuda, cpus)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    paths = [str(s.path) for s in source.samples]
    raw_runs: list[float] = []
    raw_cpu: list[float] = []

    def raw_fn() -> dict:
        raw = raw_decode_bound(paths, image_size, cpus, min_images=max(100, 2 * cpus * 24))
        raw_runs.append(raw["img_s"])
        raw_cpu.append(raw["cpu_ms_per_img"])
        return raw

    log(f"{len(source)} images of {root} ({split}), image size {image_size}, batch {batch_size}, {cpus} cores, "
        f"load avg {load_before}")
    results = []
    for config in configs:
        for loader_split in loader_splits:
            r = bench_config(config, source, image_size, batch_size, batches, warmup, seed, loader_split, rounds, raw_fn)
            log(f"  {_config_name(config):<20} {loader_split:<5} {r['img_s']:7.1f} img/s, {100 * r['ratio']:4.0f}% of raw "
                f"(rounds: {_rounds_text(r)}), "
                f"{r['cpu_ms_per_img']:.1f} CPU ms/img")
            results.append(r)
    return {
        "root": str(root),
        "split": split,
        "image_size": image_size,
        "batch_size": batch_size,
        "num_images": len(source),
        "cpus": cpus,
        "cuda": cuda,
        "rounds": rounds,
        "batches_per_round": batches,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "raw_bound_img_s": statistics.median(raw_runs),
        "raw_bound_runs_img_s": raw_runs,
        "raw_cpu_ms_per_img": statistics.median(raw_cpu),
        "results": results,
    }


def _rounds_text(result: dict) -> str:
    return ", ".join(f"{x['img_s']:.0f}/{x['raw_img_s']:.0f}" for x in result["rounds"])


def _config_name(config: dict) -> str:
    extra = ""
    if config["backend"] == "cpu":
        kind = "threads" if config.get("cpu_loader", "threads") == "threads" else "procs"
        extra = f" {kind}={config.get('num_workers', 0)}"
    elif "dali_threads" in config:
        extra = f" t={config['dali_threads']}"
    return f"{config['backend']}/{config['device']}{extra}"


def format_table(report: dict) -> str:
    lines = [
        f"raw decode bound (cv2 full decode + resize to {report['image_size']}, {report['cpus']} processes): "
        f"{report['raw_bound_img_s']:.1f} img/s (median of {len(report['raw_bound_runs_img_s'])}: "
        f"{min(report['raw_bound_runs_img_s']):.0f}..{max(report['raw_bound_runs_img_s']):.0f}); "
        f"load avg {report['loadavg_before']:.2f} -> {report['loadavg_after']:.2f}",
        f"raw CPU time: {report['raw_cpu_ms_per_img']:.1f} ms/img",
        f"{'loader':<20} {'split':<6} {'img/s':>8} {'of raw':>7} {'CPU ms/img':>11} {'raw/CPU':>8}",
    ]
    for r in report["results"]:
        lines.append(f"{_config_name(r):<20} {r['split']:<6} {r['img_s']:>8.1f} {100 * r['ratio']:>6.0f}% "
                     f"{r['cpu_ms_per_img']:>11.1f} "
                     + (f"{100 * r['cpu_ratio']:>7.0f}%" if r["cpu_ratio"] is not None else f"{'n/a':>8}"))
    best = {}
    for r in report["results"]:
        if r["device"] == "cpu" and r["ratio"] > best.get(r["split"], {}).get("ratio", 0):
            best[r["split"]] = r
    for split, r in best.items():
        lines.append(f"best CPU-only {split}: {_config_name(r)} {r['img_s']:.1f} img/s = {100 * r['ratio']:.0f}% of raw")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="dataset root (images/<split>/, jsons/<split>.json)")
    ap.add_argument("--split", default="train", choices=["train", "val", "test"], help="which images")
    ap.add_argument("--image-size", type=int, default=640)
    ap.add_argument("--crop-size", type=int, default=0, help="train crop (TransformParams.crop_size; 0: image size)")
    ap.add_argument("--batches", type=int, default=30, help="timed batches per loader and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per loader (raw bound re-measured before each)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed batches first")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--loaders", default=",".join(LOADER_SPLITS), help="train,eval or one of them")
    ap.add_argument("--only", default=None,
                    help="comma list of backend/device[/threads|processes] to run (e.g. cpu/cpu/threads,dali/cpu)")
    ap.add_argument("--no-preload", action="store_true", help="read files from disk in the loaders")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from ocr.hardware import usable_cpus

    configs = default_configs(torch.cuda.is_available(), usable_cpus())
    if args.crop_size:
        configs = [{**c, "crop_size": args.crop_size} for c in configs]
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in configs if f"{c['backend']}/{c['device']}" in wanted
                   or f"{c['backend']}/{c['device']}/{c.get('cpu_loader')}" in wanted]
    report = run_loader_bench(args.root, args.split, args.image_size, args.batches, args.warmup, args.batch_size,
                              configs, tuple(args.loaders.split(",")), preload=not args.no_preload, seed=args.seed,
                              rounds=args.rounds)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
