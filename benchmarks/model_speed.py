"""CPU speed of DBNet: forward and forward+backward seconds per image.

Example::

    uv run python benchmarks/model_speed.py --backbone resnet18 \
        --sizes 384 448 512 640 --channels 256 128 96 64 --batch 4 --threads 2 \
        --channels-last both

* ``fwd``: eval mode, ``torch.no_grad``, probability branch only (inference path,
  ``with_thresh=False``).
* ``fwd+bwd``: train mode, forward + :class:`DBLoss` on synthetic targets + backward
  (no optimizer step) -- the per-step cost of training.

The configurations are measured *interleaved*: ``--warmup`` untimed rounds, then
``--iters`` timed rounds, each round running every configuration once. The table
shows the minimum over the rounds (the least disturbed by other processes on a
shared machine) and the median, divided by the batch size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ocr.models import DBLoss, DBNet  # noqa: E402


def _batch(b: int, size: int, memory_format: torch.memory_format) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, size, size, generator=g).contiguous(memory_format=memory_format)
    prob = torch.zeros(b, 1, size, size)
    prob[:, :, size // 4 : size // 4 + size // 8, size // 8 : size - size // 8] = 1.0
    targets = {
        "prob_maps": prob,
        "prob_masks": torch.ones_like(prob),
        "thresh_maps": torch.full_like(prob, 0.3),
        "thresh_masks": torch.ones_like(prob),
    }
    return images, targets


class _Case:
    def __init__(self, backbone: str, size: int, channels: int, batch: int, channels_last: bool) -> None:
        self.key = {"backbone": backbone, "size": size, "channels": channels, "batch": batch,
                    "channels_last": channels_last}
        mf = torch.channels_last if channels_last else torch.contiguous_format
        self.model = DBNet(backbone, inner_channels=channels).to(memory_format=mf)
        self.loss_fn = DBLoss()
        self.images, self.targets = _batch(batch, size, mf)
        self.batch = batch
        self.fwd_times: list[float] = []
        self.train_times: list[float] = []

    def fwd(self) -> float:
        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model(self.images, with_thresh=False)
        return time.perf_counter() - t0

    def train(self) -> float:
        self.model.train()
        t0 = time.perf_counter()
        loss, _ = self.loss_fn(self.model(self.images), self.targets)
        loss.backward()
        dt = time.perf_counter() - t0
        self.model.zero_grad(set_to_none=True)
        return dt

    def result(self) -> dict:
        r = dict(self.key)
        r["params_M"] = sum(p.numel() for p in self.model.parameters()) / 1e6
        for name, ts in (("fwd", self.fwd_times), ("train", self.train_times)):
            r[f"{name}_s_per_img"] = min(ts) / self.batch if ts else None
            r[f"{name}_s_per_img_median"] = statistics.median(ts) / self.batch if ts else None
        return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 448, 512, 640])
    ap.add_argument("--channels", type=int, nargs="+", default=[256, 128, 96, 64])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    ap.add_argument("--iters", type=int, default=3, help="timed rounds")
    ap.add_argument("--skip-fwd", action="store_true", help="only time forward+backward")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON lines here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cl_opts = {"no": [False], "yes": [True], "both": [False, True]}[args.channels_last]
    cases = [_Case(args.backbone, s, c, args.batch, cl) for s, c, cl in itertools.product(args.sizes, args.channels, cl_opts)]
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, "
          f"backbone={args.backbone}, {len(cases)} configs, {args.warmup} warm-up + {args.iters} timed rounds",
          flush=True)
    for rnd in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        for case in cases:
            f = None if args.skip_fwd else case.fwd()
            t = case.train()
            if rnd >= args.warmup:
                if f is not None:
                    case.fwd_times.append(f)
                case.train_times.append(t)
        print(f"round {rnd + 1}/{args.warmup + args.iters} done in {time.perf_counter() - t0:.0f} s", flush=True)

    print("seconds per image: min / median over the timed rounds")
    print(f"{'size':>5} {'ch':>4} {'ch_last':>7} {'params(M)':>9} {'fwd s/img':>14} {'fwd+bwd s/img':>14}")
    results = [c.result() for c in cases]
    for r in results:
        fwd = "-" if r["fwd_s_per_img"] is None else f"{r['fwd_s_per_img']:.3f} / {r['fwd_s_per_img_median']:.3f}"
        trn = f"{r['train_s_per_img']:.3f} / {r['train_s_per_img_median']:.3f}"
        print(f"{r['size']:>5} {r['channels']:>4} {str(r['channels_last']):>7} {r['params_M']:>9.2f} {fwd:>14} {trn:>14}")
    if args.json:
        with open(args.json, "a") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
