"""Dilated ResNet "v1s" backbones (deep stem, output stride 8), as in the published CSKD/CIRKD code.

The module names (``conv1``, ``bn1``, ``relu1``, ..., ``layer1``...``layer4``) are those of the published
``ResNetV1b`` so that ImageNet files such as ``resnet18-imagenet.pth`` load without renaming.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ._registry import BackboneDefaults, register_backbone

NormLayer = Callable[[int], nn.Module]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs. ``dilation`` applies to the first conv, ``second_dilation`` to the second.

    The published blocks dilate the two convs differently in the first block of a dilated stage (e.g. 1 then 2);
    keeping both numbers reproduces its receptive fields and therefore its pretrained weights' behaviour.
    """

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        second_dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, second_dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided, dilated) → 1×1, expansion 4. ``second_dilation`` is unused (the 3×3 is the only
    spatial conv); it is accepted so both block types share one constructor signature."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        second_dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        del second_dilation
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetV1s(nn.Module):
    """Dilated ResNet with a deep stem (three 3×3 convs 64-64-128), output stride 8.

    ``forward`` returns the four stage outputs ``[c1, c2, c3, c4]`` at strides 4, 8, 8, 8.
    """

    reductions: tuple[int, ...] = (4, 8, 8, 8)

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 64, stride=2)
        self.bn1 = norm_layer(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(64, 64)
        self.bn2 = norm_layer(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv3x3(64, 128)
        self.bn3 = norm_layer(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)

        self._in_ch = 128
        self.layer1 = self._make_stage(block, 64, layers[0], 1, 1, norm_layer)
        self.layer2 = self._make_stage(block, 128, layers[1], 2, 1, norm_layer)
        self.layer3 = self._make_stage(block, 256, layers[2], 1, 2, norm_layer)
        self.layer4 = self._make_stage(block, 512, layers[3], 1, 4, norm_layer)
        self.out_channels: tuple[int, ...] = tuple(p * block.expansion for p in (64, 128, 256, 512))
        del self._in_ch

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def output_stride(self) -> int:
        return self.reductions[-1]

    def _make_stage(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        dilation: int,
        norm_layer: NormLayer,
    ) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(nn.Conv2d(self._in_ch, out_ch, 1, stride, bias=False), norm_layer(out_ch))
        # First block of a stage dilated by d starts at d/2 (1 for d ≤ 2) to avoid gridding where the
        # resolution stops shrinking; its second conv already uses the stage dilation.
        first = 2 if dilation == 4 else 1
        mods = [block(self._in_ch, planes, stride, first, dilation, downsample, norm_layer)]
        self._in_ch = out_ch
        mods += [block(out_ch, planes, 1, dilation, dilation, None, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


# Published head widths: 128 for the R18 student (DeepLabV3, PSPNet, and UperNet-lite's FPN); 256 (DeepLabV3) and
# 512 (PSPNet, UperNet) for the Bottleneck ResNets. The published recipes train an FCN aux head on layer3.
_SMALL = BackboneDefaults(head_channels={"deeplabv3": 128, "pspnet": 128, "upernet": 128, "fcn": 128},
                          aux=True, aux_stage=-2, family="resnet")
_LARGE = BackboneDefaults(head_channels={"deeplabv3": 256, "pspnet": 512, "upernet": 512, "fcn": 512},
                          aux=True, aux_stage=-2, family="resnet")


@register_backbone("resnet18", display="R18", defaults=_SMALL)
def resnet18_v1s(norm_layer: NormLayer = nn.BatchNorm2d) -> ResNetV1s:
    return ResNetV1s(BasicBlock, (2, 2, 2, 2), norm_layer)


@register_backbone("resnet50", display="R50", defaults=_LARGE)
def resnet50_v1s(norm_layer: NormLayer = nn.BatchNorm2d) -> ResNetV1s:
    return ResNetV1s(Bottleneck, (3, 4, 6, 3), norm_layer)


@register_backbone("resnet101", display="R101", defaults=_LARGE)
def resnet101_v1s(norm_layer: NormLayer = nn.BatchNorm2d) -> ResNetV1s:
    return ResNetV1s(Bottleneck, (3, 4, 23, 3), norm_layer)


__all__ = ["BasicBlock", "Bottleneck", "ResNetV1s", "resnet18_v1s", "resnet50_v1s", "resnet101_v1s"]
