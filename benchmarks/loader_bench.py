"""Loader-only benchmark: images/s of each backend's train and eval loaders, DB targets included,
each against the decode reference that does the same decode, measured in the same round.

    uv run python benchmarks/loader_bench.py --root /path/to/dataset --split train|val
        [--image-size 640] [--rounds 3] [--batches 30] [--warmup 4] [--batch-size 8]
        [--max-images N] [--only cpu/cpu/threads,dali/cpu,...] [--markdown] [--json out.json]

A round measures the decode references, then each loader in turn. Each loader is built inside
the round, warmed up (``--warmup`` batches: worker start, first decode), timed over ``--batches``
batches straight after, and closed before anything else runs: no loader works while the clock
is stopped (a loader left alive while the references ran would fill its prefetch queue, and
its first timed batches would cost nothing). The window starts and ends at a batch's delivery;
N loader threads working in step can move its count by up to N - 1 batches, so keep ``--batches``
large and a multiple of N (the default 30 is one for 1, 2, 3, 5 and 6). Each row's figure is its
median round (by img/s; the lower one of an even count), and its ratio the ratio of that same
round, against the reference measured at the start of that round.

Decode references (not bounds: the loaders warp, jitter, normalise and compute targets as well;
an eval loader can beat the full-size reference because it decodes less):

* ``full``: OpenCV full-size decode + resize (longer side ``--image-size``, ``INTER_AREA``), one
  single-threaded process per usable core, from memory: the decode DALI does.
* ``reduced``: the same with the JPEG DCT-domain reduction the eval path picks
  (``ocr.data.preload.decode_reduction_for``): the decode the CPU backend does (its train path
  picks, per sample, the reduction the sample's random scale allows).
* ``dali-gpu`` (CUDA only): a DALI pipeline that only decodes (``device="mixed"``) and resizes the
  same images, ``--batch-size`` per batch: the device's decode limit for the dali/gpu rows.

Rows (``ROW_DESCRIPTIONS``): the CPU backend in N loader threads or N DataLoader processes, each
making whole batches (decode, warp, jitter, targets with one torch thread); DALI with its CPU or
GPU operators in ``t`` threads, the Python source (per-sample geometry) either in the loader's
one helper thread or in ``py`` parallel external-source worker processes. DALI on the CPU renders
the targets in that one helper thread either way, so ``dali/cpu`` against ``cpu/cpu threads=N``
compares two loader designs, not DALI's CPU operators with OpenCV.

The function API :func:`run_loader_bench` returns the dict the ``--json`` file holds.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import queue
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOADER_SPLITS = ("train", "eval")
CPU_REFERENCES = ("full", "reduced")
REFERENCE_DESCRIPTIONS = {
    "full": "OpenCV full-size decode + resize, one single-threaded process per core",
    "reduced": "OpenCV decode with the eval path's JPEG DCT reduction + resize, one process per core",
    "dali-gpu": "DALI decode-only pipeline: mixed (nvJPEG) decode + resize, same batch size",
}
ROW_DESCRIPTIONS = {
    "cpu threads": "CPU backend: N loader threads in the training process, each making whole batches "
                   "(DCT-reduced OpenCV decode, warp, jitter, targets with one torch thread)",
    "cpu procs": "CPU backend: the same in N DataLoader worker processes",
    "dali helper": "DALI operators in t threads; the Python source and the targets in the loader's one helper "
                   "thread (the CPU default)",
    "dali parallel": "DALI operators in t threads; the Python source in py parallel external-source worker "
                     "processes (the GPU default); on the CPU the targets still in the one helper thread",
}


# ----------------------------------------------------------------------------- decode references
def _resize_longer(image, image_size: int):
    import cv2

    h, w = image.shape[:2]
    s = image_size / max(h, w)
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def _reference_worker(items: list[tuple[str, int]], image_size: int, passes: int, barrier, results) -> None:
    """Both CPU references over this process's share of (path, eval reduction), in turn, each
    started together with the other processes'. Imports no torch (seconds of start-up per process)."""
    import cv2
    import numpy as np

    from ocr.data.transforms import decode_rgb

    cv2.setNumThreads(1)
    data = [(np.fromfile(path, dtype=np.uint8), reduction) for path, reduction in items]
    for name in CPU_REFERENCES:
        barrier.wait()
        t0, c0 = time.perf_counter(), time.process_time()
        count = 0
        for _ in range(passes):
            for buf, reduction in data:
                _resize_longer(decode_rgb(buf, reduction if name == "reduced" else 1), image_size)
                count += 1
        results.put((name, count, time.perf_counter() - t0, time.process_time() - c0))


