"""The losses' shared numerics: the dtype they compute in, autocast switched off for their float32 parts, and
matrix products of low-precision operands with a float32 result.

Batched matrix products of bf16/fp16 operands with a float32 result: tensor-core speed, float32 answer.

CAM's energies X̃X̃ᵀ are sums over thousands of positions with values in the thousands, and the softmax at
τ = 2 needs them to float32 resolution: rounding them to bf16 (what a bf16 matmul returns) moves entries by ~8,
i.e. by a factor e⁴ in the attention. Casting the features to float32 first is correct but sends the product to
the GPU's float32 cores, ~15× slower than its tensor cores on an H100. Neither is needed: under autocast the
features *are* bf16, a product of two bf16 numbers is exact in float32, and tensor cores accumulate in float32.
So ``wide_bmm`` runs the bf16 product on tensor cores and keeps the float32 accumulator as the result
(``torch.bmm(..., out_dtype=torch.float32)``): the same numbers as the float32 product of the bf16-valued inputs,
up to summation order.

It is a :func:`torch.library.custom_op` so that ``torch.compile`` treats it as one opaque kernel (inductor would
otherwise decompose the cast-and-multiply into a float32 product) and so that its backward is stated here: the
incoming float32 gradient is rounded to the operands' dtype and multiplied on tensor cores, which is the
precision autocast gives every other backward product of the step.

Where ``out_dtype`` is not available (CPU kernels, older torch), the operands are cast to float32 and multiplied
there, which gives the same result more slowly. float32/float64 operands never come here: see :func:`exact_bmm`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64 (tests and gradcheck run in float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def no_autocast(t: Tensor) -> AbstractContextManager:
    """Switch autocast off for ``t``'s device type: used around the float32 parts (Grams, HSIC, CAM energies)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _has_out_dtype(device: torch.device) -> bool:
    """True when ``torch.bmm`` takes ``out_dtype`` on ``device`` (CUDA kernels of torch ≥ 2.8)."""
    return device.type == "cuda" and hasattr(torch.ops.aten.bmm, "dtype")


@torch.library.custom_op("cskd::wide_bmm", mutates_args=())
def wide_bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 3-D ``a`` (G, M, K) and ``b`` (G, K, N) of one low-precision dtype, as float32 (G, M, N)."""
    if _has_out_dtype(a.device):
        return torch.ops.aten.bmm.dtype(a, b, torch.float32)
    return torch.bmm(a.float(), b.float())


@wide_bmm.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.float32)


def _setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:  # noqa: ANN001 - torch's ctx
    a, b = inputs
    ctx.save_for_backward(a, b)


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # noqa: ANN001
    a, b = ctx.saved_tensors
    g = grad.to(a.dtype)
    grad_a = torch.bmm(g, b.mT) if ctx.needs_input_grad[0] else None
    grad_b = torch.bmm(a.mT, g) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


wide_bmm.register_autograd(_backward, setup_context=_setup_context)


def exact_bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for batched 3-D operands, in float32 or wider: through :func:`wide_bmm` when both are bf16 (or
    both fp16), else as an ordinary product in the promoted float dtype (float64 stays float64)."""
    if a.dtype == b.dtype and a.dtype in LOW_PRECISION:
        return wide_bmm(a, b)
    dtype = compute_dtype(a, b)
    return torch.bmm(a.to(dtype), b.to(dtype))


__all__ = ["LOW_PRECISION", "compute_dtype", "exact_bmm", "no_autocast", "wide_bmm"]
