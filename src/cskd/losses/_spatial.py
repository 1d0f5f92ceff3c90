"""Bringing a student map to the teacher's spatial size, for losses whose maps may differ in size."""

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


__all__ = ["to_teacher_size"]
