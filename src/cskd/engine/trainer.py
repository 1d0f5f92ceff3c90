"""The one training loop: teachers, baseline students and every distillation method.

A method is the list of distillation losses in the config; everything else (data, schedule, precision,
checkpoints, evaluation, logging, multi-GPU) is shared, so methods differ only in their loss terms.

The loop keeps the device busy: no host synchronisation between logging points (loss values are accumulated on the
device and read every ``train.log_every`` iterations), uint8 batches copied asynchronously and normalised on the
device, the teacher run under ``torch.inference_mode``. A non-finite loss is detected with the exact iteration and
its terms, and training stops before any checkpoint could be overwritten with broken weights.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from .. import __version__
from ..errors import CheckpointError, ConfigError, TrainingError
from ..losses import build_loss
from ..models import build_segmentor, load_backbone_weights, load_weights, safe_load
from ..models.segmentor import SegOutput, Segmentor
from .checkpointing import atomic_save, capture_rng, restore_rng
from .config import ExperimentConfig, save_config
from .distributed import DistEnv, all_gather_objects, barrier, init_distributed
from .records import RunRecorder, read_records
from .sampling import SeededBatchSampler, SeededSamples
from .step import TrainStep


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    train_seconds: float
    """Time spent in training steps (evaluation and checkpoint I/O excluded), synchronised on the GPU."""
    planned_seconds: float | None
    """For a time budget: the calibrated step time × the planned iterations."""
    step_seconds: float | None
    """For a time budget: the calibrated time of one step."""
    eval_seconds: float
    checkpoint_seconds: float
    best_miou: float | None
    best_iteration: int | None
    final_metrics: dict[str, Any] | None
    images_per_second: float
    history: list[dict[str, Any]] = field(default_factory=list)


class PolyDecay:
    """LR factor ``(1 − t/T)^power`` in closed form (the published schedule: the first step uses the base LR).
    A plain object, not a lambda, so that the scheduler's state dict holds (T, power) and survives a resume."""

    def __init__(self, total: int, power: float) -> None:
        self.total = total
        self.power = power

    def __call__(self, t: int) -> float:
        return max(0.0, 1.0 - t / self.total) ** self.power


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[setting]


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _infinite(loader: DataLoader) -> Iterator[dict[str, Any]]:
    while True:  # the batch sampler is endless; this only guards against a finite one
        yield from loader


