"""The training step, built from a config: models, losses, optimiser, precision, and the step itself.

The :class:`~cskd.engine.trainer.Trainer` wraps this with data, checkpoints, evaluation and logging; the speed
benchmark (``benchmarks/train_step.py``) drives the very same object with random batches, so the numbers it
reports are the engine's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from ..evaluation.inference import resolve_amp
from ..losses import build_loss
from ..losses.base import DistillLoss
from ..models import build_segmentor, load_weights
from ..models.fusion import fold_batchnorm_
from ..models.segmentor import SegOutput, Segmentor
from .checkpointing import capture_rng, restore_rng
from .config import ExperimentConfig
from .distributed import DistEnv, all_gather_objects
from .optim import build_optimizer
from .step import TrainStep


class PolyDecay:
    """LR factor ``(1 − t/T)^power`` in closed form (the published schedule: the first step uses the base LR).
    A plain object, not a lambda, so that the scheduler's state dict holds (T, power) and survives a resume."""

    def __init__(self, total: int, power: float) -> None:
        self.total = total
        self.power = power

    def __call__(self, t: int) -> float:
        return max(0.0, 1.0 - t / self.total) ** self.power


def load_teacher_weights(teacher: Segmentor, path: str) -> None:
    """Teacher files usually carry an auxiliary head the frozen teacher does not run here: drop it."""
    from ..models.convert import to_cskd_state
    from ..models.convert_transformers import read_state_file

    state = read_state_file(path)  # .pth/.bin, .safetensors or a transformers save_pretrained directory
    assert teacher.spec is not None
    state = to_cskd_state(state, teacher.spec.model, teacher.spec.backbone)
    state = {k: v for k, v in state.items() if not k.startswith("aux_head.")}
    load_weights(teacher, state, name=path)


