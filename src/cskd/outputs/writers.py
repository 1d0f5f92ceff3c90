"""The formats ``cskd predict`` writes, as a table of writers: a new output format is one function and one entry in
:data:`WRITERS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cityscapes import submission_filename, write_submission
from .maps import blend, colorize, colorize_rgb, make_panel

@dataclass(frozen=True)
class Predicted:
    """One image's prediction, as a writer gets it."""

    name: str
    image: torch.Tensor
    """1×3×H×W uint8 RGB."""
    labels: np.ndarray
    """H×W uint8 class ids."""
    mask: torch.Tensor | None
    """The ground truth, where the input is a dataset with labels."""

    @property
    def rgb(self) -> np.ndarray:
        return self.image[0].permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class WriteContext:
    """What every writer of one command shares."""

    palette: list[tuple[int, ...]]
    alpha: float
    label: str
    """The model's name, for panel titles."""
    teacher: Callable[[torch.Tensor], np.ndarray] | None = None
    """The teacher's prediction of an image, for the panel's extra column."""
    teacher_label: str = ""


def _write_palette(path: Path, item: Predicted, ctx: WriteContext) -> None:
    colorize(item.labels, ctx.palette).save(path)


def _write_blend(path: Path, item: Predicted, ctx: WriteContext) -> None:
    blend(item.rgb, item.labels, ctx.palette, alpha=ctx.alpha).save(path)


def _write_panel(path: Path, item: Predicted, ctx: WriteContext) -> None:
    tiles, titles = [item.rgb], ["image"]
    if item.mask is not None:
        tiles.append(colorize_rgb(item.mask[0], ctx.palette))
        titles.append("ground truth")
    tiles.append(colorize_rgb(item.labels, ctx.palette))
    titles.append(f"prediction ({ctx.label})")
    if ctx.teacher is not None:
        tiles.append(colorize_rgb(ctx.teacher(item.image), ctx.palette))
        titles.append(f"teacher ({ctx.teacher_label})")
    make_panel(tiles, titles).save(path)


def _write_submission(path: Path, item: Predicted, ctx: WriteContext) -> None:
    write_submission(item.labels, item.name, path.parent)


def _write_trainid(path: Path, item: Predicted, ctx: WriteContext) -> None:
    Image.fromarray(item.labels).save(path)


Writer = Callable[[Path, Predicted, WriteContext], None]

WRITERS: dict[str, Writer] = {
    "palette": _write_palette,  # indexed PNG, values = class ids
    "blend": _write_blend,  # the palette over the image
    "panel": _write_panel,  # image | ground truth | prediction | teacher
    "cityscapes-submission": _write_submission,  # label-id PNGs named as the test server expects
    "trainid": _write_trainid,  # grey PNG of class ids
}
"""One writer per ``--format``: a new output format is one function and one entry here."""
FORMATS = tuple(WRITERS)


def output_path(out_dir: Path, fmt: str, name: str) -> Path:
    return out_dir / (submission_filename(name) if fmt == "cityscapes-submission" else f"{name}.png")


__all__ = ["FORMATS", "Predicted", "WRITERS", "WriteContext", "Writer", "output_path"]
