"""Triton, where it is installed (PyTorch's CUDA builds bring it), for cskd's own kernels (engine/fused_ce.py,
models/maxpool.py): ``triton`` and ``tl`` are None without it, and :func:`available` says where the kernels run."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]


def available(device: torch.device) -> bool:
    """Whether cskd's Triton kernels can run on ``device``: CUDA with Triton, or any device under Triton's
    interpreter (``TRITON_INTERPRET=1``, which the tests use on the CPU)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


__all__ = ["available", "tl", "triton"]
