"""The one training loop: teachers, baseline students and every distillation method.

A method is the list of distillation losses in the config; everything else (data, schedule, precision,
checkpoints, evaluation, logging, multi-GPU) is shared, so methods differ only in their loss terms.

The loop keeps the device busy: no host synchronisation between logging points (loss values are accumulated on the
device and read every ``train.log_every`` iterations), uint8 batches copied asynchronously and normalised on the
device, the teacher run under ``torch.inference_mode``. A non-finite loss is detected with the exact iteration and
its terms, and training stops before any checkpoint could be overwritten with broken weights.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from .. import __version__
from ..data.workers import iterate as iterate_loader
from ..errors import CheckpointError, ConfigError, TrainingError
from ..evaluation.evaluate import collate_eval
from ..evaluation.metrics import SegMetrics
from ..checkpoints.files import (atomic_save, capture_rng, first_nonfinite, named_tensors, restore_rng,
                                 resume_difference, run_environment, safe_load)
from ..checkpoints.weights import load_weights
from ..models.epilogue import frozen_copy
from ..distributed import DistEnv, all_gather_objects, barrier, init_distributed
from ..timing import WaitClock, describe_phases
from .config import ExperimentConfig, save_config
from .records import RunRecorder, read_records
from .runlock import RunLock
from .runner import StepRunner, calibration_images
from .sampling import SeededBatchSampler, SeededSamples, StampedCollate

PREFETCH_BATCHES = 4
"""Batches each loader worker keeps ready."""


class StepTally:
    """The loss and its terms summed over the steps since the last read, and the first non-finite step with its
    terms, all kept on the device: reading them costs a host synchronisation, done once per logging interval.
    Each step adds a handful of kernels whatever the number of terms (one stacked vector)."""

    def __init__(self, device: torch.device) -> None:
        self.names: list[str] = []
        self.count = 0
        self._sums: Tensor | None = None
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_values: Tensor | None = None

    def add(self, iteration: int, loss: Tensor, terms: dict[str, Tensor]) -> None:
        if not self.names:
            self.names = ["loss", *terms]
        values = torch.stack([loss.float(), *terms.values()])
        # Every term, not only the total: an auxiliary optimiser's terms (a discriminator's loss) are not in it.
        newly_bad = torch.isfinite(values).all().logical_not_() & (self._first_bad < 0)
        self._first_bad = torch.where(newly_bad, iteration, self._first_bad)
        self._bad_values = values if self._bad_values is None else torch.where(newly_bad, values, self._bad_values)
        self._sums = values if self._sums is None else self._sums + values
        self.count += 1

    def first_nonfinite(self) -> tuple[int, dict[str, float]] | None:
        """(iteration, its loss terms) of the first step whose loss was not finite, if any."""
        it = int(self._first_bad.item())
        if it < 0 or self._bad_values is None:
            return None
        return it, {k: v for k, v in zip(self.names[1:], self._bad_values[1:].tolist())}

    def read_means(self) -> dict[str, float]:
        """Means since the last read (then starts a new interval)."""
        if self._sums is None:
            return {}
        means = {k: v / self.count for k, v in zip(self.names, self._sums.tolist())}
        self._sums, self.count = None, 0
        return means


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    train_seconds: float
    """Time spent in training steps (evaluation and checkpoint I/O excluded), synchronised on the GPU."""
    planned_seconds: float | None
    """For a time budget: the calibrated step time × the planned iterations."""
    step_seconds: float | None
    """For a time budget: the calibrated time of one iteration, fed by the training loader."""
    eval_seconds: float
    warmup_seconds: float
    """The first step of each process start (compilation, cuDNN autotuning), kept out of ``train_seconds``."""
    startup_seconds: float | None
    """This process: from the start of ``Trainer(...)`` to the end of its first training step (data and model
    set-up, a time budget's calibration, compilation and the first step itself); None if it took no step."""
    first_val_seconds: float | None
    """This process's first validation, wall time (its loader's start, decoding, inference, metric)."""
    first_val_first_batch_seconds: float | None
    """Of which its first batch (where an evaluation graph compiles and cuDNN autotunes for the new size)."""
    checkpoint_seconds: float
    best_miou: float | None
    best_iteration: int | None
    final_metrics: dict[str, Any] | None
    images_per_second: float
    data_wait_seconds: float = 0.0
    """Of ``train_seconds``, the host's wait for the next batch: near 0 when the loader keeps up with the step;
    a large share means the run is loader-bound (more ``data.workers``, ``data.cache``, GPU decode)."""
    first_step_phases: dict[str, dict[str, float]] | None = None
    """Where this process's first step went, by phase (teacher, student and losses, backward, optimizer): wall
    seconds, and of them torch.compile's (``compile``) and Triton's first-run autotuning (``autotune``); the rest
    of a phase is cuDNN's autotuning and the first runs. See :class:`~cskd.timing.PhaseClock`."""
    history: list[dict[str, Any]] = field(default_factory=list)


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _infinite(loader: DataLoader) -> Iterator[dict[str, Any]]:
    while True:  # the batch sampler is endless; this only guards against a finite one
        yield from iterate_loader(loader)


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
        self._started = time.perf_counter()  # start-up is timed from here (see TrainResult.startup_seconds)
        self.env = env or init_distributed(cfg.train.device)
        self.device = self.env.device
        self.run_dir = cfg.run_dir
        self.progress = progress
        train_cfg = cfg.train
        if train_cfg.batch_size % self.env.world_size:
            raise ConfigError(
                f"train.batch_size={train_cfg.batch_size} is the total over {self.env.world_size} processes and must "
                "divide evenly among them"
            )
        self.batch_per_device = train_cfg.batch_size // self.env.world_size

        self._lock = self._lock_run_dir()  # before anything reads or writes the folder
        try:
            self._set_up(resume, overwrite)
        except BaseException:
            self._lock.release()
            raise

    def _lock_run_dir(self) -> RunLock:
        """One run per output folder: rank 0 takes the folder's lock (the other ranks must not, or they would
        refuse each other); every rank learns whether it was refused, so that none waits for the others."""
        lock, refused = None, None
        if self.env.is_main:
            try:
                lock = RunLock.acquire(self.run_dir)
            except TrainingError as e:
                refused = e
        messages = all_gather_objects(str(refused) if refused is not None else None)
        if refused is not None:
            raise refused
        if messages[0] is not None:
            raise TrainingError(messages[0])
        return lock or RunLock("")

    def _set_up(self, resume: str | None, overwrite: bool) -> None:
        cfg, train_cfg = self.cfg, self.cfg.train
        self._configure_backends()
        resume_path = self._resume_path(resume, overwrite)

        _set_seed(train_cfg.seed)  # identical initialisation on every rank
        self.batches_per_epoch: int | None = None  # known once the first training loader is built
        self._build_data()
        self.runner = StepRunner(cfg, self.num_classes, self.env, self.batch_per_device)
        if self.runner.fp8_pending:  # train.teacher_precision: fp8, before any step and any compile
            # The first training images, untransformed and resized to the crop: the same batch on every rank and
            # in a resumed run, so the teacher's FP8 scales are too.
            self.runner.quantize_teacher(calibration_images(self._plain_train_set, self.batch_per_device,
                                                            cfg.data.crop_size))
        self.student = self.runner.student
        self.step_module = self.runner.step_module
        self.amp_dtype = self.runner.amp_dtype
        _set_seed(train_cfg.seed * 1000 + self.env.rank + 1)  # per-rank dropout / random projections

        self.iteration = 0
        self.train_seconds = 0.0
        self.data_wait_seconds = 0.0
        self.warmup_seconds = 0.0
        self.warmup_steps = 0
        self.eval_seconds = 0.0
        self.checkpoint_seconds = 0.0
        self.startup_seconds: float | None = None
        self.first_val: dict[str, float] | None = None
        self.last_val_timing: dict[str, float] = {}
        self.best_miou: float | None = None
        self.best_iteration: int | None = None
        self.last_metrics: SegMetrics | None = None
        self.resumed_from: Path | None = None
        self._step_seconds: float | None = None
        self.total_iterations = train_cfg.budget.iterations
        if resume_path is not None:
            self._load_checkpoint(resume_path)

    # ------------------------------------------------------------------------------------------------ the budget

    @property
    def step_seconds(self) -> float | None:
        """For a time budget: the calibrated time of one iteration (the calibration runs on first need)."""
        self.plan_budget()
        return self._step_seconds

    @property
    def planned_seconds(self) -> float | None:
        """For a time budget: the calibrated step time × the planned iterations."""
        seconds = self.step_seconds
        return seconds * self.total_iterations if seconds is not None and self.total_iterations else None

    def plan_budget(self) -> None:
        """Fix the iteration count of a time budget (``train.budget.gpu_seconds``) from a timed calibration, and the
        LR schedule with it. Nothing to do for an iteration budget, or when planned already (or resumed).

        The budget is spent on the loop, not on bare steps, so the calibration runs the loop's per-step bookkeeping
        on batches from the training loader, stamped with when they were made, so that the loader's own pace
        counts too (see :meth:`StepRunner.calibrate`; docs/benchmarks.md, "Time budgets"). The warm-up passes the
        workers' start-up queue plus ``warmup_steps``: a batch is requested from a worker only when the batch a
        queue's length before it is taken, so the timed batches are made after the slow first steps, not during
        them. At least one whole round of the workers is timed."""
        if self.total_iterations is not None:
            return
        budget = self.cfg.train.budget
        assert budget.gpu_seconds is not None
        tally = StepTally(self.device)
        workers = self.cfg.data.workers
        loader = self._make_train_loader(0, collate_fn=StampedCollate())
        batches = iterate_loader(loader)
        self._step_seconds = self.runner.calibrate(
            batches, workers * PREFETCH_BATCHES + budget.warmup_steps, max(budget.calibration_steps, workers + 1),
            after_step=lambda loss, terms: tally.add(1, loss, terms), round_size=max(1, workers))
        del batches, loader  # its workers stop now, before the run starts its own
        self.total_iterations = max(1, int(budget.gpu_seconds / self._step_seconds))
        self.runner.set_schedule(self.total_iterations)

    # ------------------------------------------------------------------------------------------------ set-up

    def _configure_backends(self) -> None:
        train_cfg = self.cfg.train
        deterministic = train_cfg.deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Process-wide switches, set both ways on every run: a deterministic run must not leave the next Trainer of
        # the same process (a notebook, a study, a test session) in deterministic mode. warn_only: CUDA has no
        # deterministic kernel for ops every model here runs (nll_loss2d's forward, upsample_bilinear2d's
        # backward); raising would make the option unusable on a GPU.
        torch.use_deterministic_algorithms(deterministic, warn_only=deterministic)
        torch.backends.cudnn.deterministic = deterministic
        if deterministic:
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = train_cfg.cudnn_benchmark

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
        from ..data.gpu_decode import resolve_decode

        data_cfg = self.cfg.data
        if data_cfg.synthetic is not None:
            from ..data.synthetic import ensure

            if self.env.is_main:
                synth = data_cfg.synthetic
                ensure(data_cfg.root, synth.train, synth.val, synth.size, synth.seed)
            barrier()
        train_ds = build_dataset(data_cfg.dataset, data_cfg.root, data_cfg.train_split, skip_bad=data_cfg.skip_bad,
                                 cache=data_cfg.cache)
        # data.decode: training JPEGs left encoded for StepRunner.prepare to decode on the GPU (cskd.data.gpu_decode)
        self.decode = resolve_decode(data_cfg.decode, self.device, [s.image_path for s in train_ds.samples],
                                     cached=data_cfg.cache is not None)
        self._plain_train_set = train_ds  # decoded, untransformed: the FP8 teacher's calibration images
        if self.decode == "gpu":
            train_ds = train_ds.with_encoded_images()
        transform = build_train_transform(data_cfg.crop_size, data_cfg.scale_range, data_cfg.hflip,
                                          encoded=self.decode == "gpu")
        self.train_set = SeededSamples(train_ds, transform, self.cfg.train.seed)
        self.dataset_info = train_ds.info
        self.num_classes = train_ds.num_classes
        self.val_set = build_dataset(data_cfg.dataset, data_cfg.root, data_cfg.val_split, build_eval_transform(),
                                     skip_bad=data_cfg.skip_bad, cache=data_cfg.cache)
        self._val: DataLoader | None = None  # built at the first validation (see _val_loader)
        if not self.val_set.has_labels:
            raise ConfigError(f"data.val_split={data_cfg.val_split!r} of {data_cfg.dataset} has no labels to "
                              "validate against")

    def _make_train_loader(self, start_batch: int,
                           collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None) -> DataLoader:
        data_cfg = self.cfg.data
        sampler = SeededBatchSampler(
            len(self.train_set), self.batch_per_device, self.cfg.train.seed, self.env.rank, self.env.world_size,
            start_batch=start_batch,
        )
        self.batches_per_epoch = sampler.batches_per_epoch
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            generator=torch.Generator().manual_seed(self.cfg.train.seed),  # keeps the global RNG untouched
            num_workers=data_cfg.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=data_cfg.workers > 0,
            prefetch_factor=PREFETCH_BATCHES if data_cfg.workers > 0 else None,
            collate_fn=collate_fn,
        )

    def _val_loader(self) -> DataLoader:
        if self._val is None:
            self._val = self._make_val_loader()
        return self._val

    def _make_val_loader(self) -> DataLoader:
        eval_cfg = self.cfg.eval
        n = len(self.val_set) if eval_cfg.max_images is None else min(eval_cfg.max_images, len(self.val_set))
        shard = Subset(self.val_set, list(range(self.env.rank, n, self.env.world_size)))
        workers = self.cfg.data.workers
        # Built once and kept (persistent workers): a run validates every few hundred steps, and starting the
        # workers anew each time costs more than a short validation itself. As many workers as training: decoding
        # full-size PNGs (~40 ms per Cityscapes image and label) sets the pace, and the training workers idle
        # meanwhile. collate_eval stacks same-size images into one batch and keeps lists otherwise (VOC, ADE20K).
        return DataLoader(shard, batch_size=eval_cfg.batch_size, shuffle=False, num_workers=workers,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0),
                          persistent_workers=workers > 0, collate_fn=collate_eval,
                          prefetch_factor=PREFETCH_BATCHES if workers > 0 else None)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        rng_all = all_gather_objects(capture_rng())
        return {
            "model": self.student.state_dict(),
            "spec": self.student.spec.to_dict() if self.student.spec else None,
            "losses": self.step_module.losses.state_dict(),
            "optimizer": self.runner.optimizer.state_dict(),
            "auxiliary_optimizers": self.runner.auxiliary.state_dict(),
            "scheduler": self.runner.scheduler.state_dict(),
            "scaler": self.runner.scaler.state_dict(),
            "iteration": self.iteration,
            "total_iterations": self.total_iterations,
            "step_seconds": self._step_seconds,
            "train_seconds": self.train_seconds,
            "data_wait_seconds": self.data_wait_seconds,
            "warmup_seconds": self.warmup_seconds,
            "warmup_steps": self.warmup_steps,
            "eval_seconds": self.eval_seconds,
            "checkpoint_seconds": self.checkpoint_seconds,
            "best_miou": self.best_miou,
            "best_iteration": self.best_iteration,
            "rng": rng_all,
            "world_size": self.env.world_size,
            "environment": run_environment(self.device),
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
        """Write ``<run_dir>/<name>`` atomically, after checking that every floating tensor it would hold (weights,
        buffers, the optimisers' states, the losses' own optimisers included) is finite: a run whose weights went
        non-finite stops here, and the previous checkpoint stays as it was. Every rank checks its own (identical)
        state, so all stop together."""
        start = time.perf_counter()
        self.runner.sync_buffers()
        state = self._state()  # every rank joins the RNG gather
        path = self.run_dir / name
        checked = {k: state[k] for k in ("model", "losses", "optimizer", "auxiliary_optimizers", "scaler")}
        bad = first_nonfinite(named_tensors(checked))
        if bad is not None:
            self._fail_nonfinite_weights(bad, path)
        if self.env.is_main:
            try:
                atomic_save(state, path)
            except CheckpointError as e:
                raise TrainingError(f"{e}; {self._kept(path)}. {self.resume_hint()}") from None
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
        self.runner.set_schedule(self.total_iterations)
        self.runner.optimizer.load_state_dict(ckpt["optimizer"])
        self.runner.auxiliary.load_state_dict(ckpt.get("auxiliary_optimizers", {}), where=str(path))
        self.runner.scheduler.load_state_dict(ckpt["scheduler"])
        self.runner.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self._step_seconds = ckpt.get("step_seconds")
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.data_wait_seconds = float(ckpt.get("data_wait_seconds", 0.0))
        self.warmup_seconds = float(ckpt.get("warmup_seconds", 0.0))
        self.warmup_steps = int(ckpt.get("warmup_steps", 0))
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
        note = resume_difference(ckpt.get("environment"), self.device)
        if note and self.env.rank == 0:
            print(note, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------------ evaluation

    def evaluate(self) -> SegMetrics:
        """Score the student on the validation split; its timings (seconds, first batch, img/s after the first
        batch) are kept in ``last_val_timing`` and, for the first validation of the process, ``first_val``."""
        from ..evaluation import evaluate

        eval_cfg = self.cfg.eval
        start = time.perf_counter()
        self.runner.sync_buffers()
        timing: dict[str, float] = {}
        # A frozen copy, made anew at each validation: the student's weights change between validations.
        model = frozen_copy(self.student, self.amp_dtype) if eval_cfg.fold_batchnorm else self.student
        metrics = evaluate(
            model, self._val_loader(), num_classes=self.num_classes, device=self.device,
            mode=eval_cfg.mode, crop_size=eval_cfg.crop_size, stride=eval_cfg.stride, scales=eval_cfg.scales,
            flip=eval_cfg.flip,
            amp_dtype=self.amp_dtype, progress=False, timing=timing, channels_last=self.runner.channels_last,
            compiled=eval_cfg.compile,
        )
        seconds = time.perf_counter() - start
        self.eval_seconds += seconds
        self.last_val_timing = {**timing, "seconds": seconds}  # the loader's start-up included
        if self.first_val is None:
            self.first_val = self.last_val_timing
            self._save_compile_cache()  # the evaluation graphs too, where compiled
        return metrics

    # ------------------------------------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        """Plan the budget, open the run's records, train, then sum the run up (and release the folder's lock)."""
        try:
            self.plan_budget()
            recorder = self._open_records()
            try:
                self._train(recorder)
            finally:
                recorder.close()
                self._val = None  # stops the validation workers now, not whenever the Trainer is collected
            result = self._result()
            if self.env.is_main:
                self._write_summary(recorder, result)
        finally:
            self.close()
        return result

    def close(self) -> None:
        """Stop the validation workers and release the run folder (:meth:`fit` ends so; call it for a Trainer
        used without :meth:`fit`, e.g. only to :meth:`evaluate`, as benchmarks/validation.py does)."""
        self._val = None
        self._lock.release()

    def _open_records(self) -> RunRecorder:
        """The run folder with its config, and the recorder of ``log.jsonl`` (continued after the iteration resumed
        from), opened with the run's banner."""
        cfg = self.cfg
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        assert self.total_iterations is not None
        recorder = RunRecorder(self.run_dir, self.env.is_main, self.total_iterations, self.iteration, self.progress)
        recorder.message(self._banner())
        cache = self.runner.compile_cache
        if cache is not None:
            state = "pre-loaded from artifacts.bin" if cache.loaded else "no artifacts.bin yet"
            recorder.message(f"compile cache: {cache.folder} (key {cache.key}; {state})")
        if self.decode == "gpu":
            recorder.message(f"data: training JPEGs decoded on {self.device} (data.decode={cfg.data.decode})")
        if self.runner.teacher is not None and cfg.teacher is not None and not cfg.teacher.weights:
            recorder.message("warning: the teacher has random weights (teacher.weights is not set)")
        if self._step_seconds is not None and self.iteration == 0:
            recorder.write("budget", 0, {"gpu_seconds": cfg.train.budget.gpu_seconds,
                                         "step_seconds": self._step_seconds,
                                         "planned_iterations": self.total_iterations})
        return recorder

    def _train(self, recorder: RunRecorder) -> None:
        """Steps until the budget is spent. Values stay on the device between sync points (logging, validation,
        saving), where they are read once."""
        train_cfg = self.cfg.train
        total = self.total_iterations
        assert total is not None
        val_every = max(1, total // train_cfg.val_points) if train_cfg.val_points else train_cfg.val_every
        batches = WaitClock(_infinite(self._make_train_loader(self.iteration)))
        self.step_module.train()
        tally = StepTally(self.device)
        first = self.iteration
        window_start = time.perf_counter()
        waited = 0.0  # batches.seconds at the window's start
        ahead = self.runner.pipelines_teacher  # the step launches the next batch's teacher before its backward
        upcoming: tuple[Tensor, Tensor] | None = None
        while self.iteration < total:
            x, masks = upcoming or self.runner.prepare(next(batches))
            upcoming = self.runner.prepare(next(batches)) if ahead and self.iteration + 1 < total else None
            loss, terms = self.runner.step(x, masks, upcoming[0] if upcoming else None)
            self.iteration += 1
            it = self.iteration
            if it == first + 1:  # the first step's wait (the workers' start) goes with it, out of the training time
                window_start, waited = self._time_first_step(window_start), batches.seconds
            tally.add(it, loss, terms)
            at_log = it % train_cfg.log_every == 0 or it == total
            at_save = it % train_cfg.save_every == 0 or it == total
            at_val = it % val_every == 0 or it == total
            if not (at_log or at_save or at_val):
                continue
            self.runner.sync()
            self.train_seconds += time.perf_counter() - window_start
            self.data_wait_seconds += batches.seconds - waited
            self._log_interval(recorder, tally)
            if at_val:
                self._validate(recorder)
            if at_save:
                self.save("last.pt")
            window_start, waited = time.perf_counter(), batches.seconds

    def _time_first_step(self, started: float) -> float:
        """The first step of a process pays for compilation and cuDNN autotuning: timed on its own and kept out of
        the training time, so runs compare by their steady step cost. Returns when the steady time starts."""
        self.runner.sync()
        self.warmup_seconds += time.perf_counter() - started
        self.warmup_steps += 1
        if self.startup_seconds is None:
            self.startup_seconds = time.perf_counter() - self._started
        self._save_compile_cache()
        return time.perf_counter()

    def _save_compile_cache(self) -> None:
        """Rank 0 writes the mega-cache of what was compiled so far (every rank compiled the same graphs); the time
        goes to the checkpoint I/O, not the training time."""
        cache = self.runner.compile_cache
        if cache is None or not self.env.is_main:
            return
        start = time.perf_counter()
        cache.save()
        self.checkpoint_seconds += time.perf_counter() - start

    def _log_interval(self, recorder: RunRecorder, tally: StepTally) -> None:
        """Stop at a non-finite loss; else record the means since the last sync point."""
        bad = tally.first_nonfinite()
        if bad is not None:
            self._fail_nonfinite(*bad, recorder)
        count = tally.count
        means = tally.read_means()
        means["lr"] = self.runner.optimizer.param_groups[0]["lr"]
        means["train_seconds"] = self.train_seconds
        means["data_wait_seconds"] = self.data_wait_seconds
        recorder.write("train", self.iteration, means)
        recorder.advance(count, {k: means[k] for k in ("loss", "lr") if k in means})

    def _validate(self, recorder: RunRecorder) -> None:
        """Evaluate, record, and keep the best model as ``best.pt``."""
        it = self.iteration
        metrics = self.evaluate()
        miou = metrics.miou
        timing = self.last_val_timing
        recorder.write("val", it, {"miou": miou, "pixel_acc": metrics.pixel_acc, "mean_acc": metrics.mean_acc,
                                   "train_seconds": self.train_seconds, "seconds": timing["seconds"],
                                   "first_batch_seconds": timing.get("first_batch_seconds"),
                                   "images_per_second": timing.get("images_per_second"),
                                   "loader_wait_seconds": timing.get("loader_wait_seconds")})
        recorder.message(f"iteration {it}/{self.total_iterations}: val mIoU {100 * miou:.2f}%")
        self.last_metrics = metrics
        if self.best_miou is None or miou > self.best_miou:
            self.best_miou, self.best_iteration = miou, it
            self.save("best.pt")
        self.step_module.train()

    def _result(self) -> TrainResult:
        metrics = self.last_metrics
        return TrainResult(
            run_dir=self.run_dir, iterations=self.iteration, train_seconds=self.train_seconds,
            planned_seconds=self.planned_seconds, step_seconds=self._step_seconds, eval_seconds=self.eval_seconds,
            warmup_seconds=self.warmup_seconds, startup_seconds=self.startup_seconds,
            first_val_seconds=self.first_val["seconds"] if self.first_val else None,
            first_val_first_batch_seconds=self.first_val.get("first_batch_seconds") if self.first_val else None,
            checkpoint_seconds=self.checkpoint_seconds, best_miou=self.best_miou, best_iteration=self.best_iteration,
            final_metrics=metrics.to_dict() if metrics is not None else None,
            images_per_second=((self.iteration - self.warmup_steps) * self.cfg.train.batch_size / self.train_seconds)
            if self.train_seconds else 0.0,
            data_wait_seconds=self.data_wait_seconds, first_step_phases=self.runner.first_step_phases,
            history=read_records(self.run_dir / "log.jsonl") if self.env.is_main else [],
        )

    def _write_summary(self, recorder: RunRecorder, result: TrainResult) -> None:
        """The summary record, the final metrics files, and the closing line."""
        recorder.write_summary(self.iteration, {
            "iterations": result.iterations, "train_seconds": result.train_seconds,
            "planned_seconds": result.planned_seconds, "eval_seconds": result.eval_seconds,
            "warmup_seconds": result.warmup_seconds, "startup_seconds": result.startup_seconds,
            "startup_from": "Trainer start to the end of the first training step of this process",
            "first_step_phases": result.first_step_phases,
            "first_val_seconds": result.first_val_seconds,
            "first_val_first_batch_seconds": result.first_val_first_batch_seconds,
            "checkpoint_seconds": result.checkpoint_seconds, "images_per_second": result.images_per_second,
            "data_wait_seconds": result.data_wait_seconds,
            "best_miou": result.best_miou, "best_iteration": result.best_iteration,
            "compile_cache": str(self.runner.compile_cache.folder) if self.runner.compile_cache else None,
        })
        if self.last_metrics is not None:
            self.last_metrics.save(self.run_dir, stem="metrics", class_names=self.dataset_info.class_names)
        best = f"best val mIoU {100 * self.best_miou:.2f}% at iteration {self.best_iteration}" \
            if self.best_miou is not None else "no validation"
        startup = f"; start-up {result.startup_seconds:.1f} s (Trainer start → first step done)" \
            if result.startup_seconds is not None else ""
        first_val = f"; first validation {result.first_val_seconds:.1f} s (first batch " \
            f"{result.first_val_first_batch_seconds or 0.0:.1f} s)" if result.first_val_seconds is not None else ""
        print(f"done: {self.iteration} iterations, {self.train_seconds:.1f} s of training "
              f"({result.images_per_second:.1f} img/s; waiting for data {result.data_wait_seconds:.1f} s of it; "
              f"first step {self.warmup_seconds:.1f} s, not counted"
              f"{startup}{first_val}), {best}; checkpoints in {self.run_dir}", flush=True)
        if result.first_step_phases:
            print(f"first step of this process: {describe_phases(result.first_step_phases)} (wall seconds; of them "
                  "torch.compile and Triton's autotuning)", flush=True)

    def _kept(self, path: Path | None = None) -> str:
        last = self.run_dir / "last.pt"
        if path is not None and path != last and path.is_file():
            return f"the previous {path.name} and {last.name} are intact (left untouched)" if last.is_file() \
                else f"the previous {path} is intact (left untouched)"
        return (f"the previous checkpoint {last} is intact (left untouched)" if last.is_file()
                else "no checkpoint had been written yet")

    def resume_hint(self) -> str:
        return resume_hint(self.cfg)

    def _fail_nonfinite_weights(self, tensor: str, path: Path) -> None:
        where = tensor.replace("optimizer.state.", "optimizer state of parameter ", 1) \
            .replace("auxiliary_optimizers.", "a loss's optimiser state ", 1)
        raise TrainingError(
            f"non-finite weights at iteration {self.iteration} (first: {where}); training stopped before writing "
            f"{path.name}, and {self._kept(path)}. "
            "Lower train.lr, use train.amp=bf16/none instead of fp16, or check the data for bad labels."
        )

    def _fail_nonfinite(self, iteration: int, values: dict[str, float], rec: RunRecorder) -> None:
        last = self.run_dir / "last.pt"
        keep = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
        rec.write("error", iteration, {"nonfinite_terms": values})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        named = [k for k, v in values.items() if not np.isfinite(v)]
        raise TrainingError(
            f"non-finite loss at iteration {iteration} (non-finite: {', '.join(named) or 'the total'}; {shown}); "
            f"training stopped and {keep} (left untouched). "
            "Lower train.lr, use train.amp=bf16/none instead of fp16, or check the data for bad labels."
        )

    def _banner(self) -> str:
        cfg = self.cfg
        method = " + ".join(lc.name for lc in cfg.losses) or "no distillation"
        teacher = f"{cfg.teacher.model}-{cfg.teacher.backbone} → " if cfg.teacher and cfg.losses else ""
        amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        return (
            f"cskd {__version__}: {teacher}{cfg.model.model}-{cfg.model.backbone} ({method}) on {cfg.data.dataset} "
            f"[{len(self.train_set)} train / {len(self.val_set)} val], {self.total_iterations} iterations × "
            f"batch {cfg.train.batch_size} ({self.env.world_size} process(es), {self.device}, {amp})"
            + (f", resumed at iteration {self.iteration}" if self.iteration else "")
        )


def resume_hint(cfg: ExperimentConfig) -> str:
    """How to continue ``cfg``'s run from its last.pt (its own saved config, so that ``--set`` overrides hold)."""
    if not (cfg.run_dir / "last.pt").is_file():
        return "Start the run again once the cause is fixed."
    command = "distill" if cfg.losses else "train"
    config = cfg.run_dir / "config.yaml"
    return f"Resume with `cskd {command} {config if config.is_file() else 'CONFIG'} --resume`."


def train(cfg: ExperimentConfig, resume: str | None = None, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Build a :class:`Trainer` for ``cfg`` and run it."""
    return Trainer(cfg, resume=resume, progress=progress, overwrite=overwrite).fit()


__all__ = ["TrainResult", "Trainer", "resume_hint", "train"]
