"""The package's one rule for maps of other sizes: the **student's** map is resized to the **teacher's** spatial
size (bilinear, align_corners=False) before a loss compares them; the teacher's map, the target, is never
resampled, and labels a loss reads at the map size are resized by nearest to that (the teacher's) size. When the
sizes already agree nothing is resampled (the same tensor is returned), so results are bit-identical to the
equal-stride case. Widths: logits must hold one class count (:func:`logits_to_teacher_size` says so clearly);
feature widths are projected (a loss's connector) or removed (channel means, Gram/CKA matrices) by each loss.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def to_teacher_size(student: Tensor, teacher: Tensor) -> Tensor:
    """``student`` (B×C×h×w) resized to the teacher map's h×w by bilinear interpolation (align_corners=False);
    returned unchanged when the sizes already agree. The teacher's map, the target, is never resampled."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher maps hold different batch sizes: {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    size = tuple(teacher.shape[-2:])
    if tuple(student.shape[-2:]) == size:
        return student
    return F.interpolate(student, size=size, mode="bilinear", align_corners=False)


def logits_to_teacher_size(student: Tensor, teacher: Tensor, what: str) -> Tensor:
    """:func:`to_teacher_size` for B×K×h×w logits, after checking that both hold the same K classes (``what``
    names the loss in the error)."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(f"{what} needs B×K×h×w logits, got student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)}")
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(f"{what} compares class scores: student and teacher logits must hold one class count, "
                         f"got {student.shape[1]} and {teacher.shape[1]} classes")
    return to_teacher_size(student, teacher)


def labels_at(targets: Tensor, size: tuple[int, int]) -> Tensor:
    """B×H×W class indices (255 = ignore) at ``size`` by nearest-neighbour sampling (PyTorch's ``mode="nearest"``,
    as the published losses do); unchanged (as int64) when already there. Float32 holds every label value 0…255
    exactly, so the round trip through float is lossless."""
    if targets.dim() != 3:
        raise ValueError(f"targets must be B×H×W class indices, got shape {tuple(targets.shape)}")
    if tuple(targets.shape[-2:]) == tuple(size):
        return targets.long()
    return F.interpolate(targets[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


__all__ = ["labels_at", "logits_to_teacher_size", "to_teacher_size"]