class Trainer:
    """Build everything a config describes, then :meth:`fit`.

    ``resume``: None (fresh run; refuses to overwrite an existing run's checkpoints), "auto" (continue from
    ``<run_dir>/last.pt`` if present), or a checkpoint path.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        resume: str | None = None,
        progress: bool = True,
        env: DistEnv | None = None,
        overwrite: bool = False,
    ) -> None:
        self.cfg = cfg
        self.env = env or init_distributed(cfg.train.device)
        self.device = self.env.device
        self.run_dir = cfg.run_dir
        self.progress = progress
        t = cfg.train
        if t.batch_size % self.env.world_size:
            raise ConfigError(
                f"train.batch_size={t.batch_size} is the total over {self.env.world_size} processes and must divide "
                "evenly among them"
            )
        self.batch_per_device = t.batch_size // self.env.world_size
        self.amp_dtype = resolve_amp(t.amp, self.device)
        if self.amp_dtype is not None and self.device.type == "cpu" and t.amp == "fp16":
            raise ConfigError("train.amp=fp16 needs CUDA; use bf16 or none on the CPU")

        self._configure_backends()
        resume_path = self._resume_path(resume, overwrite)

        _set_seed(t.seed)  # identical initialisation on every rank
        self._build_data()
        self._build_models()
        self._build_optimizer()
        _set_seed(t.seed * 1000 + self.env.rank + 1)  # per-rank dropout / random projections

        self.iteration = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.checkpoint_seconds = 0.0
        self.best_miou: float | None = None
        self.best_iteration: int | None = None
        self.step_seconds: float | None = None
        self.total_iterations = t.budget.iterations
        if resume_path is not None:
            self._load_checkpoint(resume_path)
        if self.total_iterations is None:
            self.total_iterations = self._calibrate()
            self._set_schedule(self.total_iterations)
        self.planned_seconds = (
            self.step_seconds * self.total_iterations if self.step_seconds is not None else None
        )

    # ------------------------------------------------------------------------------------------------ set-up

    def _configure_backends(self) -> None:
        t = self.cfg.train
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = t.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _resume_path(self, resume: str | None, overwrite: bool) -> Path | None:
        last = self.run_dir / "last.pt"
        if resume is None:
            if last.exists() and not overwrite:
                raise ConfigError(
                    f"{self.run_dir} already holds a run (last.pt); pass --resume auto to continue it, --overwrite "
                    "to start again from scratch, or choose another --output-dir"
                )
            return None
        if resume == "auto":
            return last if last.exists() else None
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint to resume from")
        return path

    def _build_data(self) -> None:
        from ..data import build_dataset, build_eval_transform, build_train_transform

        d = self.cfg.data
        train_ds = build_dataset(d.dataset, d.root, d.train_split, skip_bad=d.skip_bad)
        transform = build_train_transform(d.crop_size, d.scale_range, d.hflip)
        self.train_set = SeededSamples(train_ds, transform, self.cfg.train.seed)
        self.dataset_info = train_ds.info
        self.num_classes = train_ds.num_classes
        self.val_set = build_dataset(d.dataset, d.root, d.val_split, build_eval_transform(), skip_bad=d.skip_bad)
        if not self.val_set.has_labels:
            raise ConfigError(f"data.val_split={d.val_split!r} of {d.dataset} has no labels to validate against")

    def _make_train_loader(self, start_batch: int) -> DataLoader:
        d = self.cfg.data
        sampler = SeededBatchSampler(
            len(self.train_set), self.batch_per_device, self.cfg.train.seed, self.env.rank, self.env.world_size,
            start_batch=start_batch,
        )
        self.batches_per_epoch = sampler.batches_per_epoch
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            generator=torch.Generator().manual_seed(self.cfg.train.seed),  # keeps the global RNG untouched
            num_workers=d.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=d.workers > 0,
            prefetch_factor=4 if d.workers > 0 else None,
        )

    def _make_val_loader(self) -> DataLoader:
        e = self.cfg.eval
        n = len(self.val_set) if e.max_images is None else min(e.max_images, len(self.val_set))
        shard = Subset(self.val_set, list(range(self.env.rank, n, self.env.world_size)))
        return DataLoader(shard, batch_size=e.batch_size, shuffle=False, num_workers=min(self.cfg.data.workers, 4),
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0))

    def _build_models(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        m = cfg.model
        student = build_segmentor(m.model, m.backbone, self.num_classes, m.aux)
        if m.pretrained_base:
            load_backbone_weights(student, m.pretrained_base)
        if m.weights:
            load_weights(student, m.weights)
        self.student: Segmentor = student

        self.teacher: Segmentor | None = None
        losses: dict[str, Any] = {}
        if cfg.losses:
            assert cfg.teacher is not None
            tm = cfg.teacher
            teacher = build_segmentor(tm.model, tm.backbone, self.num_classes, aux=False)
            if tm.weights:
                _load_teacher(teacher, tm.weights)
            teacher.eval().requires_grad_(False)
            self.teacher = teacher.to(self.device)
            for lc in cfg.losses:
                if lc.name in losses:
                    raise ConfigError(f"losses: '{lc.name}' is listed twice")
                losses[lc.name] = build_loss(
                    lc.name, lc.params, student_channels=student.feature_channels,
                    teacher_channels=teacher.feature_channels, num_classes=self.num_classes, where="losses",
                )
            self._check_batch_requirements(losses)

        step = TrainStep(student, losses, aux_weight=t.aux_weight).to(self.device)
        if self.env.distributed and t.sync_bn:
            step.model = nn.SyncBatchNorm.convert_sync_batchnorm(step.model)
            self.student = step.model
        if t.channels_last and self.device.type == "cuda":
            step.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        if t.compile:
            self.student.compile()
            if self.teacher is not None:
                self.teacher.compile()
            for loss in step.losses.values():
                loss.compile()
        self.step_module = step
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module: nn.Module = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=False)
        else:
            self.train_module = step

    def _check_batch_requirements(self, losses: dict[str, Any]) -> None:
        for name, loss in losses.items():
            need = loss.min_batch_per_device
            global_scope = getattr(loss, "cka_scope", "device") == "global"
            have = self.cfg.train.batch_size if global_scope else self.batch_per_device
            if have < need:
                scope = "in the global batch" if global_scope else "per device"
                raise ConfigError(
                    f"loss '{name}' needs at least {need} images {scope}, but train.batch_size="
                    f"{self.cfg.train.batch_size} over {self.env.world_size} process(es) gives {have}. CKA compares "
                    "samples of a batch: with 2 it is identically 1 (no signal), with 1 undefined. Raise "
                    "train.batch_size" + ("" if global_scope else " or set cka_scope: global") + "."
                )

    def _build_optimizer(self) -> None:
        t = self.cfg.train
        params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self._set_schedule(t.budget.iterations or 1)

    def _set_schedule(self, total: int) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.train.lr
            g.pop("initial_lr", None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, PolyDecay(total, self.cfg.train.poly_power))

    # ------------------------------------------------------------------------------------------------ the step

    def _autocast(self):  # noqa: ANN202
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _prepare(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        from ..data.normalize import normalize

        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True).long()
        x = normalize(images)
        if self.cfg.train.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, masks

    def _teacher_forward(self, x: Tensor) -> SegOutput | None:
        if self.teacher is None:
            return None
        with torch.inference_mode(), self._autocast():
            out = self.teacher(x)
        # Inference tensors may not be saved for backward; the copy (a few MB) makes them ordinary constants.
        return SegOutput(*(v.clone() if v is not None else None for v in out))

    def train_step(self, x: Tensor, masks: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        teacher_out = self._teacher_forward(x)
        with self._autocast():
            total, terms = self.train_module(x, masks, teacher_out)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return total.detach(), {k: v.detach().float() for k, v in terms.items()}

    # ------------------------------------------------------------------------------------------------ budget

    def _calibrate(self) -> int:
        """Time this method's own step on random batches of the training size, then restore every state, so
        the real run starts exactly where an iteration-budget run would."""
        b = self.cfg.train.budget
        assert b.gpu_seconds is not None
        saved_model = copy.deepcopy(self.step_module.state_dict())
        saved_opt = copy.deepcopy(self.optimizer.state_dict())
        saved_sched = copy.deepcopy(self.scheduler.state_dict())
        rng = capture_rng()
        h, w = self.cfg.data.crop_size
        gen = torch.Generator().manual_seed(12345)
        images = torch.randint(0, 256, (self.batch_per_device, 3, h, w), generator=gen, dtype=torch.uint8)
        masks = torch.randint(0, self.num_classes, (self.batch_per_device, h, w), generator=gen, dtype=torch.uint8)
        batch = {"image": images, "mask": masks}
        self.step_module.train()
        for _ in range(b.warmup_steps):
            self.train_step(*self._prepare(batch))
        self._sync()
        start = time.perf_counter()
        for _ in range(b.calibration_steps):
            self.train_step(*self._prepare(batch))
        self._sync()
        step = (time.perf_counter() - start) / b.calibration_steps
        # The slowest rank sets the pace of a synchronous data-parallel run.
        step = max(all_gather_objects(step))
        self.step_module.load_state_dict(saved_model)
        self.optimizer.load_state_dict(saved_opt)
        self.scheduler.load_state_dict(saved_sched)
        restore_rng(rng)
        self.step_seconds = step
        return max(1, int(b.gpu_seconds / step))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        rng_all = all_gather_objects(capture_rng())
        return {
            "model": self.student.state_dict(),
            "spec": self.student.spec.to_dict() if self.student.spec else None,
            "losses": self.step_module.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "total_iterations": self.total_iterations,
            "step_seconds": self.step_seconds,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "checkpoint_seconds": self.checkpoint_seconds,
            "best_miou": self.best_miou,
            "best_iteration": self.best_iteration,
            "rng": rng_all,
            "world_size": self.env.world_size,
            "config": self.cfg.to_dict(),
            "dataset": {
                "name": self.dataset_info.name,
                "num_classes": self.dataset_info.num_classes,
                "class_names": list(self.dataset_info.class_names),
                "palette": [list(c) for c in self.dataset_info.palette],
            },
            "cskd_version": __version__,
        }

    def save(self, name: str) -> Path:
        start = time.perf_counter()
        state = self._state()  # every rank joins the RNG gather
        path = self.run_dir / name
        if self.env.is_main:
            atomic_save(state, path)
        barrier()
        self.checkpoint_seconds += time.perf_counter() - start
        return path

    def _load_checkpoint(self, path: Path) -> None:
        ckpt = safe_load(path)
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "iteration" not in ckpt:
            raise CheckpointError(f"{path}: not a cskd training checkpoint (no optimizer state / iteration)")
        old = ckpt.get("config", {})
        for block in ("model", "teacher", "losses"):
            if old.get(block) != self.cfg.to_dict().get(block):
                raise CheckpointError(
                    f"{path}: the checkpoint was trained with a different '{block}' block than the config "
                    f"({old.get(block)!r} vs {self.cfg.to_dict().get(block)!r}); resume with the run's own config "
                    f"({self.run_dir / 'config.yaml'})"
                )
        load_weights(self.student, ckpt["model"], name=str(path))
        self.step_module.losses.load_state_dict(ckpt["losses"])
        self.total_iterations = ckpt["total_iterations"]
        self._set_schedule(self.total_iterations)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.step_seconds = ckpt.get("step_seconds")
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.eval_seconds = float(ckpt.get("eval_seconds", 0.0))
        self.checkpoint_seconds = float(ckpt.get("checkpoint_seconds", 0.0))
        self.best_miou = ckpt.get("best_miou")
        self.best_iteration = ckpt.get("best_iteration")
        rng = ckpt.get("rng") or []
        if len(rng) == self.env.world_size:
            restore_rng(rng[self.env.rank])
        else:
            _set_seed(self.cfg.train.seed * 1000 + self.env.rank + 1 + self.iteration)
        self.resumed_from = path

    # ------------------------------------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, Any]:
        from ..evaluation import evaluate

        e = self.cfg.eval
        start = time.perf_counter()
        metrics = evaluate(
            self.student, self._make_val_loader(), num_classes=self.num_classes, device=self.device,
            mode=e.mode, crop_size=e.crop_size, stride=e.stride, scales=e.scales, flip=e.flip,
            amp_dtype=self.amp_dtype, progress=False,
        )
        self.eval_seconds += time.perf_counter() - start
        return metrics

    # ------------------------------------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        total = self.total_iterations
        assert total is not None
        main = self.env.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            if self.iteration:  # drop records a killed run wrote after its last checkpoint
                kept = [r for r in read_records(self.run_dir / "log.jsonl") if r.get("iteration", 0) <= self.iteration]
                (self.run_dir / "log.jsonl").write_text("".join(_json_line(r) for r in kept))
            elif (self.run_dir / "log.jsonl").exists():
                (self.run_dir / "log.jsonl").unlink()
        rec = RunRecorder(self.run_dir, main, total, self.iteration, self.progress)
        if main:
            rec.message(self._banner())
            if self.teacher is not None and cfg.teacher is not None and not cfg.teacher.weights:
                rec.message("warning: the teacher has random weights (teacher.weights is not set)")
        if self.step_seconds is not None and main and self.iteration == 0:
            rec.write("budget", 0, {"gpu_seconds": t.budget.gpu_seconds, "step_seconds": self.step_seconds,
                                    "planned_iterations": total})

        loader = self._make_train_loader(self.iteration)
        data = iter(_infinite(loader))
        self.step_module.train()
        sums: dict[str, Tensor] = {}
        count = 0
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        bad_terms: dict[str, Tensor] = {}
        window_start = time.perf_counter()
        try:
            while self.iteration < total:
                batch = next(data)
                x, masks = self._prepare(batch)
                loss, terms = self.train_step(x, masks)
                self.iteration += 1
                it = self.iteration
                finite = torch.isfinite(loss)
                newly_bad = (~finite) & (first_bad < 0)
                first_bad = torch.where(newly_bad, torch.full_like(first_bad, it), first_bad)
                for k, v in terms.items():
                    sums[k] = sums[k] + v if k in sums else v.clone()
                    bad_terms[k] = torch.where(newly_bad, v, bad_terms.get(k, torch.zeros_like(v)))
                sums["loss"] = sums["loss"] + loss if "loss" in sums else loss.clone()
                count += 1

                at_log = it % t.log_every == 0 or it == total
                at_save = it % t.save_every == 0 or it == total
                at_val = it % t.val_every == 0 or it == total
                if not (at_log or at_save or at_val):
                    continue
                # ---- a synchronisation point: read the accumulated values once
                self._sync()
                self.train_seconds += time.perf_counter() - window_start
                bad_it = int(first_bad.item())
                if bad_it >= 0:
                    self._fail_nonfinite(bad_it, bad_terms, rec)
                means = {k: float(v.item()) / count for k, v in sums.items()}
                means["lr"] = self.optimizer.param_groups[0]["lr"]
                means["train_seconds"] = self.train_seconds
                rec.write("train", it, means)
                rec.advance(count, {k: means[k] for k in ("loss", "lr") if k in means})
                sums, count = {}, 0
                if at_val:
                    metrics = self.evaluate()
                    miou = metrics.miou
                    rec.write("val", it, {"miou": miou, "pixel_acc": metrics.pixel_acc,
                                          "mean_acc": metrics.mean_acc, "train_seconds": self.train_seconds})
                    rec.message(f"iteration {it}/{total}: val mIoU {100 * miou:.2f}%")
                    self.last_metrics = metrics
                    if self.best_miou is None or miou > self.best_miou:
                        self.best_miou, self.best_iteration = miou, it
                        self.save("best.pt")
                    self.step_module.train()
                if at_save:
                    self.save("last.pt")
                window_start = time.perf_counter()
        finally:
            rec.close()

        metrics = getattr(self, "last_metrics", None)
        result = TrainResult(
            run_dir=self.run_dir, iterations=self.iteration, train_seconds=self.train_seconds,
            planned_seconds=self.planned_seconds, step_seconds=self.step_seconds, eval_seconds=self.eval_seconds,
            checkpoint_seconds=self.checkpoint_seconds, best_miou=self.best_miou, best_iteration=self.best_iteration,
            final_metrics=metrics.to_dict() if metrics is not None else None,
            images_per_second=(self.iteration * t.batch_size / self.train_seconds) if self.train_seconds else 0.0,
            history=read_records(self.run_dir / "log.jsonl") if main else [],
        )
        if main:
            summary = {
                "iterations": result.iterations, "train_seconds": result.train_seconds,
                "planned_seconds": result.planned_seconds, "eval_seconds": result.eval_seconds,
                "checkpoint_seconds": result.checkpoint_seconds, "images_per_second": result.images_per_second,
                "best_miou": result.best_miou, "best_iteration": result.best_iteration,
            }
            with (self.run_dir / "log.jsonl").open("a") as f:
                f.write(_json_line({"kind": "summary", "iteration": self.iteration, "time": time.time(), **summary}))
            if metrics is not None:
                metrics.save(self.run_dir, stem="metrics", class_names=self.dataset_info.class_names)
            best = f"best val mIoU {100 * self.best_miou:.2f}% at iteration {self.best_iteration}" \
                if self.best_miou is not None else "no validation"
            print(f"done: {self.iteration} iterations, {self.train_seconds:.1f} s of training "
                  f"({result.images_per_second:.1f} img/s), {best}; checkpoints in {self.run_dir}", flush=True)
        return result

    def _fail_nonfinite(self, iteration: int, terms: dict[str, Tensor], rec: RunRecorder) -> None:
        values = {k: float(v.item()) for k, v in terms.items()}
        last = self.run_dir / "last.pt"
        keep = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
        rec.write("error", iteration, {"nonfinite_terms": values})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        raise TrainingError(
            f"non-finite loss at iteration {iteration} ({shown}); training stopped and {keep} (left untouched). "
            "Lower train.lr, use train.amp=bf16/none instead of fp16, or check the data for bad labels."
        )

    def _banner(self) -> str:
        c = self.cfg
        method = " + ".join(lc.name for lc in c.losses) or "no distillation"
        teacher = f"{c.teacher.model}-{c.teacher.backbone} → " if c.teacher and c.losses else ""
        amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        return (
            f"cskd {__version__}: {teacher}{c.model.model}-{c.model.backbone} ({method}) on {c.data.dataset} "
            f"[{len(self.train_set)} train / {len(self.val_set)} val], {self.total_iterations} iterations × "
            f"batch {c.train.batch_size} ({self.env.world_size} process(es), {self.device}, {amp})"
            + (f", resumed at iteration {self.iteration}" if self.iteration else "")
        )


def _load_teacher(teacher: Segmentor, path: str) -> None:
    """Teacher files usually come with an auxiliary head the teacher does not need here: drop it."""
    from ..models.checkpoint import extract_state_dict
    from ..models.convert import from_official, is_official_layout, unwrap_state_dict

    state = extract_state_dict(safe_load(path), path)
    assert teacher.spec is not None
    state = from_official(state, teacher.spec.model, teacher.spec.backbone) if is_official_layout(state) \
        else unwrap_state_dict(state)
    state = {k: v for k, v in state.items() if not k.startswith("aux_head.")}
    load_weights(teacher, state, name=path)


def _json_line(rec: dict[str, Any]) -> str:
    import json

    return json.dumps(rec) + "\n"


def train(cfg: ExperimentConfig, resume: str | None = None, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Build a :class:`Trainer` for ``cfg`` and run it."""
    return Trainer(cfg, resume=resume, progress=progress, overwrite=overwrite).fit()


__all__ = ["PolyDecay", "TrainResult", "Trainer", "resolve_amp", "train"]
