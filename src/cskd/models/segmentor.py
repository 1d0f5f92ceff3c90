"""A segmentor is a registered backbone plus a registered head (plus, for training, an auxiliary head); built by
name. What a backbone or head must provide is in :mod:`cskd.models.backbones._registry` and
:mod:`cskd.models.heads._registry`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from torch import Tensor, nn

from .backbones import backbone_defaults, backbone_display_name, build_backbone
from .heads import HEADS, FCNHead, canonical_head_name, get_head

NormLayer = Callable[[int], nn.Module]


class SegOutput(NamedTuple):
    """What every segmentor returns. ``logits``, ``aux_logits`` and ``features`` are at the model's
    ``output_stride`` (1/8 of the input for the dilated CNNs, 1/4 for SegFormer); losses and inference resize
    ``logits`` to the label size themselves."""

    logits: Tensor
    """B×K×h×w class scores."""
    aux_logits: Tensor | None
    """B×K×h×w scores of the auxiliary head, or None (no aux head, or not asked for: see ``Segmentor.forward``)."""
    features: Tensor
    """B×C×h×w: the head's map right before its final 1×1 classifier, the one feature distillation compares."""
    stages: tuple[Tensor, ...] = ()
    """The backbone's stage maps, shallow to deep (widths ``Segmentor.stage_channels``, strides
    ``Segmentor.stage_reductions``); empty where a caller dropped them."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a segmentor; stored in every cskd checkpoint."""

    model: str
    backbone: str
    num_classes: int
    aux: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _models() -> tuple[str, ...]:
    return tuple(sorted(HEADS))


MODELS = _models()
"""The registered head names at import time (``deeplabv3``, ``fcn``, ``pspnet``, ``upernet``, ...)."""


class Segmentor(nn.Module):
    """``backbone`` → all stages → ``head`` (→ logits, features); ``aux_head`` on stage ``aux_stage``."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        aux_head: nn.Module | None = None,
        spec: ModelSpec | None = None,
        *,
        aux_stage: int = -2,
        output_stride: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.spec = spec
        self.aux_stage = aux_stage
        self._output_stride = int(output_stride if output_stride is not None else backbone.output_stride)

    @property
    def feature_channels(self) -> int:
        return int(self.head.channels)

    @property
    def num_classes(self) -> int:
        return int(self.head.classifier.out_channels)

    @property
    def output_stride(self) -> int:
        """Stride of ``logits`` / ``features`` (and ``aux_logits``' stage's) with respect to the input."""
        return self._output_stride

    @property
    def feature_stride(self) -> int:
        """Stride of ``features``: the same as ``logits`` for every registered head."""
        return self._output_stride

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.backbone.out_channels)

    @property
    def stage_reductions(self) -> tuple[int, ...]:
        return tuple(self.backbone.reductions)

    def forward(self, x: Tensor, with_aux: bool | None = None) -> SegOutput:
        """``with_aux`` defaults to ``self.training``: the auxiliary head only serves the training loss, so
        inference (and a frozen teacher) skips its cost."""
        stages = tuple(self.backbone(x))
        logits, features = self.head(stages)
        want_aux = self.training if with_aux is None else with_aux
        aux = self.aux_head(stages[self.aux_stage]) if (want_aux and self.aux_head is not None) else None
        return SegOutput(logits, aux, features, stages)


def canonical_model_name(model: str) -> str:
    """The registered head name for ``model`` or an alias (``psp``, ``deeplab``); ValueError naming the choices."""
    return canonical_head_name(model)


def display_name(model: str, backbone: str) -> str:
    """The name reports print for a model / backbone pair, from the registries' ``display`` names:
    ``("deeplabv3", "resnet18")`` → ``DeepLabV3-R18``, ``("segformer", "mit_b0")`` → ``SegFormer-MiT-B0``,
    ``("deeplabv3", "timm:convnext_tiny")`` → ``DeepLabV3-timm:convnext_tiny``. Aliases print as their head
    (``psp`` → ``PSPNet``); a name not registered prints as it is."""
    try:
        head = get_head(model).display_name
    except ValueError:
        head = model
    return f"{head}-{backbone_display_name(backbone)}"


def head_width(model: str, backbone: str) -> int:
    """The head width the published recipe uses for this pair (the backbone's default, else the head's)."""
    entry = get_head(model)
    return int(backbone_defaults(backbone).head_channels.get(entry.name, entry.default_channels))


def build_segmentor(
    model: str,
    backbone: str,
    num_classes: int,
    aux: bool | None = None,
    norm_layer: NormLayer = nn.BatchNorm2d,
    pretrained_base: str | Path | None = None,
) -> Segmentor:
    """Build e.g. ``build_segmentor("deeplabv3", "resnet101", num_classes=19)``.

    The head width and ``aux`` (an FCN auxiliary head, and on which stage) default to the backbone's published
    choices (:class:`~cskd.models.backbones.BackboneDefaults`). Weights are randomly initialised, except the
    backbone's when ``pretrained_base`` names an ImageNet file; load a checkpoint with
    :func:`cskd.checkpoints.load_weights`.
    """
    entry = get_head(model)  # ValueError: unknown model, naming the choices
    defaults = backbone_defaults(backbone)  # ValueError: unknown backbone, naming the choices
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    body = build_backbone(backbone, norm_layer=norm_layer, pretrained=pretrained_base)
    n = len(body.out_channels)
    if n < entry.min_stages:
        fits = sorted(h for h, e in HEADS.items() if e.min_stages <= n)
        raise ValueError(
            f"head {entry.name!r} needs at least {entry.min_stages} backbone stages and backbone {backbone!r} "
            f"has {n}; choose one of {fits}"
        )
    head = entry.cls(list(body.out_channels), head_width(entry.name, backbone), num_classes, norm_layer=norm_layer)
    if aux is None:
        aux = defaults.aux
    aux_head = None
    if aux:
        if not -n <= defaults.aux_stage < n or n < 2:
            raise ValueError(f"backbone {backbone!r} has {n} stage(s): no stage for an auxiliary head; set aux=false")
        aux_head = FCNHead(body.out_channels[defaults.aux_stage], num_classes, norm_layer)
    spec = ModelSpec(model=entry.name, backbone=backbone, num_classes=num_classes, aux=bool(aux))
    return Segmentor(body, head, aux_head, spec, aux_stage=defaults.aux_stage,
                     output_stride=entry.output_stride(body.reductions))


def build_from_spec(spec: ModelSpec | dict[str, Any], norm_layer: NormLayer = nn.BatchNorm2d) -> Segmentor:
    if isinstance(spec, dict):
        spec = ModelSpec(**spec)
    return build_segmentor(spec.model, spec.backbone, spec.num_classes, spec.aux, norm_layer)


__all__ = ["MODELS", "ModelSpec", "SegOutput", "Segmentor", "build_from_spec", "build_segmentor",
           "canonical_model_name", "display_name", "head_width"]
