"""Holistic adversarial distillation (Liu et al., SKD, CVPR 2019; used by SKD and IFVD): a discriminator learns to
tell the teacher's logit maps from the student's, and the student learns to fool it.

The discriminator D is the SAGAN-style network of the CIRKD/CSKD repositories (``utils/sagan.py``): BatchNorm over
the K class channels (SyncBatchNorm under DDP with ``train.sync_bn``, as published), four spectral-normalised 4×4
stride-2 convs (K → 64 → 128 → 256 → 512, LeakyReLU 0.1) with a self-attention block after the third and the
fourth, and a plain 4×4 conv to one channel. Spectral norm is the published one: one power iteration per forward
(u ← Wv/‖Wv‖ after v ← Wᵀu/‖Wᵀu‖, no gradient through u and v), W/σ with σ = uᵀWv; self-attention is
x + γ·V·softmax(QᵀK)ᵀ with Q, K of C/8 channels and γ starting at 0. With z_s, z_t the student's and teacher's logits
(stride 8) and the hinge loss (``losses/adv.py``):

    student (in its own loss):       L_adv = λ_adv · (−mean D(z_s))
    discriminator (its own Adam):    L_d   = λ_d · (mean relu(1 − D(z_t)) + mean relu(1 + D(sg(z_s))))

Published recipe (CIRKD ``scripts/train_kd/train_skd.sh`` and ``train_ifvd.sh``, Cityscapes): λ_adv 0.001, λ_d 0.1;
``train_kd.py`` builds ``Adam(D.parameters(), 4e-4, [0.9, 0.99])`` (constant learning rate, no weight decay) and,
per iteration, computes L_adv (D on z_s) and then L_d (D on sg(z_s), then on z_t) from the one forward, steps the
student, then zeroes D's gradients, back-propagates L_d and steps D. cskd does the same through the engine's
auxiliary-optimiser protocol (:mod:`cskd.engine.auxiliary`): ``forward`` gives L_adv, :meth:`auxiliary_loss` gives
L_d after the student's step — D's weights do not change in between, so the values are the published ones, and the
three D calls update the power-iteration vectors in the published order.

Departures from the published code, and why:

- DDP: the published trainer wraps D in its own DDP and calls it three times per backward (twice for a backward
  that DDP does not expect); here D is left out of the student's DDP and its gradients are averaged over the
  processes by the engine after L_d's backward, so every process keeps the same D.
- Maps smaller than 64×64 (inputs under 512 px at stride 8, e.g. CamVid's 360×360 crops: 45×45 logits) are too
  small for the four stride-2 convs and the final 4×4 conv, and the published D fails on them. Here they are
  zero-padded (after the BatchNorm, i.e. at the normalised mean) at the bottom and right to 64 in the short side(s);
  Cityscapes (64×128) and VOC (64×64) are unchanged.
- Spectral norm's power-iteration vectors: the published module updates them with ``u.data = …``, which autograd
  does not see; D runs three times before its backward (and the student's), so the σ term of D's weight gradient
  from the first two calls is evaluated with the third call's vectors. Here each call's graph keeps its own vectors
  (``spectral_vectors: held``, the default); ``spectral_vectors: published`` reproduces the published gradients
  (they differ in the last digits, enough to flip the sign of Adam's first step on near-zero gradients). Forward
  values, the student's gradient and the vectors themselves are the same either way.
- The published spectral-norm starts u, v from unit Gaussians; PyTorch's ``spectral_norm`` runs 15 extra power
  iterations at construction, so it is not used.
- D's step runs in float32 outside autocast (no loss scaling), whatever ``train.amp`` is.

Maps of other sizes: the student's logits are resized to the teacher's h×w (bilinear, align_corners=False) before
the discriminator, in the generator and in the discriminator term; the class counts must agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from ..models.segmentor import SegOutput
from ._spatial import logits_to_teacher_size
from .base import DistillLoss, check_non_negative, check_positive, register_loss

#: The smallest map side the discriminator takes: four stride-2 convs (÷16) and a 4×4 conv without padding.
MIN_SIDE = 64


def _l2normalize(v: Tensor, eps: float = 1e-12) -> Tensor:
    return v / (v.norm() + eps)


class SpectralNormConv2d(nn.Module):
    """A conv whose weight is divided by its largest singular value, estimated by one power iteration per call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())
        height, width = out_channels, in_channels * kernel_size * kernel_size
        self.register_buffer("u", _l2normalize(torch.randn(height)))
        self.register_buffer("v", _l2normalize(torch.randn(width)))
        self.published_vectors = False

    @torch.compiler.disable  # buffer updates, kept out of a compiled graph (run eagerly under torch.compile)
    @torch.no_grad()
    def power_iteration(self) -> None:
        """One step: v ← Wᵀu/‖Wᵀu‖, u ← Wv/‖Wv‖ (no gradient through u and v)."""
        mat = self.weight.detach().reshape(self.weight.shape[0], -1).to(self.u.dtype)
        v = _l2normalize(mat.mT @ self.u)
        u = _l2normalize(mat @ v)
        if self.published_vectors:
            # The published ``u.data = ...``: no version bump, so a graph built by an earlier call sees the new
            # vectors in its backward.
            self.v.data = v
            self.u.data = u
        else:  # new tensors: each call's graph keeps the vectors it used
            self.v = v
            self.u = u

    def normalised_weight(self) -> Tensor:
        if self.training:
            self.power_iteration()
        w = self.weight
        mat = w.reshape(w.shape[0], -1)
        sigma = self.u.to(mat.dtype) @ (mat @ self.v.to(mat.dtype))
        return w / sigma

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.normalised_weight(), self.bias, self.stride, self.padding)


