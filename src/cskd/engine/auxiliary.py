"""Optimisers that distillation losses own (an adversarial discriminator), stepped by the engine once per iteration.

The protocol (see :class:`cskd.losses.base.DistillLoss`): a loss lists its optimisers in
``auxiliary_optimizers()`` and gives their loss terms in ``auxiliary_loss(student, teacher, targets)``. The engine,
after the student's optimiser step (the published order of the CIRKD/CSKD trainers: student step, then
discriminator step, both on the outputs of the same forward),

1. zeroes the auxiliary parameters' gradients (the student's adversarial term reached them through its backward),
2. back-propagates the sum of the auxiliary terms (float32, outside autocast: no loss scaling needed),
3. averages those gradients over the processes (the parameters are kept out of DDP's own reduction, which only
   sees the student's backward), and
4. steps every auxiliary optimiser.

The optimisers' states go into ``last.pt`` under ``"auxiliary_optimizers"``; the parameters themselves (and any
buffers, e.g. spectral-norm vectors) are part of the losses' state dict already.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..distributed import all_reduce_gradients
from ..losses.base import DistillLoss
from ..models.segmentor import SegOutput


class AuxiliaryOptimizers:
    """Every auxiliary optimiser of ``losses`` (a name → loss mapping, e.g. ``TrainStep.losses``)."""

    def __init__(self, losses: Mapping[str, DistillLoss]) -> None:
        self.losses = {name: loss for name, loss in losses.items()}
        self.optimizers: dict[str, Optimizer] = {}
        self.owners: dict[str, str] = {}
        for lname, loss in self.losses.items():
            for oname, opt in loss.auxiliary_optimizers().items():
                key = f"{lname}.{oname}"
                self.optimizers[key] = opt
                self.owners[key] = lname
        self.params: list[nn.Parameter] = [p for opt in self.optimizers.values()
                                           for g in opt.param_groups for p in g["params"]]
        self._ids = {id(p) for p in self.params}

    def __bool__(self) -> bool:
        return bool(self.optimizers)

    def owns(self, param: nn.Parameter) -> bool:
        return id(param) in self._ids

    def ddp_ignored_names(self, module: nn.Module) -> list[str]:
        """Fully qualified names (within ``module``) of the auxiliary parameters, for DDP to leave alone."""
        return [name for name, p in module.named_parameters() if self.owns(p)]

    def step(self, student: SegOutput, teacher: SegOutput | None, targets: Tensor | None) -> dict[str, Tensor]:
        """One update of every auxiliary optimiser; returns the terms (detached) for logging."""
        if not self.optimizers:
            return {}
        assert teacher is not None
        for p in self.params:
            p.grad = None
        terms: dict[str, Tensor] = {}
        with torch.autocast(student.logits.device.type, enabled=False):
            for lname in dict.fromkeys(self.owners.values()):
                for name, value in self.losses[lname].auxiliary_loss(student, teacher, targets).items():
                    if name in terms:
                        raise RuntimeError(f"two auxiliary loss terms are both named {name!r}")
                    terms[name] = value
            if terms:
                torch.stack([t.float() for t in terms.values()]).sum().backward()
        all_reduce_gradients(self.params)
        for opt in self.optimizers.values():
            opt.step()
        return {k: v.detach() for k, v in terms.items()}

    def state_dict(self) -> dict[str, Any]:
        return {key: opt.state_dict() for key, opt in self.optimizers.items()}

    def load_state_dict(self, state: Mapping[str, Any], where: str = "checkpoint") -> None:
        from ..errors import CheckpointError

        if set(state) != set(self.optimizers):
            raise CheckpointError(f"{where}: auxiliary optimisers {sorted(state)} in the checkpoint, "
                                  f"{sorted(self.optimizers)} in the config")
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state[key])


__all__ = ["AuxiliaryOptimizers", "all_reduce_gradients"]
