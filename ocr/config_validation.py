"""Every config key with a fixed set of values or a constraint, in one table (:data:`ROWS`,
shown in the README by :func:`markdown_table`), checked by :func:`validate` before a runner
touches any data: a bad value is one :class:`ConfigError` naming the key, the value and what
is allowed. Booleans and the keys in :data:`FREE_FORM` (names and paths) are checked by type
only, by the schema (``ocr/config.py``) when Hydra composes the config."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

# torch-free (torch and Lightning load only for the values that need them): a refused config
# costs an interpreter and Hydra, not ~10 s of imports
from ocr.config import BACKBONES, BACKENDS, CPU_LOADERS, DEVICES, STORES, TARGET_MODES, ConfigError

__all__ = ["ROWS", "FREE_FORM", "Row", "validate", "problems", "raw_leaves", "ignored_overrides", "check_overrides",
           "markdown_table"]

SCHEDULES = ("cosine", "poly", "constant")  # ocr/training/module.py lr_lambda
OUTPUTS = ("quad", "polygon")  # ocr/models/postprocess.py DBPostProcessor
SPLITS = ("test", "val")  # runners/test.py
ON_ERROR = ("raise", "skip")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
#: "auto" and Lightning's precision names (``lightning.fabric`` ``_PRECISION_INPUT``).
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64")
MAX_SEED = 2**32 - 1  # lightning's seed_everything


@dataclass(frozen=True)
class Row:
    """``key``: a dotted key (``*`` matches any part, e.g. every split under ``datasets``);
    ``allowed``: what is allowed, as the user reads it; ``ok(value, cfg)``: True when the
    value is allowed (False, or a string saying what is wrong here, otherwise); ``bad``: a
    refused value, as an override writes it (the tests set it)."""

    key: str
    allowed: str
    ok: Callable[[Any, DictConfig], bool | str]
    description: str
    bad: str


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def one_of(values) -> tuple[str, Callable]:
    return "one of " + ", ".join(str(v) for v in values), lambda v, cfg: v in values


def at_least(lo: float) -> tuple[str, Callable]:
    return f">= {lo}", lambda v, cfg: _number(v) and v >= lo


def above(lo: float) -> tuple[str, Callable]:
    return f"> {lo}", lambda v, cfg: _number(v) and v > lo


def within(lo: float, hi: float, open_lo: bool = False, open_hi: bool = False) -> tuple[str, Callable]:
    text = f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
    return text, lambda v, cfg: (_number(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi))


def optional(rule: tuple[str, Callable]) -> tuple[str, Callable]:
    text, ok = rule
    return f"null or {text}", lambda v, cfg: v is None or ok(v, cfg)


def numbers(n: int, rule: tuple[str, Callable]) -> tuple[str, Callable]:
    text, ok = rule
    return (f"{n} numbers, each {text}",
            lambda v, cfg: isinstance(v, (list, ListConfig)) and len(v) == n and all(ok(x, cfg) for x in v))


def _multiple_of_32(v: Any) -> bool:
    return _integer(v) and v >= 32 and v % 32 == 0


def _devices(v: Any, cfg) -> bool:
    if v == "auto" or (_integer(v) and (v >= 1 or v == -1)):
        return True
    if isinstance(v, str):
        return re.fullmatch(r"\s*(-1|\d+(\s*,\s*\d+)*\s*,?)\s*", v) is not None
    return isinstance(v, (list, ListConfig)) and len(v) > 0 and all(_integer(i) and i >= 0 for i in v)


def _batch_limit(v: Any, cfg) -> bool:
    """Lightning's limit_*_batches: a fraction of the batches or a number of batches."""
    return (isinstance(v, float) and 0.0 <= v <= 1.0) or (_integer(v) and v >= 0)


def _strategy(v: Any, cfg) -> bool:
    if v == "auto":
        return True
    from lightning.pytorch.strategies import StrategyRegistry

    return v in StrategyRegistry


def _targets(v: Any, cfg) -> bool | str:
    if v not in TARGET_MODES:
        return False
    if v != "reference":
        return True
    # the DALI graph and the GPU target path compute the vectorised targets: refuse rather
    # than run them while the log and the cache key say "reference"
    from ocr.data.backends import choose_backend

    choice = choose_backend(cfg.loader, trainer_cfg=cfg.get("trainer"))
    if choice.backend == "cpu" and choice.device == "cpu":
        return True
    return f"here: the {choice.backend} backend on the {choice.device}, which computes vectorized targets"


