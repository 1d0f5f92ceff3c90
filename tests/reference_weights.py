"""Deterministic weights for a state-dict layout given as (key, shape) pairs.

Used both by the script that computed ``tests/data/official_forward.pt`` with the published CSKD model code and by
the tests that load the same weights into cskd's models: equal weights must give equal outputs. Conv weights are
He-scaled so activations stay O(1) through 100 layers; BN statistics are kept positive and near identity.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def layout(name: str) -> list[tuple[str, list[int]]]:
    """(key, shape) pairs of a layout file: ``state_dict`` as a list of pairs (the CSKD files) or ``keys`` as a
    mapping (the CIRKDV2 files)."""
    data = json.loads((DATA / f"{name}.json").read_text())
    if "keys" in data:
        return [(k, s) for k, s in data["keys"].items()]
    return [(k, s) for k, s in data["state_dict"]]


def deterministic_state(
    shapes: list[tuple[str, list[int]]], seed: int = 0, scale_linear: bool = False
) -> dict[str, torch.Tensor]:
    """``scale_linear``: linear (2-D) weights ~ N(0, 1/fan_in) instead of near 1, for transformer layouts, where a
    stack of linear layers with weights near 1 explodes (the scheme that made ``tests/data/cirkdv2_forward_*.pt``)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes:
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif scale_linear and len(shape) == 2:
            out[key] = torch.randn(shape, generator=g) * (1.0 / shape[1]) ** 0.5
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith(".weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


def reference_input(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(123)).to(dtype)
