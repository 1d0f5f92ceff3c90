"""PSPNet: pyramid pooling on the deepest stage."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ._common import NormLayer, PyramidPooling, conv_bn_relu
from ._registry import register_head


@register_head("pspnet", default_channels=512, aliases=("psp",), display="PSPNet")
class PSPHead(nn.Module):
    """Pyramid pooling → 3×3 conv-BN-ReLU-Dropout (→ ``features``) → 1×1 classifier."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
        bins: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        c = in_channels[-1]
        self.psp = PyramidPooling(c, bins, norm_layer)
        self.block = nn.Sequential(*conv_bn_relu(c * 2, channels, 3, norm_layer), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.channels = channels

    def forward(self, stages: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        feat = self.block(self.psp(stages[-1]))
        return self.classifier(feat), feat


__all__ = ["PSPHead"]