ROWS: list[Row] = [
    Row("seed", *within(0, MAX_SEED), "random seed of the run", "-1"),
    Row("batch_size", *at_least(1), "every split's batch size unless loader.batch_size / loader.eval_batch_size say otherwise", "0"),
    Row("split", *one_of(SPLITS), "runners/test.py: the split to evaluate", "train"),
    # data
    Row("data.image_size", "a multiple of 32, >= 32", lambda v, cfg: _multiple_of_32(v),
        "eval: longer side scaled to this, padded square (the network needs multiples of 32)", "100"),
    Row("data.train_crop_size", "0 (data.image_size) or a multiple of 32, >= 32", lambda v, cfg: v == 0 or _multiple_of_32(v),
        "train: square crop at the same text scale", "200"),
    Row("data.max_image_pixels", "0 (no limit) or >= 1", lambda v, cfg: _integer(v) and v >= 0,
        "larger images are refused (skipped with on_error=skip)", "-1"),
    Row("data.mean", *numbers(3, within(0, 1)), "per-channel (RGB) mean, images in [0, 1]", "[0.5,0.5]"),
    Row("data.std", *numbers(3, above(0)), "per-channel (RGB) standard deviation", "[0.2,0,0.2]"),
    Row("data.synthetic.num_train", *at_least(1), "synthetic receipts generated for the train split", "0"),
    Row("data.synthetic.num_val", *at_least(1), "... for the val split", "0"),
    Row("data.synthetic.num_test", *at_least(1), "... for the test split", "0"),
    Row("data.synthetic.seed", *within(0, MAX_SEED), "seed of the synthetic dataset", "-1"),
    Row("data.augment.scale_min", *above(0), "train: smallest random scale", "0"),
    Row("data.augment.scale_max", ">= data.augment.scale_min", lambda v, cfg: _number(v) and v >= cfg.data.augment.scale_min,
        "train: largest random scale", "0.5"),
    Row("data.augment.max_rotation", *within(0, 180), "train: largest random rotation, degrees", "200"),
    Row("data.augment.hflip_prob", *within(0, 1), "train: probability of a horizontal flip", "1.5"),
    Row("data.augment.text_crop_prob", *within(0, 1), "train: probability that the crop is placed on text", "-0.1"),
    Row("data.augment.brightness", *within(0, 1), "train: colour jitter, factor in [1 - x, 1 + x]", "1.5"),
    Row("data.augment.contrast", *within(0, 1), "train: colour jitter, factor in [1 - x, 1 + x]", "-1"),
    Row("data.augment.saturation", *within(0, 1), "train: colour jitter, factor in [1 - x, 1 + x]", "2"),
    Row("data.targets.shrink_ratio", *within(0, 1, open_lo=True, open_hi=True), "DB targets: text kernel shrink ratio", "1"),
    Row("data.targets.thresh_min", *within(0, 1, open_hi=True), "DB targets: threshold map value off the text border", "-0.1"),
    Row("data.targets.thresh_max", "in (data.targets.thresh_min, 1]",
        lambda v, cfg: _number(v) and cfg.data.targets.thresh_min < v <= 1, "DB targets: threshold map value on the border", "0.1"),
    Row("data.targets.min_text_size", *at_least(0), "DB targets: words with a shorter side (px) are ignored", "-1"),
    # datasets (every split)
    Row("datasets.*.config.on_error", *one_of(ON_ERROR), "a bad word or image stops the run, or is skipped and counted", "ignore"),
    Row("datasets.*.config.cache_config.store", *one_of(STORES), "where the batch cache lives", "ram"),
    Row("datasets.*.config.cache_config.max_memory_fraction", *within(0, 1, open_lo=True),
        "of the free GPU / available host memory a cache or preload may take", "0"),
    Row("datasets.*.config.cache_config.log_statistics_every_n", *at_least(0),
        "samples between Cache Statistics lines (0: at epoch ends only)", "-1"),
    # loader
    Row("loader.backend", *one_of(BACKENDS), "data backend (auto: DALI on a usable GPU, else the CPU backend)", "torch"),
    Row("loader.device", *one_of(DEVICES), "where pixels and targets are computed", "cuda"),
    Row("loader.targets", f"one of {', '.join(TARGET_MODES)} (reference: only with the CPU backend on the CPU, "
        "loader.backend=cpu loader.device=cpu)", _targets,
        "DB target implementation (auto: vectorized)", "exact"),
    Row("loader.batch_size", *at_least(1), "training batch size", "0"),
    Row("loader.eval_batch_size", *at_least(1), "val/test/predict batch size", "0"),
    Row("loader.num_workers", *at_least(-1), "CPU backend loader threads or processes (-1: from the CPU count)", "-2"),
    Row("loader.cpu_loader", *one_of(CPU_LOADERS),
        "CPU backend: loader threads in the training process or DataLoader worker processes "
        "(auto: threads when training on the CPU, processes next to a GPU)", "workers"),
    Row("loader.dali_threads", *at_least(-1), "DALI CPU threads (-1: from the CPU count)", "-2"),
    # model
    Row("model.backbone", *one_of(BACKBONES), "torchvision ResNet", "7x"),
    Row("model.inner_channels", "a multiple of 4, >= 4", lambda v, cfg: _integer(v) and v >= 4 and v % 4 == 0, "FPN width", "30"),
    Row("model.k", *above(0), "amplifying factor of the approximate binarisation", "0"),
    Row("model.eval_workers", *at_least(-1), "scoring worker processes (-1: from the CPU count, 0: in the training process)", "-2"),
    Row("model.optimizer.lr", *above(0), "AdamW learning rate", "0"),
    Row("model.optimizer.weight_decay", *at_least(0), "AdamW weight decay", "-0.1"),
    Row("model.optimizer.betas", *numbers(2, within(0, 1, open_hi=True)), "AdamW betas", "[0.9,1.0]"),
    Row("model.scheduler.name", *one_of(SCHEDULES), "learning-rate schedule after the warm-up", "linear"),
    Row("model.scheduler.warmup_epochs", *at_least(0), "linear warm-up length, epochs", "-1"),
    Row("model.scheduler.min_lr_ratio", *within(0, 1), "final learning rate / lr", "2"),
    Row("model.scheduler.power", *above(0), "poly schedule exponent", "0"),
    Row("model.loss.alpha", *at_least(0), "weight of the approximate-binary-map loss", "-1"),
    Row("model.loss.beta", *at_least(0), "weight of the threshold-map loss", "-1"),
    Row("model.loss.ohem_ratio", *above(0), "negatives per positive in hard negative mining", "0"),
    Row("model.postprocess.thresh", *within(0, 1, open_lo=True), "binarisation threshold on the probability map", "0"),
    Row("model.postprocess.box_thresh", *within(0, 1, open_lo=True), "smallest mean probability of a kept box", "1.5"),
    Row("model.postprocess.unclip_ratio", *above(0), "box expansion D = A * unclip_ratio / L", "0"),
    Row("model.postprocess.max_candidates", *at_least(1), "contours considered per image", "0"),
    Row("model.postprocess.min_size", *at_least(0), "smallest box side kept, px", "-1"),
    Row("model.postprocess.output", *one_of(OUTPUTS), "4-point boxes or polygons", "box"),
    # trainer
    Row("trainer.max_epochs", "-1 (no limit) or >= 1", lambda v, cfg: _integer(v) and (v >= 1 or v == -1), "epochs to train", "0"),
    Row("trainer.precision", *one_of(PRECISIONS), "auto: 16-mixed on CUDA, 32-true on CPU", "fp16"),
    Row("trainer.accelerator", *one_of(ACCELERATORS), "Lightning accelerator", "gpus"),
    Row("trainer.devices", "auto, -1 (all), a count >= 1, a list of device indices or '0,1'", _devices, "Lightning devices", "0"),
    Row("trainer.strategy", "auto or a Lightning strategy name (ddp, ddp_spawn, fsdp, ...)", _strategy,
        "how the devices share the work (ddp: one process per device, gradients averaged)", "dpp"),
    Row("trainer.num_nodes", *at_least(1), "machines, each with trainer.devices devices", "0"),
    Row("trainer.limit_train_batches", "a fraction in [0.0, 1.0] or a number of batches >= 0", _batch_limit,
        "train batches per epoch", "1.5"),
    Row("trainer.limit_val_batches", "a fraction in [0.0, 1.0] or a number of batches >= 0", _batch_limit,
        "validation batches per epoch (0: no validation)", "-1"),
    Row("trainer.limit_test_batches", "a fraction in [0.0, 1.0] or a number of batches >= 0", _batch_limit,
        "runners/test.py batches", "2.0"),
    Row("trainer.num_sanity_val_steps", *at_least(-1), "validation batches before training (-1: all)", "-2"),
    Row("trainer.check_val_every_n_epoch", *at_least(1), "validate every n-th epoch", "0"),
    Row("trainer.gradient_clip_val", *at_least(0), "gradient norm clip (0: none)", "-1"),
    Row("trainer.accumulate_grad_batches", *at_least(1), "batches per optimizer step", "0"),
    Row("trainer.log_every_n_steps", *at_least(1), "training steps between logged losses", "0"),
    Row("trainer.max_time", "null or DD:HH:MM:SS",
        lambda v, cfg: v is None or (isinstance(v, str) and re.fullmatch(r"\d+:\d+:\d+:\d+", v) is not None),
        "stop training after this long", "1h"),
    Row("trainer.gpu_memory_fraction", *optional(within(0, 1, open_lo=True)), "cap of this process's GPU memory", "0"),
]

