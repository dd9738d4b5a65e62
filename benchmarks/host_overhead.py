"""How much host work the training thread does per batch, how fast validation scoring runs, and
what the real data path costs a training step (nanoGPT ``bench.py``'s resident-batch idea).

    uv run python benchmarks/host_overhead.py [--json FILE] [--quick] [--device auto|cpu|cuda]

Data: SROIE-like receipts made on the fly (``--images`` JPEGs of ~1000 x 2000 px with ``--lines``
text lines each, preloaded into RAM), batches of ``--batch-size`` at ``--image-size`` px.

``train_thread_ms_per_batch`` -- per path ``<backend>/<device>``, the training thread's **thread CPU
time** (``time.thread_time``: time it only waited for a batch that was not ready is not counted,
nor is device kernel time) inside the loader's ``next()``, the transfer to the device and the
target step of ``on_after_batch_transfer``; median over the batches of an epoch (the first
``--warmup`` batches of each epoch excluded), then median (and min / max) over ``--repeats``
epochs. Freeing the previous host batch is timed apart (``release_ms_per_batch``): on the CPU it is
an munmap of ~180 MB, on a GPU the host batch lives in the pinned-memory cache and its release costs
nothing:

* ``cpu/cpu``, ``dali/cpu``: the CPU training paths (loader threads; DALI's CPU operators driven by
  one helper thread);
* ``cpu/gpu-host``, ``dali/gpu-host``: the GPU paths' host code on any machine -- the CPU backend's
  DataLoader worker processes with targets deferred to the device, and the DALI loader driven from
  the training thread with its parallel external source -- with the device step, rendering the
  target maps (and, for DALI, handing the images over: a host copy here, a queued device copy on a
  GPU), excluded from the figure and reported beside it (``render_ms_per_batch``: on a CPU it is
  the work itself, on a GPU it would be queued kernels);
* ``cpu/gpu``, ``dali/gpu`` (CUDA only): the real GPU paths, rendering included (on a GPU it only
  queues kernels, and queueing is host work).

``val_scoring`` -- images/s of post-processing + CLEval + IoU on the same predictions, with the
validation scoring pool and with one worker (in-process), and the ratio; the pooled result must
equal the serial one (checked).

``step_with_real_loader_vs_resident`` -- time per training step (forward, DB loss, backward,
AdamW) fed by the real default loader vs with one batch kept resident on the device, same model
and batch shape; warm-up steps excluded, the device synchronised at the ends of each timed window
only, median of ``--repeats`` windows. On 2 CPU cores the loader and the model compete for the
cores, so the CPU figure has no target; on a GPU it is the share of the step the data path costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ocr.data.annotations import load_annotations  # noqa: E402
from ocr.data.batch import attach_targets, batch_to, needs_targets  # noqa: E402
from ocr.data.source import SampleSource  # noqa: E402
from ocr.data.transforms import TransformParams  # noqa: E402

TARGET_KW = dict(shrink_ratio=0.4, thresh_min=0.3, thresh_max=0.7, min_text_size=8)
CPU_PATHS = ("cpu/cpu", "dali/cpu", "cpu/gpu-host", "dali/gpu-host")
CUDA_PATHS = ("cpu/gpu", "dali/gpu")


# ----------------------------------------------------------------------------------------- data
def make_receipts(root: Path, count: int, lines: int, seed: int = 0) -> Path:
    """``count`` receipt-like JPEGs (~1000 x 2000 px, ``lines`` text lines each: SROIE's density) with
    line-level annotations in our JSON format; returns the annotation file."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    for i in range(count):
        h, w = int(rng.integers(1800, 2200)), int(rng.integers(900, 1100))
        image = np.full((h, w, 3), 235, np.uint8)
        image += rng.integers(0, 12, size=(h, w, 1), dtype=np.uint8)
        words = {}
        pitch = (h - 120) / lines
        for k in range(lines):
            text = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .:$"), int(rng.integers(8, 36))))
            x0, y0 = int(rng.integers(30, 200)), int(60 + k * pitch)
            scale = 0.9
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
            tw = min(tw, w - x0 - 20)
            cv2.putText(image, text, (x0, y0 + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 2, cv2.LINE_AA)
            box = [[x0 - 2, y0 - 2], [x0 + tw + 2, y0 - 2], [x0 + tw + 2, y0 + th + base + 2], [x0 - 2, y0 + th + base + 2]]
            words[f"{k:04d}"] = {"points": box, "transcription": text.strip() or "###"}
        name = f"receipt_{i:04d}.jpg"
        cv2.imwrite(str(image_dir / name), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images[name] = {"words": words}
    path = root / "train.json"
    path.write_text(json.dumps({"images": images}))
    return path


def load_source(root: Path) -> SampleSource:
    return SampleSource(load_annotations(root / "train.json", root / "images"), preload=True, split="train")


# ----------------------------------------------------------------------------------------- loaders
def build_path(path: str, source: SampleSource, params: TransformParams, args):
    """(loader, device, render counted in the figure) for one ``<backend>/<device>`` path."""
    from dali_pipelines.loader import DaliLoader
    from ocr.data.dataset import ProcessLoader, ThreadedLoader, ValidatedOCRDataset
    from ocr.hardware import usable_cpus

    cpus = usable_cpus()
    kw = dict(batch_size=args.batch_size, shuffle=True, drop_last=True, seed=0)
    backend, where = path.split("/")
    cuda = torch.device("cuda", torch.cuda.current_device()) if where == "gpu" else None
    device = cuda or torch.device("cpu")
    if backend == "cpu" and where == "cpu":
        dataset = ValidatedOCRDataset(source, params, target_kwargs=TARGET_KW, target_mode="vectorized")
        return ThreadedLoader(dataset, num_threads=cpus, **kw), device, True
    if backend == "cpu":  # the GPU path's CPU backend: DataLoader worker processes, targets deferred
        dataset = ValidatedOCRDataset(source, params, target_kwargs=TARGET_KW, target_mode="deferred", seed=0)
        loader = ProcessLoader(dataset, num_workers=max(1, cpus - 1), pin_memory=cuda is not None, **kw)
        return loader, device, where == "gpu"
    if where == "cpu":
        return DaliLoader(source, params, TARGET_KW, device="cpu", num_threads=cpus, **kw), device, True
    # the DALI GPU path's host side: driven from this thread, parallel external source
    make = DaliLoader if cuda is not None else _host_side_dali()
    return (make(source, params, TARGET_KW, device="gpu" if cuda is not None else "cpu", num_threads=cpus,
                 parallel=True, py_num_workers=max(1, min(4, cpus - 1)), helper_thread=False,
                 render_targets=cuda is not None, **kw), device, cuda is not None)


def _host_side_dali():
    from dali_pipelines.loader import DaliLoader

    class HostSideDali(DaliLoader):
        """The DALI loader with DALI's CPU operators, its image hand-over timed apart: on a GPU that step
        is a device-to-device copy queued on the stream (``feed_ndarray``), here a 78 MB host copy."""

        device_step_seconds = 0.0

        def _images(self, tensor_list):
            t0 = time.thread_time()
            out = super()._images(tensor_list)
            self.device_step_seconds += time.thread_time() - t0
            return out

    return HostSideDali


def _close(loader) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_thread(path: str, source: SampleSource, params: TransformParams, args) -> dict:
    """Thread CPU time of the training thread per batch (see the module docstring)."""
    loader, device, render_counted = build_path(path, source, params, args)
    per_epoch, render_per_epoch, release_per_epoch = [], [], []
    try:
        for epoch in range(args.repeats):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            host, render, release = [], [], []
            it = iter(loader)
            for k in range(args.warmup + args.batches):
                copy0 = getattr(loader, "device_step_seconds", 0.0)
                t0 = time.thread_time()
                batch = next(it)
                if device.type == "cuda":
                    batch = batch_to(batch, device, non_blocking=True)
                t1 = time.thread_time()
                r = getattr(loader, "device_step_seconds", 0.0) - copy0  # the emulated image copy, if any
                t0 += r
                if needs_targets(batch):
                    t_render = time.thread_time()
                    attach_targets(batch, TARGET_KW)
                    r += time.thread_time() - t_render
                _sync(device)  # outside the measured span: keeps the device queue short
                t2 = time.thread_time()
                del batch  # freeing the host batch (munmap of ~180 MB) is timed apart, see "release"
                t3 = time.thread_time()
                if k >= args.warmup:
                    host.append((t1 - t0) + (r if render_counted else 0.0))
                    render.append(r)
                    release.append(t3 - t2)
            del it
            per_epoch.append(1000 * statistics.median(host))
            render_per_epoch.append(1000 * statistics.median(render))
            release_per_epoch.append(1000 * statistics.median(release))
    finally:
        _close(loader)
    return {"ms_per_batch": statistics.median(per_epoch), "min": min(per_epoch), "max": max(per_epoch),
            "per_repeat": per_epoch, "render_counted": render_counted,
            "render_ms_per_batch": statistics.median(render_per_epoch),
            "release_ms_per_batch": statistics.median(release_per_epoch)}


# ----------------------------------------------------------------------------------------- scoring
def time_scoring(source: SampleSource, params: TransformParams, args) -> dict:
    """Post-processing + metrics on the same predictions: the pool vs one worker in-process."""
    from ocr.training.scoring import benchmark_scoring

    return benchmark_scoring(source, params, workers=args.scoring_workers, repeats=args.repeats,
                             images=args.scoring_images)


# ----------------------------------------------------------------------------------------- steps
def _step_fn(device: torch.device, image_size: int):
    from ocr.models import DBLoss, DBNet

    model = DBNet(backbone="resnet18", pretrained=False, inner_channels=256 if device.type == "cuda" else 64).to(device)
    model.train()
    loss_fn = DBLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    def step(batch: dict) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
            preds = model(batch["images"])
            loss, _ = loss_fn(preds, batch)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss

    return step


def time_steps(source: SampleSource, args, device: torch.device) -> dict:
    """Step time with the real default loader of ``device`` vs one resident batch."""
    size, batch_size = (args.image_size, args.batch_size) if device.type == "cuda" else (args.step_image_size,
                                                                                        args.step_batch_size)
    params = TransformParams(image_size=size, train=True, crop_size=size)
    step_args = argparse.Namespace(**{**vars(args), "batch_size": batch_size})
    path = "dali/gpu" if device.type == "cuda" else "cpu/cpu"
    loader, _, _ = build_path(path, source, params, step_args)
    step = _step_fn(device, size)
    n_steps, warmup = args.step_steps, 2
    real, resident = [], []

    def next_batch(it):
        batch = batch_to(next(it), device, non_blocking=True)
        if needs_targets(batch):
            attach_targets(batch, TARGET_KW)
        return batch

    try:
        for epoch in range(args.repeats):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            it = iter(loader)
            for _ in range(warmup):
                step(next_batch(it))
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n_steps):
                step(next_batch(it))
            _sync(device)
            real.append((time.perf_counter() - t0) / n_steps)
            del it
        loader_batch = None
        for batch in loader:
            loader_batch = batch
            break
        resident_batch = batch_to(loader_batch, device)
        if needs_targets(resident_batch):
            attach_targets(resident_batch, TARGET_KW)
        for _ in range(warmup):
            step(resident_batch)
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n_steps):
                step(resident_batch)
            _sync(device)
            resident.append((time.perf_counter() - t0) / n_steps)
    finally:
        _close(loader)
    med_real, med_res = statistics.median(real), statistics.median(resident)
    return {"loader": path, "batch_size": batch_size, "image_size": size, "steps_per_window": n_steps,
            "real_loader_ms": 1000 * med_real, "real_loader_ms_min_max": [1000 * min(real), 1000 * max(real)],
            "resident_ms": 1000 * med_res, "resident_ms_min_max": [1000 * min(resident), 1000 * max(resident)],
            "ratio": med_real / med_res,
            "data_path_share": max(0.0, 1.0 - med_res / med_real)}


# ----------------------------------------------------------------------------------------- report
def report(result: dict) -> str:
    lines = [f"host_overhead: batches of {result['batch_size']} at {result['image_size']} px, "
             f"~{result['lines']} lines per image; load average {result['loadavg_start']} at the start, "
             f"{result['loadavg']} at the end",
             "", "training thread, thread CPU time per batch (ms): median [min, max] over repeats"]
    for path, r in result["train_thread_ms_per_batch_detail"].items():
        render = (f"; device step {r['render_ms_per_batch']:.2f} ms "
                  f"({'included' if r['render_counted'] else 'excluded: the device step'}); "
                  f"freeing the host batch {r['release_ms_per_batch']:.2f} ms (excluded)")
        lines.append(f"  {path:14s} {r['ms_per_batch']:7.2f} [{r['min']:.2f}, {r['max']:.2f}]{render}")
    s = result.get("val_scoring")
    if s:
        lines += ["", f"validation scoring: {s['img_s']:.1f} img/s with {s['workers']} workers, {s['img_s_1']:.1f} img/s "
                      f"with one: {s['speedup']:.2f}x (identical results: {s['identical']})"]
    st = result.get("step_with_real_loader_vs_resident")
    if st:
        lines += ["", f"training step ({st['loader']}, batch {st['batch_size']} at {st['image_size']} px): real loader "
                      f"{st['real_loader_ms']:.1f} ms, resident batch {st['resident_ms']:.1f} ms: {st['ratio']:.2f}x "
                      f"(data path {100 * st['data_path_share']:.0f}% of the step)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer batches and images (CI-sized)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--lines", type=int, default=50)
    parser.add_argument("--batches", type=int, default=None, help="timed batches per epoch (default 4, quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches at the start of each epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", default=None, help="comma-separated subset of the paths")
    parser.add_argument("--scoring-workers", type=int, default=None, help="pool size (default: the training default)")
    parser.add_argument("--scoring-images", type=int, default=None, help="images scored per repeat (default 32, quick 16)")
    parser.add_argument("--step-batch-size", type=int, default=4, help="CPU only: step benchmark batch size")
    parser.add_argument("--step-image-size", type=int, default=256, help="CPU only: step benchmark input size")
    parser.add_argument("--step-steps", type=int, default=None, help="steps per timed window (default 5, quick 3)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: train,scoring,steps")
    parser.add_argument("--data", help="reuse/keep the generated receipts in this folder")
    args = parser.parse_args(argv)
    args.batches = args.batches or (2 if args.quick else 4)
    args.scoring_images = args.scoring_images or (16 if args.quick else 32)
    args.step_steps = args.step_steps or (3 if args.quick else 5)
    skip = {s for s in args.skip.split(",") if s}
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not usable here")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    paths = CPU_PATHS + (CUDA_PATHS if cuda else ())
    if args.paths:
        wanted = args.paths.split(",")
        unknown = [p for p in wanted if p not in paths]
        if unknown:
            parser.error(f"--paths: {unknown} not among {list(paths)} on this machine")
        paths = tuple(wanted)

    from ocr.versions import stack

    images = args.batch_size * (args.warmup + args.batches)
    with tempfile.TemporaryDirectory(prefix="host_overhead_") as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        if not (root / "train.json").is_file():
            print(f"making {images} receipt images with {args.lines} lines each in {root} ...", flush=True)
            make_receipts(root, images, args.lines)
        source = load_source(root)
        params = TransformParams(image_size=args.image_size, train=True, crop_size=args.image_size)
        result = {"loadavg_start": [round(x, 2) for x in os.getloadavg()],
                  "batch_size": args.batch_size, "image_size": args.image_size, "lines": args.lines,
                  "timing": "thread CPU time of the training thread (time.thread_time)", "device": str(device),
                  "stack": stack()}
        if "train" not in skip:
            detail = {}
            for path in paths:
                print(f"timing {path} ...", flush=True)
                detail[path] = time_train_thread(path, source, params, args)
                print(f"  {path}: {detail[path]['ms_per_batch']:.2f} ms/batch", flush=True)
            result["train_thread_ms_per_batch"] = {p: round(r["ms_per_batch"], 3) for p, r in detail.items()}
            result["render_ms_per_batch"] = {p: round(r["render_ms_per_batch"], 3) for p, r in detail.items()}
            result["train_thread_ms_per_batch_detail"] = detail
        if "scoring" not in skip:
            print("timing validation scoring ...", flush=True)
            result["val_scoring"] = time_scoring(source, TransformParams(image_size=args.image_size, train=False), args)
        if "steps" not in skip:
            print("timing training steps ...", flush=True)
            result["step_with_real_loader_vs_resident"] = time_steps(source, args, device)
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    result.setdefault("train_thread_ms_per_batch_detail", {})
    print("\n" + report(result), flush=True)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = out.with_suffix(out.suffix + ".tmp")
        tmp_path.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp_path, out)
        print(f"written: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
