"""Pixel-wise KD (Hinton et al. 2015) on segmentation logits: every pixel's class distribution is matched,

    L = τ² · mean over the B·H·W pixels of KL(softmax(z_t/τ) ‖ softmax(z_s/τ)),

softmax over the classes.

Maps of other sizes: the student's logits are resized to the teacher's h×w (bilinear, align_corners=False;
:mod:`cskd.losses._spatial`); the class counts must agree (a clear error otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.segmentor import SegOutput
from ._numerics import compute_dtype, no_autocast
from ._spatial import logits_to_teacher_size
from .base import DistillLoss, check_non_negative, check_positive, register_loss


def pixel_wise_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """τ² · mean over pixels of KL(softmax_C(z_t/τ) ‖ softmax_C(z_s/τ)) for B×C×H×W logits of one shape (float32
    or wider); :class:`KDLoss` resizes the student's first."""
    if student.shape != teacher.shape:
        raise ValueError(f"KD needs logits of one shape, got student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)}")
    b, _, h, w = student.shape
    with no_autocast(student):
        dtype = compute_dtype(student, teacher)
        log_ps = torch.log_softmax(student.to(dtype) / temperature, dim=1)
        with torch.no_grad():
            log_pt = torch.log_softmax(teacher.to(dtype) / temperature, dim=1)
            pt = log_pt.exp()
        kl = (pt * (log_pt - log_ps)).sum()
        return kl * (temperature**2 / (b * h * w))


@register_loss("kd")
class KDLoss(DistillLoss):
    """``{"kd": weight · KD(student logits, teacher logits)}``."""

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        weight: float = 1.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        check_non_negative(weight=weight)
        check_positive(temperature=temperature)
        self.weight = float(weight)
        self.temperature = float(temperature)

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        zt = teacher.logits.detach()
        zs = logits_to_teacher_size(student.logits, zt, "KD")
        return {"kd": self.weight * pixel_wise_kl(zs, zt, self.temperature)}


__all__ = ["KDLoss", "pixel_wise_kl"]
