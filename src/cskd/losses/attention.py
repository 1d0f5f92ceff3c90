"""CSKD's building blocks: channel attention (CAM), position attention (PAM), PAM's projections and its grid.

Both attention modules follow DANet and return ``γ · context + x``; γ is a learnable scalar (CSKD shares one per
module between the student and the teacher branch). The *context* is split out (``cam_context``,
``pam_context``) because the loss needs it on its own: on the teacher side it is a constant, so the Gram matrix
of ``γ · context + x`` can be assembled from constant pieces (:func:`.cka.residual_gram`) and the teacher branch
stores nothing for backward.

Layouts. CAM works on B×C×N (N = H·W). PAM works on *tokens*: ``(..., B, n, C)``, one row per position, so that
the grid's blocks are a leading batch dimension and :func:`torch.nn.functional.scaled_dot_product_attention`
does the attention (with a fused kernel where the device has one for these shapes and dtype). Flattening a block
as n·C instead of the published C·n permutes every row the same way, which leaves Gram matrices, CKA and MSE
unchanged.

PAM's projections W_q, W_k (C → C//8) and W_v (C → C), each with a bias, are stacked into one
``(2·C//8 + C) × C`` matrix and a bias vector (:class:`Projections`), so one matrix product makes Q, K and V.
The published code builds them as new, randomly initialised ``nn.Conv2d`` at every call; :func:`draw_projections`
draws from the same distribution (PyTorch's default Conv2d init: weights and biases U(−1/√C, 1/√C) for a 1×1
kernel) for any number of blocks in one ``torch.rand`` call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._numerics import compute_dtype, exact_bmm, no_autocast

# ----------------------------------------------------------------------------------------------- channel attention


def cam_context(x: Tensor, temperature: float) -> Tensor:
    """S·X̃ for ``x`` B×C×N: A = X̃X̃ᵀ, S = softmax((rowmax(A) − A)/τ) over the last dim; returns B×C×N.

    softmax is shift-invariant, so softmax((rowmax(A) − A)/τ) = softmax(−A/τ), and softmax subtracts its own row
    maximum for stability: the explicit rowmax is left out. A's entries are sums over all N positions (thousands),
    where bf16's resolution is coarser than the temperature, so A and the softmax are float32 with autocast off;
    bf16 features are multiplied on tensor cores with a float32 result (:func:`._numerics.exact_bmm`), which is
    exact for the products. S·X̃ is then formed as every fused attention kernel (and PAM here) forms its output:
    weights rounded to the features' dtype, float32 accumulation, result in the features' dtype. float32 and
    float64 features stay in their dtype throughout.
    """
    with no_autocast(x):
        energy = exact_bmm(x, x.mT)
        attention = torch.softmax(energy * (-1.0 / temperature), dim=-1)
        return attention.to(x.dtype) @ x


def channel_attention(x: Tensor, gamma: Tensor, temperature: float) -> Tensor:
    """CAM(x) = γ · (S X̃ reshaped to C×H×W) + x for ``x`` B×C×H×W, in float32 or wider."""
    context = cam_context(x.flatten(2), temperature).view(x.shape)
    dtype = compute_dtype(x)
    return gamma * context.to(dtype) + x.to(dtype)


# ---------------------------------------------------------------------------------------------- position attention


def query_channels(channels: int) -> int:
    """Width of PAM's query and key projections, C // 8 as in DANet and the published code."""
    return channels // 8


class Projections(NamedTuple):
    """PAM's 1×1 projections stacked as rows [W_q; W_k; W_v]: ``weight`` (…, 2d + C, C), ``bias`` (…, 2d + C),
    d = C // 8. A leading dimension, when present, holds one set per grid block."""

    weight: Tensor
    bias: Tensor

    @property
    def channels(self) -> int:
        return int(self.weight.shape[-1])


def projection_rows(channels: int) -> int:
    """Rows of the stacked projection matrix: query and key (C // 8 each), then value (C)."""
    return 2 * query_channels(channels) + channels


