"""FitNet: hint-based feature regression (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), on the
segmentation head's feature maps.

A learned 1×1 convolution (no bias) maps the student's C_s channels to the teacher's C_t; the loss is the mean
squared error to the teacher's map:

    L = mean over B·C_t·h·w of (W * f_s − f_t)²

The connector is a parameter of this loss and is optimised with the student (the engine puts loss parameters in
the optimiser); it exists only for training.

Published recipe (github.com/winycg/CIRKD, train_scripts/train_kd/train_fitnet.sh, Cityscapes): weight 10 on this
term, plus pixel-wise KD (weight 1, τ = 1); connector with PyTorch's default Conv2d initialisation.

Maps of other sizes: the student's features are resized to the teacher's h×w (bilinear, align_corners=False) before
the 1×1 connector, which maps the widths.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..models.segmentor import SegOutput
from ._numerics import compute_dtype, no_autocast
from ._spatial import to_teacher_size
from .base import DistillLoss, check_non_negative, register_loss


@register_loss("fitnet")
class FitNetLoss(DistillLoss):
    """``{"fitnet": weight · MSE(connector(student features), teacher features)}``."""

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        weight: float = 10.0,
    ) -> None:
        super().__init__()
        check_non_negative(weight=weight)
        if student_channels < 1 or teacher_channels < 1:
            raise ValueError(f"channel counts must be ≥ 1, got student {student_channels}, teacher {teacher_channels}")
        self.weight = float(weight)
        self.connector = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        ft = teacher.features.detach()
        fs = to_teacher_size(student.features, ft)
        if fs.shape[0] != ft.shape[0] or fs.shape[-2:] != ft.shape[-2:]:
            raise ValueError(f"FitNet needs student and teacher maps of one batch and spatial size, got "
                             f"{tuple(fs.shape)} and {tuple(ft.shape)}")
        # The 1×1 convolution follows the ambient precision (autocast); the regression error is taken in float32.
        hint = self.connector(fs)
        with no_autocast(hint):
            dtype = compute_dtype(hint, ft)
            loss = (hint.to(dtype) - ft.to(dtype)).square().mean()
        return {"fitnet": self.weight * loss}


__all__ = ["FitNetLoss"]
