"""UperNet (Xiao et al., ECCV 2018): pyramid pooling on the deepest stage, a top-down FPN over every stage, and
a fusion of all FPN levels at the resolution of the shallowest stage.

As in the CIRKDV2 code (``upernet_lite`` on ResNet-18: FPN width 128), the pooled branches have 512 channels
whatever the FPN width, each is convolved after it is up-sampled, and the fusion conv has stride 2: the logits are
at twice the shallowest stage's stride (1/8 on a ResNet whose first stage is at 1/4). Module names follow the
published ones except ``fusion`` / ``classifier`` (published ``conv_last.0`` / ``conv_last.1``; the checkpoint
converter renames them).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import NormLayer, conv_bn_relu
from ._registry import register_head


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@register_head("upernet", default_channels=512, min_stages=2, output_stage=0, stride_factor=2, display="UperNet")
class UperNetHead(nn.Module):
    """PPM (bins 1/2/3/6) → FPN over all stages → concat → strided 3×3 (→ ``features``) → 1×1 classifier."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
        bins: Sequence[int] = (1, 2, 3, 6),
        pool_channels: int = 512,
    ) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"upernet needs at least 2 backbone stages, got {len(in_channels)}")
        top = in_channels[-1]
        self.bins = tuple(bins)
        self.ppm_conv = nn.ModuleList(conv_bn_relu(top, pool_channels, 1, norm_layer) for _ in self.bins)
        self.ppm_last_conv = conv_bn_relu(top + len(self.bins) * pool_channels, channels, 3, norm_layer)
        self.fpn_in = nn.ModuleList(conv_bn_relu(c, channels, 1, norm_layer) for c in in_channels[:-1])
        self.fpn_out = nn.ModuleList(
            nn.Sequential(conv_bn_relu(channels, channels, 3, norm_layer)) for _ in in_channels[:-1]
        )
        self.fusion = conv_bn_relu(len(in_channels) * channels, channels, 3, norm_layer, stride=2)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.channels = channels

    def forward(self, stages: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        top = stages[-1]
        size = top.shape[-2:]
        pooled = [conv(_resize(F.adaptive_avg_pool2d(top, b), size)) for b, conv in zip(self.bins, self.ppm_conv)]
        f = self.ppm_last_conv(torch.cat([top, *pooled], dim=1))
        levels = [f]
        for i in reversed(range(len(stages) - 1)):
            lateral = self.fpn_in[i](stages[i])
            f = lateral + _resize(f, lateral.shape[-2:])
            levels.append(self.fpn_out[i](f))
        levels.reverse()
        out_size = levels[0].shape[-2:]
        fused = torch.cat([levels[0], *(_resize(x, out_size) for x in levels[1:])], dim=1)
        feat = self.fusion(fused)
        return self.classifier(feat), feat


__all__ = ["UperNetHead"]
