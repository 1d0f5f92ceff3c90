"""Deterministic weights for the CIRKDV2 transformer layouts (``tests/data/cirkdv2_keys_*.json``).

Weights are :func:`reference_weights.deterministic_state` with linear (2-D) weights scaled by 1/√fan_in; the same
scheme made the reference outputs (``tests/data/cirkdv2_forward_*.pt``) from the published model code.
"""

from __future__ import annotations


import torch

from reference_weights import DATA, deterministic_state, layout  # noqa: F401 (DATA: for the tests)


def cirkdv2_layout(name: str) -> list[tuple[str, list[int]]]:
    """(key, shape) pairs of ``tests/data/cirkdv2_keys_<name>.json``, in the published module order."""
    return [(k, list(v)) for k, v in layout(f"cirkdv2_keys_{name}")]


def transformer_state(shapes: list[tuple[str, list[int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    return deterministic_state(shapes, seed, scale_linear=True)


def summarise(t: torch.Tensor, limit: int = 20000) -> dict[str, torch.Tensor]:
    """A map small enough to store: itself, or (if larger than ``limit``) its first 16 channels and the sum of
    every channel."""
    if t.numel() <= limit:
        return {"full": t}
    return {"head16": t[:, :16].clone(), "chsum": t.sum(dim=(2, 3))}


def reference_input(shape: tuple[int, ...] = (1, 3, 64, 96), seed: int = 7) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double()
