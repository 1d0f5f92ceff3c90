"""Distillation losses: one module per method, built by name through :func:`build_loss`.

Every module of this package that calls :func:`register_loss` is a built-in method; :func:`_load_all` imports them
all, so adding a method is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import CONTEXT_ARGS, LOSSES, DistillLoss, build_loss, register_loss

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


__all__ = ["CONTEXT_ARGS", "DistillLoss", "LOSSES", "build_loss", "register_loss"]
