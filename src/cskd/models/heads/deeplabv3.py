"""DeepLabV3: ASPP on the deepest stage."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ._common import ASPP, NormLayer, conv_bn_relu
from ._registry import register_head


@register_head("deeplabv3", default_channels=256, aliases=("deeplab",), display="DeepLabV3")
class DeepLabV3Head(nn.Module):
    """ASPP (rates 12/24/36 + image pooling) → 3×3 conv-BN-ReLU-Dropout (→ ``features``) → 1×1 classifier."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
        rates: Sequence[int] = (12, 24, 36),
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels[-1], channels, rates, norm_layer)
        self.block = nn.Sequential(*conv_bn_relu(channels, channels, 3, norm_layer), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.channels = channels

    def forward(self, stages: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        feat = self.block(self.aspp(stages[-1]))
        return self.classifier(feat), feat


__all__ = ["DeepLabV3Head"]
