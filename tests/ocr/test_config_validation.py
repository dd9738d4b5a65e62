"""ocr/config_validation.py: every row of the table refuses its example of a bad value (and
nothing else fires), the entry configs pass, every schema key has a row or is free-form."""

import copy
import fnmatch
import functools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

import ocr.data.backends as backends
from ocr import config
from ocr.config import register_configs
from ocr.config_validation import (
    FREE_FORM,
    ROWS,
    check_overrides,
    ignored_overrides,
    markdown_table,
    problems,
    raw_leaves,
    validate,
)
from ocr.training.run import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _compose(name="test", overrides=()):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(config_name=name, overrides=[*overrides, "output_dir=/tmp/unused"])


@functools.cache
def _base() -> DictConfig:
    return _compose()


def _with(overrides) -> DictConfig:
    """The test config with ``key=value`` overrides parsed and typed as Hydra does (a compose
    per case would make this file ten times slower)."""
    cfg = copy.deepcopy(_base())
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    return cfg


@pytest.mark.parametrize("name", ["train", "test", "predict"])
def test_entry_configs_pass(name):
    validate(_compose(name))


@pytest.mark.parametrize("row", ROWS, ids=[r.key for r in ROWS])
def test_each_row_refuses_its_bad_value(row):
    key = row.key.replace("*", "val_dataset")
    cfg = _with([f"{key}={row.bad}"])
    found = problems(cfg)
    assert len(found) == 1, found
    shown = str(OmegaConf.select(cfg, key)).replace(" ", "")
    assert found[0] == f"{key}={shown}: must be {row.allowed}"
    with pytest.raises(ConfigError, match=f"^{key}="):
        validate(cfg)


@pytest.mark.parametrize("override", [
    "data.image_size=32", "data.train_crop_size=0", "data.train_crop_size=640", "model.postprocess.thresh=1",
    "model.postprocess.output=polygon", "model.scheduler.name=poly", "trainer.devices=-1", "trainer.devices=[0,1]",
    "trainer.devices='0,1'", "trainer.limit_val_batches=50", "trainer.limit_val_batches=0.5", "trainer.max_epochs=-1",
    "trainer.max_time=00:01:30:00", "trainer.gpu_memory_fraction=0.5", "trainer.precision=bf16-mixed",
    "loader.num_workers=-1", "data.targets.thresh_max=0.31", "datasets.train_dataset.config.on_error=skip",
    "loader.targets=reference loader.backend=cpu loader.device=cpu",
])
def test_allowed_values_pass(override):
    assert problems(_with(override.split())) == []


#: The seed documents' training commands (/work/shared/seeds): they pass as written.
SEED_COMMANDS = [
    "exp_name=benchmark_baseline_32bit_no_cache logger.wandb.enabled=false trainer.max_epochs=3 trainer.limit_val_batches=50 "
    "trainer.precision=32-true datasets.val_dataset.config.preload_images=false "
    "datasets.val_dataset.config.cache_config.cache_transformed_tensors=false seed=42",
    "datasets.val_dataset.config.image_path=/path/to/new_dataset datasets.val_dataset.config.cache_config.cache_transformed_tensors=false",
    "datasets.val_dataset.config.cache_config.log_statistics_every_n=10",
    "data/performance_preset=minimal trainer.max_epochs=1 trainer.limit_train_batches=10",
    "data/performance_preset=memory_efficient batch_size=8",
    "data/performance_preset=validation_optimized",
]


@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_seed_document_commands_pass(command):
    overrides = command.split()
    cfg = _compose("train", overrides)
    validate(cfg)
    assert ignored_overrides("train", cfg, overrides) == []


def test_every_problem_in_one_line():
    cfg = _compose(overrides=["model.backbone=7x", "data.image_size=100", "batch_size=0"])
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert str(exc.value) == ("batch_size=0: must be >= 1; data.image_size=100: must be a multiple of 32, >= 32; "
                              "model.backbone=7x: must be one of resnet18, resnet34, resnet50")


def test_every_schema_key_has_a_row_or_is_free_form():
    patterns = [r.key for r in ROWS] + list(FREE_FORM)
    for schema in (config.TrainConfig, config.TestConfig, config.PredictConfig):
        for key, value in raw_leaves(OmegaConf.structured(schema)).items():
            if isinstance(value, bool):
                continue  # the schema's type check is the whole constraint
            assert any(fnmatch.fnmatchcase(key, p) for p in patterns), f"{schema.__name__}: {key} has no row"


