"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022; github.com/hunto/DIST_KD),
in its semantic-segmentation form: relations of the class probabilities instead of their exact values.

Every pixel of the batch is one sample: the B×K×h×w logits become P = B·h·w rows of K class scores and
p = softmax(z/τ) over the classes. With ρ(u, v) the Pearson correlation, (u−ū)·(v−v̄) / (‖u−ū‖‖v−v̄‖ + ε),
ε = 1e-8 as published,

    inter = 1 − 1/P Σ_pixels ρ(p_s[pixel, :], p_t[pixel, :])     (each pixel's class ranking)
    intra = 1 − 1/K Σ_classes ρ(p_s[:, class], p_t[:, class])   (each class's pattern over all B·h·w pixels)
    L = τ² · (β · inter + γ · intra).

The intra-class relation runs over the pixels of the whole per-device batch together, as in the authors' code
(``DIST.forward`` reshapes B×K×H×W to (B·H·W)×K before both relations).

Terms: ``dist`` = weight · L(student logits, teacher logits), and ``dist_aux`` = aux_weight · weight · L(student
aux logits, teacher aux logits) when both models have an aux head (the ResNet students; not MobileNetV2, whose
published trainer sets ``aux`` off and has no such term). The teacher runs its aux head for this
(``needs_teacher_aux``).

Published recipe (github.com/hunto/DIST_KD, ``segmentation/train_kd.py`` lines 196 and 254–258; the class in
``segmentation/losses/dist_kd.py``): ``criterion_kd = DIST()`` with
β = γ = 1 and no temperature (τ = 1; its ``--kd-temperature`` flag is never passed to DIST), ``--lambda-kd 1``;
``kd_loss = λ·DIST(s[0], t[0])`` plus ``0.4·λ·DIST(s[1], t[1])`` on the aux logits for ResNet students; DIST
replaces pixel-wise KD (no other distillation term). Teacher with aux head, both logits at 1/8 of the input.
Trainer defaults: 40,000 iterations, batch 16, lr 0.02, weight decay 5e-4, crop 512×1024
(``train_scripts/train_kd/deeplabv3_res18.sh`` and ``pspnet_res18.sh`` override none of them).
Its poly schedule decays to 1e-4 instead of 0 (``adjust_lr``), which the engine's schedule does not reproduce.
``temperature`` ≠ 1 follows the DIST paper's classification form (softmax(z/τ), loss × τ²).

Differences from the published code: if the student's logits differ in spatial size from the teacher's, they are
resized to the teacher's size (bilinear, align_corners=False) first; the published code assumes equal sizes.
The relations are computed in float32 (float64 inputs stay float64) outside autocast.

Maps of other sizes: the student's logits (and aux logits) are resized to the teacher's h×w (bilinear,
align_corners=False); the class counts must agree.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.segmentor import SegOutput
from ._spatial import logits_to_teacher_size
from .base import DistillLoss, check_non_negative, check_positive, register_loss
from ._numerics import compute_dtype, no_autocast

#: ε of the published Pearson correlation (added to the product of the norms).
PEARSON_EPS = 1e-8


def _pearson_rows(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of every row of ``a`` with the same row of ``b`` (N×D → N)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student: Tensor, teacher: Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> Tensor:
    """τ²(β·inter + γ·intra) for B×K×h×w logits (the student's resized to the teacher's size) or N×K scores."""
    if student.dim() == 4:
        student = logits_to_teacher_size(student, teacher, "DIST")
    if student.shape != teacher.shape:
        raise ValueError(f"DIST needs logits of one shape, got student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)}")
    k = student.shape[1]
    with no_autocast(student):
        dtype = compute_dtype(student, teacher)
        zs, zt = student.to(dtype), teacher.detach().to(dtype)
        if zs.dim() == 4:
            zs = zs.permute(0, 2, 3, 1).reshape(-1, k)
            zt = zt.permute(0, 2, 3, 1).reshape(-1, k)
        ps = torch.softmax(zs / temperature, dim=1)
        pt = torch.softmax(zt / temperature, dim=1)
        inter = 1 - _pearson_rows(ps, pt).mean()
        intra = 1 - _pearson_rows(ps.t(), pt.t()).mean()
        return temperature**2 * (beta * inter + gamma * intra)


@register_loss("dist")
class DISTLoss(DistillLoss):
    """``{"dist": weight·L(logits), "dist_aux": aux_weight·weight·L(aux logits)}`` (the latter when both models
    have aux logits and ``aux_weight`` > 0)."""

    needs_teacher_aux = True

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        weight: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        check_non_negative(weight=weight, beta=beta, gamma=gamma, aux_weight=aux_weight)
        check_positive(temperature=temperature)
        if beta == gamma == 0:
            raise ValueError("beta and gamma are both 0: the loss would do nothing")
        self.weight = float(weight)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.aux_weight = float(aux_weight)

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        terms = {"dist": self.weight * dist_loss(student.logits, teacher.logits.detach(), self.beta, self.gamma,
                                                 self.temperature)}
        if self.aux_weight > 0 and student.aux_logits is not None and teacher.aux_logits is not None:
            terms["dist_aux"] = self.aux_weight * self.weight * dist_loss(
                student.aux_logits, teacher.aux_logits.detach(), self.beta, self.gamma, self.temperature)
        return terms


__all__ = ["DISTLoss", "dist_loss"]
