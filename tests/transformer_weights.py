"""Deterministic weights for the CIRKDV2 transformer layouts (``tests/data/cirkdv2_keys_*.json``).

The scheme of :func:`reference_weights.deterministic_state` keeps every ``*.weight`` near 1, which suits BN and
LayerNorm but makes a stack of linear layers explode; here linear (2-D) weights are scaled by 1/√fan_in instead.
The same function made the reference outputs (``tests/data/cirkdv2_forward_*.pt``) from the published model code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def cirkdv2_layout(name: str) -> list[tuple[str, list[int]]]:
    """(key, shape) pairs of ``tests/data/cirkdv2_keys_<name>.json``, in the published module order."""
    return [(k, list(s)) for k, s in json.loads((DATA / f"cirkdv2_keys_{name}.json").read_text())["keys"].items()]


def transformer_state(shapes: list[tuple[str, list[int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes:
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif len(shape) == 2:
            out[key] = torch.randn(shape, generator=g) * (1.0 / shape[1]) ** 0.5
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith(".weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


def summarise(t: torch.Tensor, limit: int = 20000) -> dict[str, torch.Tensor]:
    """A map small enough to store: itself, or (if larger than ``limit``) its first 16 channels and the sum of
    every channel."""
    if t.numel() <= limit:
        return {"full": t}
    return {"head16": t[:, :16].clone(), "chsum": t.sum(dim=(2, 3))}


def reference_input(shape: tuple[int, ...] = (1, 3, 64, 96), seed: int = 7) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double()
