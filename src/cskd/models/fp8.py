"""FP8 1×1 convolutions for the frozen teacher (``train.teacher_precision: fp8``).

Why: in distillation the teacher only infers, so its weights never change and its outputs only need to be close,
not bit-exact. A 1×1 convolution with stride 1 is a plain GEMM over the pixels (N·H·W × Cin times Cin × Cout), and
on Hopper GPUs FP8 GEMMs (``torch._scaled_mm``, float8_e4m3fn) run about twice as fast as bf16. In DeepLabV3-R101
at 512×1024 the 1×1 convolutions are ~367 of ~993 GFLOP of convolutions per image (the bottlenecks' conv1 / conv3,
the dilated stages' downsample, ASPP's 1×1 branches and projection). The 3×3 convolutions stay in the autocast
dtype. Needs CUDA compute capability ≥ 8.9 (Ada, Hopper) on GPUs; the CPU kernel of torch ≥ 2.14 serves the tests.

Error model. e4m3 keeps 3 mantissa bits (relative rounding ≤ 2⁻⁴ = 6.25 % per value, ~3.6 % RMS for values in
range) and a range of ±448. Weights get one float32 scale per output channel, ``amax(|w[o, :]|) / 448``, so every
row uses the whole range. Activations get one static float32 scale per layer, ``margin · amax / 448``, with amax
measured on a calibration batch (:func:`quantize_1x1_fp8_`): values beyond ``margin · amax`` saturate to ±448 ·
scale, and the margin (default 2) costs one bit of resolution for values near zero (e4m3 is floating point, so
small values keep their relative precision down to 2⁻⁶ · scale, then subnormals). The products are accumulated in
float32 by the GEMM; the output is rounded once to the output dtype, then scaled per channel and the bias added.
Independent rounding errors average out over the Cin terms of each output, so the output's relative RMS error is
a few per cent at most (tests/test_fp8_teacher.py bounds it).

State dict of :class:`FP8Conv1x1`: ``weight`` (float8_e4m3fn, Cout × Cin), ``weight_scale`` (float32, Cout),
``input_scale`` (float32, scalar), ``bias`` (the compute dtype, Cout; absent without one). The teacher is never
saved in checkpoints (it is rebuilt from its weights file and calibrated again), so no loader reads these keys.

Order matters: quantize after the teacher has its device, dtype and memory format (a later dtype cast would turn
the float8 weights into plain numbers without their scales, so :class:`FP8Conv1x1` refuses one) and before
``compile`` (the calibration's hooks must run eagerly); :class:`~cskd.engine.runner.StepRunner` does so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def eligible(conv: nn.Module) -> bool:
    """A 1×1, stride-1, unpadded, undilated, ungrouped conv whose channels are multiples of 16 (``_scaled_mm``'s
    requirement on the GEMM's K and N)."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1)
        and conv.padding in ((0, 0), "valid") and conv.groups == 1
        and conv.in_channels % 16 == 0 and conv.out_channels % 16 == 0
    )


