"""Distillation losses: one module per method, built by name through :func:`build_loss`."""

from __future__ import annotations

import importlib

from .base import CONTEXT_ARGS, LOSSES, DistillLoss, build_loss, register_loss

# Modules that register built-in methods; each adds itself to LOSSES on import.
_BUILTIN_MODULES: tuple[str, ...] = ()


def _load_all() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


__all__ = ["CONTEXT_ARGS", "DistillLoss", "LOSSES", "build_loss", "register_loss"]
