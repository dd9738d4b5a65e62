"""Structured config schemas (Hydra ConfigStore). Every key a YAML file or an override
may set is declared here with its type, so a typo in an override fails loudly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class CacheConfig:
    cache_transformed_tensors: bool = False  # replay eval Batches (images + targets + metadata)
    cache_images: bool = False  # keep encoded image bytes in RAM after first read
    cache_maps: bool = False  # keep DB target maps computed/loaded for eval splits
    store: str = "auto"  # auto | gpu | pinned | disk
    cache_dir: str = ".cache/dbnet"
    content_hash: bool = False  # fingerprint file contents, not only names/sizes/mtimes
    log_statistics_every_n: int = 100


@dataclass
class DatasetConfig:
    image_path: str = MISSING
    annotation_path: str = MISSING
    preload_images: bool = False
    load_maps: bool = False
    preload_maps: bool = False
    on_error: str = "raise"  # raise | skip (skip bad words/images with one counted warning)
    cache_config: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class DatasetEntry:
    config: DatasetConfig = field(default_factory=DatasetConfig)


def _split_entry(split: str):
    def make() -> DatasetEntry:
        return DatasetEntry(DatasetConfig(
            image_path=f"${{data.root}}/images/{split}",
            annotation_path=f"${{data.root}}/jsons/{split}.json",
        ))
    return make


@dataclass
class DatasetsConfig:
    train_dataset: DatasetEntry = field(default_factory=_split_entry("train"))
    val_dataset: DatasetEntry = field(default_factory=_split_entry("val"))
    test_dataset: DatasetEntry = field(default_factory=_split_entry("test"))


@dataclass
class SyntheticConfig:
    # The built-in dataset is generated here on first use; only when data.root points here.
    root: str = "data/synthetic_receipts"
    num_train: int = 200
    num_val: int = 40
    num_test: int = 40
    seed: int = 0


@dataclass
class AugmentConfig:
    scale_min: float = 0.75
    scale_max: float = 1.5
    max_rotation: float = 10.0
    hflip_prob: float = 0.5
    text_crop_prob: float = 0.9
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


@dataclass
class TargetConfig:
    shrink_ratio: float = 0.4
    thresh_min: float = 0.3
    thresh_max: float = 0.7
    min_text_size: int = 8


@dataclass
class DataConfig:
    root: str = "${data.synthetic.root}"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    image_size: int = 640  # eval: longer side scaled to this, padded square
    train_crop_size: int = 0  # train: square window at the same text scale (0: image_size)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    reduced_decode: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)


@dataclass
class LoaderConfig:
    backend: str = "auto"  # auto | cpu | dali
    device: str = "auto"  # auto | gpu | cpu (where DALI runs its operators / targets are computed)
    batch_size: int = 8
    eval_batch_size: int = 8
    num_workers: int = -1  # -1: chosen from the CPU count
    dali_threads: int = -1  # -1: chosen from the CPU count
    targets: str = "auto"  # auto | reference | vectorized


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | poly | constant
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    power: float = 0.9


@dataclass
class LossConfig:
    alpha: float = 5.0
    beta: float = 10.0
    ohem_ratio: float = 3.0


@dataclass
class PostprocessConfig:
    thresh: float = 0.3
    box_thresh: float = 0.6
    unclip_ratio: float = 1.5
    max_candidates: int = 1000
    min_size: float = 3.0
    output: str = "quad"  # quad | polygon


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    pretrained: bool = False
    inner_channels: int = 256
    k: int = 50
    channels_last: bool = True  # NHWC convolutions: 10-30% faster on CPU and with AMP on GPU
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    precision: str = "auto"  # auto: 16-mixed on CUDA, 32-true on CPU; any Lightning value wins
    accelerator: str = "auto"
    devices: Any = "auto"
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = 1.0
    num_sanity_val_steps: int = 0
    check_val_every_n_epoch: int = 1
    gradient_clip_val: float = 5.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    benchmark: bool = True
    deterministic: bool = False
    enable_progress_bar: bool = True
    max_time: Optional[str] = None


@dataclass
class CSVLoggerConfig:
    enabled: bool = True


@dataclass
class TensorBoardLoggerConfig:
    enabled: bool = False


@dataclass
class WandbLoggerConfig:
    enabled: bool = False
    project: str = "dali-dbnet"
    entity: Optional[str] = None
    offline: bool = False


@dataclass
class LoggerConfig:
    csv: CSVLoggerConfig = field(default_factory=CSVLoggerConfig)
    tensorboard: TensorBoardLoggerConfig = field(default_factory=TensorBoardLoggerConfig)
    wandb: WandbLoggerConfig = field(default_factory=WandbLoggerConfig)


@dataclass
class TrainConfig:
    exp_name: str = "dbnet"
    seed: int = 42
    output_dir: str = MISSING
    ckpt_path: Optional[str] = None  # resume training from this checkpoint
    data: DataConfig = field(default_factory=DataConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class TestConfig(TrainConfig):
    ckpt_path: Optional[str] = None  # required: the checkpoint to evaluate
    split: str = "test"  # test | val


@dataclass
class PredictConfig(TrainConfig):
    ckpt_path: Optional[str] = None  # required
    input_dir: Optional[str] = None  # required: a folder of images
    output_json: Optional[str] = None  # default: <output_dir>/predictions.json


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="test_schema", node=TestConfig)
    store.store(name="predict_schema", node=PredictConfig)
