"""Backbones by name: each module here registers its backbones with :func:`register_backbone`.

A new backbone is one new file in this package with a registered class or builder, plus its import below.
"""

from __future__ import annotations

from . import mit, mobilenetv2, mobilenetv3, mobilevit, resnet  # noqa: F401  (registration)
from ._registry import (
    BACKBONES,
    TIMM_PREFIX,
    BackboneDefaults,
    BackboneEntry,
    OptimizerRecipe,
    backbone_defaults,
    backbone_display_name,
    backbone_names,
    build_backbone,
    check_backbone_name,
    register_backbone,
)
from .mit import MixVisionTransformer, mit_b0, mit_b1, mit_b2, mit_b3, mit_b4, mit_b5
from .mobilenetv2 import MobileNetV2OS8, mobilenetv2_os8
from .mobilenetv3 import MobileNetV3OS8, mobilenetv3_large, mobilenetv3_small
from .mobilevit import MobileViT, mobilevit_xxs
from .resnet import ResNetV1s, resnet18_v1s, resnet50_v1s, resnet101_v1s

Backbone = ResNetV1s | MobileNetV2OS8 | MobileNetV3OS8 | MixVisionTransformer | MobileViT

__all__ = ["BACKBONES", "TIMM_PREFIX", "Backbone", "BackboneDefaults", "BackboneEntry", "MixVisionTransformer",
           "MobileNetV2OS8", "MobileNetV3OS8", "MobileViT", "OptimizerRecipe", "ResNetV1s", "backbone_defaults",
           "backbone_display_name", "backbone_names",
           "build_backbone", "check_backbone_name", "mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5",
           "mobilenetv2_os8", "mobilenetv3_large", "mobilenetv3_small", "mobilevit_xxs", "register_backbone",
           "resnet18_v1s", "resnet50_v1s", "resnet101_v1s"]
