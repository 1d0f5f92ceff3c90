"""MobileNetV3-Small / -Large at output stride 8, as the CIRKDV2 students use them.

The module tree (``layer0`` stem, ``layer1``...``layerN`` inverted residual blocks with ``expand_conv`` /
``depthwise_conv`` / ``se`` / ``linear_conv``, and a last 1×1 ``conv``/``bn`` layer) is the one of the
OpenMMLab MobileNetV3 that the published CIRKDV2 code and the ImageNet files ``mobilenet_v3_small-47085aa1.pth`` /
``mobilenet_v3_large-bc2c3fd3.pth`` use, so both load without renaming (the files may carry a ``backbone.``
prefix or a ``state_dict`` wrapper: :func:`cskd.checkpoints.official.backbone_state_dict` strips them).

For output stride 8 the last two down-sampling blocks keep stride 1 and every spatial conv from the first of
them on is dilated by 2, and from the second on by 4. A conv that down-samples pads as TensorFlow's "same" does
(computed from the input size, extra pixel at the bottom / right), as the ImageNet weights were trained with.
"""

from __future__ import annotations

import math
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import BackboneDefaults, register_backbone

NormLayer = Callable[[int], nn.Module]

# Per block: (kernel, expanded width, output width, squeeze-excitation, activation, stride). The architecture
# tables of the MobileNetV3 paper (Howard et al., 2019), tables 1 and 2.
_SMALL = (
    (3, 16, 16, True, "relu", 2), (3, 72, 24, False, "relu", 2), (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hswish", 2), (5, 240, 40, True, "hswish", 1), (5, 240, 40, True, "hswish", 1),
    (5, 120, 48, True, "hswish", 1), (5, 144, 48, True, "hswish", 1), (5, 288, 96, True, "hswish", 2),
    (5, 576, 96, True, "hswish", 1), (5, 576, 96, True, "hswish", 1),
)
_LARGE = (
    (3, 16, 16, False, "relu", 1), (3, 64, 24, False, "relu", 2), (3, 72, 24, False, "relu", 1),
    (5, 72, 40, True, "relu", 2), (5, 120, 40, True, "relu", 1), (5, 120, 40, True, "relu", 1),
    (3, 240, 80, False, "hswish", 2), (3, 200, 80, False, "hswish", 1), (3, 184, 80, False, "hswish", 1),
    (3, 184, 80, False, "hswish", 1), (3, 480, 112, True, "hswish", 1), (3, 672, 112, True, "hswish", 1),
    (5, 672, 160, True, "hswish", 2), (5, 960, 160, True, "hswish", 1), (5, 960, 160, True, "hswish", 1),
)


def _act(kind: str) -> nn.Module:
    return nn.ReLU(inplace=True) if kind == "relu" else nn.Hardswish()


def _divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor`` (at least ``divisor``), never below 90 % of it."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


class SamePadConv2d(nn.Conv2d):
    """A strided conv padded like TensorFlow's "same": the output is ceil(input / stride), and the padding that
    takes is split with the odd pixel at the bottom / right. Same parameters as ``nn.Conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv_unit(conv: nn.Module, norm: nn.Module | None, act: nn.Module | None) -> nn.Sequential:
    unit = nn.Sequential()
    unit.add_module("conv", conv)
    if norm is not None:
        unit.add_module("bn", norm)
    if act is not None:
        unit.add_module("activation", act)
    return unit


class SqueezeExcite(nn.Module):
    """Global pool → 1×1 (ReLU) → 1×1 (hard sigmoid) → channel gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _divisible(channels // 4)
        self.conv1 = _conv_unit(nn.Conv2d(channels, squeezed, 1), None, nn.ReLU(inplace=True))
        self.conv2 = _conv_unit(nn.Conv2d(squeezed, channels, 1), None, nn.Hardsigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv2(self.conv1(F.adaptive_avg_pool2d(x, 1)))


class InvertedResidualV3(nn.Module):
    """[1×1 expand] → k×k depth-wise (strided or dilated) → [squeeze-excite] → 1×1 linear (+ identity)."""

    def __init__(
        self, in_ch: int, mid: int, out_ch: int, kernel: int, se: bool, act: str, stride: int, dilation: int,
        residual: bool, norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        self.residual = residual
        if in_ch != mid:
            self.expand_conv = _conv_unit(nn.Conv2d(in_ch, mid, 1, bias=False), norm_layer(mid), _act(act))
        if stride > 1:
            dw: nn.Conv2d = SamePadConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        else:
            dw = nn.Conv2d(mid, mid, kernel, 1, dilation * (kernel // 2), dilation, groups=mid, bias=False)
        self.depthwise_conv = _conv_unit(dw, norm_layer(mid), _act(act))
        if se:
            self.se = SqueezeExcite(mid)
        self.linear_conv = _conv_unit(nn.Conv2d(mid, out_ch, 1, bias=False), norm_layer(out_ch), None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand_conv(x) if hasattr(self, "expand_conv") else x
        out = self.depthwise_conv(out)
        if hasattr(self, "se"):
            out = self.se(out)
        out = self.linear_conv(out)
        return x + out if self.residual else out


class MobileNetV3OS8(nn.Module):
    """``forward`` returns four stage maps at strides 4, 8, 8, 8 (the last one is the 1×1 expansion layer's)."""

    reductions: tuple[int, ...] = (4, 8, 8, 8)

    def __init__(self, arch: str, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        table, last, undilate, ends = {
            # blocks whose stride becomes 1 (the rest of the network dilated by 2, then 4); last block of a stage
            "small": (_SMALL, 576, (4, 9), (1, 3, 8, 12)),
            "large": (_LARGE, 960, (7, 13), (3, 6, 12, 16)),
        }[arch]
        self.layer0 = _conv_unit(SamePadConv2d(3, 16, 3, 2, bias=False), norm_layer(16), nn.Hardswish())
        in_ch = 16
        for i, (k, mid, out, se, act, stride) in enumerate(table, start=1):
            dilation = 1 if i < undilate[0] else (2 if i < undilate[1] else 4)
            residual = stride == 1 and in_ch == out
            if i in undilate:
                stride = 1
            block = InvertedResidualV3(in_ch, mid, out, k, se, act, stride, dilation, residual, norm_layer)
            self.add_module(f"layer{i}", block)
            in_ch = out
        self.add_module(f"layer{len(table) + 1}",
                        _conv_unit(nn.Conv2d(in_ch, last, 1, bias=False), norm_layer(last), nn.Hardswish()))
        self._ends = ends
        self.out_channels: tuple[int, ...] = tuple(
            last if e == len(table) + 1 else table[e - 1][2] for e in ends
        )

    @property
    def output_stride(self) -> int:
        return self.reductions[-1]

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(self._ends[-1] + 1):
            x = getattr(self, f"layer{i}")(x)
            if i in self._ends:
                outs.append(x)
        return outs


_DEFAULTS = BackboneDefaults(head_channels={"deeplabv3": 128, "pspnet": 128, "upernet": 128, "fcn": 128},
                             aux=False, family="mobilenetv3")


@register_backbone("mobilenetv3_small", defaults=_DEFAULTS, display="MobileNetV3-Small")
def mobilenetv3_small(norm_layer: NormLayer = nn.BatchNorm2d) -> MobileNetV3OS8:
    return MobileNetV3OS8("small", norm_layer)


@register_backbone("mobilenetv3_large", defaults=_DEFAULTS, display="MobileNetV3-Large")
def mobilenetv3_large(norm_layer: NormLayer = nn.BatchNorm2d) -> MobileNetV3OS8:
    return MobileNetV3OS8("large", norm_layer)


__all__ = ["InvertedResidualV3", "MobileNetV3OS8", "SamePadConv2d", "mobilenetv3_large", "mobilenetv3_small"]
