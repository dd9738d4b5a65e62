"""Soak benchmark (not a test): do the loaders hold their memory over a long run?

    uv run python benchmarks/soak.py --root ../shared/data/sroie [--epochs 50] [--replay-passes 300]
        [--replay-every 10] [--image-size 640] [--max-images N] [--backends cpu/cpu,dali/cpu,dali/gpu]
        [--slope-from 5] [--max-slope 1.0] [--in-process] [--json out.json] [--markdown] [hydra overrides ...]

For each backend (``cpu/cpu``: ``loader.backend=cpu``; ``dali/cpu``: ``loader.backend=dali
loader.device=cpu``; ``dali/gpu`` when CUDA is usable), in a fresh process unless ``--in-process``,
the training config is composed with those overrides, and the loaders are the ones training gets:
``OCRDataModule.train_dataloader()`` and ``val_dataloader()`` (the validation batch cache in front
of it, as the run's preset says). Then

* the train loader runs ``--epochs`` epochs (the epoch set as Lightning sets it, each batch moved
  to the device and given its targets as ``on_after_batch_transfer`` does); after each epoch the
  host RSS of this process plus its child processes (DataLoader / DALI external-source workers)
  and, on a GPU, this process's GPU memory (NVML) are recorded;
* the validation loader runs ``--replay-passes`` passes (the first records the cache, the others
  replay it), RSS recorded every ``--replay-every`` passes.

The verdict: the least-squares RSS slope over epochs ``--slope-from``..N (epochs numbered from 1;
the first epochs fill allocator pools and prefetch queues) must be below ``--max-slope`` MB/epoch;
the replay's slope (MB per 100 passes, over all its records) is held to the same bound. Exit code 0
when every backend passes both, 1 otherwise.
No trainer is attached, so the validation cache lives on the host even for ``dali/gpu``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 2**20
BACKENDS = {"cpu/cpu": ("cpu", "cpu"), "dali/cpu": ("dali", "cpu"), "dali/gpu": ("dali", "gpu")}


# ----------------------------------------------------------------------------- measuring
def rss_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``ys`` over ``xs``; None with fewer than two points."""
    n = len(xs)
    if n < 2 or n != len(ys):
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def epoch_slope(epochs: list[dict], first: int) -> float | None:
    """RSS slope in MB/epoch over the epochs numbered ``first`` and later."""
    kept = [e for e in epochs if e["epoch"] >= first]
    return rss_slope([e["epoch"] for e in kept], [e["rss_mb"] for e in kept])


def host_rss_mb() -> tuple[float, float]:
    """(RSS of this process, RSS of its live child processes summed), in MB."""
    import psutil

    proc = psutil.Process()
    children = 0
    for child in proc.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.Error:  # a worker that just exited
            pass
    return proc.memory_info().rss / MB, children / MB


def sample(device) -> dict:
    main, children = host_rss_mb()
    out = {"rss_mb": round(main + children, 2), "rss_main_mb": round(main, 2), "rss_children_mb": round(children, 2)}
    if device.type == "cuda":
        from ocr.hardware import process_gpu_memory

        used, source = process_gpu_memory(device)
        out["gpu_mb"] = None if used is None else round(used / MB, 2)
        out["gpu_source"] = source
    return out


