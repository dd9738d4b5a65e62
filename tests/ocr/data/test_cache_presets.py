"""Performance presets compose, mean what the receipt project documented, default to the
fastest safe settings, and explicit overrides always win over them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ocr.config import register_configs

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
            "preload_decoded": c.preload_decoded}


NOTHING = dict(preload_images=False, cache_images=False, tensors=False, load_maps=False, preload_maps=False,
               cache_maps=False, preload_decoded=False)
BALANCED = {**NOTHING, "preload_images": True}
EVAL_FULL = dict(preload_images=True, cache_images=False, tensors=True, load_maps=True, preload_maps=True,
                 cache_maps=True, preload_decoded=False)


@pytest.mark.parametrize("preset, train, evals", [
    ("none", NOTHING, NOTHING),
    ("minimal", NOTHING, NOTHING),
    ("memory_efficient", NOTHING, NOTHING),
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
