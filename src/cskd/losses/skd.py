"""SKD's pair-wise term (Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019):
the student matches the teacher's pixel-to-pixel similarities within each image.

Features are max-pooled over β×β cells (β = 2, ceil mode, as published), L2-normalised over channels, and
compared position by position:

    a_ij = <f̂_i, f̂_j>  for the n = ⌈h/β⌉·⌈w/β⌉ pooled positions of one image
    L = mean over B·n·n of (a_ij^s − a_ij^t)²

Student and teacher channel counts may differ (similarities are n×n either way).

SKD as a method is three terms; this module is the pair-wise one. The published recipe
(github.com/winycg/CIRKD, train_scripts/train_kd/train_skd.sh, Cityscapes): weight 10 on this term, pixel-wise KD
on the logits (the registered ``kd`` loss: weight 1, τ = 1), and the holistic adversarial term (a spectral-norm
discriminator on the logits, hinge loss, λ_adv 0.001 for the student, λ_d 0.1 for the discriminator, Adam 4e-4,
β = (0.9, 0.99)): the registered ``adv`` loss (:mod:`cskd.losses.adv`). The method ``skd`` has all three terms,
``skd_noadv`` the first two.

Maps of other sizes: the student's features are resized to the teacher's h×w (bilinear, align_corners=False) before
the pooling and the n×n pair-wise similarities (width-free).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..models.segmentor import SegOutput
from ._numerics import compute_dtype, no_autocast
from ._spatial import to_teacher_size
from .base import DistillLoss, check_non_negative, register_loss


def pairwise_similarity(features: Tensor) -> Tensor:
    """B×C×h×w → B×n×n cosine similarities between positions (n = h·w)."""
    x = F.normalize(features.flatten(2), dim=1)
    return x.mT @ x


def pairwise_distillation(student: Tensor, teacher: Tensor, pool: int = 2) -> Tensor:
    """The pair-wise term; the student's map is resized to the teacher's size first."""
    student = to_teacher_size(student, teacher)
    if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(f"SKD needs student and teacher maps of one batch and spatial size, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    with no_autocast(student):
        dtype = compute_dtype(student, teacher)
        fs, ft = student.to(dtype), teacher.to(dtype)
        if pool > 1:
            fs = F.max_pool2d(fs, kernel_size=pool, stride=pool, ceil_mode=True)
            ft = F.max_pool2d(ft, kernel_size=pool, stride=pool, ceil_mode=True)
        return (pairwise_similarity(fs) - pairwise_similarity(ft)).square().mean()


@register_loss("skd")
class SKDLoss(DistillLoss):
    """``{"skd": weight · pair-wise similarity MSE(student features, teacher features)}``."""

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        weight: float = 10.0,
        pool: int = 2,
    ) -> None:
        super().__init__()
        check_non_negative(weight=weight)
        if pool < 1:
            raise ValueError(f"pool must be ≥ 1 (1 = no pooling), got {pool}")
        self.weight = float(weight)
        self.pool = int(pool)

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        loss = pairwise_distillation(student.features, teacher.features.detach(), self.pool)
        return {"skd": self.weight * loss}


__all__ = ["SKDLoss", "pairwise_distillation", "pairwise_similarity"]