class StepRunner:
    """Everything one optimisation step needs, for one process.

    ``batch_per_device`` is checked against the losses' needs (CKA compares samples: ≥ 3) before anything runs.
    """

    def __init__(
        self, cfg: ExperimentConfig, num_classes: int, env: DistEnv, batch_per_device: int,
        with_teacher: bool | None = None,
    ) -> None:
        """``with_teacher`` defaults to "the config lists distillation losses"; the benchmark sets it to time the
        teacher's forward alone."""
        self.cfg = cfg
        self.with_teacher = bool(cfg.losses) if with_teacher is None else with_teacher
        self.env = env
        self.device = env.device
        self.num_classes = num_classes
        self.batch_per_device = batch_per_device
        t = cfg.train
        self.amp_dtype = resolve_amp(t.amp, self.device)
        if self.amp_dtype == torch.float16 and self.device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs CUDA; use bf16 or none on the CPU")
        self.channels_last = t.channels_last and self.device.type == "cuda"
        self._build_models()
        # train.optimizer: SGD or AdamW (engine/optim.py). One fused kernel for the whole update on CUDA instead of
        # a few per parameter tensor.
        self.optimizer = build_optimizer(self.step_module, t, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.set_schedule(t.budget.iterations or 1)

    # ------------------------------------------------------------------------------------------------ building

    def _build_models(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        m = cfg.model
        # pretrained_base goes to the backbone's builder (it may convert its own file layouts: timm, SegFormer)
        student = build_segmentor(m.model, m.backbone, self.num_classes, m.aux, pretrained_base=m.pretrained_base)
        if m.weights:
            load_weights(student, m.weights)

        self.teacher: Segmentor | None = None
        losses: dict[str, DistillLoss] = {}
        if self.with_teacher:
            if cfg.teacher is None:
                raise ConfigError("distillation needs a 'teacher' block")
            tm = cfg.teacher
            teacher = build_segmentor(tm.model, tm.backbone, self.num_classes, aux=False)
            if tm.weights:
                load_teacher_weights(teacher, tm.weights)
            teacher.eval().requires_grad_(False)
            # Frozen: its BatchNorms become part of the convs (exact), and its weights are stored in the autocast
            # dtype so no step re-casts them.
            fold_batchnorm_(teacher)
            self.teacher = teacher.to(self.device, dtype=self.amp_dtype or torch.float32)
            for lc in cfg.losses:
                if lc.name in losses:
                    raise ConfigError(f"losses: '{lc.name}' is listed twice")
                losses[lc.name] = build_loss(
                    lc.name, lc.params, student_channels=student.feature_channels,
                    teacher_channels=teacher.feature_channels, num_classes=self.num_classes, where="losses",
                )
            self._check_batch_requirements(losses)
        self.teacher_stages = any(getattr(loss, "uses_stages", False) for loss in losses.values())

        step = TrainStep(student, losses, aux_weight=t.aux_weight).to(self.device)
        if self.env.distributed and t.sync_bn and self.device.type == "cuda":
            # Batch statistics over all GPUs (PyTorch's SyncBatchNorm is CUDA-only); the losses' own BN layers too
            # (CIRKD's projection head), as published.
            step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
        if self.channels_last:
            step.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        self.cudagraphs = False
        if t.compile or (t.compile is None and self.device.type == "cuda"):
            mode = None if t.compile_mode == "default" else t.compile_mode
            loss_mode = t.loss_compile_mode or t.compile_mode
            loss_mode = None if loss_mode == "default" else loss_mode
            step.model.compile(mode=mode)
            if self.teacher is not None:
                self.teacher.compile(mode=mode)
            for loss in step.losses.values():
                loss.compile(mode=loss_mode)
            self.cudagraphs = "reduce-overhead" in (mode, loss_mode) and self.device.type == "cuda"
        self.step_module = step
        self.student: Segmentor = step.model
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # No buffer broadcast at every forward: memory-bank queues (hundreds of MB for CIRKD) are kept identical
            # by the losses themselves, and BN statistics are synchronised by SyncBatchNorm on GPUs and by
            # sync_buffers() at evaluation and checkpoint points.
            self.train_module: nn.Module = DistributedDataParallel(step, device_ids=ids, broadcast_buffers=False)
        else:
            self.train_module = step

    def _check_batch_requirements(self, losses: dict[str, DistillLoss]) -> None:
        for name, loss in losses.items():
            need, scope = loss.batch_requirement()
            have = self.batch_per_device * (self.env.world_size if scope == "global" else 1)
            if have < need:
                where = "in the global batch" if scope == "global" else "per device"
                raise ConfigError(
                    f"loss '{name}' needs at least {need} images {where}, but train.batch_size="
                    f"{self.cfg.train.batch_size} over {self.env.world_size} process(es) gives {have}. CKA compares "
                    "samples of a batch: with 2 it is identically 1 (no signal), with 1 undefined. Raise "
                    "train.batch_size" + ("" if scope == "global" else " or set cka_scope: global") + "."
                )

    def set_schedule(self, total: int) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.train.lr
            g.pop("initial_lr", None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, PolyDecay(total, self.cfg.train.poly_power))

    # ------------------------------------------------------------------------------------------------ the step

    def autocast(self):  # noqa: ANN201
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """uint8 images and masks from the loader → normalised float images and int64 labels on the device."""
        from ..data.normalize import normalize

        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True).long()
        x = normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, masks

    def teacher_forward(self, x: Tensor) -> SegOutput | None:
        if self.teacher is None:
            return None
        with torch.inference_mode(), self.autocast():
            out = self.teacher(x)
        # Inference tensors may not be saved for backward; the copy (a few MB) makes them ordinary constants. The
        # backbone stages are copied only for a loss that reads them (``uses_stages``): they are most of the size.
        stages = tuple(s.clone() for s in out.stages) if self.teacher_stages else ()
        return SegOutput(*(v.clone() if v is not None else None for v in out[:3]), stages)

    def step(self, x: Tensor, masks: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimisation step; returns the total loss and its terms, detached, on the device (no host sync)."""
        if self.cudagraphs:  # a new iteration: CUDA-graph outputs of the previous one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        teacher_out = self.teacher_forward(x)
        with self.autocast():
            total, terms = self.train_module(x, masks, teacher_out)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        # Copies (scalars): the values outlive this step, and CUDA-graph outputs are reused by the next replay.
        return total.detach().clone(), {k: v.detach().float().clone() for k, v in terms.items()}

    def sync_buffers(self) -> None:
        """Give every process rank 0's BatchNorm statistics (they drift apart without SyncBatchNorm, e.g. on CPUs)."""
        if self.env.distributed:
            import torch.distributed as dist

            for buf in self.student.buffers():
                dist.broadcast(buf, 0)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def random_batch(self, size: tuple[int, int], seed: int = 12345) -> dict[str, Tensor]:
        """A uint8 batch of the training size, for timing (a step's cost does not depend on the pixels)."""
        h, w = size
        g = torch.Generator().manual_seed(seed)
        n = self.batch_per_device
        return {
            "image": torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8),
            "mask": torch.randint(0, self.num_classes, (n, h, w), generator=g, dtype=torch.uint8),
        }

    def calibrate(
        self, batches: Iterator[dict[str, Tensor]], warmup: int, steps: int,
        after_step: Callable[[Tensor, dict[str, Tensor]], None] | None = None,
    ) -> float:
        """Seconds per iteration of this method fed by ``batches`` (plus ``after_step``, the loop's own per-step
        work). Fed by the training loader, the timing includes what the loop will wait for: batches that come
        slower than the step, and the loader's share of the host (its pinning thread competes with the kernel
        launches). Every state (weights, BN statistics, optimiser, schedule, RNG) is restored afterwards, so the
        real run starts exactly where an iteration-budget run would. The slowest process sets the pace of a
        data-parallel run."""
        saved_model = copy.deepcopy(self.step_module.state_dict())
        saved_opt = copy.deepcopy(self.optimizer.state_dict())
        saved_sched = copy.deepcopy(self.scheduler.state_dict())
        rng = capture_rng()
        self.step_module.train()

        def one_step() -> None:
            loss, terms = self.step(*self.prepare(next(batches)))
            if after_step is not None:
                after_step(loss, terms)

        for _ in range(warmup):
            one_step()
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            one_step()
        self.sync()
        seconds = (time.perf_counter() - start) / steps
        seconds = max(all_gather_objects(seconds))
        self.step_module.load_state_dict(saved_model)
        self.optimizer.load_state_dict(saved_opt)
        self.scheduler.load_state_dict(saved_sched)
        restore_rng(rng)
        return seconds


__all__ = ["PolyDecay", "StepRunner", "load_teacher_weights"]
