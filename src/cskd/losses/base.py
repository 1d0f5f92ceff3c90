"""The contract every distillation method follows, and the registry the engine builds methods from.

A method is one :class:`DistillLoss` subclass plus a config block. The engine builds it with
``build_loss(name, params, student_channels=..., teacher_channels=..., num_classes=...)``; ``params`` (the YAML
block) is checked against the constructor's typed keyword arguments, so a new method needs no schema file:

.. code-block:: python

    @register_loss("kd")
    class KDLoss(DistillLoss):
        def __init__(self, *, student_channels: int, teacher_channels: int, num_classes: int,
                     weight: float = 1.0, temperature: float = 1.0) -> None: ...

        def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
            return {"kd": self.weight * ...}

``forward`` returns named scalar terms, each already multiplied by its weight; the engine sums them, adds the task
loss, and logs each name. Parameters a loss owns (CSKD's γ, a connector conv) are optimised with the student.

Optional hooks (all no-ops by default):

- ``uses_stages = True``: ``forward`` reads ``SegOutput.stages`` (the backbone's stage maps); the constructor may
  then take ``student_stage_channels`` / ``teacher_stage_channels`` (the backbones' ``out_channels``), which
  ``build_loss`` supplies like the other context arguments.
- :meth:`before_optimizer_step`: after the backward (gradients unscaled), before the student's optimiser steps
  (Af-DCD clips its projector's gradient norm here).
- A second optimiser (an adversarial discriminator): :meth:`auxiliary_optimizers` names the optimisers the loss
  owns, over parameters trained apart from the student; :meth:`auxiliary_loss` gives their loss terms for this
  iteration. The engine (:mod:`cskd.engine.auxiliary`), once per iteration *after* the student's optimiser step,
  zeroes those parameters' gradients (the student's backward may have reached them), back-propagates the sum of
  the terms, averages the gradients over the processes, and steps each optimiser; their state is checkpointed,
  their parameters are left out of the student's optimiser and of DDP, the terms are logged and checked for
  non-finite values like the others, and the step is timed with the student's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.optim import Optimizer

from ..schema import validate_kwargs
from ..errors import ConfigError
from ..models.segmentor import SegOutput

#: Constructor arguments the engine supplies; a config block may not set them.
CONTEXT_ARGS = ("student_channels", "teacher_channels", "num_classes")
#: Supplied only to losses whose constructor names them (``uses_stages``): the backbones' stage widths.
STAGE_CONTEXT_ARGS = ("student_stage_channels", "teacher_stage_channels")


class DistillLoss(nn.Module):
    """Base class of distillation terms. See the module docstring for the contract."""

    #: The smallest per-device batch for which the loss carries signal (CKA across samples needs 3).
    min_batch_per_device: ClassVar[int] = 1
    #: Whether ``forward`` needs the labels (``targets``: B×H×W int64 at input resolution, 255 = ignore).
    needs_targets: ClassVar[bool] = False
    #: Whether ``forward`` wants the teacher's auxiliary-head logits (``teacher.aux_logits``): the engine then
    #: builds the teacher with its aux head, keeps that head's weights from the teacher file and runs it.
    needs_teacher_aux: ClassVar[bool] = False
    #: Whether ``forward`` reads ``SegOutput.stages`` (the engine then keeps the teacher's stage maps).
    uses_stages: ClassVar[bool] = False

    def batch_requirement(self) -> tuple[int, str]:
        """(the fewest samples the loss needs, "device" or "global"): checked by the engine at start-up against
        the per-device or the global batch."""
        return self.min_batch_per_device, "device"

    def forward(  # type: ignore[override]
        self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called after the backward (gradients unscaled) and before the student's optimiser steps."""

    def auxiliary_optimizers(self) -> dict[str, Optimizer]:
        """The optimisers this loss owns (name → optimiser), over parameters trained apart from the student.
        Called once by the engine after the loss has been moved to its device."""
        return {}

    def auxiliary_loss(
        self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The auxiliary optimisers' named, weighted loss terms for this iteration's outputs (called after the
        student's optimiser step; the engine back-propagates their sum and steps the optimisers)."""
        return {}


def check_non_negative(**values: float) -> None:
    """Raise ValueError naming the first argument that is negative (loss weights: 0 switches a term off)."""
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be ≥ 0, got {value}")


def check_positive(**values: float) -> None:
    """Raise ValueError naming the first argument that is not > 0 (temperatures, exponents)."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


LOSSES: dict[str, type[DistillLoss]] = {}


def register_loss(name: str):  # noqa: ANN201 - decorator
    def deco(cls: type[DistillLoss]) -> type[DistillLoss]:
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"distillation loss {name!r} registered twice")
        LOSSES[name] = cls
        cls.registered_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def build_loss(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    student_channels: int,
    teacher_channels: int,
    num_classes: int,
    where: str = "config",
    student_stage_channels: tuple[int, ...] | None = None,
    teacher_stage_channels: tuple[int, ...] | None = None,
) -> DistillLoss:
    """Build the registered loss ``name`` from a config block, validated against its constructor. The stage widths
    go only to a constructor that takes them (``uses_stages`` losses)."""
    from . import _load_all  # registers the built-in methods

    _load_all()
    if name not in LOSSES:
        raise ConfigError(f"{where}: unknown distillation loss '{name}'; registered: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name]
    kwargs = validate_kwargs(cls, params or {}, where, prefix=name, reserved=CONTEXT_ARGS + STAGE_CONTEXT_ARGS)
    accepted = inspect.signature(cls.__init__).parameters
    stage_widths = {"student_stage_channels": student_stage_channels,
                    "teacher_stage_channels": teacher_stage_channels}
    for key, value in stage_widths.items():
        if key in accepted:
            if value is None:
                raise ConfigError(f"{where}: {name} needs the backbones' stage widths ({key})")
            kwargs[key] = tuple(int(c) for c in value)
    try:
        return cls(student_channels=student_channels, teacher_channels=teacher_channels, num_classes=num_classes,
                   **kwargs)
    except ValueError as e:
        raise ConfigError(f"{where}: {name}: {e}") from None


__all__ = ["CONTEXT_ARGS", "STAGE_CONTEXT_ARGS", "DistillLoss", "LOSSES", "build_loss", "check_non_negative", "check_positive",
           "register_loss"]
