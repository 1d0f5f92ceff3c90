"""CSKD (Karine et al., Pattern Recognition Letters 2024): align the student's and the teacher's channel- and
position-attended feature maps by CKA across the batch.

    L_CAM = −log CKA(CAM(F_s), CAM(F_t)),    L_PAM = mean over grid blocks b of −log CKA(PAM(F_s^b), PAM(F_t^b))

with CAM / PAM as in :mod:`.attention`, CKA as in :mod:`.cka`, F the segmentors' ``features`` (the head's map
before its classifier). The published recipe (Cityscapes, CamVid, VOC alike) weights them λ_cam = 0.3,
λ_pam = 0.8 at τ_sa = 2 on a 5×5 grid, and adds CWD on the logits (λ = 3, τ = 2): list the registered ``cwd``
loss beside ``cskd`` in the config for the full method. The engine adds the cross-entropy terms.

Faithful to the published code: γ_cam and γ_pam start at 0 and are each *shared* by the student and the teacher
branch, so γ is trained through both (the teacher's features are constants, but γ·context + F_t depends on γ);
grid blocks follow ``torch.chunk`` (5 row chunks, then 5 column chunks of each, ragged last ones); the term is
−log(|CKA| + 1e-8).

PAM projections (``pam_projection``). The published code builds W_q, W_k, W_v as new, randomly initialised 1×1
convolutions at every call — for every grid block, separately for the student and the teacher — so they are never
learned and the loss is a fresh random-projection estimate at every step:

- ``resample`` (default; the paper's numbers come from it): the same thing, drawn on the device with one
  ``torch.rand`` per side and step, from PyTorch's default Conv2d init, independently per block. Reproducible
  through the global RNG seed.
- ``fixed``: one set per side drawn once from ``projection_seed`` (shared by all blocks), stored as buffers and
  so saved with the loss's state.
- ``learned``: the same initial draw as ``fixed``, but as parameters optimised with the student.

Ablations: ``lambda_cam = 0`` / ``lambda_pam = 0`` switch a branch off (CAM-only / PAM-only), skipping its compute
and leaving out its γ; ``pam_grid = 1`` is whole-map PAM (its N×N attention is big: 8192² per sample at 512×1024);
``similarity = "mse"`` replaces −log CKA with mean squared error between the attended maps, as the published
CAM_MSE / gridPAM_MSE variants, after a 1×1 connector from the student's width to the teacher's. The published code
builds that connector randomly at every call too; here it is a learned ``nn.Conv2d(Cs, Ct, 1, bias=False)``
(none when the widths agree), shared by both branches as there.

``cka_scope = "global"`` computes CKA over the batch of all data-parallel ranks (samples gathered with a
differentiable all_gather) instead of each device's own batch.

Maps of other sizes: the student's features are resized to the teacher's h×w (bilinear, align_corners=False) before
the connector and both terms. CAM (C×C channel attention) and CKA (per-sample Gram matrices over the batch) are
width- and size-free, but PAM's 5×5 grid blocks must cover the same image regions in both maps, so one resize serves
both terms; widths need no projection under CKA (the MSE ablation's connector maps them).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import gather_samples, world_size
from ..errors import ConfigError
from ..models.segmentor import SegOutput
from ._numerics import compute_dtype, no_autocast
from ._spatial import to_teacher_size
from .attention import (
    BlockGroup,
    Projections,
    cam_context,
    draw_projections,
    grid_groups,
    grid_tokens,
    pam_context,
    query_channels,
)
from .base import DistillLoss, check_non_negative, check_positive, register_loss
from .cka import cka_from_grams, neg_log_cka, residual_gram

Similarity = Literal["cka", "mse"]
ProjectionMode = Literal["resample", "fixed", "learned"]
CkaScope = Literal["device", "global"]


@register_loss("cskd")
class CSKDLoss(DistillLoss):
    """CSKD's CAM and grid-PAM terms; returns ``{"cam": λ_cam·L_CAM, "pam": λ_pam·L_PAM}`` (a switched-off branch
    is absent). See the module docstring for the options."""

    #: CKA across samples carries no signal below 3 samples per device. Instances with ``similarity = "mse"`` or
    #: ``cka_scope = "global"`` (3 over all ranks, checked in forward) set 1.
    min_batch_per_device: ClassVar[int] = 3

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        lambda_cam: float = 0.3,
        lambda_pam: float = 0.8,
        temperature: float = 2.0,
        similarity: Similarity = "cka",
        pam_grid: int = 5,
        pam_projection: ProjectionMode = "resample",
        projection_seed: int = 0,
        cka_scope: CkaScope = "device",
    ) -> None:
        super().__init__()
        check_non_negative(lambda_cam=lambda_cam, lambda_pam=lambda_pam)  # 0 switches a branch off
        if lambda_cam == 0 and lambda_pam == 0:
            raise ValueError("lambda_cam and lambda_pam are both 0: nothing to compute; leave the 'cskd' loss out")
        check_positive(temperature=temperature)
        if pam_grid < 1:
            raise ValueError(f"pam_grid must be ≥ 1 (1 = whole-map PAM), got {pam_grid}")
        if similarity == "mse" and cka_scope == "global":
            raise ValueError("cka_scope 'global' only applies to similarity 'cka' (MSE compares samples one by one)")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.lambda_cam = float(lambda_cam)
        self.lambda_pam = float(lambda_pam)
        self.temperature = float(temperature)
        self.similarity = similarity
        self.pam_grid = pam_grid
        self.pam_projection = pam_projection
        self.cka_scope = cka_scope
        if similarity == "mse" or cka_scope == "global":
            # Per instance, as it depends on the options: MSE compares samples one by one, and global CKA needs
            # 3 samples over all ranks together (checked in forward).
            self.min_batch_per_device = 1  # type: ignore[misc]
        # MSE compares maps element by element, so the student's map is first brought to the teacher's width.
        mse_connector = similarity == "mse" and student_channels != teacher_channels
        self.connector = nn.Conv2d(student_channels, teacher_channels, 1, bias=False) if mse_connector else None
        pam_student_channels = teacher_channels if similarity == "mse" else student_channels

        if self.lambda_cam > 0:
            self.gamma_cam = nn.Parameter(torch.zeros(()))
        if self.lambda_pam > 0:
            for side, c in (("student", pam_student_channels), ("teacher", teacher_channels)):
                if query_channels(c) < 1:
                    raise ValueError(f"PAM needs ≥ 8 {side} channels (C // 8 query channels), got {c}")
            self.gamma_pam = nn.Parameter(torch.zeros(()))
            self._pam_channels = {"student": pam_student_channels, "teacher": teacher_channels}
            if pam_projection != "resample":
                gen = torch.Generator().manual_seed(projection_seed)
                for side in ("student", "teacher"):
                    proj = draw_projections(self._pam_channels[side], generator=gen)
                    for part in ("weight", "bias"):
                        value = getattr(proj, part).clone(memory_format=torch.contiguous_format)
                        if pam_projection == "learned":
                            self.register_parameter(f"pam_{side}_{part}", nn.Parameter(value))
                        else:
                            self.register_buffer(f"pam_{side}_{part}", value)

    def batch_requirement(self) -> tuple[int, str]:
        if self.similarity == "cka" and self.cka_scope == "global":
            return 3, "global"
        return self.min_batch_per_device, "device"

    # ------------------------------------------------------------------------------------------------- forward

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        ft = teacher.features.detach()
        fs = to_teacher_size(student.features, ft)  # PAM's grid blocks must cover the same image regions
        self._check_inputs(fs, ft)
        if self.connector is not None:
            fs = self.connector(fs)
        out: dict[str, Tensor] = {}
        if self.lambda_cam > 0:
            out["cam"] = self.lambda_cam * self.cam_loss(fs, ft)
        if self.lambda_pam > 0:
            out["pam"] = self.lambda_pam * self.pam_loss(fs, ft)
        return out

    def cam_loss(self, fs: Tensor, ft: Tensor) -> Tensor:
        """Unweighted CAM term for student features ``fs`` (already through the connector for MSE) and teacher
        features ``ft``, both B×C×H×W."""
        gamma = self.gamma_cam
        xs = fs.flatten(2)
        ms = cam_context(xs, self.temperature)
        with torch.no_grad():
            xt = ft.flatten(2)
            mt = cam_context(xt, self.temperature)
        if self.similarity == "mse":
            return _mse(ms, xs, mt, xt, gamma).mean()
        gather = gather_samples if self.cka_scope == "global" else None
        ks = residual_gram(ms.flatten(1), xs.flatten(1), gamma, gather)
        kt = residual_gram(mt.flatten(1), xt.flatten(1), gamma, gather)
        return neg_log_cka(cka_from_grams(ks, kt))

    def pam_loss(self, fs: Tensor, ft: Tensor) -> Tensor:
        """Unweighted grid-PAM term: the mean over the grid's blocks of the per-block term. Blocks of equal shape
        are stacked and scored together (at most 4 groups)."""
        groups = grid_groups(fs.shape[2], fs.shape[3], self.pam_grid)
        proj_s = self._projections("student", groups, fs)
        proj_t = self._projections("teacher", groups, fs)
        learned = self.pam_projection == "learned"
        gather = gather_samples if self.cka_scope == "global" else None
        gamma = self.gamma_pam
        mse_per_block: list[Tensor] = []
        grams_s: list[Tensor] = []
        grams_t: list[Tensor] = []
        tokens_s = grid_tokens(fs, groups)
        with torch.no_grad():
            tokens_t = grid_tokens(ft, groups)
        for xs, xt, ps, pt in zip(tokens_s, tokens_t, proj_s, proj_t):
            ms = pam_context(xs, ps, self.temperature)
            # The teacher's context is a constant unless its projections are learned.
            with torch.set_grad_enabled(learned and torch.is_grad_enabled()):
                mt = pam_context(xt, pt, self.temperature)
            if self.similarity == "mse":
                mse_per_block.append(_mse(ms, xs, mt, xt, gamma).mean((1, 2, 3)))
            else:
                grams_s.append(residual_gram(ms.flatten(2), xs.flatten(2), gamma, gather))
                grams_t.append(residual_gram(mt.flatten(2), xt.flatten(2), gamma, gather))
        if self.similarity == "mse":
            return torch.cat(mse_per_block).mean()
        # The B×B Grams of all 25 blocks share one shape whatever the block sizes: one CKA call scores them.
        return neg_log_cka(cka_from_grams(torch.cat(grams_s), torch.cat(grams_t))).mean()

    # ------------------------------------------------------------------------------------------------- helpers

    def _projections(self, side: str, groups: list[BlockGroup], like: Tensor) -> list[Projections]:
        """One :class:`Projections` per group: per-block fresh draws (``resample``) or the stored set."""
        if self.pam_projection != "resample":
            stored = Projections(getattr(self, f"pam_{side}_weight"), getattr(self, f"pam_{side}_bias"))
            return [stored] * len(groups)
        counts = [g.count for g in groups]
        drawn = draw_projections(self._pam_channels[side], sum(counts), device=like.device)
        return [Projections(w, b) for w, b in zip(drawn.weight.split(counts), drawn.bias.split(counts))]

    def _check_inputs(self, fs: Tensor, ft: Tensor) -> None:
        if fs.dim() != 4 or ft.dim() != 4:
            raise ValueError(f"cskd: features must be B×C×H×W, got student {tuple(fs.shape)} and teacher "
                             f"{tuple(ft.shape)}")
        if fs.shape[0] != ft.shape[0] or fs.shape[2:] != ft.shape[2:]:
            raise ValueError(f"cskd: student features {tuple(fs.shape)} and teacher features {tuple(ft.shape)} "
                             "must share batch size and spatial size")
        if fs.shape[1] != self.student_channels or ft.shape[1] != self.teacher_channels:
            raise ValueError(f"cskd: built for {self.student_channels} student / {self.teacher_channels} teacher "
                             f"channels, got {fs.shape[1]} / {ft.shape[1]}")
        if self.similarity == "cka":
            ranks = world_size() if self.cka_scope == "global" else 1
            if fs.shape[0] * ranks < 3:
                where = "each device's batch" if ranks == 1 else f"the batch of all {ranks} ranks"
                raise ConfigError(
                    f"cskd: CKA compares the samples of {where} and needs at least 3 of them (with 2 it is "
                    f"identically 1, with 1 undefined); got {fs.shape[0] * ranks}. Raise the per-device batch size "
                    "(the published recipe uses 8) and drop the last incomplete batch."
                )


def _mse(ms: Tensor, xs: Tensor, mt: Tensor, xt: Tensor, gamma: Tensor) -> Tensor:
    """Element-wise squared difference of γ·ms + xs and γ·mt + xt, in float32 or wider."""
    with no_autocast(xs):
        dtype = compute_dtype(ms, xs, mt, xt)
        gamma = gamma.to(dtype)
        ys = xs.to(dtype) + gamma * ms.to(dtype)
        yt = xt.to(dtype) + gamma * mt.to(dtype)
        return F.mse_loss(ys, yt, reduction="none")


__all__ = ["CSKDLoss", "CkaScope", "ProjectionMode", "Similarity"]
