"""One training step's forward: the trained model and every loss term, as one module.

Keeping the student and the distillation losses in one module lets DDP synchronise the gradients of the losses'
own parameters (CSKD's γ, connectors, projection heads) together with the student's; the published code leaves
them unsynchronised across GPUs. The benchmark times this same module, so benchmark and engine cannot drift apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import IGNORE_INDEX
from ..losses.base import DistillLoss
from ..models.segmentor import SegOutput, Segmentor


def interpolation_taps(out_size: int, in_size: int) -> tuple[Tensor, Tensor]:
    """1-D linear interpolation with align_corners=True, in float64: output position i reads input positions
    lo[i] and min(lo[i] + 1, in_size − 1) with weights 1 − frac[i] and frac[i] (the weights that
    ``F.interpolate(..., mode="bilinear", align_corners=True)`` gives)."""
    if in_size == 1 or out_size == 1:
        return torch.zeros(out_size, dtype=torch.int64), torch.zeros(out_size, dtype=torch.float64)
    src = torch.arange(out_size, dtype=torch.float64) * ((in_size - 1) / (out_size - 1))
    lo = src.floor().long().clamp(max=in_size - 2)
    return lo, src - lo


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(out_size: int, in_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The (out × in) matrix of :func:`interpolation_taps`: row i holds output position i's weights."""
    lo, frac = interpolation_taps(out_size, in_size)
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    m[rows, lo] = 1.0 - frac
    m[rows, (lo + 1).clamp(max=in_size - 1)] += frac
    return m.to(device, dtype)


def upsample_bilinear(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (align_corners=True) as two float32 matrix products, W then H.

    Same values as ``F.interpolate`` (to float32 rounding), but its backward is two more matrix products instead of
    the scatter-with-atomics kernel that ``upsample_bilinear2d_backward`` runs: on an H100 at B=8, 19 classes,
    64×128 → 512×1024 that backward alone took 3.5 ms per call, twice per step (main and aux head)."""
    mh, mw = _upsampling_matrices(logits, size)
    return _upsample_with(logits, mh, mw)


def _upsampling_matrices(logits: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(logits.dtype, torch.float32)
    h, w = logits.shape[-2:]
    return (_interpolation_matrix(size[0], h, logits.device, dtype),
            _interpolation_matrix(size[1], w, logits.device, dtype))


def _upsample_with(logits: Tensor, mh: Tensor, mw: Tensor) -> Tensor:
    (b, c, h, _), (out_h, out_w) = logits.shape, (mh.shape[0], mw.shape[0])
    with torch.autocast(logits.device.type, enabled=False):
        rows = (logits.to(mh.dtype) @ mw.T).reshape(b * c, h, out_w)
        # A batched product with the H matrix first keeps the result contiguous (B·C, H, W); ``mh @ rows`` with a
        # broadcast 2-D left operand would come back as a transposed view, and every elementwise kernel of the
        # cross-entropy after it would run on strided memory.
        return torch.bmm(mh.expand(b * c, -1, -1), rows).view(b, c, out_h, out_w)


def _upsampled_ce(logits: Tensor, targets: Tensor, mh: Tensor, mw: Tensor) -> Tensor:
    return F.cross_entropy(_upsample_with(logits, mh, mw), targets, ignore_index=IGNORE_INDEX)


def segmentation_ce(logits: Tensor, targets: Tensor, upsampled_ce: Callable[..., Tensor] | None = None) -> Tensor:
    """Cross-entropy with logits upsampled (bilinear, align_corners=True, as published) to the label size.
    ``upsampled_ce``: a compiled ``_upsampled_ce`` to run it with (see :meth:`StepModule.compile_ce`)."""
    if logits.shape[-2:] == targets.shape[-2:]:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    mh, mw = _upsampling_matrices(logits, tuple(targets.shape[-2:]))
    return (upsampled_ce or _upsampled_ce)(logits, targets, mh, mw)


class StepModule(nn.Module):
    """The forward of one training step: the student and every loss term (what :class:`~cskd.engine.runner.StepRunner`
    calls at each :meth:`~cskd.engine.runner.StepRunner.step`)."""

    def __init__(self, model: Segmentor, losses: Mapping[str, DistillLoss] | None = None, aux_weight: float = 0.4):
        super().__init__()
        self.model = model
        self.losses = nn.ModuleDict(dict(losses or {}))
        self.aux_weight = aux_weight
        #: Set by the runner when a loss owns a second optimiser: forward then keeps (student outputs, teacher
        #: outputs, targets) in ``last_outputs`` for the auxiliary step after the student's.
        self.keep_outputs = False
        self._upsampled_ce: Callable[..., Tensor] | None = None
        self.last_outputs: tuple[SegOutput, SegOutput | None, Tensor] | None = None

    def compile_ce(self, mode: str | None = None) -> None:
        """Run the cross-entropy terms through ``torch.compile`` (the runner's choice when it compiles the model):
        the upsampling, log-softmax, gather and their backward over the full-resolution float32 logits (B ×
        classes × crop) fuse where they can (alone on an H200, B = 8, 19 classes, 512×1024: 1.83 → 1.69 ms per call,
        two calls per step; docs/benchmarks.md §8). The upsampling matrices are arguments (cached tensors), so one
        graph serves every step."""
        self._upsampled_ce = torch.compile(_upsampled_ce, mode=mode, dynamic=False)

    def use_fused_ce(self) -> None:
        """Run the cross-entropy terms as one Triton kernel each (``train.fused_ce``; cskd/engine/fused_ce.py)."""
        from .fused_ce import fused_upsampled_ce

        self._upsampled_ce = fused_upsampled_ce

    def forward(
        self, images: Tensor, targets: Tensor, teacher: SegOutput | None = None,
        teacher_ready: torch.cuda.Event | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the total loss and its named terms (each already weighted). ``teacher_ready``: the event that
        ends the teacher's forward on another CUDA stream (``train.teacher_stream``); the student's forward and
        cross-entropy are queued before the wait, so they run alongside it."""
        out = self.model(images)
        if self.keep_outputs:
            self.last_outputs = (out, teacher, targets)
        terms: dict[str, Tensor] = {"ce": segmentation_ce(out.logits, targets, self._upsampled_ce)}
        if out.aux_logits is not None and self.aux_weight:
            terms["aux"] = self.aux_weight * segmentation_ce(out.aux_logits, targets, self._upsampled_ce)
        if teacher_ready is not None:
            torch.cuda.current_stream(images.device).wait_event(teacher_ready)
        if self.losses:
            if teacher is None:
                raise RuntimeError("distillation losses need the teacher's outputs")
            for loss in self.losses.values():
                for name, value in loss(out, teacher, targets).items():
                    if name in terms:
                        raise RuntimeError(f"two loss terms are both named {name!r}")
                    terms[name] = value
        total = torch.stack([t.float() for t in terms.values()]).sum()
        return total, terms


__all__ = ["StepModule", "segmentation_ce", "upsample_bilinear"]
