"""Af-DCD: augmentation-free dense contrastive distillation (Fan et al., "Augmentation-free Dense Contrastive
Knowledge Distillation for Efficient Semantic Segmentation", NeurIPS 2023; github.com/OSVAI/Af-DCD).

Distils a backbone stage (the authors use the last one, ``c4``: 512 → 2048 channels for R18 ← R101; MobileNetV2's
320 → 2048). With f_s the student's stage map, f_t the teacher's (B×C_t×H×W; f_s resized to its size, see below):

    a   = A(f_s)                      A: a 1×1 conv C_s → C_t (the identity when the widths agree)
    y   = P(a ⊙ m)                    m ∈ {0,1}^{B×1×H×W}: the mask; P: the projector
    L_fd  = ‖y − f_t‖² / B            (a sum over channels and positions, per image)

    The mask is "centre" (0 on rows H//3 … 2H//3−1 and columns W//3 … 2W//3−1, 1 elsewhere) or "random" (each
    position is 0 with probability ``mask_ratio``: the published ``rand > 1 − ratio``). The "enhanced" projector
    is two 3×3 conv + ReLU blocks b₁, b₂ with a 3×3 adaptor each, P(x) = (a₁(b₁(x)) + a₂(b₂(b₁(x)))) / 2; the
    "plain" one is conv3×3 → ReLU → conv3×3 (all convs C_t → C_t with bias).

    Omni-contrastive term: y and f_t are max-pooled (k = stride = ``pool``) to h×w, cut into p×p patches, and the
    channels into M groups of C_t/M. Each patch gives N = p²·M vectors per map (one per position n and group g,
    index n·M + g). With s_ij = −‖y_i − t_j‖₁ (Manhattan distance between the student's vector i and the
    teacher's j of the same patch):

    L_ctr = (1 / (B·h·w)) · Σ over patches and i of  −log( exp(s_ii/τ) / Σ_{j = i or g(j) ≠ g(i)} exp(s_ij/τ) )

    i.e. the positive is the same position and group in the teacher's map, the negatives are every vector of the
    patch from another channel group (p²·(M−1) of them).

    total: ``{"afdcd_fd": λ_fd · L_fd, "afdcd_ctr": λ_ctr · L_ctr}``; the method adds KD on the logits.

Published recipe (``train_scripts/cityscape/deeplabv3_r101_deeplabv3_r18_ocmgd.sh``): λ_fd 2e-6, λ_ctr 0.005,
centre mask, enhanced projector; τ 0.07, M 16, pool 4, 4×4 patches, mask ratio 0.75 are the defaults of
``losses/ocmgd.py`` (``OmniContrastiveFeatureLoss.__init__``), KD (λ 1, τ 1) those of ``train_ocmgd.py``. The trainer
clips the gradient norm of the loss's own parameters (A and P) to 15 before each SGD step
(``train_ocmgd.py``: ``clip_grad_norm_(criterion_ocfd.parameters(), max_norm=15)``): ``clip_grad_norm`` here, done
in :meth:`before_optimizer_step`. The other scripts (Cityscapes MobileNetV2, CamVid, VOC) pass no mask or projector
flags and so run the defaults of ``train_ocmgd.py``: the random mask (ratio 0.75) and the plain projector; CamVid
λ_fd 8e-6, λ_ctr 0.01; VOC λ_fd 1e-6, λ_ctr 0.005 (the configs under ``configs/<dataset>/afdcd_*``).

Departures from the published code, and why:

- The Cityscapes R18 script writes ``--rand_mask False --enhance_projector True`` but the parser defines
  ``--rand-mask``/``--enhance-projector`` (with ``type=bool``, under which even ``--rand-mask False`` is True):
  as written, ``parse_args`` rejects the line. The recipe here is what the script evidently means (centre mask,
  enhanced projector); ``mask: random`` / ``projector: plain`` give the defaults the parser would have kept.
- CamVid: the published loss does not pool there but keeps the top-left 44×44 of the (45×45, from 360×360 crops)
  map, hard-coded by ``dataset == 'camvid'``. Here that is ``contrast_region: crop``: the top-left
  largest multiple of the patch size that fits the map, 44×44 on 360×360 crops (the published value exactly), and
  the same rule on any other crop size instead of failing. With ``contrast_region: pool`` (the default, Cityscapes,
  VOC, ADE20K) a pooled map whose sides are not multiples of the patch is cut the same way (the published view
  fails there), and a map smaller than a patch is one patch of its own size (tiny test images); a map smaller
  than the pool (a transformer's 1/32 stage on tiny images) is pooled by its own size instead of failing.
- Equal student and teacher widths: the published module never creates its 1×1 connector then and fails at the
  first call; here A is the identity.
- The cross-entropy over [positive, negatives] is computed as logsumexp over the allowed entries of the p²M×p²M
  similarity matrix minus the positive (same value, no gather of the negatives into a new matrix).

Maps of other sizes: the student's backbone stage is resized to the teacher's h×w (bilinear, align_corners=False)
before the 1×1 connector A (a transformer's last stage is at 1/32, a dilated CNN's at 1/8), which maps the widths.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.segmentor import SegOutput
from .base import DistillLoss, check_non_negative, check_positive, register_loss
from ._numerics import no_autocast
from ._spatial import to_teacher_size


class EnhancedProjector(nn.Module):
    """(a₁(b₁(x)) + a₂(b₂(b₁(x)))) / 2 with b_k = ReLU∘conv3×3 and a_k = conv3×3 (the paper's projector)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.block_2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.adaptor_1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.adaptor_2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.block_1(x)
        x2 = self.block_2(x1)
        return (self.adaptor_1(x1) + self.adaptor_2(x2)) / 2.0


def plain_projector(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1))


