"""IFVD: intra-class feature variation distillation (Wang et al., "Intra-class Feature Variation Distillation for
Semantic Segmentation", ECCV 2020).

Each pixel's feature is compared with the centre (mean feature) of its ground-truth class in the same image; the
student learns the teacher's map of these cosine similarities:

    v(x, c) = cos(f_x, mean of f over the pixels of class c in x's image),   c = label of x
    L = mean over all B·h·w pixels of (v_s(x) − v_t(x))²

Labels are brought to the feature size (stride 8) by nearest-neighbour sampling, as published. Pixels without a
class (255) contribute 0 but count in the mean: the published code leaves their "centre" equal to the pixel's own
feature, so both similarities are 1 there. Gradients reach the student through the pixel features *and* the
class centres, as published.

Published recipe (github.com/winycg/CIRKD, train_scripts/train_kd/train_ifvd.sh, Cityscapes): weight 20 on this
term, plus pixel-wise KD (weight 1, τ = 1) and SKD's holistic adversarial term (λ_adv 0.001, λ_d 0.1; the ``adv``
loss). The method ``ifvd`` has all three, ``ifvd_noadv`` the first two.

Differences from the published code (same value, cheaper): the per-class loop over every class becomes two
batched products with a one-hot label matrix, and the centres are class *sums* rather than means — cosine is
scale-invariant, so the published ``+1e-6`` in the mean's denominator has no counterpart here.

Maps of other sizes: the student's features are resized to the teacher's h×w (bilinear, align_corners=False) and the
labels to that size by nearest; the class centres and cosine similarities are per map, so widths may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.segmentor import SegOutput
from ._numerics import compute_dtype, no_autocast
from ._spatial import labels_at as downsample_labels, to_teacher_size
from .base import DistillLoss, check_non_negative, register_loss


def class_one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """B×n labels → B×n×K one-hot in ``dtype``; labels outside 0…K−1 (255 = ignore) give all-zero rows.

    A comparison with ``arange`` rather than ``F.one_hot``: no value check, hence no host sync, and no special
    case for the ignore value."""
    classes = torch.arange(num_classes, device=labels.device)
    return (labels[..., None] == classes).to(dtype)


def intra_class_similarity(features: Tensor, one_hot: Tensor) -> Tensor:
    """cos(f_x, centre of x's class in its image) for ``features`` B×C×n and ``one_hot`` B×n×K → B×n.

    Pixels without a class get a zero centre and hence similarity 0; callers mask them."""
    sums = features @ one_hot  # B×C×K: per image and class, the sum of its features
    centres = sums @ one_hot.mT  # B×C×n: each pixel's class sum
    return F.cosine_similarity(features, centres, dim=1)


def ifv_loss(student: Tensor, teacher: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The IFVD term for features B×C×h×w (channel counts may differ) and labels B×h×w (255 = ignore)."""
    if student.shape[-2:] != teacher.shape[-2:] or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"IFVD needs student and teacher maps of one batch and spatial size, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    b, _, h, w = student.shape
    with no_autocast(student):
        dtype = compute_dtype(student, teacher)
        flat = labels.flatten(1)
        one_hot = class_one_hot(flat, num_classes, dtype)
        sim_s = intra_class_similarity(student.to(dtype).flatten(2), one_hot)
        with torch.no_grad():
            sim_t = intra_class_similarity(teacher.to(dtype).flatten(2), one_hot)
        valid = (flat >= 0) & (flat < num_classes)
        sq = torch.where(valid, (sim_s - sim_t).square(), torch.zeros((), dtype=dtype, device=sim_s.device))
        return sq.sum() / (b * h * w)


@register_loss("ifvd")
class IFVDLoss(DistillLoss):
    """``{"ifvd": weight · IFVD(student features, teacher features, labels)}``."""

    needs_targets = True

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        weight: float = 20.0,
    ) -> None:
        super().__init__()
        check_non_negative(weight=weight)
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        self.weight = float(weight)
        self.num_classes = int(num_classes)

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        if targets is None:
            raise ValueError("ifvd needs the labels (targets); the engine passes them when needs_targets is set")
        ft = teacher.features.detach()
        fs = to_teacher_size(student.features, ft)
        labels = downsample_labels(targets, tuple(ft.shape[-2:]))
        loss = ifv_loss(fs, ft, labels, self.num_classes)
        return {"ifvd": self.weight * loss}


__all__ = ["IFVDLoss", "class_one_hot", "downsample_labels", "ifv_loss", "intra_class_similarity"]
