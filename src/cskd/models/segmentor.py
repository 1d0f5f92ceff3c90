"""A segmentor is a backbone plus a head (plus, for training, an auxiliary head); built by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple

from torch import Tensor, nn

from .backbones import BACKBONES
from .heads import DeepLabV3Head, FCNHead, PSPHead

NormLayer = Callable[[int], nn.Module]


class SegOutput(NamedTuple):
    """What every segmentor returns. All maps are at the backbone's output stride (1/8 of the input);
    losses and inference resize ``logits`` to the label size themselves."""

    logits: Tensor
    """B×K×h×w class scores."""
    aux_logits: Tensor | None
    """B×K×h×w scores of the auxiliary head, or None (no aux head, or not asked for: see ``Segmentor.forward``)."""
    features: Tensor
    """B×C×h×w: the head's map right before its final 1×1 classifier, the one feature distillation compares."""
    stages: tuple[Tensor, ...] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a segmentor; stored in every cskd checkpoint."""

    model: str
    backbone: str
    num_classes: int
    aux: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Head width per backbone output width, as published: 128 for the students (R18: 512 in, MobileNetV2: 320 in),
# 256 (DeepLabV3) / 512 (PSPNet) for the Bottleneck ResNets (2048 in).
_HEAD_CHANNELS = {
    "deeplabv3": {512: 128, 320: 128, 2048: 256},
    "pspnet": {512: 128, 320: 128, 2048: 512},
}
_MODEL_ALIASES = {"deeplabv3": "deeplabv3", "deeplab": "deeplabv3", "pspnet": "pspnet", "psp": "pspnet"}
MODELS = tuple(sorted(_HEAD_CHANNELS))


class Segmentor(nn.Module):
    """``backbone`` → ``head`` (→ logits, features); ``aux_head`` on the second-to-last stage."""

    def __init__(
        self, backbone: nn.Module, head: nn.Module, aux_head: nn.Module | None = None, spec: ModelSpec | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.spec = spec

    @property
    def feature_channels(self) -> int:
        return int(self.head.channels)

    @property
    def num_classes(self) -> int:
        return int(self.head.classifier.out_channels)

    @property
    def output_stride(self) -> int:
        return int(self.backbone.output_stride)

    def forward(self, x: Tensor, with_aux: bool | None = None) -> SegOutput:
        """``with_aux`` defaults to ``self.training``: the auxiliary head only serves the training loss, so
        inference (and a frozen teacher) skips its cost."""
        stages = self.backbone(x)
        logits, features = self.head(stages[-1])
        want_aux = self.training if with_aux is None else with_aux
        aux = self.aux_head(stages[-2]) if (want_aux and self.aux_head is not None) else None
        return SegOutput(logits, aux, features, tuple(stages))


def canonical_model_name(model: str) -> str:
    try:
        return _MODEL_ALIASES[model.lower()]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(set(_MODEL_ALIASES))}") from None


def build_segmentor(
    model: str,
    backbone: str,
    num_classes: int,
    aux: bool | None = None,
    norm_layer: NormLayer = nn.BatchNorm2d,
) -> Segmentor:
    """Build e.g. ``build_segmentor("deeplabv3", "resnet101", num_classes=19)``.

    ``aux`` defaults to the published choice: an FCN auxiliary head on layer3 for ResNets, none for MobileNetV2.
    Weights are randomly initialised; load a checkpoint with :func:`cskd.checkpoints.load_weights`.
    """
    model = canonical_model_name(model)
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    if aux is None:
        aux = backbone.startswith("resnet")
    body = BACKBONES[backbone](norm_layer=norm_layer)
    in_ch = body.out_channels[-1]
    channels = _HEAD_CHANNELS[model][in_ch]
    head_cls = DeepLabV3Head if model == "deeplabv3" else PSPHead
    head = head_cls(in_ch, channels, num_classes, norm_layer=norm_layer)
    aux_head = FCNHead(body.out_channels[-2], num_classes, norm_layer) if aux else None
    spec = ModelSpec(model=model, backbone=backbone, num_classes=num_classes, aux=aux)
    return Segmentor(body, head, aux_head, spec)


def build_from_spec(spec: ModelSpec | dict[str, Any], norm_layer: NormLayer = nn.BatchNorm2d) -> Segmentor:
    if isinstance(spec, dict):
        spec = ModelSpec(**spec)
    return build_segmentor(spec.model, spec.backbone, spec.num_classes, spec.aux, norm_layer)


__all__ = ["MODELS", "ModelSpec", "SegOutput", "Segmentor", "build_from_spec", "build_segmentor",
           "canonical_model_name"]