def draw_projections(
    channels: int,
    count: int | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Projections:
    """Random PAM projections, distributed as PyTorch's default init of ``nn.Conv2d(C, ·, 1)`` (weight and bias
    U(−1/√C, 1/√C)); ``count`` independent sets (a leading dimension) or one set when None. One ``torch.rand``
    call, on ``device``: no module is built."""
    if query_channels(channels) < 1:
        raise ValueError(f"position attention needs at least 8 channels (C // 8 query channels), got {channels}")
    rows = projection_rows(channels)
    shape = (rows, channels + 1) if count is None else (count, rows, channels + 1)
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    bound = 1.0 / math.sqrt(channels)
    u = u.mul(2.0 * bound).sub_(bound)
    return Projections(u[..., :channels], u[..., channels])


def pam_context(tokens: Tensor, proj: Projections, temperature: float) -> Tensor:
    """V·Sᵀ in token layout: ``tokens`` (G, B, n, C) → (G, B, n, C), with Q, K, V = 1×1 projections of the tokens,
    energy = QᵀK, S = softmax(energy/τ) over the last dim.

    ``proj`` holds one set shared by all G blocks (weight 2-D) or one per block (weight (G, ·, C)). Runs in the
    autocast dtype when autocast is on (attention with fp32 accumulation, as in any transformer).
    """
    g, b, n, c = tokens.shape
    if proj.channels != c:
        raise ValueError(f"position attention: projections are for {proj.channels} channels, tokens have {c}")
    # Autocast, when on, moves these products to its lower precision; otherwise follow the tokens' dtype.
    weight, bias = proj.weight.to(tokens.dtype), proj.bias.to(tokens.dtype)
    if weight.dim() == 2:
        qkv = F.linear(tokens, weight, bias)
    else:
        if weight.shape[0] != g:
            raise ValueError(f"position attention: {weight.shape[0]} projection sets for {g} blocks")
        qkv = torch.baddbmm(bias.unsqueeze(1), tokens.reshape(g, b * n, c), weight.mT).view(g, b, n, -1)
    d = query_channels(c)
    q, k, v = qkv.split([d, d, c], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0 / temperature)


def position_attention(x: Tensor, gamma: Tensor, temperature: float, proj: Projections) -> Tensor:
    """PAM(x) = γ · (V·Sᵀ reshaped to C×H×W) + x for ``x`` B×C×H×W and one set of projections."""
    b, c, h, w = x.shape
    tokens = x.flatten(2).mT.unsqueeze(0)
    context = pam_context(tokens, proj, temperature)[0].mT.reshape(b, c, h, w)
    return gamma * context + x


# ------------------------------------------------------------------------------------------------------------ grid


def chunk_sizes(length: int, chunks: int) -> list[int]:
    """Sizes that ``torch.chunk(t, chunks)`` gives along a dimension of ``length``: ⌈length/chunks⌉ each, the last
    one smaller, and fewer than ``chunks`` pieces when they run out (64 → 13,13,13,13,12; 6 → 2,2,2)."""
    if length < 1 or chunks < 1:
        raise ValueError(f"chunk_sizes needs a positive length and chunk count, got {length} and {chunks}")
    size = -(-length // chunks)
    count = -(-length // size)
    return [size] * (count - 1) + [length - size * (count - 1)]


class BlockGroup(NamedTuple):
    """Equal-sized grid blocks: ``rows`` × ``cols`` blocks of ``block_h`` × ``block_w`` starting at
    (``top``, ``left``)."""

    top: int
    left: int
    rows: int
    cols: int
    block_h: int
    block_w: int

    @property
    def count(self) -> int:
        return self.rows * self.cols


def _runs(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(start, number, size) of the runs of equal sizes: at most two for ``chunk_sizes``."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for s in sizes:
        if runs and runs[-1][2] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, s)
        else:
            runs.append((start, 1, s))
        start += s
    return runs


def grid_groups(height: int, width: int, grid: int) -> list[BlockGroup]:
    """The grid's blocks (``torch.chunk`` rows, then columns) grouped by shape: at most 4 groups (the regular
    blocks, the last column, the last row, the corner)."""
    return [
        BlockGroup(top, left, nr, nc, h, w)
        for top, nr, h in _runs(chunk_sizes(height, grid))
        for left, nc, w in _runs(chunk_sizes(width, grid))
    ]


def grid_tokens(x: Tensor, groups: list[BlockGroup]) -> list[Tensor]:
    """Cut ``x`` (B×C×H×W) into the blocks of ``groups``; one tensor per group in token layout
    (blocks, B, block_h·block_w, C). One copy of the map in all."""
    b, c = x.shape[:2]
    cl = x.permute(0, 2, 3, 1)
    out = []
    for gr in groups:
        region = cl[:, gr.top : gr.top + gr.rows * gr.block_h, gr.left : gr.left + gr.cols * gr.block_w]
        blocks = region.reshape(b, gr.rows, gr.block_h, gr.cols, gr.block_w, c).permute(1, 3, 0, 2, 4, 5)
        out.append(blocks.reshape(gr.count, b, gr.block_h * gr.block_w, c))
    return out


def grid_blocks(x: Tensor, grid: int) -> list[Tensor]:
    """The blocks of ``x`` (B×C×H×W) in the published order (row chunks, then column chunks, by ``torch.chunk``),
    each B×C×h×w. For inspection; the loss uses the grouped :func:`grid_tokens`."""
    return [blk for band in torch.chunk(x, grid, dim=2) for blk in torch.chunk(band, grid, dim=3)]


__all__ = [
    "BlockGroup", "Projections", "cam_context", "channel_attention", "chunk_sizes", "draw_projections", "grid_blocks",
    "grid_groups", "grid_tokens", "pam_context", "position_attention", "projection_rows", "query_channels",
]