def eval_reductions(source, image_size: int) -> list[tuple[str, int]]:
    """(path, the JPEG DCT reduction the eval path decodes it at) of every image of ``source``."""
    from ocr.data.preload import decode_reduction_for
    from ocr.data.transforms import TransformParams

    params = TransformParams(image_size=image_size)
    return [(str(s.path), decode_reduction_for(params, *source.sizes[i], source.encoded_array(i)))
            for i, s in enumerate(source.samples)]


def cpu_decode_references(items: list[tuple[str, int]], image_size: int, processes: int,
                          min_images: int = 100) -> dict[str, dict]:
    """``full`` and ``reduced`` decode references over (path, eval reduction): images/s of all
    ``processes`` together."""
    passes = max(1, -(-min_images // max(1, len(items))))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_reference_worker, args=(items[i::processes], image_size, passes, barrier, results))
             for i in range(processes)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    out = []
    while len(out) < len(CPU_REFERENCES) * processes:
        try:
            out.append(results.get(timeout=1.0))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:  # the others wait at the barrier for ever
                for p in procs:
                    p.terminate()
                raise RuntimeError(f"a decode reference process exited with code {failed[0]}") from None
    for p in procs:
        p.join()
    refs = {}
    for name in CPU_REFERENCES:
        runs = [(c, t, cpu) for n, c, t, cpu in out if n == name]
        images = sum(c for c, _, _ in runs)
        seconds = max(t for _, t, _ in runs)
        refs[name] = {"img_s": images / seconds, "images": images, "seconds": seconds, "processes": processes,
                      "cpu_ms_per_img": 1e3 * sum(cpu for _, _, cpu in runs) / images}
    stop = time.perf_counter()
    for ref in refs.values():
        ref["window"] = {"start": start, "stop": stop}
    return refs


def dali_gpu_decode_reference(paths: list[str], image_size: int, batch_size: int, num_threads: int, batches: int,
                              warmup: int) -> dict:
    """Images/s of a DALI pipeline that only decodes on the GPU (``mixed``) and resizes, fed the
    files' bytes from memory by a plain (non-parallel) external source."""
    import numpy as np
    import torch
    from nvidia.dali import fn, pipeline_def, types

    data = [np.fromfile(p, dtype=np.uint8) for p in paths]
    position = [0]

    def next_batch():
        i = position[0]
        position[0] = i + batch_size
        return [data[(i + k) % len(data)] for k in range(batch_size)]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=torch.cuda.current_device(),
                  prefetch_queue_depth=2, seed=0)
    def decode_pipeline():
        encoded = fn.external_source(source=next_batch, batch=True, dtype=types.UINT8)
        images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=True)
        return fn.resize(images, resize_longer=image_size, antialias=True, interp_type=types.INTERP_LINEAR)

    start = time.perf_counter()
    pipe = decode_pipeline()
    pipe.build()
    try:
        for _ in range(warmup):
            pipe.run()
        c0, t0 = _cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            (images,) = pipe.run()
        images.as_cpu()  # waits for the last batch's GPU work (batches complete in order)
        seconds = time.perf_counter() - t0
        cpu = _cpu_seconds() - c0
    finally:
        del pipe
        gc.collect()
    n = batches * batch_size
    return {"img_s": n / seconds, "images": n, "seconds": seconds, "cpu_ms_per_img": 1e3 * cpu / n,
            "num_threads": num_threads, "window": {"start": start, "stop": time.perf_counter()}}


