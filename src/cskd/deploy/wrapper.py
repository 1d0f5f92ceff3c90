"""The inference graph a deployed model runs (:class:`InferenceWrapper`) and the options that shape it
(:class:`GraphOptions`); what it takes and returns is described in :mod:`cskd.deploy.export`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError
from ..models import Segmentor

InputFormat = Literal["uint8", "float"]
LabelsDtype = Literal["uint8", "int64"]

INPUT_NAME = "image"
LOGITS_NAME = "logits"
LABELS_NAME = "labels"
LABEL_DTYPES = {"uint8": torch.uint8, "int64": torch.int64}


@dataclass(frozen=True)
class GraphOptions:
    """What the exported graph takes and returns (see the module docstring)."""

    input_format: InputFormat = "uint8"
    argmax: bool = False
    labels_dtype: LabelsDtype = "uint8"
    align_corners: bool = True

    def __post_init__(self) -> None:
        if self.input_format not in ("uint8", "float"):
            raise ConfigError(f"input format {self.input_format!r}: choose uint8 or float")
        if self.labels_dtype not in LABEL_DTYPES:
            raise ConfigError(f"labels dtype {self.labels_dtype!r}: choose uint8 or int64")

    @property
    def output_name(self) -> str:
        return LABELS_NAME if self.argmax else LOGITS_NAME


class InferenceWrapper(nn.Module):
    """image → (normalise) → segmentor → logits resized to the input → (argmax). Always in eval mode, and puts
    ``model`` in eval mode: an inference graph has no training behaviour (dropout, batch statistics, aux head)."""

    def __init__(self, model: Segmentor, options: GraphOptions = GraphOptions()) -> None:
        super().__init__()
        if options.argmax and options.labels_dtype == "uint8" and model.num_classes > 256:
            raise ConfigError(f"{model.num_classes} classes do not fit uint8 labels; use labels dtype int64")
        self.model = model
        self.options = options
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> InferenceWrapper:
        return super().train(False)

    def logits(self, image: Tensor) -> Tensor:
        # Same operations, in the same order, as cskd.data.normalize.normalize, so the graph matches the evaluator.
        x = image.float()
        if self.options.input_format == "uint8":
            x = (x / 255.0 - self.mean) / self.std
        out = self.model(x, with_aux=False).logits
        return F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=self.options.align_corners)

    def forward(self, image: Tensor) -> Tensor:
        logits = self.logits(image)
        if not self.options.argmax:
            return logits
        return logits.argmax(dim=1).to(LABEL_DTYPES[self.options.labels_dtype])


def describe_io(num_classes: int, size: tuple[int, int], options: GraphOptions, dynamic: bool) -> tuple[str, str]:
    """Human-readable input and output specs (what ``cskd export`` prints)."""
    n, (h, w) = ("N", ("H", "W")) if dynamic else ("1", size)
    if options.input_format == "uint8":
        inp = f'"{INPUT_NAME}" uint8 {n}×3×{h}×{w} RGB in 0..255 (ImageNet normalisation inside the graph)'
    else:
        inp = f'"{INPUT_NAME}" float32 {n}×3×{h}×{w} RGB, already normalised: (x/255 − mean)/std, ImageNet'
    resize = f"resized bilinearly to the input, align_corners={options.align_corners}"
    if options.argmax:
        out = f'"{LABELS_NAME}" {options.labels_dtype} {n}×{h}×{w} class indices (argmax of logits {resize})'
    else:
        out = f'"{LOGITS_NAME}" float32 {n}×{num_classes}×{h}×{w} class scores ({resize})'
    return inp, out


__all__ = ["GraphOptions", "INPUT_NAME", "InferenceWrapper", "LABELS_NAME", "LABEL_DTYPES", "LOGITS_NAME",
           "describe_io"]
