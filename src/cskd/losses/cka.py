"""Linear CKA (centred kernel alignment) between two sets of per-sample features, and CSKD's −log CKA term.

Rows are samples: ``x`` is B×D1 and ``y`` B×D2 (each sample's map flattened), so CKA compares how the *batch* is
arranged in the two feature spaces. With K = XXᵀ, L = YYᵀ and H = I − 11ᵀ/B,

    HSIC(K, L) = Σᵢⱼ (HKH)ᵢⱼ (HLH)ᵢⱼ,    CKA = HSIC(K, L) / √(HSIC(K, K) · HSIC(L, L))  ∈ [0, 1].

Everything here works on B×B Gram matrices: forming one costs a single pass over the features, whatever D is,
and the rest is B×B arithmetic. Leading dimensions are batch dimensions (``(..., B, D)`` → ``(..., B, B)``), so
the 25 blocks of grid PAM are scored by one call.

Numerics. Gram matrices, HSIC and the log are computed in float32 (float64 stays float64) with autocast switched
off: centring subtracts numbers of similar size, which bf16's 8-bit mantissa cannot survive.

Degenerate batches. CKA needs spread across the samples on both sides. With B = 2 the centred Gram matrices have
rank 1 and CKA ≡ 1 (no signal); with B = 1 they are zero. When every sample of the batch is the same on one side
(e.g. a constant block), HSIC(K, K) = 0 and CKA is 0/0, which the published code turns into NaN. Here a side counts
as degenerate when ‖HKH‖_F ≤ 1e-6 · ‖K‖_F (zero up to float32 rounding); CKA is then taken as 1, so the term is
−log(1 + 1e-8) = 0 with zero gradient (nothing to align, as with B = 2). ``cka_loss`` is −log(|CKA| + 1e-8) as in
the published code (the epsilon sits *inside* the log there), so CKA = 0 gives a finite 18.42.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._numerics import LOW_PRECISION, compute_dtype, exact_bmm, no_autocast

#: The published code's guard: loss = −log(|CKA| + LOG_EPS).
LOG_EPS = 1e-8
#: A side whose centred Gram is this small relative to its Gram is treated as having no spread (see module doc).
DEGENERATE_RTOL = 1e-6


#: Target length of the slices long rows are cut into (see :func:`row_products`).
_SLICE = 1024
_MAX_SLICES = 1024


def _slices(length: int) -> int:
    """The largest power of two p ≤ 1024 that divides ``length`` and leaves slices of ≥ 128 elements: a divisor,
    so that slicing is a view."""
    p = 1
    while p < _MAX_SLICES and length % (2 * p) == 0 and length // (2 * p) >= 128 and length // p > _SLICE:
        p *= 2
    return p


def row_products(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.mT`` for ``(..., B, D)`` inputs: the B×B inner products of the rows.

    The rows are long (a whole map: D = C·H·W ≈ 10⁶; a grid block: ≈ 4·10⁴) and few (B ≈ 8): one matrix product
    gives the GPU an 8×8 output per matrix to spread its work over, and a handful of thread blocks stream the
    whole input (seen on an H100: 260 µs for what memory bandwidth allows in ~20 µs). Cutting D into p slices of
    ~1k makes p independent products, summed afterwards.
    """
    d = a.shape[-1]
    p = _slices(d)
    if p == 1:
        return a @ b.mT
    av = a.unflatten(-1, (p, d // p)).transpose(-3, -2)  # (..., p, B, d/p)
    bv = b.unflatten(-1, (p, d // p)).transpose(-3, -2)
    return (av @ bv.mT).sum(-3)


def gram(x: Tensor) -> Tensor:
    """Linear kernel XXᵀ over the sample dimension: ``(..., B, D)`` → ``(..., B, B)``, in float32 or wider."""
    with no_autocast(x):
        x = x.to(compute_dtype(x))
        return row_products(x, x)


def centre_gram(k: Tensor) -> Tensor:
    """HKH with H = I − 11ᵀ/B, written as double centring (no B×B matrix products)."""
    return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)


def hsic(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741 - the usual name of the second kernel
    """Σᵢⱼ (HKH)ᵢⱼ (HLH)ᵢⱼ over the last two dimensions (no 1/(B−1)² factor: it cancels in CKA)."""
    return (centre_gram(k) * centre_gram(l)).sum((-2, -1))


def cka_from_grams(k: Tensor, l: Tensor, rtol: float = DEGENERATE_RTOL) -> Tensor:  # noqa: E741
    """CKA of two Gram matrices ``(..., B, B)`` → ``(...)``. A degenerate side gives CKA = 1 (see module doc)."""
    with no_autocast(k):
        dtype = compute_dtype(k, l)
        k, l = k.to(dtype), l.to(dtype)  # noqa: E741
        kc, lc = centre_gram(k), centre_gram(l)
        kk = (kc * kc).sum((-2, -1))
        ll = (lc * lc).sum((-2, -1))
        kl = (kc * lc).sum((-2, -1))
        valid = (kk > rtol**2 * (k * k).sum((-2, -1))) & (ll > rtol**2 * (l * l).sum((-2, -1)))
        # Both branches of a where() are differentiated: feed the unused one harmless values so that a degenerate
        # side yields an exact zero gradient instead of 0·inf = NaN.
        one = torch.ones_like(kk)
        den = torch.sqrt(torch.where(valid, kk, one)) * torch.sqrt(torch.where(valid, ll, one))
        return torch.where(valid, kl / den, one)


def neg_log_cka(cka: Tensor, eps: float = LOG_EPS) -> Tensor:
    """The published term −log(|CKA| + eps); the abs only matters for rounding (linear CKA is ≥ 0)."""
    return -torch.log(cka.abs() + eps)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA between ``x`` (B×…) and ``y`` (B×…), each sample flattened; a 0-dim tensor in [0, 1]."""
    _check_pair(x, y)
    return cka_from_grams(gram(x.flatten(1)), gram(y.flatten(1)))


def cka_loss(x: Tensor, y: Tensor, eps: float = LOG_EPS) -> Tensor:
    """−log(|CKA(x, y)| + eps) for ``x`` (B×…) and ``y`` (B×…): CSKD's similarity term."""
    return neg_log_cka(linear_cka(x, y), eps)


def residual_gram(m: Tensor, x: Tensor, gamma: Tensor, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Gram matrix ``(..., B, B)`` of the rows of γ·m + x (``m``, ``x``: ``(..., B, D)``), float32 or wider.

    CAM and PAM outputs have this form. The Gram is assembled as γ²·MMᵀ + γ·(MXᵀ + XMᵀ) + XXᵀ from one product
    over the stacked rows [M; X] when that product is cheaper than forming γ·m + x:

    - ``m`` and ``x`` both bf16 (or both fp16), as under autocast: the stacked rows stay in that dtype and are
      multiplied on tensor cores with a float32 result (:func:`._numerics.wide_bmm`, exact products); the
      gradient reaches ``m``, ``x`` and γ through the B×B combination.
    - neither needs a gradient (the teacher side): γ keeps its gradient and nothing of size D is kept for
      backward.

    Otherwise y = γ·m + x is formed in float32 (float64 stays float64) and multiplied. ``gather`` (e.g.
    :func:`cskd.distributed.gather_samples`) collects the samples of all ranks first.
    """
    gather = gather or _identity
    with no_autocast(x):
        dtype = compute_dtype(m, x)
        gamma = gamma.to(dtype)
        low_precision = m.dtype == x.dtype and m.dtype in LOW_PRECISION
        needs_grad = torch.is_grad_enabled() and (m.requires_grad or x.requires_grad)
        if needs_grad and not low_precision:
            y = gather(torch.addcmul(x.to(dtype), m.to(dtype), gamma))
            return row_products(y, y)
        with torch.set_grad_enabled(needs_grad):
            both = stacked_gram(gather(m), gather(x)).to(dtype)
        b = both.shape[-1] // 2
        mm, mx, xx = both[..., :b, :b], both[..., :b, b:], both[..., b:, b:]
        return gamma * gamma * mm + gamma * (mx + mx.mT) + xx


def stacked_gram(m: Tensor, x: Tensor) -> Tensor:
    """Gram matrix ``(..., 2B, 2B)`` of the stacked rows [M; X] (``m``, ``x``: ``(..., B, D)``), float32 or wider.

    The rows are copied once, straight into the sliced layout of :func:`row_products` (``(..., p, 2B, D/p)``,
    contiguous), so that every leading dimension merges into one batch of p·… small products: for low-precision
    rows one tensor-core :func:`._numerics.wide_bmm` call.
    """
    d = m.shape[-1]
    p = _slices(d)
    rows = torch.cat([m.unflatten(-1, (p, d // p)).transpose(-3, -2),
                      x.unflatten(-1, (p, d // p)).transpose(-3, -2)], dim=-2)  # (..., p, 2B, d/p)
    flat = rows.flatten(0, -3)
    products = exact_bmm(flat, flat.mT)
    return products.view(*rows.shape[:-1], rows.shape[-2]).sum(-3)


def _identity(t: Tensor) -> Tensor:
    return t


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2 or y.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"CKA needs two tensors with the same number of samples in dimension 0 and at least 2 dimensions; got "
            f"shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )


__all__ = [
    "DEGENERATE_RTOL", "LOG_EPS", "centre_gram", "cka_from_grams", "cka_loss", "gram", "hsic", "linear_cka",
    "neg_log_cka", "residual_gram",
    "row_products", "stacked_gram",
]
