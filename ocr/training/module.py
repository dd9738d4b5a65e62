"""LightningModule: DBNet + DB loss for training, post-processing + hmean for eval."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

from ocr.data.batch import batch_size
from ocr.metrics import DetectionEvaluator
from ocr.models import DBLoss, DBNet, DBPostProcessor
from ocr.training.device_timer import DeviceTimer
from ocr.training.scoring import ScoringPool, resolve_workers

log = logging.getLogger(__name__)

#: ``{image name: its GT transcriptions, in the order of its Batch polygons}`` of one split.
Transcriptions = dict[str, tuple[str, ...]]


def lr_lambda(step: int, total_steps: int, warmup_steps: int, name: str, min_lr_ratio: float, power: float) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine / poly decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "poly":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress) ** power
    raise ValueError(f"model.scheduler.name: unknown schedule {name!r} (cosine | poly | constant)")


class DBNetModule(L.LightningModule):
    def __init__(self, model_cfg: dict, eval_data: dict | None = None):
        """``eval_data``: the evaluation input settings of the training run (``image_size``,
        ``mean``, ``std``), kept in the checkpoint so that test/predict can check theirs."""
        super().__init__()
        self.save_hyperparameters({"model_cfg": model_cfg, "eval_data": eval_data})
        cfg = model_cfg
        self.model = DBNet(backbone=cfg["backbone"], pretrained=cfg["pretrained"], inner_channels=cfg["inner_channels"], k=cfg["k"])
        loss = cfg["loss"]
        self.loss = DBLoss(alpha=loss["alpha"], beta=loss["beta"], negative_ratio=loss["ohem_ratio"])
        self._scoring: ScoringPool | None = None  # validation/test scoring beside the forward pass
        self.eval_workers = int(cfg.get("eval_workers", -1))
        self.set_postprocess(cfg["postprocess"])
        self.memory_format = torch.channels_last if cfg.get("channels_last", False) else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.evaluators = {"val": DetectionEvaluator(), "test": DetectionEvaluator()}
        # per eval stage, the transcriptions of the split it scores (set_transcriptions, or the
        # trainer's datamodule); resolved at the stage's first eval epoch into _texts
        self.transcriptions: dict[str, Transcriptions] = {}
        self._texts: dict[str, Transcriptions | None] = {}
        self.last_metrics: dict[str, dict] = {}
        # per split, the last epoch's forward seconds (CUDA events / wall) and the seconds this
        # thread waited for scoring (EpochTimer puts them in the epoch record)
        self.eval_timings: dict[str, dict] = {}
        self._forward_timer = DeviceTimer()
        self._scoring_wait_start = 0.0

    def set_postprocess(self, pp: dict) -> None:
        self.postprocess = DBPostProcessor(
            thresh=pp["thresh"], box_thresh=pp["box_thresh"], unclip_ratio=pp["unclip_ratio"],
            max_candidates=pp["max_candidates"], min_size=pp["min_size"], output=pp["output"],
        )
        self._postprocess_cfg = dict(pp)
        self._close_scoring()  # a running pool post-processes with the old settings

    def set_eval_workers(self, workers: int) -> None:
        """``model.eval_workers`` of the command (test/predict load the checkpoint's model_cfg)."""
        self.eval_workers = int(workers)
        self._close_scoring()

    def set_transcriptions(self, stage: str, transcriptions: Transcriptions) -> None:
        """The GT transcriptions of the split that ``stage`` ("val" | "test") scores, when the
        trainer has no datamodule to take them from (``run.test`` passes its loader)."""
        self.transcriptions[stage] = dict(transcriptions)

    def _split_transcriptions(self, stage: str) -> Transcriptions | None:
        """CLEval counts each GT word's characters from its transcription, as ``python -m ocr.metrics``
        does; without them it guesses from the word's shape (at most 10), which on line-level GT
        (30-60 characters a line) is a different metric. The Batch carries no transcriptions: they
        are looked up by image name in the split's samples (already in memory), so the batch
        caches and the DALI pipeline stay as they are."""
        if stage in self.transcriptions:
            return self.transcriptions[stage]
        trainer = self._trainer
        lookup = getattr(trainer.datamodule, "transcriptions", None) if trainer is not None else None
        texts = lookup(stage) if lookup is not None else None
        if texts is None:
            log.warning("%s: no GT transcriptions (no OCRDataModule, nor set_transcriptions): CLEval estimates each "
                        "word's characters from its shape, unlike python -m ocr.metrics on line-level text", stage)
        return texts

    def _batch_transcriptions(self, stage: str, batch: dict) -> list[tuple[str, ...]] | None:
        texts = self._texts.get(stage)
        if texts is None:
            return None
        out = []
        for name, polygons in zip(batch["names"], batch["polygons"]):
            words = texts.get(name)
            if words is None:
                raise KeyError(f"{stage}: image {name!r} of a batch is not in the split's annotations "
                               f"(no transcriptions for CLEval)")
            if len(words) != len(polygons):
                raise ValueError(f"{stage}: image {name!r} has {len(polygons)} GT polygons in its batch but "
                                 f"{len(words)} transcriptions in the split's annotations")
            out.append(words)
        return out

    def _scoring_pool(self) -> ScoringPool:
        """This process's scoring pool, created on first use and reused by every eval epoch.
        Under DDP every rank has its own, sized by the CPUs per rank on the node."""
        if self._scoring is None:
            per_node = self._trainer.num_devices if self._trainer is not None else 1
            workers = resolve_workers(self.eval_workers, processes_per_node=per_node)
            self._scoring = ScoringPool(self._postprocess_cfg, workers)
        return self._scoring

    def _close_scoring(self) -> None:
        if getattr(self, "_scoring", None) is not None:
            self._scoring.close()
            self._scoring = None

    def setup(self, stage: str) -> None:
        # Start the scoring workers now: they import and pay cleval's JIT while training runs.
        validates = stage in ("validate", "test") or (
            stage == "fit" and self._trainer is not None and self._trainer.limit_val_batches not in (0, 0.0))
        if validates:
            self._scoring_pool().start()

    def teardown(self, stage: str) -> None:
        self._close_scoring()
        self._texts.clear()  # a later fit / test may bring another datamodule

    def forward(self, images: torch.Tensor) -> dict:
        return self.model(images.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        preds = self(batch["images"])
        loss, parts = self.loss(preds, batch)
        n = batch_size(batch)
        # the step value is this rank's; the epoch mean is reduced over the ranks once, at the
        # epoch's end (one log with on_step and sync_dist would all-reduce every step)
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=n)
        return loss

    def _eval_step(self, batch: dict, split: str) -> None:
        self._forward_timer.start(self.device)
        preds = self(batch["images"])
        if "thresh_map" in preds and "prob_maps" in batch:
            loss, _ = self.loss(preds, batch)
            self.log(f"{split}/loss", loss, batch_size=batch_size(batch), sync_dist=True)  # reduced at the epoch's end
        self._forward_timer.stop()
        # One pinned non-blocking copy + a CUDA event; post-processing and counting run in the
        # pool's workers while the next batches go through the model.
        self._scoring_pool().submit(preds["prob_map"], batch["matrices"], batch["orig_sizes"],
                                    batch["polygons"], batch["ignore"], batch["names"],
                                    self._batch_transcriptions(split, batch))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _gathered(self, evaluator: DetectionEvaluator) -> DetectionEvaluator:
        """Under DDP each rank scored its own shard: sum every rank's counts."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return evaluator
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, evaluator)
        merged = DetectionEvaluator()
        for part in parts:
            merged.merge(part)
        return merged

    def _eval_epoch_start(self, split: str) -> None:
        self.evaluators[split].reset()
        if split not in self._texts:
            self._texts[split] = self._split_transcriptions(split)
        pool = self._scoring_pool()
        if pool.pending:
            pool.discard()  # left by an interrupted epoch
        self._forward_timer.reset()
        self._scoring_wait_start = pool.wait_seconds

    def _eval_epoch_end(self, split: str) -> None:
        pool = self._scoring_pool()
        self.evaluators[split].merge(pool.result())  # in submission order: identical to serial scoring
        self.eval_timings[split] = {
            "forward_seconds": round(self._forward_timer.seconds(), 3),
            "scoring_seconds": round(pool.wait_seconds - self._scoring_wait_start, 3),
            "scoring_workers": pool.workers,
        }
        evaluator = self._gathered(self.evaluators[split])  # the same object without DDP: reset after compute
        if len(evaluator) == 0:
            self.evaluators[split].reset()
            return
        metrics = evaluator.compute()
        self.evaluators[split].reset()
        self.last_metrics[split] = metrics
        # identical on every rank after the gather: "max" over the ranks keeps them exact
        self.log(f"{split}/hmean", metrics["cleval"]["hmean"], prog_bar=True, sync_dist=True, reduce_fx="max")
        for family in ("cleval", "iou"):
            for name, value in metrics[family].items():
                self.log(f"{split}/{family}_{name}", value, sync_dist=True, reduce_fx="max")

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start("val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start("test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        preds = self(batch["images"])
        results = self.postprocess(preds["prob_map"], batch["matrices"], batch["orig_sizes"])
        return [
            {"name": name, "polygons": polygons, "scores": scores}
            for name, (polygons, scores) in zip(batch["names"], results)
        ]

    def configure_optimizers(self):
        opt_cfg, sch_cfg = self.hparams.model_cfg["optimizer"], self.hparams.model_cfg["scheduler"]
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"], betas=tuple(opt_cfg["betas"])
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = int(round(sch_cfg["warmup_epochs"] * total / epochs))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_lambda(step, total, warmup, sch_cfg["name"], sch_cfg["min_lr_ratio"], sch_cfg["power"]),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
