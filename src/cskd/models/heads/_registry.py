"""The head registry. A head is an ``nn.Module`` built as ``Head(in_channels, channels, num_classes,
norm_layer=...)`` where ``in_channels`` lists the width of every backbone stage; ``forward(stages)`` receives all
stage maps (shallow to deep) and returns ``(logits, features)``, ``features`` being the map right before the final
1×1 ``classifier``. It has ``.channels`` (the width of ``features``) and ``.classifier``.

Registering one is a decorator::

    @register_head("deeplabv3", default_channels=256, display="DeepLabV3")
    class DeepLabV3Head(nn.Module): ...

``display`` is the name reports print (``DeepLabV3``); with a backbone's (see
:func:`cskd.models.segmentor.display_name`) it names a pair, e.g. ``DeepLabV3-R18``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class HeadEntry:
    name: str
    cls: Callable[..., nn.Module]
    default_channels: int
    """Width when the backbone's defaults do not name one for this head."""
    min_stages: int
    """How many backbone stages the head needs (it reads the last ``min_stages`` or more)."""
    output_stage: int
    """The stage whose resolution ``logits`` and ``features`` have (-1: the deepest; 0: the shallowest)."""
    stride_factor: int
    """Extra down-sampling after that stage (UperNet's strided fusion conv: 2)."""
    aliases: tuple[str, ...]
    display: str = ""
    """The name reports and tables print (``DeepLabV3``, ``UperNet``); empty: the registered name."""

    @property
    def display_name(self) -> str:
        return self.display or self.name

    def output_stride(self, reductions: Sequence[int]) -> int:
        """The stride of the head's maps w.r.t. the input, for a backbone with these stage reductions."""
        return int(reductions[self.output_stage]) * self.stride_factor


HEADS: dict[str, HeadEntry] = {}
_ALIASES: dict[str, str] = {}


def register_head(
    name: str,
    *,
    default_channels: int = 256,
    min_stages: int = 1,
    output_stage: int = -1,
    stride_factor: int = 1,
    aliases: Sequence[str] = (),
    display: str = "",
) -> Callable[[Any], Any]:
    def deco(cls: Any) -> Any:
        if name in HEADS:
            raise ValueError(f"head {name!r} is already registered")
        HEADS[name] = HeadEntry(name, cls, default_channels, min_stages, output_stage, stride_factor,
                                tuple(aliases), display)
        for a in (name, *aliases):
            _ALIASES[a] = name
        return cls

    return deco


def head_names() -> list[str]:
    return sorted(HEADS)


def canonical_head_name(name: str) -> str:
    """The registered name for ``name`` or an alias of it (``psp`` → ``pspnet``); ValueError naming the choices."""
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), sorted(_ALIASES), n=3, cutoff=0.5)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; choose one of {sorted(_ALIASES)}") from None


def get_head(name: str) -> HeadEntry:
    return HEADS[canonical_head_name(name)]


__all__ = ["HEADS", "HeadEntry", "canonical_head_name", "get_head", "head_names", "register_head"]
