"""Segmentation heads, registered by name (:func:`register_head`). Each receives all backbone stages and returns
``(logits, features)``, ``features`` being the map right before the final 1×1 classifier: the map the
feature-distillation losses compare.

A new head is one new file in this package with a registered class, plus its import below.
"""

from __future__ import annotations

from . import deeplabv3, fcn, pspnet, segformer, upernet  # noqa: F401  (registration)
from ._common import ASPP, FCNHead, PyramidPooling, conv_bn_relu
from ._registry import HEADS, HeadEntry, canonical_head_name, get_head, head_names, register_head
from .deeplabv3 import DeepLabV3Head
from .fcn import FCNSegHead
from .pspnet import PSPHead
from .segformer import SegFormerHead
from .upernet import UperNetHead

__all__ = ["ASPP", "DeepLabV3Head", "FCNHead", "FCNSegHead", "HEADS", "HeadEntry", "PSPHead", "PyramidPooling",
           "SegFormerHead", "UperNetHead", "canonical_head_name", "conv_bn_relu", "get_head", "head_names",
           "register_head"]
