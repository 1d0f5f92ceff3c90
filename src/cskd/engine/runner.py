"""The training step, built from a config: models, losses, optimiser, precision, and the step itself.

The :class:`~cskd.engine.trainer.Trainer` wraps this with data, checkpoints, evaluation and logging; the speed
benchmark (``benchmarks/train_step.py``) drives the very same object with random batches, so the numbers it
reports are the engine's.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from ..evaluation.inference import resolve_amp
from ..losses import LOSSES, _load_all, build_loss
from ..losses.base import DistillLoss
from ..checkpoints.files import capture_rng, restore_rng
from ..checkpoints.weights import load_teacher_weights, load_weights
from ..distributed import DistEnv, all_gather_objects
from ..models import build_segmentor
from ..models.atrous import row_taps_dilated_, space_to_batch_dilated_
from ..models.maxpool import triton_max_pools_
from ..models.epilogue import fuse_conv_epilogues_
from ..models.fp8 import cpu_scaled_mm_available, quantize_1x1_fp8_
from ..models.fusion import fold_batchnorm_
from ..models.segmentor import SegOutput, Segmentor
from ..timing import PhaseClock, synchronize
from .auxiliary import AuxiliaryOptimizers
from .compile_cache import CompileCache, default_root
from .config import ExperimentConfig
from .cuda_graph import GraphedForward
from .optim import build_optimizer
from .step import StepModule


class PolyDecay:
    """LR factor ``(1 − t/T)^power`` in closed form (the published schedule: the first step uses the base LR).
    A plain object, not a lambda, so that the scheduler's state dict holds (T, power) and survives a resume."""

    def __init__(self, total: int, power: float) -> None:
        self.total = total
        self.power = power

    def __call__(self, t: int) -> float:
        return max(0.0, 1.0 - t / self.total) ** self.power


def check_teacher_precision(precision: str, device: torch.device) -> None:
    """``train.teacher_precision: fp8`` needs FP8 tensor cores (CUDA compute capability ≥ 8.9) or, on the CPU, a
    torch with a CPU ``_scaled_mm``; a one-line ConfigError otherwise."""
    if precision != "fp8":
        return
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) < (8, 9):
            raise ConfigError(f"train.teacher_precision=fp8 needs CUDA compute capability ≥ 8.9 (FP8 tensor cores); "
                              f"{device} ({torch.cuda.get_device_name(device)}) has {cap[0]}.{cap[1]}: use amp")
    elif device.type == "cpu":
        if not cpu_scaled_mm_available():
            raise ConfigError(f"train.teacher_precision=fp8: torch {torch.__version__} has no CPU _scaled_mm: "
                              "use amp (or torch ≥ 2.14)")
    else:
        raise ConfigError(f"train.teacher_precision=fp8 is for CUDA (capability ≥ 8.9) and the CPU, not {device}: "
                          "use amp")


def _rewrite_dilated_convs(net: nn.Module, how: str, crop: tuple[int, int], *, chosen: bool = True) -> None:
    """``train.dilated_convs``: the same convolutions, computed another way (cskd/models/atrous.py). Row taps
    switch only the convs that take that path at the training crop, leaving the others fusable. ``chosen``: the
    user asked for ``how``; when it came from "auto", a model row taps cannot take keeps its native convs."""
    if how == "space_to_batch":
        space_to_batch_dilated_(net)
    elif how == "row_taps":
        try:
            row_taps_dilated_(net, input_size=crop)
        except Exception as e:  # the shape pass runs the model on the meta device, which a model may not support
            first_line = next(iter(str(e).strip().splitlines()), type(e).__name__)
            problem = (f"{type(net).__name__} could not run a shape-only pass at data.crop_size={list(crop)} "
                       f"({first_line})")
            if not chosen:
                warnings.warn(f"train.dilated_convs=auto: {problem}; its dilated convs stay native", stacklevel=2)
                return
            raise ConfigError(f"train.dilated_convs=row_taps: {problem}; use dilated_convs: native") from e


def calibration_images(dataset: Any, count: int, size: tuple[int, int]) -> Tensor:
    """The first ``count`` images of ``dataset`` (items with a uint8 ``image``, no random transform: the same
    every run) resized to ``size`` (bilinear, antialiased), as one uint8 batch: the FP8 teacher's calibration
    batch (:meth:`StepRunner.quantize_teacher`)."""
    from torchvision.transforms.v2 import functional as TF

    n = min(count, len(dataset))
    images = [TF.resize(dataset[i]["image"].as_subclass(Tensor), list(size), antialias=True) for i in range(n)]
    return torch.stack(images).to(torch.uint8)