# ----------------------------------------------------------------------------- data
def subset_root(root: Path, out: Path, max_images: int) -> Path:
    """A dataset root with the first ``max_images`` images of each split of ``root`` (links)."""
    for split in ("train", "val"):
        annotation = root / "jsons" / f"{split}.json"
        try:
            images = json.loads(annotation.read_text())["images"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{annotation}: cannot read its 'images' ({e})") from None
        kept = dict(list(images.items())[:max_images])
        (out / "jsons").mkdir(parents=True, exist_ok=True)
        (out / "jsons" / f"{split}.json").write_text(json.dumps({"images": kept}))
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for name in kept:
            (folder / name).symlink_to((root / "images" / split / name).resolve())
    return out


def compose(root: Path, backend: str, image_size: int, cache_dir: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ocr.config import register_configs

    name, device = BACKENDS[backend]
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return hydra_compose(config_name="train", overrides=[
            f"data.root={root}", f"data.image_size={image_size}", f"loader.backend={name}", f"loader.device={device}",
            f"datasets.train_dataset.config.cache_config.cache_dir={cache_dir}",
            f"datasets.val_dataset.config.cache_config.cache_dir={cache_dir}",
            *overrides, "output_dir=unused"])


# ----------------------------------------------------------------------------- running
def _close(loader) -> None:
    """Close a loader and whatever it wraps (batch cache, map filler, backend loader)."""
    while loader is not None:
        for part in (getattr(loader, "cache", None), loader):
            close = getattr(part, "close", None)
            if close is not None:
                close()
        loader = getattr(loader, "loader", None)


def _set_epoch(loader, epoch: int) -> None:
    """What Lightning does before an epoch: ``loader.sampler.set_epoch`` where there is one."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _consume(dm, loader, device) -> int:
    """One pass as the trainer takes it: each batch to the device, then its targets."""
    batches = 0
    for batch in loader:
        batch = dm.on_after_batch_transfer(dm.transfer_batch_to_device(batch, device, 0), 0)
        batches += 1
        del batch
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    return batches


def soak_backend(backend: str, root: Path, args, log=None) -> dict:
    """Soak one backend in this process (``run_soak`` gives each its own process)."""
    import torch

    from ocr.data.datamodule import OCRDataModule

    log = log or _log
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda", 0) if backend == "dali/gpu" else torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="soak_cache_") as cache_dir:
        dm = OCRDataModule(compose(root, backend, args.image_size, Path(cache_dir), args.overrides),
                           splits=("train", "val"))
        dm.prepare_data()
        dm.setup("fit")
        result: dict = {"backend": backend, "choice": dm.backend_description(), "start": sample(device),
                        "train_images": len(dm.sources["train"]), "val_images": len(dm.sources["val"])}
        t0 = time.perf_counter()
        result["epochs"] = train_epochs(dm, device, args.epochs, result["start"]["rss_mb"],
                                        lambda row: log(f"  {backend} epoch {row['epoch']}/{args.epochs}: "
                                                        f"{row['batches']} batches, RSS {row['rss_mb']:.1f} MB "
                                                        f"({row['delta_mb']:+.1f}){_gpu_text(row)}"))
        result["train_seconds"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        result["replay"], result["cache"] = replay_validation(dm, device, args.replay_passes, args.replay_every)
        result["replay_seconds"] = round(time.perf_counter() - t0, 1)
    slope = epoch_slope(result["epochs"], args.slope_from)
    records = result["replay"]
    replay_slope = rss_slope([r["pass"] / 100 for r in records], [r["rss_mb"] for r in records])
    result.update({
        "rss_slope_mb_per_epoch": slope, "slope_epochs": [args.slope_from, args.epochs],
        "verdict": _verdict(slope, args.max_slope),
        "replay_rss_slope_mb_per_100_passes": replay_slope, "replay_verdict": _verdict(replay_slope, args.max_slope),
    })
    log(f"  {backend}: RSS slope {_num(slope)} MB/epoch over epochs {args.slope_from}..{args.epochs}: "
        f"{result['verdict']}; replay {_num(replay_slope)} MB/100 passes: {result['replay_verdict']}")
    return result


def train_epochs(dm, device, epochs: int, rss_before: float, report) -> list[dict]:
    """``epochs`` epochs of the train loader; a memory sample after each (``report`` gets each row)."""
    rows = []
    train = dm.train_dataloader()
    try:
        previous = rss_before
        for epoch in range(1, epochs + 1):
            _set_epoch(train, epoch - 1)
            t0 = time.perf_counter()
            batches = _consume(dm, train, device)
            row = {"epoch": epoch, "batches": batches, "seconds": round(time.perf_counter() - t0, 3), **sample(device)}
            row["delta_mb"] = round(row["rss_mb"] - previous, 2)
            previous = row["rss_mb"]
            rows.append(row)
            report(row)
    finally:
        _close(train)
    return rows


def replay_validation(dm, device, passes: int, every: int) -> tuple[list[dict], dict]:
    """``passes`` passes of the validation loader (the first records its cache), a memory sample every
    ``every`` passes and after the last; returns the samples and the cache's statistics."""
    records = []
    val = dm.val_dataloader()
    try:
        for p in range(1, passes + 1):
            batches = _consume(dm, val, device)
            if p % every == 0 or p == passes:
                records.append({"pass": p, "batches": batches, **sample(device)})
    finally:
        stats = _cache_summary(dm.cache_stats().get("val", {}))
        _close(val)
    return records, stats


def _cache_summary(stats: dict) -> dict:
    """The validation split's cache statistics, its per-pass list replaced by the number of passes."""
    tensors = dict(stats.get("tensors", {}))
    if "passes" in tensors:
        tensors["passes"] = len(tensors["passes"])
    return {**stats, "tensors": tensors}


def _log(text: str) -> None:
    print(text, flush=True)


def _verdict(slope: float | None, bound: float) -> str:
    if slope is None:
        return "n/a (too few points)"
    return "PASS" if slope < bound else "FAIL"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _gpu_text(row: dict) -> str:
    return f", GPU {_num(row.get('gpu_mb'), '.1f')} MB ({row['gpu_source']})" if "gpu_source" in row else ""


# ----------------------------------------------------------------------------- output
def markdown(report: dict) -> str:
    stack = report["stack"]
    dirty = " (uncommitted changes)" if stack.get("dirty") else ""
    header = (f"`{report['command']}` on {report['machine']['device']} ({report['machine']['usable_cpus']} usable "
              f"cores), {report['date']}; {report['root']}, {report['image_size']} px, {report['epochs']} epochs, "
              f"{report['replay_passes']} validation passes; load average {report['loadavg_start']} -> "
              f"{report['loadavg_end']}; torch {stack['torch']}, DALI {stack['dali']}, commit "
              f"{str(stack.get('commit'))[:10]}{dirty}")
    lines = [header, "",
             ("| backend | RSS start MB | RSS epoch 1 MB | RSS last epoch MB | slope MB/epoch | verdict "
              "| replay slope MB/100 passes | replay verdict | train s | replay s |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        first, last = (r["epochs"][0], r["epochs"][-1]) if r["epochs"] else ({}, {})
        lines.append(f"| {r['backend']} | {r['start']['rss_mb']:.1f} | {_num(first.get('rss_mb'), '.1f')} | "
                     f"{_num(last.get('rss_mb'), '.1f')} | {_num(r['rss_slope_mb_per_epoch'])} | {r['verdict']} | "
                     f"{_num(r['replay_rss_slope_mb_per_100_passes'])} | {r['replay_verdict']} | "
                     f"{r['train_seconds']} | {r['replay_seconds']} |")
    for r in report["results"]:
        gpu = any("gpu_source" in e for e in r["epochs"])
        lines += ["", f"{r['backend']}: {r['train_images']} train images, {r['val_images']} val images",
                  "", "| epoch | RSS MB | delta MB | children MB |" + (" GPU MB |" if gpu else ""),
                  "| --- | --- | --- | --- |" + (" --- |" if gpu else "")]
        for e in r["epochs"]:
            lines.append(f"| {e['epoch']} | {e['rss_mb']:.1f} | {e['delta_mb']:+.1f} | {e['rss_children_mb']:.1f} |"
                         + (f" {_num(e.get('gpu_mb'), '.1f')} |" if gpu else ""))
        lines += ["", "| val pass | RSS MB |", "| --- | --- |"]
        lines += [f"| {x['pass']} | {x['rss_mb']:.1f} |" for x in r["replay"]]
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


def run_soak(args, command: str, log=None) -> dict:
    import torch

    from ocr.hardware import probe, usable_cpus
    from ocr.versions import stack

    log = log or _log

    cuda = torch.cuda.is_available()
    backends = args.backends.split(",") if args.backends else ["cpu/cpu", "dali/cpu"] + (["dali/gpu"] if cuda else [])
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"--backends: {unknown} not among {list(BACKENDS)}")
    if "dali/gpu" in backends and not cuda:
        raise SystemExit("--backends: dali/gpu needs CUDA, which is not usable here")
    info = probe()
    report = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {"cpu": info.cpu_model, "usable_cpus": usable_cpus(), "device": info.device},
              "stack": stack(), "loadavg_start": [round(x, 2) for x in os.getloadavg()], "root": str(args.root),
              "image_size": args.image_size, "max_images": args.max_images, "epochs": args.epochs,
              "replay_passes": args.replay_passes, "replay_every": args.replay_every, "slope_from": args.slope_from,
              "max_slope_mb_per_epoch": args.max_slope,
              "process_per_backend": not args.in_process, "overrides": args.overrides, "results": []}
    with tempfile.TemporaryDirectory(prefix="soak_data_") as tmp:
        root = subset_root(args.root, Path(tmp), args.max_images) if args.max_images else args.root
        for backend in backends:
            log(f"{backend}: {args.epochs} epochs, then {args.replay_passes} validation passes ...")
            if args.in_process:
                report["results"].append(soak_backend(backend, root, args, log))
                continue
            # a fresh process per backend: its RSS owes nothing to the backends soaked before it
            with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
                report["results"].append(pool.submit(soak_backend, backend, root, args).result())
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    ok = all(r["verdict"] == "PASS" and r["replay_verdict"] != "FAIL" for r in report["results"])
    report["verdict"] = "PASS" if ok else "FAIL"
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="dataset root (images/{train,val}/, jsons/{train,val}.json)")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--replay-passes", type=int, default=300, help="validation passes (the first records the cache)")
    ap.add_argument("--replay-every", type=int, default=10, help="record RSS every this many validation passes")
    ap.add_argument("--image-size", type=int, default=640, help="data.image_size")
    ap.add_argument("--max-images", type=int, default=None, help="use the first N images of each split")
    ap.add_argument("--backends", default=None, help="comma-separated: cpu/cpu,dali/cpu,dali/gpu (default: all usable)")
    ap.add_argument("--slope-from", type=int, default=5, help="first epoch (from 1) of the slope fit")
    ap.add_argument("--max-slope", type=float, default=1.0, help="PASS below this RSS slope, MB/epoch")
    ap.add_argument("--in-process", action="store_true",
                    help="soak every backend in this process (starts faster; a backend's RSS then includes what "
                         "the ones before it left)")
    ap.add_argument("--json", type=Path, help="write the report here (atomically)")
    ap.add_argument("--markdown", action="store_true", help="print the report as markdown tables")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the training config (key=value)")
    args = ap.parse_args(argv)
    for name in ("epochs", "replay_passes", "replay_every", "image_size", "slope_from"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_images is not None and args.max_images < 1:
        ap.error(f"--max-images must be at least 1, got {args.max_images}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = "python benchmarks/soak.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = run_soak(args, command)
    if args.markdown:
        print("\n" + markdown(report), flush=True)
    if args.json:
        write_json(args.json, report)
        print(f"written: {args.json}", flush=True)
    print(f"soak verdict: {report['verdict']}", flush=True)
    return 0 if report["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
