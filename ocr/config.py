"""Structured config schemas (Hydra ConfigStore). Every key a YAML file or an override
may set is declared here with its type, so a typo in an override fails loudly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING


class ConfigError(ValueError):
    """A config value a runner refuses: one line naming the key, the value and what is allowed."""


# The fixed choices of the fields below; this module imports neither torch nor Lightning, so
# a runner refuses a bad value (ocr/config_validation.py) before those load.
BACKENDS = ("auto", "cpu", "dali")  # loader.backend
DEVICES = ("auto", "gpu", "cpu")  # loader.device
TARGET_MODES = ("auto", "reference", "vectorized")  # loader.targets
CPU_LOADERS = ("auto", "threads", "processes")  # loader.cpu_loader
STORES = ("auto", "gpu", "pinned", "host", "disk", "off")  # datasets.*.config.cache_config.store
BACKBONES = ("resnet18", "resnet34", "resnet50")  # model.backbone


@dataclass
class CacheConfig:
    # Replay this eval split's Batches (images + targets + metadata) after the first
    # complete pass; refused on the train split (random augmentation).
    cache_transformed_tensors: bool = False
    # Image caching: the same switch as preload_images (either one true: the split's
    # encoded images are read into RAM by the main process before any loader worker
    # starts, in one buffer every worker maps; never a cache per worker). Presets use
    # preload_images, so an override preload_images=false turns it off.
    cache_images: bool = False
    cache_maps: bool = False  # with load_maps: keep maps read from the map store in RAM (main process)
    store: str = "auto"  # auto | gpu | pinned | host | disk | off (pinned == host RAM, page-locked with CUDA)
    cache_dir: str = ".cache/dbnet"  # disk store and precomputed maps: <cache_dir>/{tensors,maps}/<split>-<key>/
    content_hash: bool = False  # fingerprint the images by content (SHA-256), not names/sizes/mtimes
    log_statistics_every_n: int = 100  # accesses (samples) between "Cache Statistics" lines (0: epoch ends only)
    max_memory_fraction: float = 0.5  # of the free GPU / available host memory a cache or preload may take


@dataclass
class DatasetConfig:
    image_path: str = MISSING
    annotation_path: str = MISSING
    preload_images: bool = False  # encoded bytes of every image in RAM at start (both backends)
    preload_decoded: bool = False  # CPU backend: decoded RGB arrays in RAM instead (more memory, no decode)
    load_maps: bool = False  # eval splits: DB targets from precomputed maps (scripts/preprocess_data.py maps)
    preload_maps: bool = False  # with load_maps: read all maps into RAM at start
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
    # Which configs/data/performance_preset/*.yaml set the datasets' cache options
    # (the preset files set this; individual overrides of those options still win).
    performance_preset: str = "none"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Sized so the default run trains from scratch in minutes on a 2-core CPU; for real
    # documents on a GPU use e.g. data.image_size=640 data.train_crop_size=640.
    image_size: int = 384  # eval: longer side scaled to this, padded square
    train_crop_size: int = 256  # train: square window at the same text scale (0: image_size)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    reduced_decode: bool = True
    max_image_pixels: int = 100_000_000  # larger images are refused (skipped with on_error=skip); 0: no limit
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)


@dataclass
class LoaderConfig:
    backend: str = "auto"  # auto | cpu | dali
    device: str = "auto"  # auto | gpu | cpu (where DALI runs its operators / targets are computed)
    batch_size: int = II("batch_size")  # the training batch; default: the top-level batch_size
    eval_batch_size: int = II("batch_size")  # val/test/predict batches; default: the top-level batch_size
    num_workers: int = -1  # -1: chosen from the CPU count
    cpu_loader: str = "auto"  # auto | threads | processes (CPU backend; auto: threads on the CPU, processes next to a GPU)
    dali_threads: int = -1  # -1: chosen from the CPU count
    targets: str = "auto"  # auto | reference | vectorized


@dataclass
class OptimizerConfig:
    lr: float = 2e-3
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
    box_thresh: float = 0.4  # the DB paper: 0.6 (ImageNet-pretrained models); see README "Defaults and why"
    unclip_ratio: float = 1.5
    max_candidates: int = 1000
    min_size: float = 3.0
    output: str = "quad"  # quad | polygon


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    pretrained: bool = False
    init_from: Optional[str] = None  # a training checkpoint whose weights start this run (fine-tuning)
    inner_channels: int = 64  # FPN width (the DB paper: 256); the backbone dominates the cost
    k: int = 50
    channels_last: bool = True  # NHWC convolutions: 10-30% faster on CPU and with AMP on GPU
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    # Validation/test scoring (post-processing + CLEval/IoU) in this many worker processes beside
    # the forward pass (ocr/training/scoring.py); -1: min(4, CPUs per training process), 0: serial
    # in the training process.
    eval_workers: int = -1


@dataclass
class TrainerConfig:
    max_epochs: int = 24
    precision: str = "auto"  # auto: 16-mixed on CUDA, 32-true on CPU; any Lightning value wins
    accelerator: str = "auto"
    devices: Any = "auto"
    # Several GPUs or machines: devices=N num_nodes=M strategy=ddp (Lightning launches the
    # processes, or torchrun / SLURM as Lightning documents).
    strategy: str = "auto"
    num_nodes: int = 1
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
    # Cap this process's share of GPU memory (benchmarks/run_matrix.py --emulate-tier).
    gpu_memory_fraction: Optional[float] = None


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
    # Every split's batch size (the presets document's `batch_size=8`); loader.batch_size or
    # loader.eval_batch_size set one of them alone.
    batch_size: int = 8
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
    # A folder for each image with its detections drawn (null: none); with gt_json, also the
    # missed and false boxes, matched by the IoU metric's rule (ocr/training/overlays.py).
    overlays: Optional[str] = None
    gt_json: Optional[str] = None  # ground truth for the overlays, in the annotation format


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="test_schema", node=TestConfig)
    store.store(name="predict_schema", node=PredictConfig)
