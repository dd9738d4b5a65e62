"""ResNet backbone (torchvision) returning the four stage outputs C2..C5.

Strides are 4, 8, 16 and 32 with respect to the input image.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from ocr.config import BACKBONES

__all__ = ["ResNetBackbone", "BACKBONE_CHANNELS"]

#: Output channels of layer1..layer4 for each supported architecture.
BACKBONE_CHANNELS: dict[str, tuple[int, int, int, int]] = dict(zip(BACKBONES, (
    (64, 128, 256, 512),  # resnet18
    (64, 128, 256, 512),  # resnet34
    (256, 512, 1024, 2048),  # resnet50
), strict=True))


class ResNetBackbone(nn.Module):
    """torchvision ResNet without the pooling/classifier.

    Args:
        name: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        pretrained: ``False`` (random init, torchvision's default init);
            ``True`` loads torchvision's ImageNet weights (needs internet access
            or a copy already in the torch hub cache); a ``str``/``Path`` loads a
            local ``state_dict`` file of the torchvision model (missing ``fc.*``
            keys are fine).

    ``forward(x)`` returns ``[c2, c3, c4, c5]``; ``out_channels`` gives their
    channel counts.
    """

    def __init__(self, name: str = "resnet18", pretrained: bool | str | Path = False) -> None:
        super().__init__()
        if name not in BACKBONE_CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONE_CHANNELS)}")
        self.name = name
        self.out_channels: tuple[int, int, int, int] = BACKBONE_CHANNELS[name]

        net = getattr(torchvision.models, name)(weights=None)
        if isinstance(pretrained, (str, Path)):
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
            missing, unexpected = net.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith("fc.")]
            if bad or unexpected:
                raise RuntimeError(
                    f"state_dict {pretrained} does not match torchvision {name}: "
                    f"missing={bad[:5]} unexpected={list(unexpected)[:5]}"
                )
        elif pretrained:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            try:
                state = weights.get_state_dict(progress=False)
            except Exception as exc:  # network errors come in many types
                raise RuntimeError(
                    f"pretrained=True: could not download/load the ImageNet weights for {name} "
                    f"({weights}). This needs internet access (or the file already in the torch "
                    f"hub cache, see TORCH_HOME); use pretrained=False or pass a local "
                    f"state_dict path instead. Original error: {type(exc).__name__}: {exc}"
                ) from exc
            net.load_state_dict(state)

        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]
