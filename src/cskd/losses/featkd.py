"""Feature KD: plain regression of the student's feature map onto the teacher's through a learned projection, the
"feature KD" baseline of the 2026 budget-matched study (arXiv 2604.25530), so its claim (strongest at equal
wall-clock) can be checked in this engine.

    L = mean over B·C_t·h·w of (W * up(f_s) − f_t)²

``f_s``, ``f_t`` are the segmentors' head features (``SegOutput.features``, the map before the final classifier);
W is a learned 1×1 convolution C_s→C_t without bias (PyTorch's default initialisation), optimised with the student;
up(·) resizes the student's map to the teacher's spatial size (bilinear, align_corners=False) when they differ.
The study's description gives no weight; the default is 1 (plain MSE), and ``weight`` scales it.

How this differs from ``fitnet`` (:mod:`cskd.losses.fitnet`), whose connector and regression it shares by
subclassing: the ``featkd`` method is this term alone, weight 1, no logit KD; the ``fitnet`` method is CIRKD's
FitNet recipe (pixel-wise KD on the logits + this regression at weight 10). Both resize a student map of another
spatial size to the teacher's (the package's rule, :mod:`cskd.losses._spatial`).

Maps of other sizes: as FitNet's, the student's features resized to the teacher's h×w (bilinear,
align_corners=False), then the 1×1 connector.
"""

from __future__ import annotations

from torch import Tensor

from ..models.segmentor import SegOutput
from ._spatial import to_teacher_size
from .base import register_loss
from .fitnet import FitNetLoss


@register_loss("featkd")
class FeatureKDLoss(FitNetLoss):
    """``{"featkd": weight · MSE(connector(resized student features), teacher features)}``."""

    def __init__(self, *, student_channels: int, teacher_channels: int, num_classes: int,
                 weight: float = 1.0) -> None:
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels,
                         num_classes=num_classes, weight=weight)

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        ft = teacher.features.detach()
        resized = SegOutput(student.logits, student.aux_logits, to_teacher_size(student.features, ft))
        return {"featkd": super().forward(resized, teacher)["fitnet"]}


__all__ = ["FeatureKDLoss"]
