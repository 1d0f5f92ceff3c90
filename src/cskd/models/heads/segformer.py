"""The all-MLP SegFormer decoder (Xie et al., NeurIPS 2021).

Every stage map is projected to ``channels`` by a per-pixel linear layer (``linear_c1`` … ``linear_c4``),
upsampled bilinearly to the first (1/4) stage's size, concatenated deepest first, fused by a 1×1 conv-BN-ReLU
(``linear_fuse``: the ``features`` map) and classified by a 1×1 conv. Module names follow CIRKDV2's SegFormer
except the classifier (published: ``linear_pred``); see :mod:`cskd.checkpoints.official`. The head reads every stage
and its maps are at the first (shallowest) stage's stride: 1/4 on MiT, MobileNet, ResNet and MobileViT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_head

NormLayer = Callable[[int], nn.Module]


class LinearProjection(nn.Module):
    """A per-pixel linear map B×C×h×w → B×D×h×w (weights kept as ``proj``, an ``nn.Linear``)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_ch, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        y = self.proj(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, -1, h, w)


@register_head("segformer", default_channels=256, min_stages=1, output_stage=0, display="SegFormer")
class SegFormerHead(nn.Module):
    """All-MLP head on every stage; ``forward(stages)`` → ``(logits, features)``, both at the first stage's size
    (1/4 of the input on MiT)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        if not self.in_channels:
            raise ValueError("SegFormerHead needs at least one stage")
        for i in range(len(self.in_channels), 0, -1):  # deepest first, as published (state-dict order)
            self.add_module(f"linear_c{i}", LinearProjection(self.in_channels[i - 1], channels))
        self.linear_fuse = nn.Sequential(
            nn.Conv2d(len(self.in_channels) * channels, channels, 1), norm_layer(channels), nn.ReLU()
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.channels = channels

    def forward(self, stages: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        n = len(self.in_channels)
        if isinstance(stages, Tensor):
            raise TypeError("SegFormerHead takes the list of backbone stages, not one map")
        if len(stages) < n:
            raise ValueError(f"SegFormerHead takes {n} stages; the backbone gave {len(stages)}")
        stages = list(stages)[-n:]
        size = stages[0].shape[-2:]
        maps = []
        for i in range(n, 0, -1):  # deepest first, as published
            y = getattr(self, f"linear_c{i}")(stages[i - 1])
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            maps.append(y)
        feat = self.linear_fuse(torch.cat(maps, dim=1))
        return self.classifier(self.dropout(feat)), feat


__all__ = ["LinearProjection", "SegFormerHead"]
