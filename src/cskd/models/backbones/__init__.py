"""Backbones by name. Each returns a list of stage outputs and exposes ``out_channels`` and ``output_stride``."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .mobilenetv2 import MobileNetV2OS8, mobilenetv2_os8
from .resnet import ResNetV1s, resnet18_v1s, resnet50_v1s, resnet101_v1s

Backbone = ResNetV1s | MobileNetV2OS8

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18_v1s,
    "resnet50": resnet50_v1s,
    "resnet101": resnet101_v1s,
    "mobilenetv2": mobilenetv2_os8,
}

__all__ = ["BACKBONES", "Backbone", "MobileNetV2OS8", "ResNetV1s", "mobilenetv2_os8", "resnet18_v1s",
           "resnet50_v1s", "resnet101_v1s"]
