"""A 3×3, stride-2, padding-1 max-pool (the ResNet stem's) as two Triton kernels (``train.fused_maxpool``).

Inductor compiles the stem pool's backward as a gather that recomputes each window's argmax from the saved input:
0.95 ms per step on the H200 for the student (B = 8, 128 × 256 × 512 bf16), about 9× its bandwidth bound, the
largest single kernel of the step that does no arithmetic. ATen's own kernels save int64 indices (134 MB at that
size). Here the forward saves, per output, which of the nine taps won as one int8 (16 MB); the backward gives
each input pixel the gradients of the windows (at most four) whose winning tap it is, a gather without atomics,
so it is deterministic.

Exactly ``nn.MaxPool2d(3, 2, 1)``: the first maximum in scan order wins a tie (ReLU outputs tie at 0 often), a NaN
wins as in ATen (and the last NaN of a window, as there), padding never wins (a window of -inf only is won by its
first pixel inside the map), and the backward sums a pixel's gradients in float32 in the order ATen's CUDA kernel
does (output rows, then columns, ascending). Any memory format (the engine's is channels-last). The ops are
``torch.library`` custom ops, so a compiled graph calls them as they are. Off CUDA they run only under Triton's
interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._triton import tl, triton

K, S, P = 3, 2, 1
BLOCK_X = 16
"""Output (forward) or input (backward) columns per program, each with all channels (128 in the stem: 2048
elements a tile); ``benchmarks/kernel_levers.py --levers pool`` times 16 and 32."""


def _out_size(n: int) -> int:
    return (n + 2 * P - K) // S + 1


if triton is not None:

    @triton.jit
    def _row_block(rows, cols, C, BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's image b, its row r (of ``rows`` per image), its block of BLOCK_X columns, all channels,
        and the mask of those inside (cols, C)."""
        pid = tl.program_id(0)  # b · rows + r
        xs = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
        cs = tl.arange(0, BLOCK_C)
        return (pid // rows).to(tl.int64), pid % rows, xs, cs, (xs[:, None] < cols) & (cs[None, :] < C)

    @triton.jit
    def _offsets(b, r, xs, cs, sb, sc, sh, sw):
        """Element offsets of row r, columns xs and channels cs of image b (int64: a large batch of full-resolution
        maps passes 2³¹ elements)."""
        return b * sb + r.to(tl.int64) * sh + xs[:, None].to(tl.int64) * sw + cs[None, :].to(tl.int64) * sc

    @triton.jit
    def _pool_forward_kernel(x, out, code, C, H, W, OH, OW,
                             sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                             BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr):
        """One output row (b, oy) of BLOCK_X columns × all channels: the max of each window and its tap, 0…8."""
        b, oy, ox, cs, omask = _row_block(OH, OW, C, BLOCK_X, BLOCK_C)
        best = tl.full((BLOCK_X, BLOCK_C), float("-inf"), tl.float32)
        # ATen's start: the window's first pixel inside the map (it keeps the gradient of a window of -inf only)
        first = (oy == 0).to(tl.int32) * 3 + (ox == 0).to(tl.int32)
        tap = tl.zeros((BLOCK_X, BLOCK_C), tl.int32) + first[:, None]
        for dy in tl.static_range(3):
            iy = oy * 2 - 1 + dy
            for dx in tl.static_range(3):
                ix = ox * 2 - 1 + dx
                ok = omask & (iy >= 0) & (iy < H) & (ix[:, None] >= 0) & (ix[:, None] < W)
                v = tl.load(x + _offsets(b, iy, ix, cs, sxb, sxc, sxh, sxw), mask=ok,
                            other=float("-inf")).to(tl.float32)
                take = ok & ((v > best) | (v != v))  # ATen: a NaN always takes the window, the first max a tie
                best = tl.where(take, v, best)
                tap = tl.where(take, dy * 3 + dx, tap)
        where = _offsets(b, oy, ox, cs, sob, soc, soh, sow)
        tl.store(out + where, best.to(out.dtype.element_ty), mask=omask)
        tl.store(code + where, tap.to(tl.int8), mask=omask)

    @triton.jit
    def _pool_backward_kernel(grad_out, code, grad_in, C, H, W, OH, OW,
                              sgb, sgc, sgh, sgw, sib, sic, sih, siw,
                              BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr):
        """One input row (b, iy) of BLOCK_X columns × all channels: the summed gradients of the windows whose
        winning tap the pixel is. ``code`` has ``grad_out``'s strides."""
        b, iy, ix, cs, imask = _row_block(H, W, C, BLOCK_X, BLOCK_C)
        acc = tl.zeros((BLOCK_X, BLOCK_C), tl.float32)
        # the windows holding the pixel at tap (dy, dx): oy = (iy + 1 − dy) / 2; dy and dx descending gives the
        # windows in ATen's order (rows, then columns, ascending)
        for ry in tl.static_range(3):
            dy = 2 - ry
            ny = iy + 1 - dy
            oy = ny // 2
            row_ok = (ny >= 0) & (ny % 2 == 0) & (oy < OH)
            for rx in tl.static_range(3):
                dx = 2 - rx
                nx = ix + 1 - dx
                ox = nx // 2
                ok = imask & row_ok & ((nx >= 0) & (nx % 2 == 0) & (ox < OW))[:, None]
                where = _offsets(b, oy, ox, cs, sgb, sgc, sgh, sgw)
                won = tl.load(code + where, mask=ok, other=-1).to(tl.int32) == dy * 3 + dx
                g = tl.load(grad_out + where, mask=ok & won, other=0.0).to(tl.float32)
                acc += g
        where = _offsets(b, iy, ix, cs, sib, sic, sih, siw)
        tl.store(grad_in + where, acc.to(grad_in.dtype.element_ty), mask=imask)


def _like(x: Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> Tensor:
    """An empty (B, C, H, W) tensor in ``x``'s memory format (channels-last or contiguous)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        b, c, h, w = shape
        return torch.empty(b, h, w, c, device=x.device, dtype=dtype).permute(0, 3, 1, 2)
    return torch.empty(shape, device=x.device, dtype=dtype)


def _grid(rows: int, cols: int) -> tuple[int, int]:
    return rows, triton.cdiv(cols, BLOCK_X)


@torch.library.custom_op("cskd::max_pool_3x3s2", mutates_args=())
def max_pool_3x3s2(x: Tensor) -> tuple[Tensor, Tensor]:
    """(max-pooled ``x``, each output's winning tap as int8)."""
    b, c, h, w = x.shape
    oh, ow = _out_size(h), _out_size(w)
    out = _like(x, (b, c, oh, ow), x.dtype)
    code = _like(x, (b, c, oh, ow), torch.int8)
    if out.numel():
        _pool_forward_kernel[_grid(b * oh, ow)](
            x, out, code, c, h, w, oh, ow, *x.stride(), *out.stride(),
            BLOCK_X=BLOCK_X, BLOCK_C=triton.next_power_of_2(c))
    return out, code


@max_pool_3x3s2.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    b, c, h, w = x.shape
    shape = (b, c, _out_size(h), _out_size(w))
    return _like(x, shape, x.dtype), _like(x, shape, torch.int8)


@torch.library.custom_op("cskd::max_pool_3x3s2_backward", mutates_args=())
def max_pool_3x3s2_backward(grad: Tensor, code: Tensor, h: int, w: int) -> Tensor:
    """The input's gradient, (B, C, h, w) in ``code``'s memory format (the input's)."""
    b, c, oh, ow = grad.shape
    if grad.stride() != code.stride():  # the kernel reads both at the same offsets; code is dense, as made
        grad = torch.empty_strided(code.shape, code.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)
    grad_in = _like(code, (b, c, h, w), grad.dtype)
    if grad_in.numel():
        _pool_backward_kernel[_grid(b * h, w)](
            grad, code, grad_in, c, h, w, oh, ow, *grad.stride(), *grad_in.stride(),
            BLOCK_X=BLOCK_X, BLOCK_C=triton.next_power_of_2(c))
    return grad_in


@max_pool_3x3s2_backward.register_fake
def _(grad: Tensor, code: Tensor, h: int, w: int) -> Tensor:
    b, c = grad.shape[:2]
    return _like(code, (b, c, h, w), grad.dtype)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor],
                   output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(output[1])
    ctx.size = tuple(inputs[0].shape[-2:])


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor, _grad_code: Tensor | None) -> Tensor:
    (code,) = ctx.saved_tensors
    return max_pool_3x3s2_backward(grad, code, *ctx.size)


max_pool_3x3s2.register_autograd(_backward, setup_context=_setup_context)


class TritonMaxPool(nn.Module):
    """``nn.MaxPool2d(3, 2, 1)`` through :func:`max_pool_3x3s2` for 4-D float32/bf16/fp16 inputs (the kernels
    compare in float32), ``F.max_pool2d`` for anything else."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return F.max_pool2d(x, K, S, P)
        return max_pool_3x3s2(x)[0]


def triton_max_pools_(net: nn.Module) -> int:
    """Swap every ``nn.MaxPool2d(3, 2, 1)`` of ``net`` (plain: no dilation, no ceil mode, no indices) for
    :class:`TritonMaxPool`, in place; returns how many."""
    swapped = 0
    for name, child in list(net.named_children()):
        if isinstance(child, nn.MaxPool2d) and _is_stem_pool(child):
            setattr(net, name, TritonMaxPool())
            swapped += 1
        else:
            swapped += triton_max_pools_(child)
    return swapped


def _is_stem_pool(m: nn.MaxPool2d) -> bool:
    def pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
        return (v, v) if isinstance(v, int) else tuple(v)

    return (pair(m.kernel_size) == (K, K) and pair(m.stride) == (S, S) and pair(m.padding) == (P, P)
            and pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)


__all__ = ["TritonMaxPool", "max_pool_3x3s2", "triton_max_pools_"]