# ----------------------------------------------------------------------------- loaders
def training_config(backend: str, device: str, cuda: bool) -> dict:
    """The loader training builds for ``loader.backend`` / ``loader.device`` (workers and threads
    from ``ocr.data.backends.choose_backend``'s defaults)."""
    from omegaconf import OmegaConf

    from ocr.data.backends import choose_backend

    cfg = OmegaConf.create({"backend": backend, "device": device, "targets": "auto", "num_workers": -1,
                            "dali_threads": -1})
    c = choose_backend(cfg, cuda_available=cuda)
    config = {"backend": c.backend, "device": c.device}
    if c.backend == "cpu":
        return {**config, "cpu_loader": c.cpu_loader, "num_workers": c.num_workers}
    parallel = c.device == "gpu"  # dali_pipelines.loader.build_dali_loader's default
    # build_dali_loader runs max(1, min(4, num_workers)) external-source workers
    return {**config, "dali_threads": c.dali_threads, "parallel": parallel,
            "num_workers": max(1, min(4, c.num_workers)) if parallel else 0}


def default_configs(cuda: bool, cpus: int) -> list[dict]:
    """Training's CPU-backend and DALI-CPU loaders, the CPU backend with one more thread and with
    worker processes, DALI-CPU with parallel external-source workers; with CUDA, training's
    DALI-GPU loader."""
    threads = training_config("cpu", "cpu", cuda=False)
    dali_cpu = training_config("dali", "cpu", cuda=False)
    configs = [
        threads,
        {**threads, "num_workers": threads["num_workers"] + 1},
        {**threads, "cpu_loader": "processes", "num_workers": cpus},
        dali_cpu,
        {**dali_cpu, "parallel": True, "num_workers": max(1, min(4, cpus))},
    ]
    if cuda:
        configs.append(training_config("dali", "gpu", cuda=True))
    return configs


def reference_for(config: dict, cuda_reference: bool) -> str:
    """The decode reference a loader is compared with: the one that decodes as it does."""
    if config["backend"] == "cpu":
        return "reduced"
    if config["device"] == "gpu" and cuda_reference:
        return "dali-gpu"
    return "full"


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
    t1 = time.perf_counter()
    return {"img_s": images / (t1 - t0), "images": images, "seconds": t1 - t0,
            "cpu_ms_per_img": 1e3 * (_cpu_seconds() - c0) / images, "window": {"clock_start": t0, "clock_stop": t1}}


def make_loader(config: dict, source, image_size: int, batch_size: int, seed: int, split: str):
    from ocr.data.backends import BackendChoice, build_loader
    from ocr.data.transforms import TransformParams

    train = split == "train"
    choice = BackendChoice(backend=config["backend"], device=config["device"],
                           targets=config.get("targets", "vectorized"), num_workers=config.get("num_workers", 0),
                           dali_threads=config.get("dali_threads", 1), reason="loader benchmark",
                           cpu_loader=config.get("cpu_loader", "threads"))
    params = TransformParams(image_size=image_size, train=train, crop_size=config.get("crop_size", 0))
    kwargs = dict(batch_size=batch_size, shuffle=train, drop_last=train and len(source) > batch_size, seed=seed,
                  with_targets=True)
    if choice.backend == "dali":
        from dali_pipelines.loader import build_dali_loader

        return build_dali_loader(choice, source, params, {}, parallel=config.get("parallel"), **kwargs)
    return build_loader(choice, source, params, {}, **kwargs)


def _close(loader) -> None:
    """Stop every thread and process of ``loader`` (before anything else is measured)."""
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    iterator = getattr(loader, "_iterator", None)  # a DataLoader's persistent worker processes
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def time_loader(config: dict, source, image_size: int, batch_size: int, batches: int, warmup: int, seed: int,
                split: str) -> dict:
    """One round of one loader: built here, ``warmup`` batches, ``batches`` timed batches at once
    after them, closed here. ``window`` holds the ``time.perf_counter()`` of each step."""
    import torch

    cuda = config["device"] == "gpu" and torch.cuda.is_available()
    opened = time.perf_counter()
    loader = make_loader(config, source, image_size, batch_size, seed, split)
    stream = _endless(loader)
    try:
        for _ in range(warmup):  # worker start-up, first decode, allocator warm-up
            next(stream)
        run = _time_batches(stream, batches, cuda)
    finally:
        stream.close()
        _close(loader)
        del loader, stream
        gc.collect()
    run["window"] = {"loader_open": opened, **run["window"], "loader_closed": time.perf_counter()}
    return run


