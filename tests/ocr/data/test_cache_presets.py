"""Performance presets compose, mean what the receipt project documented and what their names
say (none, minimal and memory_efficient differ), default to the fastest safe settings, and
explicit overrides always win over them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from small_data import VAL, compose_small, tiny_dataset

from ocr.config import register_configs
from ocr.data.datamodule import OCRDataModule

REPO = Path(__file__).resolve().parents[3]
PRESETS = ("none", "minimal", "balanced", "validation_optimized", "memory_efficient", "auto")
SPLITS = ("train", "val", "test")


def _compose(name="train", overrides=()):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name=name, overrides=[*overrides, "output_dir=/tmp/x"])


def features(cfg, split) -> dict:
    c = cfg.datasets[f"{split}_dataset"].config
    cc = c.cache_config
    return {"preload_images": c.preload_images, "cache_images": cc.cache_images, "tensors": cc.cache_transformed_tensors,
            "load_maps": c.load_maps, "preload_maps": c.preload_maps, "cache_maps": cc.cache_maps,
            "preload_decoded": c.preload_decoded, "store": cc.store}


NOTHING = dict(preload_images=False, cache_images=False, tensors=False, load_maps=False, preload_maps=False,
               cache_maps=False, preload_decoded=False, store="auto")
BALANCED = {**NOTHING, "preload_images": True}
EVAL_FULL = dict(preload_images=True, cache_images=False, tensors=True, load_maps=True, preload_maps=True,
                 cache_maps=True, preload_decoded=False, store="auto")
RECORD_IN_MEMORY = {**NOTHING, "tensors": True}  # recorded during the first pass, nothing read up front
RECORD_ON_DISK = {**RECORD_IN_MEMORY, "store": "disk"}


@pytest.mark.parametrize("preset, train, evals", [
    ("none", NOTHING, NOTHING),
    ("minimal", NOTHING, RECORD_IN_MEMORY),
    ("memory_efficient", NOTHING, RECORD_ON_DISK),
    ("balanced", BALANCED, BALANCED),
    ("validation_optimized", NOTHING, EVAL_FULL),
    ("auto", BALANCED, EVAL_FULL),
])
def test_presets_mean_what_the_documents_say(preset, train, evals):
    cfg = _compose(overrides=[f"data/performance_preset={preset}"])
    assert cfg.data.performance_preset == preset
    assert features(cfg, "train") == train
    assert features(cfg, "val") == evals and features(cfg, "test") == evals
    assert not features(cfg, "train")["tensors"]  # no preset ever caches augmented batches


@pytest.mark.parametrize("name", ["train", "test", "predict"])
def test_default_is_auto_the_fastest_safe_settings(name):
    cfg = _compose(name)
    assert cfg.data.performance_preset == "auto"
    assert features(cfg, "train") == BALANCED
    assert features(cfg, "val") == EVAL_FULL and features(cfg, "test") == EVAL_FULL
    assert cfg.datasets.val_dataset.config.cache_config.store == "auto"


@pytest.mark.parametrize("preset", ["auto", "validation_optimized", "balanced"])
def test_explicit_overrides_win_over_the_preset(preset):
    overrides = [
        "datasets.val_dataset.config.preload_images=false",
        "datasets.val_dataset.config.cache_config.cache_transformed_tensors=false",
        "datasets.val_dataset.config.cache_config.store=disk",
        "datasets.train_dataset.config.preload_images=false",
    ]
    for order in (overrides + [f"data/performance_preset={preset}"], [f"data/performance_preset={preset}"] + overrides):
        cfg = _compose(overrides=order)
        val = cfg.datasets.val_dataset.config
        assert val.preload_images is False and val.cache_config.cache_transformed_tensors is False
        assert val.cache_config.store == "disk"
        assert cfg.datasets.train_dataset.config.preload_images is False
        # what was not overridden still comes from the preset
        assert val.load_maps == (preset in ("auto", "validation_optimized"))
        assert cfg.datasets.test_dataset.config.preload_images is True


def test_seed_document_baseline_and_optimized_commands_compose():
    baseline = _compose(overrides=[
        "exp_name=baseline", "trainer.max_epochs=3", "trainer.limit_val_batches=50", "trainer.precision=32-true",
        "datasets.val_dataset.config.preload_images=false",
        "datasets.val_dataset.config.cache_config.cache_transformed_tensors=false", "logger.wandb.enabled=false"])
    assert features(baseline, "val")["preload_images"] is False and features(baseline, "val")["tensors"] is False
    optimized = _compose(overrides=["exp_name=optimized", "trainer.max_epochs=3", "trainer.limit_val_batches=50",
                                    "logger.wandb.enabled=false"])
    assert features(optimized, "val") == EVAL_FULL


def test_unknown_preset_fails():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose(overrides=["data/performance_preset=fastest"])


def start_up_work(cfg) -> list[str]:
    """What a preset makes a run do before its first batch, per split."""
    work = []
    for split in SPLITS:
        f = features(cfg, split)
        work += [f"{split}: {k}" for k in ("preload_images", "cache_images", "preload_decoded", "preload_maps") if f[k]]
        if f["load_maps"]:
            work.append(f"{split}: open the precomputed maps")
        if f["tensors"] and f["store"] == "disk":
            work.append(f"{split}: verify an earlier disk entry")
    return work


def held_in_memory(cfg) -> list[str]:
    """What a preset keeps in RAM or GPU memory for the run, per split."""
    held = []
    for split in SPLITS:
        f = features(cfg, split)
        held += [f"{split}: {k}" for k in ("preload_images", "cache_images", "preload_decoded", "preload_maps",
                                           "cache_maps") if f[k]]
        if f["tensors"] and f["store"] != "disk":
            held.append(f"{split}: batches")
    return held


def test_every_preset_is_distinct():
    settings = {p: tuple(tuple(sorted(features(_compose(overrides=[f"data/performance_preset={p}"]), s).items()))
                         for s in SPLITS) for p in PRESETS}
    assert len(set(settings.values())) == len(PRESETS), settings


def test_none_does_nothing_at_all():
    cfg = _compose(overrides=["data/performance_preset=none"])
    assert all(features(cfg, s) == NOTHING for s in SPLITS)
    assert start_up_work(cfg) == [] and held_in_memory(cfg) == []


def test_minimal_does_the_least_start_up_work_of_the_caching_presets():
    cfg = _compose(overrides=["data/performance_preset=minimal"])
    assert start_up_work(cfg) == []
    assert features(cfg, "val")["tensors"]  # unlike none, validation is replayed after the first pass
    for preset in ("balanced", "validation_optimized", "memory_efficient", "auto"):
        assert start_up_work(_compose(overrides=[f"data/performance_preset={preset}"])), preset


def test_memory_efficient_holds_nothing_in_memory_but_keeps_a_validation_cache():
    cfg = _compose(overrides=["data/performance_preset=memory_efficient"])
    assert held_in_memory(cfg) == []
    assert features(cfg, "val")["tensors"] and features(cfg, "test")["tensors"]
    # every other preset with a validation cache holds something in memory
    for preset in ("minimal", "validation_optimized", "auto"):
        other = _compose(overrides=[f"data/performance_preset={preset}"])
        assert features(other, "val")["tensors"] and held_in_memory(other), preset


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory, "presets", seed=4, num_val=3, num_train=2)


@pytest.mark.parametrize("preset, store", [("none", None), ("minimal", "host"), ("memory_efficient", "disk"),
                                           ("balanced", None)])
def test_presets_at_run_time(tiny_root, tmp_path, preset, store):
    """Through the datamodule: what is read at start, and where validation batches are kept."""
    cfg = compose_small(tiny_root, f"data/performance_preset={preset}", f"{VAL}.cache_config.cache_dir={tmp_path}")
    dm = OCRDataModule(cfg, splits=("train", "val"))
    dm.setup("fit")
    preloaded = {s for s in ("train", "val") if dm.sources[s].preloaded}
    assert preloaded == ({"train", "val"} if preset == "balanced" else set())
    loader = dm.val_dataloader()
    first, second = list(loader), list(loader)
    assert len(first) == len(second) == 2
    tensors = dm.cache_stats().get("val", {}).get("tensors")
    if store is None:
        assert tensors is None
        return
    assert tensors["store"] == store and [p["action"] for p in tensors["passes"]] == ["record", "replay"]
    entries = list((tmp_path / "tensors").glob("val-*")) if (tmp_path / "tensors").is_dir() else []
    assert len(entries) == (1 if store == "disk" else 0)
