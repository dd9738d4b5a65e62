"""DB loss: balanced BCE (probability map) + masked L1 (threshold map) + dice (binary map).

Everything is computed in float32 with autocast disabled, whatever the dtype of
the predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DBLoss", "balanced_bce_with_logits", "masked_l1_loss", "dice_loss", "top_k_sum"]


def top_k_sum(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Sum of the ``k`` largest entries of the 1-D ``values``, ``k`` a 0-dim integer tensor
    on the same device: no host synchronisation (``torch.topk`` needs ``k`` as a Python int).

    One descending sort and a rank mask; the gradient flows to the kept entries only.
    """
    ranked = torch.sort(values, descending=True).values
    keep = torch.arange(ranked.numel(), device=ranked.device) < k
    return torch.where(keep, ranked, ranked.new_zeros(())).sum()


def _negative_budget(pos_count: torch.Tensor, negative_ratio: float) -> torch.Tensor:
    """``floor(pos_count * negative_ratio)`` as an int64 tensor, as ``int(pos * ratio)`` computes it."""
    if float(negative_ratio).is_integer():
        return pos_count * int(negative_ratio)  # exact in int64
    dtype = torch.float32 if pos_count.device.type == "mps" else torch.float64  # MPS has no float64
    return torch.floor(pos_count.to(dtype) * negative_ratio).long()


def balanced_bce_with_logits(
    logits: torch.Tensor,
    gt: torch.Tensor,
    mask: torch.Tensor,
    negative_ratio: float = 3.0,
    eps: float = 1e-6,
    sync_free: bool | None = None,
) -> torch.Tensor:
    """BCE-with-logits over all positives + the hardest ``negative_ratio * #pos`` negatives.

    Positives are pixels with ``gt > 0.5`` and ``mask > 0.5``; negatives ``gt <= 0.5``
    inside the mask. Mining is over the whole batch (as in the DB reference). With
    no positive pixel no negative is kept either and the loss is exactly 0 (finite,
    zero gradient), as in the reference.

    ``sync_free`` (default: on any device but the CPU) keeps the counts on the device and
    mines with :func:`top_k_sum` (one sort), so a training step never waits for the GPU;
    on the CPU, where reading a count costs nothing and a full sort is slow, the counts are
    read and ``torch.topk`` mines. Both give the same value.
    """
    logits, gt, mask = logits.float(), gt.float(), mask.float()
    inside = mask > 0.5
    positive = (gt > 0.5) & inside
    negative = (gt <= 0.5) & inside
    loss = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    pos_loss = (loss * positive).sum()
    negative_losses = (loss * negative).reshape(-1)
    if sync_free is None:
        sync_free = logits.device.type != "cpu"
    if sync_free:
        pos_count = positive.sum()
        neg_count = torch.minimum(negative.sum(), _negative_budget(pos_count, negative_ratio))
        neg_loss = top_k_sum(negative_losses, neg_count)
        return (pos_loss + neg_loss) / ((pos_count + neg_count).float() + eps)
    pos_count = int(positive.sum())
    neg_count = min(int(negative.sum()), int(pos_count * negative_ratio))
    if neg_count > 0:
        neg_loss = torch.topk(negative_losses, neg_count, sorted=False).values.sum()
    else:
        neg_loss = loss.sum() * 0.0
    return (pos_loss + neg_loss) / (pos_count + neg_count + eps)


def masked_l1_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean ``|pred - gt|`` over the mask (0 if the mask is empty)."""
    pred, gt, mask = pred.float(), gt.float(), mask.float()
    return ((pred - gt).abs() * mask).sum() / (mask.sum() + eps)


def dice_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - 2 |P∩G| / (|P| + |G|)`` within the mask (finite for empty maps)."""
    pred, gt, mask = pred.float(), gt.float(), mask.float()
    inter = (pred * gt * mask).sum()
    union = (pred * mask).sum() + (gt * mask).sum() + eps
    return 1.0 - 2.0 * inter / union


class DBLoss(nn.Module):
    """``alpha * L_prob + beta * L_thresh + gamma * L_binary`` (DB paper: 5, 10, 1).

    ``forward(preds, batch)``:

    * ``preds``: the :class:`~ocr.models.DBNet` output dict; needs ``prob_logits``,
      ``thresh_map`` and ``binary_map`` (i.e. the threshold branch must have run).
    * ``batch``: dict with float ``[B, 1, H, W]`` ``prob_maps``, ``prob_masks``,
      ``thresh_maps``, ``thresh_masks`` (``[B, H, W]`` is accepted too).

    Returns ``(total, {"loss_prob", "loss_thresh", "loss_binary"})``; ``total`` is a
    float32 scalar with grad, the components are detached float32 scalars
    (unweighted).
    """

    def __init__(
        self,
        alpha: float = 5.0,
        beta: float = 10.0,
        gamma: float = 1.0,
        negative_ratio: float = 3.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.negative_ratio = negative_ratio
        self.eps = eps

    @staticmethod
    def _as_b1hw(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = t.to(device=like.device, dtype=torch.float32)
        if t.dim() == 3:
            t = t.unsqueeze(1)
        if t.shape != like.shape:
            raise ValueError(f"target shape {tuple(t.shape)} does not match prediction {tuple(like.shape)}")
        return t

    def forward(
        self, preds: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        missing = [k for k in ("prob_logits", "thresh_map", "binary_map") if k not in preds]
        if missing:
            raise KeyError(
                f"DBLoss needs {missing} in the model output; run DBNet with the threshold "
                f"branch (training mode, or forward(..., with_thresh=True))"
            )
        logits = preds["prob_logits"]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            prob_gt = self._as_b1hw(batch["prob_maps"], logits)
            prob_mask = self._as_b1hw(batch["prob_masks"], logits)
            thresh_gt = self._as_b1hw(batch["thresh_maps"], logits)
            thresh_mask = self._as_b1hw(batch["thresh_masks"], logits)

            loss_prob = balanced_bce_with_logits(logits, prob_gt, prob_mask, self.negative_ratio, self.eps)
            loss_thresh = masked_l1_loss(preds["thresh_map"].float(), thresh_gt, thresh_mask, self.eps)
            loss_binary = dice_loss(preds["binary_map"].float(), prob_gt, prob_mask, self.eps)
            total = self.alpha * loss_prob + self.beta * loss_thresh + self.gamma * loss_binary
        parts = {
            "loss_prob": loss_prob.detach(),
            "loss_thresh": loss_thresh.detach(),
            "loss_binary": loss_binary.detach(),
        }
        return total, parts