# ----------------------------------------------------------------------------- the run
def _load_source(root: Path, split: str, preload: bool, max_images: int | None = None):
    from ocr.data.annotations import load_annotations
    from ocr.data.source import SampleSource

    json_path, image_dir = root / "jsons" / f"{split}.json", root / "images" / split
    if not json_path.is_file() or not image_dir.is_dir():
        raise SystemExit(f"{root}: expected jsons/{split}.json and images/{split}/")
    samples = load_annotations(json_path, image_dir)
    if max_images is not None:
        samples = samples[:max_images]
    return SampleSource(samples, preload=preload, split=split)


def config_name(config: dict) -> str:
    if config["backend"] == "cpu":
        kind = "threads" if config.get("cpu_loader", "threads") == "threads" else "procs"
        return f"cpu/{config['device']} {kind}={config.get('num_workers', 0)}"
    name = f"dali/{config['device']} t={config.get('dali_threads', 1)}"
    return name + (f" py={config['num_workers']}" if config.get("parallel") else "")


def row_kind(config: dict) -> str:
    if config["backend"] == "cpu":
        return "cpu threads" if config.get("cpu_loader", "threads") == "threads" else "cpu procs"
    return "dali parallel" if config.get("parallel") else "dali helper"


def median_round(runs: list[dict]) -> int:
    """Index of the median round by img/s (the lower one of an even count)."""
    order = sorted(range(len(runs)), key=lambda i: runs[i]["img_s"])
    return order[(len(order) - 1) // 2]


def summarize(config: dict, split: str, reference: str, runs: list[dict]) -> dict:
    """A row: the median round's img/s, and the ratios of that same round."""
    m = median_round(runs)
    run = runs[m]
    return {**config, "name": config_name(config), "kind": row_kind(config), "split": split,
            "img_s": run["img_s"], "img_s_rounds": [r["img_s"] for r in runs], "median_round": m,
            "reference": reference, "reference_img_s": run["references_img_s"][reference],
            "ratio": run["ratios"][reference], "cpu_ms_per_img": run["cpu_ms_per_img"],
            "reference_cpu_ms_per_img": run["references_cpu_ms_per_img"][reference],
            "rounds": runs}


def _matches(config: dict, wanted: set[str]) -> bool:
    """``--only`` names: backend/device, plus cpu/cpu/threads|processes and dali/<device>/helper|parallel."""
    base = f"{config['backend']}/{config['device']}"
    detail = config.get("cpu_loader") if config["backend"] == "cpu" else (
        "parallel" if config.get("parallel") else "helper")
    return base in wanted or f"{base}/{detail}" in wanted


def run_loader_bench(root: str | Path, split: str = "train", image_size: int = 640, batches: int = 30, warmup: int = 4,
                     batch_size: int = 8, configs: list[dict] | None = None, loader_splits=LOADER_SPLITS,
                     preload: bool = True, seed: int = 0, rounds: int = 3, max_images: int | None = None,
                     command: str | None = None, log=print) -> dict:
    """``rounds`` x (decode references, then each configuration and loader split, each loader
    built and closed inside its turn); returns the JSON dict (``command``: what ran it, for the
    record)."""
    import torch

    from ocr.hardware import probe, usable_cpus
    from ocr.versions import stack

    root = Path(root)
    source = _load_source(root, split, preload, max_images)
    cpus = usable_cpus()
    cuda = torch.cuda.is_available()
    configs = configs if configs is not None else default_configs(cuda, cpus)
    gpu_dali = [c for c in configs if c["backend"] == "dali" and c["device"] == "gpu"]
    cuda_reference = cuda and bool(gpu_dali)
    loadavg_start = list(os.getloadavg())
    items = eval_reductions(source, image_size)
    log(f"{len(source)} images of {root} ({split}), image size {image_size}, batch {batch_size}, {cpus} cores, "
        f"load average {loadavg_start}")
    references: dict[str, list[dict]] = {}
    loader_runs: dict[tuple[int, str], list[dict]] = {}
    for r in range(rounds):
        refs = cpu_decode_references(items, image_size, cpus, min_images=max(100, 2 * cpus * 24))
        if cuda_reference:
            refs["dali-gpu"] = dali_gpu_decode_reference([p for p, _ in items], image_size, batch_size,
                                                         gpu_dali[0].get("dali_threads", 1), batches, warmup)
        for name, ref in refs.items():
            references.setdefault(name, []).append(ref)
        log(f"round {r + 1}/{rounds}: decode references " + ", ".join(f"{n} {x['img_s']:.1f}" for n, x in refs.items())
            + " img/s")
        for i, config in enumerate(configs):
            for loader_split in loader_splits:
                run = time_loader(config, source, image_size, batch_size, batches, warmup, seed, loader_split)
                run["references_img_s"] = {n: x["img_s"] for n, x in refs.items()}
                run["references_cpu_ms_per_img"] = {n: x["cpu_ms_per_img"] for n, x in refs.items()}
                run["ratios"] = {n: run["img_s"] / x["img_s"] for n, x in refs.items()}
                loader_runs.setdefault((i, loader_split), []).append(run)
                ref = reference_for(config, cuda_reference)
                log(f"  {config_name(config):<22} {loader_split:<5} {run['img_s']:7.1f} img/s = "
                    f"{run['ratios'][ref]:.2f} x {ref}, {run['cpu_ms_per_img']:.1f} CPU ms/img")
    results = [summarize(config, s, reference_for(config, cuda_reference), loader_runs[(i, s)])
               for i, config in enumerate(configs) for s in loader_splits]
    ref_summary = {}
    for name, runs in references.items():
        m = median_round(runs)
        ref_summary[name] = {"description": REFERENCE_DESCRIPTIONS[name], "img_s": runs[m]["img_s"],
                             "cpu_ms_per_img": runs[m]["cpu_ms_per_img"], "median_round": m, "rounds": runs}
    info = probe()
    return {
        "command": command or f"run_loader_bench({str(root)!r}, {split!r}, ...)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": info.cpu_model, "usable_cpus": cpus, "device": info.device},
        "stack": stack(),
        "loadavg_start": loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "root": str(root),
        "split": split,
        "image_size": image_size,
        "batch_size": batch_size,
        "num_images": len(source),
        "cpus": cpus,
        "cuda": cuda,
        "rounds": rounds,
        "warmup_batches": warmup,
        "batches_per_round": batches,
        "references": ref_summary,
        "results": results,
        "row_descriptions": {k: v for k, v in ROW_DESCRIPTIONS.items() if any(r["kind"] == k for r in results)},
    }