class FP8Conv1x1(nn.Module):
    """An eval-mode 1×1 conv as an FP8 GEMM: ``y = (q(x / s_a) · q(W / s_w)ᵀ) · s_a · s_w + b`` with e4m3 rounding
    ``q``, a static activation scale ``s_a`` and per-output-channel weight scales ``s_w``. The result comes back
    in channels_last layout (a view of the N·H·W × Cout GEMM output); a channels_last input is the fast path
    (its pixel matrix is a view)."""

    weight: Tensor
    weight_scale: Tensor
    input_scale: Tensor
    bias: Tensor | None

    def __init__(self, conv: nn.Conv2d, input_scale: float = 1.0) -> None:
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"FP8Conv1x1 needs a 1×1, stride-1, ungrouped conv with channels multiples of 16, "
                             f"got {conv}")
        if conv.training:
            raise ValueError("FP8Conv1x1 is for frozen (eval-mode) convs: call .eval() first")
        if not input_scale > 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        w = conv.weight.detach().reshape(conv.out_channels, conv.in_channels).float()
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        self.register_buffer("weight", (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("input_scale", torch.tensor(float(input_scale), device=w.device))
        self.register_buffer("_one", torch.ones((), device=w.device), persistent=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.register_buffer("bias", bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, input_scale={float(self.input_scale):.4g}, "
                f"bias={self.bias is not None}")

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FP8Conv1x1:  # type: ignore[override]
        # Device and memory-format moves are fine; a dtype cast (.to(bf16), .float(), .half()) would silently drop
        # the float8 storage and scales, so it is refused. Probed on two scalars: what ``fn`` does to a dtype.
        probes = (torch.zeros((), dtype=FP8), torch.zeros(()))
        if any(fn(p).dtype != p.dtype for p in probes):
            raise TypeError("FP8Conv1x1 holds float8 weights and float32 scales: cast the model to its dtype "
                            "before quantize_1x1_fp8_, not after (device moves are fine)")
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        out_dtype = x.dtype if x.dtype in _OUT_DTYPES else torch.bfloat16
        # Quantize first (elementwise: keeps x's memory format), then take the pixel matrix: a view for a
        # channels_last input, otherwise a copy of one byte per value. x / s in float32, as the fused kernel of a
        # compiled graph computes it anyway: a bf16 quotient would round twice (bf16, then e4m3).
        xq = (x.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        rows = xq.permute(0, 2, 3, 1).reshape(n * h * w, c)
        # _scaled_mm wants the second operand column-major: the transposed view of the row-major weight.
        y = torch._scaled_mm(rows, self.weight.t(), scale_a=self.input_scale, scale_b=self._one,
                             out_dtype=out_dtype)
        y = y * self.weight_scale.to(out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)


def quantize_1x1_fp8_(teacher: nn.Module, calibration: Tensor, margin: float = 2.0, **forward_kwargs: Any) -> int:
    """Replace, in place, every eligible 1×1 conv of an eval-mode ``teacher`` (see :func:`eligible`) by an
    :class:`FP8Conv1x1`; return how many. One forward on ``calibration`` (normalised images, any batch; extra
    ``forward_kwargs`` go to the forward) records each conv's input amax with forward pre-hooks; the activation
    scale is ``margin · amax / 448`` (1 for an all-zero input). Convs the forward does not reach (an aux head that
    is not run) and ineligible ones (3×3, strided, grouped, channels not multiples of 16) stay as they are.

    The forward runs the module's ``forward`` directly, not its ``__call__``: a module that was ``.compile()``-d
    would otherwise go through its compiled wrapper, where the hooks are traced rather than run. Call this
    before compiling anyway (the replaced modules invalidate a graph traced before)."""
    if teacher.training:
        raise ValueError("quantize_1x1_fp8_ needs a frozen module in eval mode: call teacher.eval() first")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    targets = {name: m for name, m in teacher.named_modules() if eligible(m)}
    amax: dict[str, float] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            value = float(args[0].detach().abs().amax())  # one host sync per conv, once
            amax[name] = max(value, amax.get(name, 0.0))
        return hook

    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in targets.items()]
    try:
        with torch.no_grad():
            teacher.forward(calibration, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    for name, value in amax.items():
        parent_name, _, attr = name.rpartition(".")
        parent = teacher.get_submodule(parent_name)
        scale = margin * value / FP8_MAX if value > 0 else 1.0
        setattr(parent, attr, FP8Conv1x1(targets[name], input_scale=scale))  # type: ignore[arg-type]
    return len(amax)


def cpu_scaled_mm_available() -> bool:
    """Whether this torch has ``torch._scaled_mm`` on the CPU (torch ≥ 2.14 does; the tests skip without it)."""
    try:
        a = torch.zeros(16, 16, dtype=FP8)
        one = torch.ones(())
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


__all__ = ["FP8", "FP8Conv1x1", "FP8_MAX", "cpu_scaled_mm_available", "eligible", "quantize_1x1_fp8_"]
