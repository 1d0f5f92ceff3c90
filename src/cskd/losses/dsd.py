"""DSD, double similarity distillation (Feng et al., "Double Similarity Distillation for Semantic Image
Segmentation", IEEE TIP 2021), as the CSKD and CIRKD repositories ship it (``losses/dsd.py``, identical in both).

Two terms on a model's maps, all at 1/8 of the input:

- **Pixel similarity** (``dsd_pixel``, the published PSD) on the list of maps [aux logits, head features, logits]
  (CIRKD ``train_kd.py`` lines 356–361: ``[outputs[-2], outputs[-1], outputs[0]]`` of a model returning
  [logits, aux logits, features]). Each map f (B×C×h×w) becomes a spatial attention
  vector a = normalise(mean_c f²) ∈ ℝ^{h·w} (L2 over positions); each pair n < m of the list gives a residual
  r = normalise(a_m − a_n); with R the number of pairs (3),
  L_psd = 1/R Σ_pairs mean over B·h·w of (normalise(r_s) − normalise(r_t))².
- **Category similarity** (``dsd_category``, the published CSD) on the logits: 2×2 average pooling (ceil mode),
  each class map becomes a distribution over positions, q = softmax(z/τ) with τ = 4, the class-by-class Gram
  G = q qᵀ (K×K per image), and L_csd = mean over B·K·K of (G_s − G_t)².

normalise(·) is x / max(‖x‖, 1e-12), as ``F.normalize``. ``forward`` returns
``{"dsd_pixel": lambda_pixel · L_psd, "dsd_category": lambda_category · L_csd}``.

Published recipe (github.com/winycg/CIRKD, ``scripts/train_kd/train_dsd.sh``: ``--lambda-psd 1000. --lambda-csd
10.``, DeepLabV3-R101 → DeepLabV3-R18 and → DeepLabV3-MobileNetV2 on Cityscapes; ``train_kd.py``'s other λ,
pixel-wise KD included, default to 0): λ_pixel 1000, λ_category 10, DSD alone. These are the defaults.

Differences from the published code, and why:

- A student without an aux head (MobileNetV2): the published list for such a student is ``[outputs[-2], ...]`` of a
  two-element output, i.e. [logits, features, logits], compared against the teacher's [aux logits, features,
  logits] — the first pair contrasts different maps, and the (logits − logits) residual is zero. Here
  (``missing_aux = "drop"``, the default) both lists become [features, logits] (one pair) when either model lacks
  aux logits; ``missing_aux = "published"`` keeps the published substitution of the student's logits for its aux
  logits (the teacher keeps its aux logits).
- The ``.cuda()`` accumulator of the published PSD is gone (the loss runs on any device).
- Maps of different spatial size: the student's attention map (mean_c f², before its normalisation) and the
  student's logits (before pooling) are resized to the teacher's size (bilinear, align_corners=False). The
  published code assumes equal sizes. Channel counts may differ (the attention is a channel mean; the logits agree).
- Float32 (float64 inputs stay float64) outside autocast.

Maps of other sizes: each student attention map and the student's logits are resized to the teacher's h×w (bilinear,
align_corners=False); attention is a channel reduction (width-free); the logits' class counts must agree.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.segmentor import SegOutput
from ._spatial import logits_to_teacher_size, to_teacher_size
from .base import DistillLoss, check_non_negative, check_positive, register_loss
from ._numerics import compute_dtype, no_autocast


def _attention(f: Tensor) -> Tensor:
    """mean over channels of f², B×1×h×w."""
    return f.pow(2).mean(dim=1, keepdim=True)


def pixel_similarity(student_maps: list[Tensor], teacher_maps: list[Tensor]) -> Tensor:
    """L_psd for two equally long lists of B×C×h×w maps (≥ 2 each; channel counts may differ)."""
    if len(student_maps) != len(teacher_maps) or len(student_maps) < 2:
        raise ValueError(f"DSD's pixel similarity needs two lists of ≥ 2 maps of one length, got "
                         f"{len(student_maps)} and {len(teacher_maps)}")
    with no_autocast(student_maps[0]):
        dtype = compute_dtype(*student_maps, *teacher_maps)
        a_t = [_attention(t.detach().to(dtype)) for t in teacher_maps]
        a_s = [to_teacher_size(_attention(s.to(dtype)), t) for s, t in zip(student_maps, a_t)]
        a_s = [F.normalize(a.flatten(1), dim=1) for a in a_s]
        a_t = [F.normalize(a.flatten(1), dim=1) for a in a_t]
        terms = []
        for n in range(len(a_s) - 1):
            for m in range(n + 1, len(a_s)):
                r_s = F.normalize(F.normalize(a_s[m] - a_s[n], dim=1), dim=1)
                r_t = F.normalize(F.normalize(a_t[m] - a_t[n], dim=1), dim=1)
                terms.append((r_s - r_t).square().mean())
        return torch.stack(terms).mean()


def category_similarity(student: Tensor, teacher: Tensor, temperature: float = 4.0, pool: int = 2) -> Tensor:
    """L_csd for B×K×h×w logits (the student's resized to the teacher's size first)."""
    student = logits_to_teacher_size(student, teacher, "DSD's category similarity")
    if student.shape != teacher.shape:
        raise ValueError(f"DSD's category similarity needs logits of one shape, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    with no_autocast(student):
        dtype = compute_dtype(student, teacher)

        def gram(z: Tensor) -> Tensor:
            if pool > 1:
                z = F.avg_pool2d(z, kernel_size=pool, stride=pool, ceil_mode=True)
            q = torch.softmax(z.flatten(2) / temperature, dim=-1)
            return torch.bmm(q, q.mT)

        return (gram(student.to(dtype)) - gram(teacher.detach().to(dtype))).square().mean()


@register_loss("dsd")
class DSDLoss(DistillLoss):
    """``{"dsd_pixel": λ_pixel·L_psd, "dsd_category": λ_category·L_csd}``; a term at weight 0 is not computed."""

    needs_teacher_aux = True

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        lambda_pixel: float = 1000.0,
        lambda_category: float = 10.0,
        temperature: float = 4.0,
        pool: int = 2,
        missing_aux: Literal["drop", "published"] = "drop",
    ) -> None:
        super().__init__()
        check_non_negative(lambda_pixel=lambda_pixel, lambda_category=lambda_category)
        if lambda_pixel == lambda_category == 0:
            raise ValueError("lambda_pixel and lambda_category are both 0: the loss would do nothing")
        check_positive(temperature=temperature, pool=pool)
        if missing_aux not in ("drop", "published"):
            raise ValueError(f"missing_aux must be 'drop' or 'published', got {missing_aux!r}")
        self.lambda_pixel = float(lambda_pixel)
        self.lambda_category = float(lambda_category)
        self.temperature = float(temperature)
        self.pool = int(pool)
        self.missing_aux = missing_aux

    def _maps(self, student: SegOutput, teacher: SegOutput) -> tuple[list[Tensor], list[Tensor]]:
        s_aux, t_aux = student.aux_logits, teacher.aux_logits
        if s_aux is None and t_aux is not None and self.missing_aux == "published":
            s_aux = student.logits
        if s_aux is None or t_aux is None:
            return [student.features, student.logits], [teacher.features, teacher.logits]
        return [s_aux, student.features, student.logits], [t_aux, teacher.features, teacher.logits]

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.lambda_pixel > 0:
            s_maps, t_maps = self._maps(student, teacher)
            terms["dsd_pixel"] = self.lambda_pixel * pixel_similarity(s_maps, t_maps)
        if self.lambda_category > 0:
            terms["dsd_category"] = self.lambda_category * category_similarity(
                student.logits, teacher.logits.detach(), self.temperature, self.pool)
        return terms


__all__ = ["DSDLoss", "category_similarity", "pixel_similarity"]
