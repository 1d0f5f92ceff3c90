"""The backbone registry: a backbone is a class (or builder) registered by name with its published defaults.

A backbone is an ``nn.Module`` whose ``forward(x)`` returns its stage maps, shallow to deep, and which has
``out_channels`` and ``reductions`` (each stage's stride with respect to the input) and ``output_stride``
(``reductions[-1]``). Registering one is a decorator on its class or builder::

    @register_backbone("mobilenetv3_large", defaults=BackboneDefaults(head_channels={"deeplabv3": 128}),
                       display="MobileNetV3-Large")
    class MobileNetV3Large(nn.Module): ...

``display`` is the short name reports print (``R18``, ``MiT-B0``); :func:`backbone_display_name` gives it (a timm
backbone prints as ``timm:<name>``).

The builder is called as ``builder(norm_layer=..., pretrained=path_or_None)`` if it takes ``pretrained`` (it
then loads that file itself, e.g. converting another layout), else as ``builder(norm_layer=...)`` and
:func:`build_backbone` loads ``pretrained`` (an ImageNet file on disk) strictly with
:func:`cskd.models.load_backbone_weights`. ``timm:<name>`` builds any timm model with ``features_only`` (see
:mod:`cskd.models.backbones.timm_backbone`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

NormLayer = Callable[[int], nn.Module]
TIMM_PREFIX = "timm:"


OPTIMIZER_NAMES = {"sgd": "SGD", "adamw": "AdamW"}
"""``train.optimizer`` values and the names reports print for them."""


@dataclass(frozen=True)
class OptimizerRecipe:
    """The optimiser a backbone's published training script uses (what ``train.optimizer``, ``train.lr`` and
    ``train.weight_decay`` then hold). AdamW leaves norms, biases and position terms undecayed
    (``train.no_decay_norm_bias`` null, :mod:`cskd.engine.optim`)."""

    optimizer: str
    """``sgd`` or ``adamw``."""
    lr: float
    weight_decay: float
    source: str = ""
    """Where the values come from (a published script)."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer {self.optimizer!r}: choose one of {sorted(OPTIMIZER_NAMES)}")

    def describe(self) -> str:
        """E.g. ``AdamW lr 0.0009, weight decay 0.01``."""
        return f"{OPTIMIZER_NAMES[self.optimizer]} lr {self.lr:g}, weight decay {self.weight_decay:g}"


@dataclass(frozen=True)
class BackboneDefaults:
    """What the published recipe of a backbone uses."""

    head_channels: Mapping[str, int] = field(default_factory=dict)
    """Head width per head name (e.g. ``{"deeplabv3": 128, "pspnet": 128}``); a head not listed uses its own
    default width (the ``default_channels`` of its registration)."""
    aux: bool = False
    """Whether the published recipe trains an auxiliary FCN head."""
    aux_stage: int = -2
    """The stage (index into the stage list) that the auxiliary head reads."""
    family: str = ""
    """A label grouping backbones that share a module tree (``resnet``, ``mobilenetv3``...), for messages."""
    optimizer: OptimizerRecipe | None = None
    """The published recipe's optimiser where it is not the CNN recipe's SGD (MobileViT and MiT: AdamW); None: the
    config's own ``train.optimizer`` (SGD by default). ``cskd demo`` trains with it; a config for ``cskd train`` /
    ``cskd distill`` spells it out (configs/cityscapes/*-mvitxxs.yaml, *_segformer-*.yaml)."""


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    builder: Callable[..., nn.Module]
    defaults: BackboneDefaults
    display: str = ""
    """The short name reports print (``R18``, ``MobileNetV3-Large``, ``MiT-B0``); empty: the registered name."""


BACKBONES: dict[str, BackboneEntry] = {}


def register_backbone(
    name: str, defaults: BackboneDefaults | None = None, display: str = ""
) -> Callable[[Any], Any]:
    """Class / builder decorator: register ``name`` (printed as ``display``). A name may be registered once."""

    def deco(builder: Any) -> Any:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered (by {BACKBONES[name].builder.__qualname__})")
        BACKBONES[name] = BackboneEntry(name, builder, defaults or BackboneDefaults(), display)
        return builder

    return deco


def backbone_names() -> list[str]:
    return sorted(BACKBONES)


def _closest(name: str, choices: list[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(name, choices, n=n, cutoff=0.5)


def unknown_backbone_message(name: str) -> str:
    close = _closest(name, backbone_names())
    hint = f" (closest: {', '.join(close)})" if close else ""
    return (f"unknown backbone {name!r}{hint}; choose one of {backbone_names()} or 'timm:<model name>' "
            "(any timm model with features_only)")


def backbone_defaults(name: str) -> BackboneDefaults:
    """The published defaults of ``name``; a timm backbone gets the heads' own defaults and no aux head."""
    if name.startswith(TIMM_PREFIX):
        from .timm_backbone import check_timm_name

        check_timm_name(name[len(TIMM_PREFIX):])
        return BackboneDefaults(family="timm")
    try:
        return BACKBONES[name].defaults
    except KeyError:
        raise ValueError(unknown_backbone_message(name)) from None


def backbone_display_name(name: str) -> str:
    """The short name reports print for backbone ``name`` (``resnet18`` → ``R18``); a ``timm:<name>`` backbone and
    a name not registered (e.g. read from an old record) print as they are."""
    entry = BACKBONES.get(name)
    return (entry.display or entry.name) if entry is not None else name


def check_backbone_name(name: str) -> None:
    """Raise ValueError (naming the value and the choices) if ``name`` cannot be built."""
    backbone_defaults(name)


def build_backbone(
    name: str, norm_layer: NormLayer = nn.BatchNorm2d, pretrained: str | Path | None = None
) -> nn.Module:
    """Build backbone ``name`` and, if ``pretrained`` is a path, load that ImageNet file into it strictly."""
    if name.startswith(TIMM_PREFIX):
        from .timm_backbone import TimmBackbone

        # timm loads its own weight files (its key layout, its classifier filtering)
        return TimmBackbone(name[len(TIMM_PREFIX):], norm_layer=norm_layer, pretrained=pretrained)
    check_backbone_name(name)
    builder = BACKBONES[name].builder
    loads_itself = "pretrained" in inspect.signature(builder).parameters
    if loads_itself:  # the builder reads its own file layouts (e.g. converting a Hugging Face file)
        body = builder(norm_layer=norm_layer, pretrained=pretrained)
    else:
        body = builder(norm_layer=norm_layer)
    for attr in ("out_channels", "reductions"):
        if not hasattr(body, attr):
            raise TypeError(f"backbone {name!r} breaks the contract: it has no attribute {attr!r}")
    if pretrained is not None and not loads_itself:
        from ...checkpoints.weights import load_backbone_weights

        load_backbone_weights(body, pretrained, backbone_name=name)
    return body


__all__ = ["BACKBONES", "OPTIMIZER_NAMES", "TIMM_PREFIX", "BackboneDefaults", "BackboneEntry", "OptimizerRecipe",
           "backbone_defaults", "backbone_display_name", "backbone_names", "build_backbone", "check_backbone_name",
           "register_backbone", "unknown_backbone_message"]