class StepRunner:
    """Everything one optimisation step needs, for one process.

    ``batch_per_device`` is checked against the losses' needs (CKA compares samples: ≥ 3) before anything runs.
    """

    def __init__(
        self, cfg: ExperimentConfig, num_classes: int, env: DistEnv, batch_per_device: int,
        with_teacher: bool | None = None,
    ) -> None:
        """``with_teacher`` (build and run the teacher) defaults to ``cfg.is_distillation``; the benchmark sets it
        to time the teacher's forward alone."""
        self.cfg = cfg
        self.with_teacher = cfg.is_distillation if with_teacher is None else with_teacher
        self.env = env
        self.device = env.device
        self.num_classes = num_classes
        self.batch_per_device = batch_per_device
        train_cfg = cfg.train
        self.amp_dtype = resolve_amp(train_cfg.amp, self.device)
        if self.amp_dtype == torch.float16 and self.device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs CUDA; use bf16 or none on the CPU")
        self.channels_last = train_cfg.channels_last and self.device.type == "cuda"
        check_teacher_precision(train_cfg.teacher_precision, self.device)
        self._build_models()
        # train.optimizer: SGD or AdamW (engine/optim.py), one fused kernel for the whole update on CUDA. A loss's
        # own second optimiser (a discriminator) trains its parameters; the student's leaves them alone.
        self.optimizer = build_optimizer(self.step_module, train_cfg, fused=self.device.type == "cuda",
                                         exclude=self.auxiliary.owns)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.set_schedule(train_cfg.budget.iterations or 1)
        self.first_step_phases: dict[str, dict[str, float]] | None = None
        """Where this process's first step went (:class:`~cskd.timing.PhaseClock`: the teacher's forward, the
        student's with the losses, the backward, the optimiser; wall seconds, and of each torch.compile's and
        Triton's autotuning): that step compiles everything. Set by that step."""

    # ------------------------------------------------------------------------------------------------ building

    def _build_models(self) -> None:
        cfg, train_cfg = self.cfg, self.cfg.train
        model_cfg = cfg.model
        # pretrained_base goes to the backbone's builder (it may convert its own file layouts: timm, SegFormer)
        student = build_segmentor(model_cfg.model, model_cfg.backbone, self.num_classes, model_cfg.aux,
                                  pretrained_base=model_cfg.pretrained_base)
        if model_cfg.weights:
            load_weights(student, model_cfg.weights)
        if train_cfg.fuses_maxpool(self.device):
            triton_max_pools_(student)
        dilated = train_cfg.resolved_dilated_convs(self.device)
        dilated_chosen = train_cfg.dilated_convs != "auto"
        _rewrite_dilated_convs(student, dilated, cfg.data.crop_size, chosen=dilated_chosen)

        self.teacher: Segmentor | None = None
        self.teacher_aux = False
        self.teacher_fp8_convs: int | None = None  # set by quantize_teacher
        losses: dict[str, DistillLoss] = {}
        if self.with_teacher:
            if cfg.teacher is None:
                raise ConfigError("distillation needs a 'teacher' block")
            teacher_cfg = cfg.teacher
            _load_all()
            # The teacher runs its aux head only when a loss distils the aux logits (DIST, DSD), and only where the
            # backbone has one as published (ResNets; a MobileNetV2 teacher has none, and those terms are skipped).
            wants_aux = any(getattr(LOSSES.get(lc.name), "needs_teacher_aux", False) for lc in cfg.losses)
            teacher = build_segmentor(teacher_cfg.model, teacher_cfg.backbone, self.num_classes, aux=None if wants_aux else False)
            self.teacher_aux = teacher.aux_head is not None
            if teacher_cfg.weights:
                load_teacher_weights(teacher, teacher_cfg.weights, keep_aux=self.teacher_aux)
            teacher.eval().requires_grad_(False)
            # Frozen: its BatchNorms become part of the convs (exact), and its weights are stored in the autocast
            # dtype so no step re-casts them.
            fold_batchnorm_(teacher)
            _rewrite_dilated_convs(teacher, dilated, cfg.data.crop_size, chosen=dilated_chosen)  # before fusion
            if train_cfg.fuses_teacher_epilogues(self.device):
                fuse_conv_epilogues_(teacher)
            self.teacher = teacher.to(self.device, dtype=self.amp_dtype or torch.float32)
            if train_cfg.teacher_graph and self.device.type != "cuda":
                raise ConfigError(f"train.teacher_graph=true needs CUDA (train.device is {self.device}); set it to "
                                  "null (on CUDA only) or false")
            self._teacher_call: Callable[..., SegOutput] = (
                GraphedForward(self.teacher, name="the teacher's forward (train.teacher_graph)")
                if train_cfg.graphs_teacher(self.device) else self.teacher)
            for lc in cfg.losses:
                if lc.name in losses:
                    raise ConfigError(f"losses: '{lc.name}' is listed twice")
                losses[lc.name] = build_loss(
                    lc.name, lc.params, student_channels=student.feature_channels,
                    teacher_channels=teacher.feature_channels, num_classes=self.num_classes, where="losses",
                    student_stage_channels=tuple(student.backbone.out_channels),
                    teacher_stage_channels=tuple(teacher.backbone.out_channels),
                )
            self._check_batch_requirements(losses)

        step = StepModule(student, losses, aux_weight=train_cfg.aux_weight).to(self.device)
        if self.env.distributed and train_cfg.sync_bn and self.device.type == "cuda":
            # Batch statistics over all GPUs (PyTorch's SyncBatchNorm is CUDA-only); the losses' own BN layers too
            # (CIRKD's projection head), as published.
            step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
        if self.channels_last:
            step.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        self.keep_teacher_stages = any(loss.uses_stages for loss in losses.values())
        self.pre_step_losses = [loss for loss in step.losses.values()
                                if type(loss).before_optimizer_step is not DistillLoss.before_optimizer_step]
        self.auxiliary = AuxiliaryOptimizers(step.losses)  # after the move to the device, before compile and DDP
        step.keep_outputs = bool(self.auxiliary)
        self.cudagraphs = False
        self.compile_cache: CompileCache | None = None
        fused = train_cfg.fuses_ce(self.device)
        self.compiled = bool(train_cfg.compile or (train_cfg.compile is None and self.device.type == "cuda"))
        if self.compiled:
            if train_cfg.compile_cache is not None:  # before the first (lazy) compile reads the cache folder
                root = default_root() if train_cfg.compile_cache == "auto" else train_cfg.compile_cache
                self.compile_cache = CompileCache.for_run(root, cfg, self.device, self.num_classes,
                                                          self.batch_per_device, self.env.world_size)
                self.compile_cache.activate()
            mode = None if train_cfg.compile_mode == "default" else train_cfg.compile_mode
            loss_mode = train_cfg.loss_compile_mode or train_cfg.compile_mode
            loss_mode = None if loss_mode == "default" else loss_mode
            step.model.compile(mode=mode)
            if self.teacher is not None and not self.fp8_pending:
                self._compile_teacher(mode)
            self._teacher_compile_mode = mode  # an FP8 teacher is compiled by quantize_teacher, once quantized
            for loss in step.losses.values():
                loss.compile(mode=loss_mode)
            if not fused:
                step.compile_ce(mode=mode)
            self.cudagraphs = "reduce-overhead" in (mode, loss_mode) and self.device.type == "cuda"
        if fused:
            step.use_fused_ce()
        self.step_module = step
        self.student: Segmentor = step.model
        # train.teacher_stream: the teacher's forward on its own CUDA stream; ``_pending`` holds the next batch's
        # teacher outputs launched during the previous step's backward ("pipeline"): (its images, outputs, ready).
        use_stream = train_cfg.teacher_stream != "off" and self.device.type == "cuda" and self.teacher is not None
        self.teacher_stream = torch.cuda.Stream(self.device) if use_stream else None
        self._pending: tuple[Tensor, SegOutput | None, torch.cuda.Event | None] | None = None
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            if self.auxiliary:  # reduced by the auxiliary step itself, after its own backward
                # DDP's (long-standing) hook for parameters it must not reduce, as its
                # _set_params_and_buffers_to_ignore_for_model sets it.
                step._ddp_params_and_buffers_to_ignore = self.auxiliary.ddp_ignored_names(step)
            # No buffer broadcast at every forward: memory-bank queues (hundreds of MB for CIRKD) are kept identical
            # by the losses themselves, and BN statistics are synchronised by SyncBatchNorm on GPUs and by
            # sync_buffers() at evaluation and checkpoint points.
            self._forward: nn.Module = DistributedDataParallel(step, device_ids=ids, broadcast_buffers=False)
        else:
            self._forward = step  # the step module as called: wrapped in DDP when data-parallel

    @property
    def pipelines_teacher(self) -> bool:
        """``train.teacher_stream: pipeline`` with a teacher: :meth:`step` wants the next batch's images. Off CUDA
        there is no second stream, and the next batch's teacher forward simply runs before the backward."""
        return self.teacher is not None and self.cfg.train.teacher_stream == "pipeline"

    @property
    def fp8_pending(self) -> bool:
        """The teacher is to run in FP8 (``train.teacher_precision: fp8``) and is not quantized yet."""
        return (self.cfg.train.teacher_precision == "fp8" and self.teacher is not None
                and self.teacher_fp8_convs is None)

    def quantize_teacher(self, images: Tensor) -> int:
        """For ``train.teacher_precision: fp8``: calibrate the teacher on ``images`` and run its eligible 1×1 convs
        in FP8 (:func:`~cskd.models.fp8.quantize_1x1_fp8_`), then compile it if the run compiles; returns the
        number of convs replaced (0 with ``amp`` or without a teacher; the first count again on a second call).

        ``images``: a uint8 N×3×H×W batch as the loader gives it (normalised here, as :meth:`prepare` does) or
        float images already normalised (what :meth:`prepare` returns). The scales depend only on these images and
        the teacher's weights, so a caller that passes the same batch (the Trainer: the first training images,
        :func:`calibration_images`) gets the same teacher after a kill and resume."""
        if self.teacher is None or self.cfg.train.teacher_precision != "fp8":
            return 0
        if self.teacher_fp8_convs is not None:
            return self.teacher_fp8_convs
        from ..data.normalize import normalize

        x = images.to(self.device)
        x = normalize(x) if x.dtype == torch.uint8 else x.float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():  # the activations' amax as the teacher's forward will see them
            self.teacher_fp8_convs = quantize_1x1_fp8_(self.teacher, x, with_aux=self.teacher_aux)
        if self.compiled:  # after the swap: the hooks ran eagerly and the graph sees the FP8 modules
            self._compile_teacher(self._teacher_compile_mode)
        return self.teacher_fp8_convs

    def _compile_teacher(self, mode: str | None) -> None:
        """torch.compile the teacher, whole or (``train.teacher_compile: head``) only its heads."""
        assert self.teacher is not None
        if self.cfg.train.teacher_compile == "head":
            for head in (self.teacher.head, self.teacher.aux_head):
                if head is not None:
                    head.compile(mode=mode)
        else:
            self.teacher.compile(mode=mode)

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
        """uint8 images and masks from the loader → normalised float images and int64 labels on the device. A batch
        of still-encoded JPEGs (``data.decode: gpu``) is decoded and augmented on the device first."""
        from ..data.gpu_decode import decode_batch, is_encoded
        from ..data.normalize import normalize

        if is_encoded(batch):
            images = decode_batch(batch, self.device)
        else:
            images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True).long()
        x = normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, masks

    def teacher_forward(self, x: Tensor) -> SegOutput | None:
        if self.teacher is None:
            return None
        if self.fp8_pending:
            raise RuntimeError("train.teacher_precision=fp8: call StepRunner.quantize_teacher(images) before the "
                               "first step (the Trainer and benchmarks/train_step.py do)")
        with torch.inference_mode(), self.autocast():
            out = self._teacher_call(x, with_aux=self.teacher_aux)
        # Inference tensors may not be saved for backward; the copy (a few MB) makes them ordinary constants. The
        # backbone stages are copied only for a loss that reads them (``uses_stages``): they are most of the size.
        stages = tuple(s.clone() for s in out.stages) if self.keep_teacher_stages else ()
        return SegOutput(*(v.clone() if v is not None else None for v in out[:3]), stages)

    def _launch_teacher(self, x: Tensor) -> tuple[SegOutput | None, torch.cuda.Event | None]:
        """The teacher's forward; with :attr:`teacher_stream`, launched on that stream after the work queued so far
        on the current one (``x`` is made there), with the event that marks its end. Its outputs are allocated on
        the side stream and freed, a step later, on the host: the side stream's next use of their memory comes
        after its next ``wait_stream``, so after every kernel that read them."""
        if self.teacher_stream is None:
            return self.teacher_forward(x), None
        self.teacher_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.teacher_stream):
            out = self.teacher_forward(x)
            ready = torch.cuda.Event()
            ready.record(self.teacher_stream)
        x.record_stream(self.teacher_stream)  # x may be freed and reused on the main stream before the side is done
        return out, ready

    def step(
        self, x: Tensor, masks: Tensor, next_x: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimisation step; returns the total loss and its terms, detached, on the device (no host sync).
        ``next_x``: the next step's images, with ``train.teacher_stream: pipeline`` (their teacher forward is
        launched before this step's backward and used by the next call whose ``x`` is that same tensor)."""
        # The first step compiles and autotunes everything: its phases are timed (device syncs, on that step only).
        clock = PhaseClock(self.device) if self.first_step_phases is None else None
        if self.cudagraphs:  # a new iteration: CUDA-graph outputs of the previous one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is x:
            _, teacher_out, ready = pending
        else:
            teacher_out, ready = self._launch_teacher(x)
        if clock is not None and self.teacher is not None:
            clock.mark("teacher")
        with self.autocast():
            total, terms = self._forward(x, masks, teacher_out, teacher_ready=ready)
        if next_x is not None and self.pipelines_teacher:
            self._pending = (next_x, *self._launch_teacher(next_x))
        if clock is not None:
            clock.mark("student and losses")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if clock is not None:
            clock.mark("backward")
        if self.pre_step_losses:
            self.scaler.unscale_(self.optimizer)
            for loss in self.pre_step_losses:
                loss.before_optimizer_step()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.auxiliary:  # the losses' own optimisers, after the student's (the published order)
            student_out, teacher_out, targets = self.step_module.last_outputs
            self.step_module.last_outputs = None
            aux_terms = self.auxiliary.step(student_out, teacher_out, targets)
            if set(aux_terms) & set(terms):
                raise RuntimeError(f"auxiliary terms {sorted(set(aux_terms) & set(terms))} clash with loss terms")
            terms = {**terms, **aux_terms}
        if clock is not None:
            clock.mark("optimizer")
            self.first_step_phases = clock.phases
        # Copies (scalars): the values outlive this step, and CUDA-graph outputs are reused by the next replay.
        return total.detach().clone(), {k: v.detach().float().clone() for k, v in terms.items()}

    def sync_buffers(self) -> None:
        """Give every process rank 0's BatchNorm statistics (they drift apart without SyncBatchNorm, e.g. on CPUs)."""
        if self.env.distributed:
            import torch.distributed as dist

            for buf in self.student.buffers():
                dist.broadcast(buf, 0)

    def sync(self) -> None:
        synchronize(self.device)

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
        after_step: Callable[[Tensor, dict[str, Tensor]], None] | None = None, round_size: int = 1,
    ) -> float:
        """Seconds per iteration of this method fed by ``batches`` (plus ``after_step``, the loop's own per-step
        work). Fed by the training loader, the timing includes what the loop will wait for: batches that come
        slower than the step, and the loader's share of the host (its pinning thread competes with the kernel
        launches). Every state (weights, BN statistics, optimiser, schedule, RNG) is restored afterwards, so the
        real run starts exactly where an iteration-budget run would. The slowest process sets the pace of a
        data-parallel run.

        Batches stamped by :class:`~cskd.engine.sampling.StampedCollate` (``ready_at``) also give the loader's own
        pace: the time between the making of the first and the last timed batch, over whole rounds of
        ``round_size`` (the number of workers, which finish their batches in turn). Timing the steps alone would
        under-measure a loader that is slower than the step whenever the timed steps consume batches the workers
        queued earlier; the batches' making times do not depend on the queue. The result is the slower of the two."""
        saved_model = copy.deepcopy(self.step_module.state_dict())
        saved_opt = copy.deepcopy(self.optimizer.state_dict())
        saved_aux = copy.deepcopy(self.auxiliary.state_dict())
        saved_sched = copy.deepcopy(self.scheduler.state_dict())
        rng = capture_rng()
        self.step_module.train()
        made: list[float] = []

        def one_step() -> None:
            batch = next(batches)
            if "ready_at" in batch:
                made.append(float(batch["ready_at"]))
            loss, terms = self.step(*self.prepare(batch))
            if after_step is not None:
                after_step(loss, terms)

        for _ in range(warmup):
            one_step()
        self.sync()
        made.clear()
        start = time.perf_counter()
        for _ in range(steps):
            one_step()
        self.sync()
        seconds = (time.perf_counter() - start) / steps
        span = (len(made) - 1) // max(1, round_size) * max(1, round_size)
        if span > 0:
            seconds = max(seconds, (made[span] - made[0]) / span)
        seconds = max(all_gather_objects(seconds))
        self.step_module.load_state_dict(saved_model)
        self.optimizer.load_state_dict(saved_opt)
        self.auxiliary.load_state_dict(saved_aux)
        self.scheduler.load_state_dict(saved_sched)
        restore_rng(rng)
        return seconds


__all__ = ["PolyDecay", "StepRunner", "calibration_images", "check_teacher_precision"]
