"""FCN: one 3×3 conv on the deepest stage (the simplest head; also a baseline for new backbones)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ._common import NormLayer, conv_bn_relu
from ._registry import register_head


@register_head("fcn", default_channels=256, display="FCN")
class FCNSegHead(nn.Module):
    """3×3 conv-BN-ReLU-Dropout on the deepest stage (→ ``features``) → 1×1 classifier."""

    def __init__(
        self, in_channels: Sequence[int], channels: int, num_classes: int, norm_layer: NormLayer = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        self.block = nn.Sequential(*conv_bn_relu(in_channels[-1], channels, 3, norm_layer), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.channels = channels

    def forward(self, stages: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        feat = self.block(stages[-1])
        return self.classifier(feat), feat


__all__ = ["FCNSegHead"]