# ----------------------------------------------------------------------------- output
def _table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["loader", "split", "img/s", "rounds min..max", "decode reference", "ref img/s", "x ref",
              "CPU ms/img", "ref CPU ms/img"]
    rows = [[r["name"], r["split"], f"{r['img_s']:.1f}",
             f"{min(r['img_s_rounds']):.1f}..{max(r['img_s_rounds']):.1f}", r["reference"],
             f"{r['reference_img_s']:.1f}", f"{r['ratio']:.2f}", f"{r['cpu_ms_per_img']:.1f}",
             f"{r['reference_cpu_ms_per_img']:.1f}"] for r in report["results"]]
    return header, rows


def _reference_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["decode reference", "img/s", "rounds min..max", "CPU ms/img", "what"]
    rows = []
    for name, ref in report["references"].items():
        runs = [x["img_s"] for x in ref["rounds"]]
        rows.append([name, f"{ref['img_s']:.1f}", f"{min(runs):.1f}..{max(runs):.1f}",
                     f"{ref['cpu_ms_per_img']:.1f}", ref["description"]])
    return header, rows


def _heading(report: dict) -> str:
    s = report["stack"]
    dirty = " (uncommitted changes)" if s.get("dirty") else ""
    load = ", ".join(f"{x:.2f}" for x in report["loadavg_start"]) + " -> " + ", ".join(
        f"{x:.2f}" for x in report["loadavg_end"])
    return (f"`{report['command']}` on {report['machine']['device']}, {report['date']}; "
            f"{report['num_images']} images of {report['root']} ({report['split']}), {report['image_size']} px, "
            f"batch {report['batch_size']}, DB targets included; median round of {report['rounds']} rounds of "
            f"{report['batches_per_round']} batches after {report['warmup_batches']} warm-up batches, each loader "
            f"built and closed in its round; load average {load}; torch {s.get('torch')}, DALI {s.get('dali')}, "
            f"commit {(s.get('commit') or '?')[:10]}{dirty}")