class SelfAttention(nn.Module):
    """SAGAN self-attention: x + γ·(V softmax(QᵀK)ᵀ), Q and K with C/8 channels, γ initialised to 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels // 8, 1)
        self.key_conv = nn.Conv2d(channels, channels // 8, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2).mT  # B×N×C'
        k = self.key_conv(x).flatten(2)  # B×C'×N
        attention = torch.softmax(q @ k, dim=-1)  # B×N×N, rows: queries
        v = self.value_conv(x).flatten(2)  # B×C×N
        out = (v @ attention.mT).view(b, c, h, w)
        return self.gamma * out + x


class Discriminator(nn.Module):
    """The SAGAN-style discriminator of ``utils/sagan.py`` (``preprocess_GAN_mode=1``: BatchNorm on the input)."""

    def __init__(self, in_channels: int, conv_dim: int = 64) -> None:
        super().__init__()
        self.preprocess = nn.BatchNorm2d(in_channels)
        d = conv_dim
        self.l1 = nn.Sequential(SpectralNormConv2d(in_channels, d, 4, 2, 1), nn.LeakyReLU(0.1))
        self.l2 = nn.Sequential(SpectralNormConv2d(d, 2 * d, 4, 2, 1), nn.LeakyReLU(0.1))
        self.l3 = nn.Sequential(SpectralNormConv2d(2 * d, 4 * d, 4, 2, 1), nn.LeakyReLU(0.1))
        self.attn1 = SelfAttention(4 * d)
        self.l4 = nn.Sequential(SpectralNormConv2d(4 * d, 8 * d, 4, 2, 1), nn.LeakyReLU(0.1))
        self.attn2 = SelfAttention(8 * d)
        self.last = nn.Conv2d(8 * d, 1, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.preprocess(x)
        h, w = x.shape[-2:]
        if h < MIN_SIDE or w < MIN_SIDE:
            x = F.pad(x, (0, max(0, MIN_SIDE - w), 0, max(0, MIN_SIDE - h)))
        x = self.attn1(self.l3(self.l2(self.l1(x))))
        x = self.attn2(self.l4(x))
        return self.last(x)


def hinge_generator_loss(d_fake: Tensor) -> Tensor:
    return -d_fake.mean()


def hinge_discriminator_loss(d_fake: Tensor, d_real: Tensor) -> Tensor:
    return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()


@register_loss("adv")
class AdversarialLoss(DistillLoss):
    """``{"adv_g": λ_adv · L_adv}`` for the student; ``{"adv_d": λ_d · L_d}`` for the discriminator's own Adam."""

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        lambda_adv: float = 0.001,
        lambda_d: float = 0.1,
        lr: float = 4e-4,
        beta1: float = 0.9,
        beta2: float = 0.99,
        conv_dim: int = 64,
        spectral_vectors: str = "held",
    ) -> None:
        super().__init__()
        check_non_negative(lambda_adv=lambda_adv, lambda_d=lambda_d)
        check_positive(lr=lr)
        for key, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{key} must be in [0, 1), got {beta}")
        if conv_dim < 8 or conv_dim % 2:
            raise ValueError(f"conv_dim must be an even number ≥ 8 (self-attention uses conv_dim/2 channels), got "
                             f"{conv_dim}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        if spectral_vectors not in ("held", "published"):
            raise ValueError(f"spectral_vectors must be 'held' or 'published', got {spectral_vectors!r}")
        self.lambda_adv, self.lambda_d = float(lambda_adv), float(lambda_d)
        self.lr, self.betas = float(lr), (float(beta1), float(beta2))
        self.discriminator = Discriminator(num_classes, conv_dim)
        for m in self.discriminator.modules():
            if isinstance(m, SpectralNormConv2d):
                m.published_vectors = spectral_vectors == "published"
        self._optimizer: Optimizer | None = None

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        zs = logits_to_teacher_size(student.logits, teacher.logits, "adv")
        return {"adv_g": self.lambda_adv * hinge_generator_loss(self.discriminator(zs))}

    def auxiliary_optimizers(self) -> dict[str, Optimizer]:
        if self._optimizer is None:
            params = [p for p in self.discriminator.parameters() if p.requires_grad]
            self._optimizer = torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        return {"discriminator": self._optimizer}

    def auxiliary_loss(
        self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None
    ) -> dict[str, Tensor]:
        dtype = self.discriminator.last.weight.dtype
        zs = logits_to_teacher_size(student.logits.detach(), teacher.logits, "adv")
        d_fake = self.discriminator(zs.to(dtype))  # the published order: student first
        d_real = self.discriminator(teacher.logits.detach().to(dtype))
        return {"adv_d": self.lambda_d * hinge_discriminator_loss(d_fake, d_real)}


__all__ = ["AdversarialLoss", "Discriminator", "SelfAttention", "SpectralNormConv2d", "hinge_discriminator_loss",
           "hinge_generator_loss"]
