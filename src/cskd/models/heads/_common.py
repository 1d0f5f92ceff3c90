"""Building blocks shared by the heads (ASPP, pyramid pooling, conv-BN-ReLU) and the auxiliary FCN head.

Sub-module names (``aspp.b0`` ... ``block`` ... ``classifier``) follow the published code so that the checkpoint
converter (:mod:`cskd.checkpoints.official`) only has to rename prefixes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]


def conv_bn_relu(
    in_ch: int, out_ch: int, k: int, norm_layer: NormLayer, dilation: int = 1, stride: int = 1
) -> nn.Sequential:
    pad = 0 if k == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, k, stride, padding=pad, dilation=dilation, bias=False), norm_layer(out_ch),
        nn.ReLU(True),
    )


class _ASPPConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, rate: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.block = conv_bn_relu(in_ch, out_ch, 3, norm_layer, dilation=rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class _ASPPPooling(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_ch, out_ch, 1, norm_layer))

    def forward(self, x: Tensor) -> Tensor:
        # A 1×1 map upsampled with align_corners=True is a broadcast; expand() says so without an interpolation.
        return self.gap(x).expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1×1 branch, three dilated 3×3 branches and image pooling."""

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int], norm_layer: NormLayer) -> None:
        super().__init__()
        r1, r2, r3 = rates
        self.b0 = conv_bn_relu(in_ch, out_ch, 1, norm_layer)
        self.b1 = _ASPPConv(in_ch, out_ch, r1, norm_layer)
        self.b2 = _ASPPConv(in_ch, out_ch, r2, norm_layer)
        self.b3 = _ASPPConv(in_ch, out_ch, r3, norm_layer)
        self.b4 = _ASPPPooling(in_ch, out_ch, norm_layer)
        self.project = nn.Sequential(*conv_bn_relu(5 * out_ch, out_ch, 1, norm_layer), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x))
        return self.project(torch.cat(branches, dim=1))


class PyramidPooling(nn.Module):
    """Average-pool to 1/2/3/6 bins, 1×1 conv each to in/4 channels, upsample, concatenate with the input."""

    def __init__(self, in_ch: int, bins: Sequence[int], norm_layer: NormLayer) -> None:
        super().__init__()
        self.bins = tuple(bins)
        for i, _ in enumerate(self.bins, start=1):
            self.add_module(f"conv{i}", conv_bn_relu(in_ch, in_ch // 4, 1, norm_layer))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        outs = [x]
        for i, b in enumerate(self.bins, start=1):
            pooled = getattr(self, f"conv{i}")(F.adaptive_avg_pool2d(x, b))
            outs.append(F.interpolate(pooled, size, mode="bilinear", align_corners=True))
        return torch.cat(outs, dim=1)


class FCNHead(nn.Module):
    """Auxiliary head (on one stage, ``forward(map) -> logits``): 3×3 conv to in/4 channels, BN, ReLU, Dropout, 1×1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        inter = in_channels // 4
        self.block = nn.Sequential(
            *conv_bn_relu(in_channels, inter, 3, norm_layer), nn.Dropout(0.1), nn.Conv2d(inter, num_classes, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


__all__ = ["ASPP", "FCNHead", "NormLayer", "PyramidPooling", "conv_bn_relu"]