def test_added_key_is_refused():
    with pytest.raises(ConfigError, match=r"^foo=1: no such key"):
        validate(_compose("train", ["+foo=1"]))


def test_reference_targets_refused_with_dali():
    pytest.importorskip("nvidia.dali")
    cfg = _compose(overrides=["loader.targets=reference", "loader.backend=dali", "loader.device=cpu"])
    assert problems(cfg) == ["loader.targets=reference: must be one of auto, reference, vectorized (reference: only "
                             "with the CPU backend on the CPU, loader.backend=cpu loader.device=cpu) (here: the dali "
                             "backend on the cpu, which computes vectorized targets)"]


def test_reference_targets_refused_when_auto_resolves_to_the_gpu(monkeypatch):
    # a CUDA machine without DALI: the CPU backend, with the targets computed on the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_dali_available", lambda: False)
    cfg = _compose(overrides=["loader.targets=reference"])
    assert problems(cfg)[0].endswith("(here: the cpu backend on the gpu, which computes vectorized targets)")
    assert problems(_compose(overrides=["loader.targets=reference", "trainer.accelerator=cpu"])) == []


def test_top_level_batch_size_sets_every_split():
    # the presets document's low-memory example
    cfg = _compose("train", ["data/performance_preset=memory_efficient", "batch_size=4"])
    assert (cfg.loader.batch_size, cfg.loader.eval_batch_size) == (4, 4)
    validate(cfg)
    cfg = _compose("train", ["batch_size=4", "loader.batch_size=2"])
    assert (cfg.loader.batch_size, cfg.loader.eval_batch_size) == (2, 4)
    cfg = _compose("train", ["batch_size=0", "loader.batch_size=2", "loader.eval_batch_size=2"])
    assert problems(cfg) == ["batch_size=0: must be >= 1"]


def test_ignored_overrides_per_runner():
    given = ["logger.wandb.enabled=false", "datasets.val_dataset.config.preload_images=false",
             "data/performance_preset=minimal", "model.postprocess.thresh=0.5", "datasets.test_dataset.config.on_error=skip"]
    predict = _compose("predict")
    assert ignored_overrides("predict", predict, given) == [given[0], given[1], given[2], given[4]]
    test = _compose("test", ["split=val"])
    assert ignored_overrides("test", test, given) == [given[0], given[4]]
    assert ignored_overrides("train", _compose("train"), given) == [given[4]]


def test_preset_name_override_refused():
    with pytest.raises(ConfigError, match="select a preset with data/performance_preset=minimal"):
        check_overrides(["data.performance_preset=minimal"])
    check_overrides(["data/performance_preset=minimal"])


def test_the_readme_shows_the_table_as_it_is():
    readme = (CONFIGS.parent / "README.md").read_text()
    assert markdown_table() in readme, "README.md: paste `uv run python -m ocr.config_validation` over its table"


def test_markdown_table_lists_every_row():
    lines = markdown_table().splitlines()
    assert lines[0] == "| Key | Allowed | What it sets |"
    assert [line.split("`")[1] for line in lines[2:2 + len(ROWS)]] == [r.key for r in ROWS]
    assert "`model.backbone` | one of resnet18, resnet34, resnet50 |" in markdown_table()


def test_a_refused_config_loads_neither_torch_nor_lightning():
    """A runner checks the config before it imports torch and Lightning (~10 s on a small
    machine): validating the default config and refusing a bad one load neither."""
    import subprocess
    import sys

    code = f"""
import sys
from hydra import compose, initialize_config_dir
from ocr.config import ConfigError, register_configs
from ocr.training.entry import check_config
register_configs()
with initialize_config_dir(version_base="1.3", config_dir={str(CONFIGS)!r}):
    good = compose(config_name="train", overrides=["output_dir=/tmp/unused"])
    bad = compose(config_name="train", overrides=["model.backbone=7x", "output_dir=/tmp/unused"])
check_config("train", good)
try:
    check_config("train", bad)
except ConfigError as e:
    print("refused:", e)
print("loaded:", sorted(m for m in ("torch", "lightning", "torchvision") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: model.backbone=7x: must be one of resnet18, resnet34, resnet50" in out.stdout
    assert "loaded: []" in out.stdout, out.stdout