#: Keys checked by type only (names and paths; a path is checked when it is opened).
FREE_FORM = (
    "exp_name", "data.performance_preset", "output_dir", "ckpt_path", "input_dir", "output_json", "overlays", "gt_json", "data.root",
    "data.synthetic.root", "datasets.*.config.image_path", "datasets.*.config.annotation_path",
    "datasets.*.config.cache_config.cache_dir", "model.init_from", "logger.wandb.project", "logger.wandb.entity",
)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a plain container (lists are leaves) with its value."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def raw_leaves(cfg: DictConfig) -> dict[str, Any]:
    """``cfg``'s leaf keys with their values before interpolation."""
    return _leaves(OmegaConf.to_container(cfg, resolve=False))


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (ListConfig, DictConfig)):
        return str(OmegaConf.to_container(value)).replace(" ", "")
    return str(value)


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${")


def problems(cfg: DictConfig) -> list[str]:
    """``key=value: must be ...`` for every value the table refuses, in table order. A key
    whose value is an interpolation (``loader.batch_size: ${batch_size}``) is checked where it
    points; a row whose key this config does not have (e.g. ``split`` in train) is skipped."""
    raw = raw_leaves(cfg)
    found = []
    for row in ROWS:
        for key in (k for k in raw if fnmatch.fnmatchcase(k, row.key)):
            if _is_interpolation(raw[key]):
                continue
            value = OmegaConf.select(cfg, key)
            verdict = row.ok(value, cfg)
            if verdict is True:
                continue
            note = f" ({verdict})" if isinstance(verdict, str) else ""
            found.append(f"{key}={_show(value)}: must be {row.allowed}{note}")
    return found


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys added with ``+key=value`` that the schema does not declare: nothing reads them."""
    schema_type = OmegaConf.get_type(cfg)
    if schema_type is None or schema_type is dict:
        return []
    known = set(raw_leaves(OmegaConf.structured(schema_type)))
    return [k for k in raw_leaves(cfg) if k not in known
            and not any(k.startswith(f"{p}.") for p in known)]  # an Any key holding a dict


def validate(cfg: DictConfig) -> None:
    """Raise one :class:`ConfigError` listing every refused value (one line)."""
    found = problems(cfg)
    found += [f"{k}={_show(OmegaConf.select(cfg, k, throw_on_resolution_failure=False))}: no such key "
              f"(nothing reads it; every key: --cfg job)" for k in unknown_keys(cfg)]
    if found:
        raise ConfigError("; ".join(found))


# ------------------------------------------------------------------ keys a runner ignores

#: What train/test/predict read nothing from (a key, its sub-keys, or a config group).
TRAINING_ONLY = (
    "data.augment", "data.train_crop_size", "model.optimizer", "model.scheduler", "model.loss", "model.init_from",
    "model.pretrained", "loader.batch_size", "trainer.max_epochs", "trainer.limit_train_batches",
    "trainer.limit_val_batches", "trainer.check_val_every_n_epoch", "trainer.gradient_clip_val",
    "trainer.accumulate_grad_batches", "trainer.num_sanity_val_steps", "trainer.max_time", "logger",
)
IGNORED = {
    "train": ("datasets.test_dataset",),
    "test": TRAINING_ONLY,
    "predict": (*TRAINING_ONLY, "datasets", "data/performance_preset", "data.root", "data.synthetic", "data.targets",
                "trainer.limit_test_batches"),
}


def _override_key(override: str) -> str:
    return override.lstrip("~+").split("=", 1)[0].strip()


def ignored_overrides(runner: str, cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The command-line overrides ``runner`` (train | test | predict) reads nothing from."""
    ignored = list(IGNORED.get(runner, ()))
    if runner == "test":  # only the evaluated split's dataset settings apply
        ignored += [f"datasets.{s}_dataset" for s in ("train", *SPLITS) if s != cfg.split]
    out = []
    for override in overrides:
        key = _override_key(override)
        if any(key == p or key.startswith((f"{p}.", f"{p}/")) for p in ignored):
            out.append(override)
    return out


def check_overrides(overrides: list[str]) -> None:
    """``data.performance_preset=NAME`` only renames the preset in the log: refuse it."""
    for override in overrides:
        if _override_key(override) == "data.performance_preset":
            name = override.split("=", 1)[-1]
            raise ConfigError(f"{override}: only the preset's name; select a preset with data/performance_preset={name}")


# ------------------------------------------------------------------ README


def markdown_table() -> str:
    """The table as the README shows it."""
    lines = ["| Key | Allowed | What it sets |", "| --- | --- | --- |"]
    lines += [f"| `{r.key}` | {r.allowed} | {r.description} |" for r in ROWS]
    lines.append("")
    lines.append("Checked by type only: booleans and " + ", ".join(f"`{k}`" for k in FREE_FORM) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
