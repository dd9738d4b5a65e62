"""DBNet (Liao et al., AAAI 2020): ResNet backbone + FPN neck + DB head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .backbone import ResNetBackbone
from .head import DBHeadBranch
from .neck import DBFPN

__all__ = ["DBNet"]


class DBNet(nn.Module):
    """Differentiable-binarisation text detector.

    Args:
        backbone: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"`` (torchvision).
        pretrained: load ImageNet weights into the backbone (``True``: download via
            torchvision, raises a clear ``RuntimeError`` without internet; a path:
            local torchvision ``state_dict``).
        inner_channels: FPN width (paper 256; must be divisible by 4).
        k: amplifying factor of the approximate step function (paper 50).
        thresh_in_eval: whether the threshold branch (and the approximate binary
            map) is computed in eval mode by default. ``True`` keeps the outputs
            identical in both modes (so a validation loss can be computed); pass
            ``with_thresh=False`` to ``forward`` (or set this to ``False``) to skip
            the branch for faster inference -- post-processing only needs
            ``prob_map``.

    ``forward(images)`` with ``images`` ``[B, 3, H, W]`` (H, W multiples of 32) returns
    a dict of ``[B, 1, H, W]`` tensors:

    * ``prob_logits``: logits of the probability map (dtype of the forward pass,
      e.g. fp16/bf16 under autocast); train with BCE-with-logits.
    * ``prob_map``: ``sigmoid(prob_logits)``, float32.
    * ``thresh_map``: threshold map (sigmoid), float32 (only if the threshold branch ran).
    * ``binary_map``: approximate binary map ``sigmoid(k * (P - T))``, computed in
      float32 with autocast disabled (only if the threshold branch ran).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool | str | Path = False,
        inner_channels: int = 256,
        k: float = 50.0,
        thresh_in_eval: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(backbone, pretrained=pretrained)
        self.neck = DBFPN(self.backbone.out_channels, inner_channels)
        self.prob_head = DBHeadBranch(inner_channels)
        self.thresh_head = DBHeadBranch(inner_channels)
        self.k = float(k)
        self.thresh_in_eval = thresh_in_eval

    def forward(self, images: torch.Tensor, with_thresh: bool | None = None) -> dict[str, torch.Tensor]:
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"input H and W must be multiples of 32, got {tuple(images.shape[-2:])}")
        if with_thresh is None:
            with_thresh = self.training or self.thresh_in_eval
        fused = self.neck(self.backbone(images))
        logits = self.prob_head(fused)
        out: dict[str, torch.Tensor] = {"prob_logits": logits}
        thresh_logits = self.thresh_head(fused) if with_thresh else None
        with torch.autocast(device_type=images.device.type, enabled=False):
            prob = torch.sigmoid(logits.float())
            out["prob_map"] = prob
            if thresh_logits is not None:
                thresh = torch.sigmoid(thresh_logits.float())
                out["thresh_map"] = thresh
                out["binary_map"] = torch.sigmoid(self.k * (prob - thresh))
        return out
