"""The DB paper's FPN neck (``SegDetector`` in the reference implementation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DBFPN", "db_weights_init"]


def db_weights_init(m: nn.Module) -> None:
    """Initialisation of the DB reference: kaiming-normal convs, BN weight 1 / bias 1e-4."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(m.weight)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.constant_(m.bias, 1e-4)


class DBFPN(nn.Module):
    """FPN: 1x1 laterals -> top-down nearest-upsample + add -> per level 3x3 conv to
    ``inner_channels // 4`` -> upsample to 1/4 scale -> concat (``inner_channels`` channels).

    Args:
        in_channels: channels of C2..C5.
        inner_channels: FPN width (paper: 256); must be divisible by 4.
    """

    def __init__(self, in_channels: Sequence[int], inner_channels: int = 256) -> None:
        super().__init__()
        if inner_channels % 4:
            raise ValueError(f"inner_channels must be divisible by 4, got {inner_channels}")
        self.inner_channels = inner_channels
        self.out_channels = inner_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, inner_channels, 1, bias=False) for c in in_channels)
        self.smooth = nn.ModuleList(
            nn.Conv2d(inner_channels, inner_channels // 4, 3, padding=1, bias=False) for _ in in_channels
        )
        self.apply(db_weights_init)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        # top-down pathway (from C5 to C2)
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        size = lat[0].shape[-2:]
        outs = []
        for i, (conv, x) in enumerate(zip(self.smooth, lat)):
            y = conv(x)
            if i:
                y = F.interpolate(y, size=size, mode="nearest")
            outs.append(y)
        # reference order: p5, p4, p3, p2
        return torch.cat(outs[::-1], dim=1)
