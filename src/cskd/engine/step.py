"""One training step's forward: the trained model and every loss term, as one module.

Keeping the student and the distillation losses in one module lets DDP synchronise the gradients of the losses'
own parameters (CSKD's γ, connectors, projection heads) together with the student's; the published code leaves
them unsynchronised across GPUs. The benchmark times this same module, so benchmark and engine cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import IGNORE_INDEX
from ..losses.base import DistillLoss
from ..models.segmentor import SegOutput, Segmentor


def segmentation_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy with logits upsampled (bilinear, align_corners=True, as published) to the label size."""
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = F.interpolate(logits, targets.shape[-2:], mode="bilinear", align_corners=True)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


class TrainStep(nn.Module):
    def __init__(self, model: Segmentor, losses: Mapping[str, DistillLoss] | None = None, aux_weight: float = 0.4):
        super().__init__()
        self.model = model
        self.losses = nn.ModuleDict(dict(losses or {}))
        self.aux_weight = aux_weight

    def forward(
        self, images: Tensor, targets: Tensor, teacher: SegOutput | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the total loss and its named terms (each already weighted)."""
        out = self.model(images)
        terms: dict[str, Tensor] = {"ce": segmentation_ce(out.logits, targets)}
        if out.aux_logits is not None and self.aux_weight:
            terms["aux"] = self.aux_weight * segmentation_ce(out.aux_logits, targets)
        if self.losses:
            if teacher is None:
                raise RuntimeError("distillation losses need the teacher's outputs")
            for loss in self.losses.values():
                for name, value in loss(out, teacher, targets).items():
                    if name in terms:
                        raise RuntimeError(f"two loss terms are both named {name!r}")
                    terms[name] = value
        total = torch.stack([t.float() for t in terms.values()]).sum()
        return total, terms


__all__ = ["TrainStep", "segmentation_ce"]
