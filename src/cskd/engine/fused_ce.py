"""The training cross-entropy of bilinearly upsampled logits, fused (``train.fused_ce``).

The published recipe scores the head's 1/8-resolution logits against full-resolution labels: upsample (bilinear,
align_corners=True), log-softmax, pick the label's class, average over the labelled pixels. Done as tensors, that
writes and rereads the full-resolution float32 logits several times (B = 8, 19 classes, 512×1024: 318 MB each
time), forward and backward: 1.84 ms per call compiled on an H100, twice per step (main and aux head).

Bilinear interpolation is separable. One matrix product interpolates along the height to (B, H, w, C), classes
innermost (40 MB at that size). One Triton kernel then takes each output row and, for each input column j, the
output columns whose left neighbour is j: their logits mix two neighbouring entries of that row (no gather),
and the kernel computes each pixel's log-sum-exp and loss. It also computes the pixel's gradient, softmax −
one-hot, summed into its two input columns with their weights. One more product takes those sums back along the
height. The backward only scales that result by the incoming gradient: nothing of full resolution is ever
stored. The gradient is computed in the forward because it depends on the incoming gradient only through that
scalar factor.

No atomics: a pixel belongs to the program that holds its left input column, and its right-hand share is written
to a second buffer and added one column over, so the sums are deterministic. Labels outside [0, classes), other
than the ignore value, make the loss NaN (the engine stops on a non-finite loss), where the library's kernel
would trip a device assertion.

The interpolation weights come from :func:`cskd.engine.step.interpolation_taps`, as the tensor version's
matrices do (float64, rounded to float32 once), so the fused loss computes the same function as the tensor
version, to float32 rounding. Off CUDA the kernel runs only under Triton's interpreter (``TRITON_INTERPRET=1``),
which the tests use; the engine then keeps the tensor version.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .._triton import available, tl, triton
from ..constants import IGNORE_INDEX
from .step import interpolation_taps


@functools.lru_cache(maxsize=64)
def _columns(out_w: int, in_w: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
    """The output columns' interpolation: (w_left, w_right, first), ``max_run``. Output column x interpolates its
    input columns j(x) and j(x) + 1 with weights w_left[x] and w_right[x] (``interpolation_taps``, each weight
    rounded to float32 once, as in the tensor version's matrices); j(x) never decreases, so the columns with
    j(x) = j are first[j] … first[j + 1] − 1; ``max_run`` is the longest such run."""
    left, frac = interpolation_taps(out_w, in_w)
    first = torch.searchsorted(left, torch.arange(in_w + 1), side="left")
    max_run = int((first[1:] - first[:-1]).max())
    return (1.0 - frac).float().to(device), frac.float().to(device), first.int().to(device), max_run


NUM_WARPS = 4
"""Warps per program of the kernel; ``benchmarks/kernel_levers.py`` times 4 and 8."""

if triton is not None:

    @triton.jit
    def _pixels(tgt_row, s_tw, w_left, w_right, here, right, x_first, x_stop, cs, cmask, C, ignore_index,
                R0: tl.constexpr, RUN: tl.constexpr):
        """Output columns first[j] + R0 … + RUN − 1 of each input column j of the block (those before first[j + 1]):
        their summed gradient shares for columns j and j + 1 (J, C), and their loss sum and labelled count."""
        xs = x_first[:, None] + R0 + tl.arange(0, RUN)[None, :]  # (J, RUN)
        xmask = xs < x_stop[:, None]
        wl = tl.load(w_left + xs, mask=xmask, other=0.0)[:, :, None]
        wr = tl.load(w_right + xs, mask=xmask, other=0.0)[:, :, None]
        z = wl * here[:, None, :] + wr * right[:, None, :]  # (J, RUN, C): each pixel's logits
        z = tl.where(cmask[None, None, :], z, float("-inf"))
        zmax = tl.max(z, axis=2)
        e = tl.exp(z - zmax[:, :, None])
        total = tl.sum(e, axis=2)
        t = tl.load(tgt_row + xs.to(tl.int64) * s_tw, mask=xmask, other=ignore_index).to(tl.int32)
        valid = xmask & (t != ignore_index)
        onehot = cs[None, None, :] == t[:, :, None]
        # the pixel's gradient, softmax − one-hot, summed into its two input columns with their weights
        p = e * (1.0 / total)[:, :, None]
        d = tl.where(valid[:, :, None] & cmask[None, None, :], p - onehot.to(tl.float32), 0.0)
        picked = tl.sum(tl.where(onehot, z, 0.0), axis=2)
        pixel = tl.where((t < 0) | (t >= C), float("nan"), zmax + tl.log(total) - picked)
        loss = tl.sum(tl.sum(tl.where(valid, pixel, 0.0), axis=1), axis=0)
        count = tl.sum(tl.sum(valid.to(tl.int32), axis=1), axis=0)
        return tl.sum(d * wl, axis=1), tl.sum(d * wr, axis=1), loss, count

    @triton.jit
    def _upsampled_ce_kernel(
        rows, targets, s_tb, s_th, s_tw, w_left, w_right, first,
        grad_left, grad_right, loss_part, count_part,
        C, in_w, out_h, n_blocks, ignore_index,
        BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, RUN: tl.constexpr, TAIL: tl.constexpr,
    ):
        """Output row y of image b (program axis 0), the output columns whose left input column lies in one
        block of BLOCK_J input columns (axis 1). ``rows``: the logits already interpolated along the height,
        (B, H, w, C) float32, so a pixel's logits mix two of its rows' entries: no gather. An input column's
        run of output columns is taken as RUN columns, then TAIL more where runs are longer (runs of 8 and 9
        as 8 + 2 lanes, not 16)."""
        row = tl.program_id(0)  # b · out_h + y
        blk = tl.program_id(1)
        js = blk * BLOCK_J + tl.arange(0, BLOCK_J)
        jmask = js < in_w
        x_first = tl.load(first + js, mask=jmask, other=0)
        x_stop = tl.load(first + js + 1, mask=jmask, other=0)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        line = rows + row.to(tl.int64) * in_w * C
        here = tl.load(line + js[:, None] * C + cs[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0)
        right = tl.load(line + (js[:, None] + 1) * C + cs[None, :],
                        mask=(js[:, None] + 1 < in_w) & cmask[None, :], other=0.0)
        tgt_row = targets + (row // out_h).to(tl.int64) * s_tb + (row % out_h).to(tl.int64) * s_th
        g_left, g_right, loss, count = _pixels(tgt_row, s_tw, w_left, w_right, here, right, x_first, x_stop, cs,
                                               cmask, C, ignore_index, 0, RUN)
        if TAIL > 0:
            l2, r2, loss2, count2 = _pixels(tgt_row, s_tw, w_left, w_right, here, right, x_first, x_stop, cs, cmask,
                                            C, ignore_index, RUN, TAIL)
            g_left += l2
            g_right += r2
            loss += loss2
            count += count2
        out = row.to(tl.int64) * in_w * C + js[:, None] * C + cs[None, :]
        smask = jmask[:, None] & cmask[None, :]
        tl.store(grad_left + out, g_left, mask=smask)
        tl.store(grad_right + out, g_right, mask=smask)
        part = row * n_blocks + blk
        tl.store(loss_part + part, loss)
        tl.store(count_part + part, count)


def _lanes(max_run: int) -> tuple[int, int]:
    """(RUN, TAIL): power-of-two lane counts covering runs of up to ``max_run`` output columns, RUN the largest
    power of two ≤ max_run (at least 2), TAIL the rest rounded up (0 where RUN covers it)."""
    run = max(2, 1 << (max(max_run, 1).bit_length() - 1))
    rest = max_run - run
    return run, 0 if rest <= 0 else max(2, 1 << (rest - 1).bit_length())


def _forward(logits: Tensor, targets: Tensor, mh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, Σ over labelled pixels of the gradient of their summed loss w.r.t. ``logits`` (float32), the number
    of labelled pixels)."""
    b, c, h, w = logits.shape
    out_h, out_w = targets.shape[-2:]
    dev = logits.device
    mh = mh.to(torch.float32)
    # Along the height first, one product over every (column, class): (B, H, w·C), classes innermost.
    rows = torch.matmul(mh, logits.float().permute(0, 2, 3, 1).reshape(b, h, w * c))
    w_left, w_right, first, max_run = _columns(out_w, w, dev)
    block_c = max(2, triton.next_power_of_2(c))
    run, tail = _lanes(max_run)
    block_j = max(2, min(64, 4096 // (run * block_c)))
    n_blocks = triton.cdiv(w, block_j)
    grad_left = torch.empty(b, out_h, w, c, device=dev, dtype=torch.float32)
    grad_right = torch.empty_like(grad_left)
    loss_part = torch.empty(b * out_h * n_blocks, device=dev, dtype=torch.float32)
    count_part = torch.empty(b * out_h * n_blocks, device=dev, dtype=torch.int32)
    _upsampled_ce_kernel[(b * out_h, n_blocks)](
        rows, targets, *targets.stride(), w_left, w_right, first,
        grad_left, grad_right, loss_part, count_part,
        c, w, out_h, n_blocks, IGNORE_INDEX,
        BLOCK_C=block_c, BLOCK_J=block_j, RUN=run, TAIL=tail, num_warps=NUM_WARPS,
    )
    count = count_part.sum()
    loss = loss_part.sum() / count
    grad_left[:, :, 1:] += grad_right[:, :, :-1]  # a pixel's right-hand share belongs to the next input column
    grad = torch.matmul(mh.T, grad_left.view(b, out_h, w * c))  # back along the height
    return loss, grad.view(b, h, w, c).permute(0, 3, 1, 2), count


class _UpsampledCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, mh: Tensor) -> Tensor:  # type: ignore[override]
        with torch.autocast(logits.device.type, enabled=False):
            loss, grad, count = _forward(logits, targets, mh)
        ctx.save_for_backward(grad, count)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        grad, count = ctx.saved_tensors
        return (grad * (grad_out / count)).to(ctx.logits_dtype), None, None


@torch.compiler.disable  # launched as it is, also from inside a compiled region
def fused_upsampled_ce(logits: Tensor, targets: Tensor, mh: Tensor, mw: Tensor | None = None) -> Tensor:
    """Mean cross-entropy (ignore value 255) of ``logits`` (B×C×h×w, any float dtype and strides) upsampled
    bilinearly (align_corners=True) to the size of ``targets`` (B×H×W, integer). ``mh``: the H×h interpolation
    matrix (``_interpolation_matrix``); ``mw`` is accepted for the signature of the tensor version and unused (the
    kernel builds the columns' weights itself). Differentiable in ``logits``."""
    if not available(logits.device):
        raise RuntimeError(f"the fused cross-entropy needs CUDA and Triton (train.fused_ce), not {logits.device}")
    if logits.dim() != 4 or targets.dim() != 3 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"fused cross-entropy: logits B×C×h×w and targets B×H×W, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if targets.dtype.is_floating_point:
        raise ValueError(f"fused cross-entropy: targets must be integer class indices, got {targets.dtype}")
    return _UpsampledCE.apply(logits, targets, mh)


__all__ = ["fused_upsampled_ce"]
