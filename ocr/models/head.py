"""DB head: probability (binarisation) and threshold branches."""

from __future__ import annotations

from torch import nn

from .neck import db_weights_init

__all__ = ["DBHeadBranch"]


class DBHeadBranch(nn.Sequential):
    """conv3x3(in -> in/4) + BN + ReLU, ConvT(2, s2) + BN + ReLU, ConvT(2, s2) -> 1 channel.

    Takes the 1/4-scale fused feature and returns a 1-channel map at full input
    resolution. No final activation: the caller applies the sigmoid (so the
    probability branch can be trained with BCE-with-logits).
    """

    def __init__(self, in_channels: int) -> None:
        mid = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(mid, mid, 2, stride=2),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(mid, 1, 2, stride=2),
        )
        self.apply(db_weights_init)
