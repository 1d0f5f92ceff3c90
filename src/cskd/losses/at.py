"""AT: attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017), on the segmentation head's feature maps.

A map's spatial attention is the channel mean of |f|^p, flattened and L2-normalised per image; the student matches
the teacher's:

    a(f) = normalise_over_positions(mean_c |f_c|^p)
    L = mean over the B·h·w entries of (a(f_s) − a(f_t))²

Student and teacher channel counts may differ (the channel mean removes them).

Published recipe (github.com/winycg/CIRKD, train_scripts/train_kd/train_at.sh, Cityscapes): p = 2, weight 10000 on
this term (the mean over h·w positions of a unit vector's squared differences is small), plus pixel-wise KD
(weight 1, τ = 1).

Difference from the published code: |f|^p instead of f^p (the AT paper's definition); equal for p = 2 and for the
non-negative (post-ReLU) head features, and well defined for other p.

Maps of other sizes: the student's features are resized to the teacher's h×w (bilinear, align_corners=False) before
the attention maps; the channel mean removes the widths.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..models.segmentor import SegOutput
from ._numerics import compute_dtype, no_autocast
from ._spatial import to_teacher_size
from .base import DistillLoss, check_non_negative, check_positive, register_loss


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """B×C×h×w → B×(h·w): channel mean of |f|^p, L2-normalised over positions."""
    return F.normalize(features.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """The AT term; the student's map is resized to the teacher's size first."""
    student = to_teacher_size(student, teacher)
    if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(f"AT needs student and teacher maps of one batch and spatial size, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    with no_autocast(student):
        dtype = compute_dtype(student, teacher)
        a_s = attention_map(student.to(dtype), p)
        a_t = attention_map(teacher.to(dtype), p)
        return (a_s - a_t).square().mean()


@register_loss("at")
class ATLoss(DistillLoss):
    """``{"at": weight · AT(student features, teacher features)}``."""

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        weight: float = 10000.0,
        p: float = 2.0,
    ) -> None:
        super().__init__()
        check_non_negative(weight=weight)
        check_positive(p=p)
        self.weight = float(weight)
        self.p = float(p)

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        return {"at": self.weight * attention_transfer(student.features, teacher.features.detach(), self.p)}


__all__ = ["ATLoss", "attention_map", "attention_transfer"]
