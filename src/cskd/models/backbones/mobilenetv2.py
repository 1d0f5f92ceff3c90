"""MobileNetV2 at output stride 8 (320 output channels), as in the published CSKD/CIRKD code.

Module names follow the published ImageNet file ``mobilenetv2-imagenet.pth`` (``features.<i>.conv.<j>``), so it
loads without renaming. The last two down-sampling blocks (``features[7]`` and ``features[14]``) lose their stride
and the 3×3 depth-wise convs after them are dilated (2, then 4), which keeps the receptive field of the
ImageNet network while the resolution stays at 1/8.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ._registry import BackboneDefaults, register_backbone

NormLayer = Callable[[int], nn.Module]

# (expansion t, output channels c, repeats n, first stride s): the ImageNet configuration.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """Point-wise expand → 3×3 depth-wise → point-wise linear, with a residual when shapes allow."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, expand: int, dilation: int, norm_layer: NormLayer
    ) -> None:
        super().__init__()
        hidden = round(in_ch * expand)
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_ch, hidden, 1, bias=False), norm_layer(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, dilation, dilation, groups=hidden, bias=False),
            norm_layer(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            norm_layer(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2OS8(nn.Module):
    """``forward`` returns four stage outputs at strides 4, 8, 8, 8 with 24, 32, 96 and 320 channels."""

    reductions: tuple[int, ...] = (4, 8, 8, 8)
    # Indices into ``features`` after which a stage ends.
    _stage_ends = (3, 6, 13, 17)

    def __init__(self, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        feats: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), norm_layer(32), nn.ReLU6(inplace=True))
        ]
        in_ch = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                idx = len(feats)
                stride, dilation = (s if i == 0 else 1), 1
                if idx >= 7:  # features[7..13]: stride removed, dilation 2 (the strided conv itself: 1)
                    dilation = 1 if idx == 7 else 2
                    stride = 1
                if idx >= 14:  # features[14..17]: dilation 4 (the formerly strided conv: 2)
                    dilation = 2 if idx == 14 else 4
                feats.append(InvertedResidual(in_ch, c, stride, t, dilation, norm_layer))
                in_ch = c
        self.features = nn.Sequential(*feats)
        self.out_channels: tuple[int, ...] = (24, 32, 96, 320)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def output_stride(self) -> int:
        return self.reductions[-1]

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        start = 0
        for end in self._stage_ends:
            x = self.features[start : end + 1](x)
            outs.append(x)
            start = end + 1
        return outs


@register_backbone("mobilenetv2", display="MobileNetV2", defaults=BackboneDefaults(
    head_channels={"deeplabv3": 128, "pspnet": 128, "upernet": 128, "fcn": 128}, aux=False, family="mobilenetv2"))
def mobilenetv2_os8(norm_layer: NormLayer = nn.BatchNorm2d) -> MobileNetV2OS8:
    return MobileNetV2OS8(norm_layer)


__all__ = ["InvertedResidual", "MobileNetV2OS8", "mobilenetv2_os8"]