def _notes(report: dict) -> list[str]:
    notes = [f"`{kind}`: {text}" for kind, text in report["row_descriptions"].items()]
    notes.append("x ref: img/s over the decode reference of the same round (shown); the reference decodes as the "
                 "loader does but does nothing else, so eval loaders can exceed it.")
    return notes


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Aligned columns: names and descriptions to the left, figures to the right."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    left = [i == 0 or name == "what" for i, name in enumerate(header)]
    return ["  ".join(x.ljust(w) if lj else x.rjust(w) for x, w, lj in zip(line, widths, left)).rstrip()
            for line in (header, *rows)]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(line) + " |" for line in (header, ["---"] * len(header), *rows)]


def format_table(report: dict, markdown: bool = False) -> str:
    """The report as aligned text, or as markdown to paste unchanged into the README."""
    table = _markdown_table if markdown else _text_table
    lines = [_heading(report), ""]
    lines += table(*_table_rows(report)) + [""] + table(*_reference_rows(report)) + [""]
    lines += [f"- {n}" if markdown else n for n in _notes(report)]
    return "\n".join(lines)


def _write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="dataset root (images/<split>/, jsons/<split>.json)")
    ap.add_argument("--split", default="train", choices=["train", "val", "test"], help="which images")
    ap.add_argument("--max-images", type=int, default=None, help="only the split's first N images")
    ap.add_argument("--image-size", type=int, default=640)
    ap.add_argument("--crop-size", type=int, default=0, help="train crop (TransformParams.crop_size; 0: image size)")
    ap.add_argument("--batches", type=int, default=30, help="timed batches per loader and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (decode references, then every loader)")
    ap.add_argument("--warmup", type=int, default=4,
                    help="untimed batches first, in every round (at least the loader's start-up run-ahead: DALI "
                         "prefetches 2 batches and its helper thread works on a third)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--loaders", default=",".join(LOADER_SPLITS), help="train,eval or one of them")
    ap.add_argument("--only", default=None,
                    help="comma list of backend/device[/threads|processes|helper|parallel] "
                         "(e.g. cpu/cpu/threads,dali/cpu/helper)")
    ap.add_argument("--no-preload", action="store_true", help="read files from disk in the loaders")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown (for the README)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        ap.error("--max-images must be at least 1")

    import torch

    from ocr.hardware import usable_cpus

    configs = default_configs(torch.cuda.is_available(), usable_cpus())
    if args.crop_size:
        configs = [{**c, "crop_size": args.crop_size} for c in configs]
    if args.only:
        configs = [c for c in configs if _matches(c, set(args.only.split(",")))]
        if not configs:
            ap.error(f"--only {args.only}: no loader configuration matches")
    report = run_loader_bench(args.root, args.split, args.image_size, args.batches, args.warmup, args.batch_size,
                              configs, tuple(args.loaders.split(",")), preload=not args.no_preload, seed=args.seed,
                              rounds=args.rounds, max_images=args.max_images,
                              command=shlex.join(["python", "benchmarks/loader_bench.py", *argv]))
    print()
    print(format_table(report, markdown=args.markdown))
    if args.json:
        _write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