def centre_mask(b: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """B×1×H×W ones with the centre third (rows H//3…2H//3−1, columns W//3…2W//3−1) zeroed."""
    m = torch.ones(b, 1, h, w, device=device, dtype=dtype)
    m[:, :, h // 3: 2 * h // 3, w // 3: 2 * w // 3] = 0
    return m


def random_mask(b: int, h: int, w: int, ratio: float, device: torch.device, dtype: torch.dtype,
                generator: torch.Generator | None = None) -> Tensor:
    """Each position 0 with probability ``ratio`` (the published ``rand > 1 − ratio``), else 1."""
    u = torch.rand((b, 1, h, w), device=device, generator=generator)
    return (u <= 1 - ratio).to(dtype)


def contrast_region(x: Tensor, region: str, pool: int, patch: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """The map the contrastive term sees (pooled or cropped, cut to whole patches) and the patch size used."""
    if region == "pool" and pool > 1:
        kernel = (min(pool, x.shape[-2]), min(pool, x.shape[-1]))  # a map smaller than the pool: its own size
        x = F.max_pool2d(x, kernel)
    h, w = x.shape[-2:]
    ph, pw = min(patch[0], h), min(patch[1], w)
    return x[..., : h - h % ph, : w - w % pw], (ph, pw)


def to_groups(x: Tensor, groups: int, patch: tuple[int, int]) -> Tensor:
    """B×C×H×W → (B·patches)×(p_h·p_w·M)×(C/M): per patch, one vector per position n and channel group g, at index
    n·M + g (positions row-major within the patch, patches row-major over the map)."""
    b, c, h, w = x.shape
    ph, pw = patch
    x = x.reshape(b, groups, c // groups, h // ph, ph, w // pw, pw)
    x = x.permute(0, 3, 5, 4, 6, 1, 2)  # B, H/p, W/p, p_h, p_w, M, C/M
    return x.reshape(b * (h // ph) * (w // pw), ph * pw * groups, c // groups)


def omni_contrastive_loss(student: Tensor, teacher: Tensor, groups: int, temperature: float,
                          patch: tuple[int, int] = (4, 4)) -> Tensor:
    """Σ over rows of the InfoNCE with −L1 similarities (see the module docstring), divided by B·h·w, for maps
    already pooled/cropped to whole patches."""
    b, _, h, w = student.shape
    zs, zt = to_groups(student, groups, patch), to_groups(teacher, groups, patch)
    logits = -torch.cdist(zs, zt, p=1) / temperature  # P×N×N
    n = zs.shape[1]
    group = torch.arange(n, device=student.device) % groups
    same_group = group[:, None] == group[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=student.device)
    excluded = same_group & ~eye  # positives of other positions in the same group are neither positive nor negative
    lse = torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=-1)
    positives = torch.diagonal(logits, dim1=-2, dim2=-1)
    return (lse - positives).sum() / (b * h * w)


@register_loss("afdcd")
class AfDCDLoss(DistillLoss):
    """``{"afdcd_fd": λ_fd · L_fd, "afdcd_ctr": λ_ctr · L_ctr}`` on backbone stage ``stage`` (1-based: 4 = c4)."""

    uses_stages: ClassVar[bool] = True

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        student_stage_channels: tuple[int, ...],
        teacher_stage_channels: tuple[int, ...],
        stage: int = 4,
        lambda_fd: float = 2e-6,
        lambda_ctr: float = 0.005,
        temperature: float = 0.07,
        groups: int = 16,
        pool: int = 4,
        patch: int = 4,
        mask: str = "centre",
        mask_ratio: float = 0.75,
        projector: str = "enhanced",
        contrast_region: str = "pool",
        clip_grad_norm: float = 15.0,
    ) -> None:
        super().__init__()
        check_non_negative(lambda_fd=lambda_fd, lambda_ctr=lambda_ctr, clip_grad_norm=clip_grad_norm)
        check_positive(temperature=temperature)
        n_stages = min(len(student_stage_channels), len(teacher_stage_channels))
        if not 1 <= stage <= n_stages:
            raise ValueError(f"stage must be one of 1…{n_stages} (the backbones' stages c1…c{n_stages}), got {stage}")
        cs, ct = int(student_stage_channels[stage - 1]), int(teacher_stage_channels[stage - 1])
        if groups < 1 or ct % groups:
            raise ValueError(f"groups (M) must divide the teacher's stage-{stage} channels ({ct}), got {groups}")
        if pool < 1:
            raise ValueError(f"pool must be ≥ 1 (1 = no pooling), got {pool}")
        if patch < 1:
            raise ValueError(f"patch must be ≥ 1, got {patch}")
        if mask not in ("centre", "random"):
            raise ValueError(f"mask must be 'centre' or 'random', got {mask!r}")
        if not 0 <= mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        if projector not in ("enhanced", "plain"):
            raise ValueError(f"projector must be 'enhanced' or 'plain', got {projector!r}")
        if contrast_region not in ("pool", "crop"):
            raise ValueError(f"contrast_region must be 'pool' or 'crop' (CamVid's published crop), got "
                             f"{contrast_region!r}")
        self.stage = int(stage)
        self.lambda_fd, self.lambda_ctr = float(lambda_fd), float(lambda_ctr)
        self.temperature, self.groups = float(temperature), int(groups)
        self.pool, self.patch = int(pool), (int(patch), int(patch))
        self.mask, self.mask_ratio = mask, float(mask_ratio)
        self.contrast_region = contrast_region
        self.clip_grad_norm = float(clip_grad_norm)
        self.align: nn.Module = nn.Conv2d(cs, ct, 1) if cs != ct else nn.Identity()
        self.projector: nn.Module = EnhancedProjector(ct) if projector == "enhanced" else plain_projector(ct)

    def make_mask(self, like: Tensor) -> Tensor:
        b, _, h, w = like.shape
        if self.mask == "centre":
            return centre_mask(b, h, w, like.device, like.dtype)
        return random_mask(b, h, w, self.mask_ratio, like.device, like.dtype)

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        if not student.stages or not teacher.stages:
            raise ValueError("afdcd needs the backbone stages (SegOutput.stages)")
        ft = teacher.stages[self.stage - 1].detach()
        fs = to_teacher_size(student.stages[self.stage - 1], ft)
        if fs.shape[0] != ft.shape[0] or fs.shape[-2:] != ft.shape[-2:]:
            raise ValueError(f"afdcd needs student and teacher stage maps of one batch and spatial size, got "
                             f"{tuple(fs.shape)} and {tuple(ft.shape)}")
        a = self.align(fs)
        y = self.projector(a * self.make_mask(a))
        with no_autocast(y):
            dtype = torch.promote_types(torch.promote_types(y.dtype, ft.dtype), torch.float32)
            y, t = y.to(dtype), ft.to(dtype)
            b = y.shape[0]
            fd = (y - t).square().sum() / b
            ys, region_patch = contrast_region(y, self.contrast_region, self.pool, self.patch)
            ts, _ = contrast_region(t, self.contrast_region, self.pool, self.patch)
            ctr = omni_contrastive_loss(ys, ts, self.groups, self.temperature, region_patch)
        return {"afdcd_fd": self.lambda_fd * fd, "afdcd_ctr": self.lambda_ctr * ctr}

    def before_optimizer_step(self) -> None:
        """The published trainer clips the gradient norm of the connector and projector to 15 before each step."""
        if self.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm=self.clip_grad_norm, norm_type=2)


__all__ = ["AfDCDLoss", "EnhancedProjector", "centre_mask", "contrast_region", "omni_contrastive_loss",
           "plain_projector", "random_mask", "to_groups"]
