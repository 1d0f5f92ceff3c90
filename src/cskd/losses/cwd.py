"""CWD, channel-wise distillation (Shu et al., ICCV 2021), as the CSKD recipe uses it on the logits.

Each channel's map becomes a distribution over the H·W positions, p = softmax(z/τ) over positions, and the student
matches the teacher channel by channel:

    L = τ² / (B·C) · Σ_{b,c} KL(p_t^{b,c} ‖ p_s^{b,c}).

Defaults are the CSKD recipe's (λ = 3, τ = 2 on the logits). ``on = "features"`` applies the same loss to the
segmentors' feature maps instead (the CWD paper's feature variant); when the student's channel count differs from
the teacher's, a learned 1×1 convolution (no bias) maps the student's map first. Logits always agree in width.

Maps of other sizes: the student's map (logits or features) is resized to the teacher's h×w (bilinear,
align_corners=False) before the connector; logits must agree in class count, features in other widths go through the
1×1 connector.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..models.segmentor import SegOutput
from ._numerics import compute_dtype, no_autocast
from ._spatial import logits_to_teacher_size, to_teacher_size
from .base import DistillLoss, check_non_negative, check_positive, register_loss


def channel_wise_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """τ²/(B·C) · Σ_{b,c} KL(softmax_HW(z_t/τ) ‖ softmax_HW(z_s/τ)) for B×C×H×W maps (float32 or wider)."""
    if student.shape != teacher.shape:
        raise ValueError(f"CWD needs maps of one shape, got student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)}")
    b, c = student.shape[:2]
    with no_autocast(student):
        dtype = compute_dtype(student, teacher)
        log_ps = torch.log_softmax(student.flatten(2).to(dtype) / temperature, dim=-1)
        with torch.no_grad():
            log_pt = torch.log_softmax(teacher.flatten(2).to(dtype) / temperature, dim=-1)
            pt = log_pt.exp()
        # Σ p_t (log p_t − log p_s); log_softmax keeps both logs finite, so an underflowed p_t contributes 0.
        kl = (pt * (log_pt - log_ps)).sum()
        return kl * (temperature**2 / (b * c))


@register_loss("cwd")
class CWDLoss(DistillLoss):
    """``{"cwd": weight · CWD(student, teacher)}`` on the logits (default) or the features."""

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        weight: float = 3.0,
        temperature: float = 2.0,
        on: Literal["logits", "features"] = "logits",
    ) -> None:
        super().__init__()
        check_non_negative(weight=weight)
        check_positive(temperature=temperature)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.on = on
        maps_differ = on == "features" and student_channels != teacher_channels
        self.connector = nn.Conv2d(student_channels, teacher_channels, 1, bias=False) if maps_differ else None

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        zs = student.logits if self.on == "logits" else student.features
        zt = (teacher.logits if self.on == "logits" else teacher.features).detach()
        if self.on == "logits":
            zs = logits_to_teacher_size(zs, zt, "CWD")
        else:
            zs = to_teacher_size(zs, zt)
        if self.connector is not None:
            zs = self.connector(zs)
        return {"cwd": self.weight * channel_wise_kl(zs, zt, self.temperature)}


__all__ = ["CWDLoss", "channel_wise_kl"]
