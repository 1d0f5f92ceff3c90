"""The engine on tiny synthetic data: every method runs; checkpoints hold what a resume needs; kill -9 and resume
gives the uninterrupted loss curve; non-finite losses stop cleanly; bad batch sizes are refused; DDP with gloo."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

from cskd.engine.config import config_from_dict
from cskd.engine.records import read_records
from cskd.engine.trainer import Trainer
from cskd.errors import ConfigError, TrainingError
from cskd.losses import LOSSES, _load_all
from cskd.losses.base import DistillLoss, register_loss
from cskd.checkpoints import safe_load

TINY = (32, 64)


def tiny_config(root: Path, out: Path, losses: list[dict] | None = None, **train: object) -> dict:
    cfg = {
        "name": "tiny",
        "output_dir": str(out),
        "data": {"dataset": "synthscapes", "root": str(root), "crop_size": list(TINY), "workers": 0},
        "model": {"model": "deeplabv3", "backbone": "mobilenetv2"},
        "train": {"budget": {"iterations": 2}, "batch_size": 3, "lr": 0.01, "log_every": 1, "val_every": 1000,
                  "save_every": 1000, "device": "cpu", "amp": "none"},
        "eval": {"max_images": 2},
    }
    if losses:
        cfg["teacher"] = {"model": "deeplabv3", "backbone": "resnet18"}
        cfg["losses"] = losses
    for k, v in train.items():
        cfg["train"][k] = v
    return cfg


def method_configs() -> dict[str, list[dict]]:
    _load_all()
    methods = {"baseline": [], "cskd_published": [{"name": "cwd", "weight": 3.0, "temperature": 2.0},
                                                  {"name": "cskd"}]}
    for name in sorted(LOSSES):
        if not name.startswith("_test"):
            methods[name] = [{"name": name}]
    return methods


@pytest.mark.parametrize("method", sorted(method_configs()))
def test_every_method_runs_two_iterations(synth_root: Path, tmp_path: Path, method: str) -> None:
    losses = method_configs()[method]
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / method, losses))
    result = Trainer(cfg, progress=False).fit()
    assert result.iterations == 2
    train_recs = read_records(tmp_path / method / "log.jsonl", "train")
    assert [r["iteration"] for r in train_recs] == [1, 2]
    for r in train_recs:
        assert all(isinstance(v, float) and v == v for k, v in r.items() if k not in ("kind", "iteration", "time"))
    distill_terms = {k for r in train_recs for k in r} - {"kind", "iteration", "time", "ce", "aux", "loss", "lr",
                                                          "train_seconds", "data_wait_seconds"}
    assert bool(distill_terms) == bool(losses), distill_terms  # every method logs its own terms, the baseline none
    assert result.final_metrics is not None and 0.0 <= result.best_miou <= 1.0


def test_checkpoint_holds_everything_for_a_resume(synth_root: Path, tmp_path: Path) -> None:
    losses = [{"name": "cwd", "weight": 3.0, "temperature": 2.0}, {"name": "cskd", "pam_projection": "fixed"}]
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "run", losses, save_every=2))
    Trainer(cfg, progress=False).fit()
    ckpt = safe_load(tmp_path / "run" / "last.pt")  # weights_only: plain containers and tensors only
    for key in ("model", "spec", "losses", "optimizer", "scheduler", "scaler", "iteration", "rng", "config",
                "dataset", "cskd_version", "train_seconds", "warmup_seconds", "warmup_steps"):
        assert key in ckpt, key
    assert ckpt["iteration"] == 2 and ckpt["spec"]["backbone"] == "mobilenetv2"
    assert {"cskd.gamma_cam", "cskd.gamma_pam", "cskd.pam_student_weight", "cskd.pam_teacher_bias"} <= set(ckpt["losses"])
    assert ckpt["config"]["losses"][1]["name"] == "cskd"
    assert set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}
    assert (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "config.yaml").exists()
    for ext in ("json", "csv", "md"):
        assert (tmp_path / "run" / f"metrics.{ext}").exists()


def test_summary_reports_startup_and_first_validation_seconds(synth_root: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    result = Trainer(config_from_dict(tiny_config(synth_root, tmp_path / "run")), progress=False).fit()
    wall = time.perf_counter() - started
    # start-up (Trainer start → first step done) holds the first step; the first validation holds its first batch
    assert result.startup_seconds is not None and result.warmup_seconds <= result.startup_seconds < wall
    assert result.first_val_seconds is not None and result.first_val_first_batch_seconds is not None
    assert 0 < result.first_val_first_batch_seconds <= result.first_val_seconds <= result.eval_seconds < wall
    summary = read_records(tmp_path / "run" / "log.jsonl", "summary")[-1]
    for key in ("startup_seconds", "first_val_seconds", "first_val_first_batch_seconds", "warmup_seconds"):
        assert summary[key] == pytest.approx(getattr(result, key)), key
    assert "first training step" in summary["startup_from"] and summary["compile_cache"] is None  # eager on the CPU
    val = read_records(tmp_path / "run" / "log.jsonl", "val")[-1]
    assert val["seconds"] > 0 and val["first_batch_seconds"] > 0
    assert val["images_per_second"] > 0  # 2 images, batch 1: one batch after the first
    out = capsys.readouterr().out.splitlines()
    done = [line for line in out if line.startswith("done:")]
    assert done and "start-up" in done[0] and "first validation" in done[0]
    # the first step by phase: within the first step's time, in the summary and on the closing lines
    phases = result.first_step_phases
    # (a run without a teacher has no teacher phase; the loop benchmark's test has one)
    assert phases is not None and list(phases) == ["student and losses", "backward", "optimizer"]
    assert sum(row["seconds"] for row in phases.values()) <= result.warmup_seconds
    assert summary["first_step_phases"] == phases
    assert any(line.startswith("first step of this process: ") for line in out)


def test_existing_run_is_not_overwritten(synth_root: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "run", None))
    Trainer(cfg, progress=False).fit()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(cfg, progress=False)


def _losses_by_iteration(run: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_records(run / "log.jsonl", "train")}


def test_kill_minus_nine_and_resume_reproduces_the_loss_curve(synth_root: Path, tmp_path: Path) -> None:
    losses = [{"name": "cwd", "weight": 3.0, "temperature": 2.0}, {"name": "cskd"}]  # published resample mode
    base = tiny_config(synth_root, tmp_path / "x", losses, deterministic=True, save_every=2, budget={"iterations": 10})
    base["data"]["workers"] = 1

    ref = dict(base, output_dir=str(tmp_path / "ref"))
    Trainer(config_from_dict(ref), progress=False).fit()
    expected = _losses_by_iteration(tmp_path / "ref")

    run = tmp_path / "killed"
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(base, output_dir=str(run))))
    # The same thread count as this process (conftest.py caps it): CPU float sums depend on it.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, "-m", "cskd", "distill", str(cfg_path), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = safe_load(run / "last.pt")["iteration"]
    assert killed_at < 10, "the run finished before it could be killed; the test proves nothing"

    done = subprocess.run(cmd + ["--resume", "auto"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "bit-identical" not in done.stderr  # same threads and device: no note
    got = _losses_by_iteration(run)
    assert sorted(got) == list(range(1, 11))
    assert got == expected  # bit-identical: same batches, same augmentation, same dropout, same projections


def test_deterministic_mode_is_set_per_run_and_does_not_leak_into_the_next_trainer(synth_root: Path,
                                                                                     tmp_path: Path) -> None:
    """The switches are process-wide: a deterministic run left them on for every later Trainer of the process (on
    the GPU machine, a CUDA test then stopped at the cross-entropy, which has no deterministic CUDA kernel)."""
    try:
        Trainer(config_from_dict(tiny_config(synth_root, tmp_path / "det", deterministic=True)), progress=False)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic
        Trainer(config_from_dict(tiny_config(synth_root, tmp_path / "free")), progress=False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def _step_values(step: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> dict[str, float]:
    """A step's returned loss and terms as floats."""
    total, terms = step
    return {"loss": total.item(), **{k: v.item() for k, v in terms.items()}}


def _train_then_step_twice(synth_root: Path, out: Path, device: str, compiled: bool) -> None:
    """Six CWD + CSKD iterations through the Trainer (in CUDA graphs when ``compiled`` on CUDA), a validation after
    the 3rd and the 6th (compiled too), then two more steps of its runner: the first step's returned terms must
    keep their values while the second replays the graphs over the same memory."""
    losses = [{"name": "cwd", "weight": 3.0, "temperature": 2.0}, {"name": "cskd"}]
    cfg = tiny_config(synth_root, out, losses, device=device, amp="bf16", compile=compiled,
                      compile_mode="reduce-overhead", compile_cache=None, budget={"iterations": 6}, val_every=3)
    cfg["eval"]["compile"] = compiled
    trainer = Trainer(config_from_dict(cfg), progress=False)
    result = trainer.fit()
    assert result.iterations == 6 and result.final_metrics is not None
    assert len(read_records(out / "log.jsonl", "val")) == 2
    curve = [{k: v for k, v in r.items() if k in ("loss", "ce", "cwd", "cam", "pam")}
             for r in read_records(out / "log.jsonl", "train")]
    assert len(curve) == 6 and all(len(terms) == 5 for terms in curve)
    assert all(v == v and abs(v) != float("inf") for terms in curve for v in terms.values()), curve
    assert all(a != b for a, b in itertools.pairwise(curve)), curve  # each record holds its own step's terms

    runner = trainer.runner
    first = runner.step(*runner.prepare(runner.random_batch(TINY, seed=1)))
    kept = _step_values(first)
    second = runner.step(*runner.prepare(runner.random_batch(TINY, seed=2)))
    assert _step_values(first) == kept  # not overwritten by the second step's replay
    assert _step_values(second) != kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_over_the_whole_step_keep_each_steps_terms_through_replays_and_validations(
    synth_root: Path, tmp_path: Path
) -> None:
    """train.compile_mode=reduce-overhead: the model, the teacher and the losses replay CUDA graphs over the same
    memory, step after step, with compiled validations in between. Outputs kept from an earlier replay are the risk;
    the runner returns copies. (Comparing the curve with an eager or default-compiled run does not work: two
    compiled bf16 runs of this tiny model differ by up to 7 % in CAM at the same iteration, on the CPU too.)"""
    _train_then_step_twice(synth_root, tmp_path / "graphs", "cuda", compiled=True)


@pytest.mark.parametrize("device,fusion,fused", [
    ("cpu", True, False),  # off CUDA the teacher keeps its plain convs: the fused kernels are cuDNN's
    pytest.param("cuda", True, True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    pytest.param("cuda", False, False, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_the_runner_fuses_the_teachers_conv_epilogues_on_cuda_by_default(
    synth_root: Path, tmp_path: Path, device: str, fusion: bool, fused: bool
) -> None:
    from cskd.distributed import DistEnv
    from cskd.engine.runner import StepRunner
    from cskd.models.epilogue import ConvReLU, FusedBasicBlock

    amp = "bf16" if device == "cuda" else "none"
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "f", [{"name": "cwd"}], device=device, amp=amp,
                                       compile=False, teacher_conv_fusion=fusion))
    runner = StepRunner(cfg, 13, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device)), 3)
    kinds = {type(m) for m in runner.teacher.modules()}
    assert (FusedBasicBlock in kinds and ConvReLU in kinds) == fused
    loss, terms = runner.step(*runner.prepare(runner.random_batch(TINY, seed=0)))
    assert torch.isfinite(loss) and "cwd" in terms


def _stream_runner(root: Path, out: Path, device: str, how: str):  # noqa: ANN202
    from cskd.distributed import DistEnv
    from cskd.engine.runner import StepRunner

    losses = [{"name": "cwd", "weight": 3.0, "temperature": 2.0}, {"name": "cskd"}]
    cfg = config_from_dict(tiny_config(root, out, losses, device=device, compile=False, teacher_stream=how,
                                       teacher_conv_fusion=False))
    torch.manual_seed(0)  # the same student, connectors and CSKD projections for every variant
    return StepRunner(cfg, 13, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device)), 3)


def _stream_steps(runner, order: list[int], ahead: bool) -> list[dict[str, float]]:  # noqa: ANN001
    """Steps over the batches of seeds ``order``; with ``ahead``, each step is handed the next one's images (as
    the Trainer does under teacher_stream=pipeline). Each step's loss and terms, read after all steps."""
    batches = {s: runner.prepare(runner.random_batch(TINY, seed=s)) for s in set(order)}
    out = []
    for i, s in enumerate(order):
        nxt = batches[order[i + 1]][0] if ahead and i + 1 < len(order) else None
        out.append(runner.step(*batches[s], nxt))
    return [_step_values(step) for step in out]


@pytest.mark.parametrize("device,how", [
    ("cpu", "pipeline"),  # no second stream: the next batch's teacher runs before the backward, same values
    pytest.param("cuda", "forward", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    pytest.param("cuda", "pipeline", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_the_teacher_on_its_own_stream_gives_each_step_its_own_batchs_teacher(
    synth_root: Path, tmp_path: Path, device: str, how: str
) -> None:
    """train.teacher_stream: every step's terms equal the plain run's, also when a step is not given the images
    it was told about (the kept teacher outputs belong to other images and must not be used). Float32, eager:
    the same kernels in another order on the GPU, so equal to rounding."""
    if device == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    order = [1, 2, 3, 3, 4]  # a batch twice in a row: the "next" images are the very tensor of this step
    plain = _stream_steps(_stream_runner(synth_root, tmp_path / "off", device, "off"), order, ahead=False)
    streamed = _stream_runner(synth_root, tmp_path / how, device, how)
    assert (streamed.teacher_stream is not None) == (device == "cuda")
    assert streamed.pipelines_teacher == (how == "pipeline")
    got = _stream_steps(streamed, order, ahead=True)
    mismatched = _stream_steps(_stream_runner(synth_root, tmp_path / f"{how}2", device, how), [1, 2, 3], ahead=True)
    # told 1 → 2 → 3 but handed 1, then 3 (its kept outputs are for 2): the second step must run 3's teacher
    wrong = _stream_runner(synth_root, tmp_path / f"{how}3", device, how)
    b = {s: wrong.prepare(wrong.random_batch(TINY, seed=s)) for s in (1, 2, 3)}
    first = wrong.step(*b[1], b[2][0])
    second = wrong.step(*b[3])
    ref = _stream_steps(_stream_runner(synth_root, tmp_path / "off2", device, "off"), [1, 3], ahead=False)
    assert len(plain) == len(got) == 5 and len(plain[0]) == 5  # loss, ce, cwd, cam, pam
    for want, have in zip(plain + plain[:3] + ref, got + mismatched + [_step_values(first), _step_values(second)]):
        assert have.keys() == want.keys()
        for k in want:
            assert have[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), (k, have, want)


def test_teacher_stream_pipeline_trains_as_the_plain_loop(synth_root: Path, tmp_path: Path) -> None:
    """Through the Trainer (CPU): the loop hands each step the next batch and the run's curve is the plain run's,
    exactly (the same operations in the same order on one device), across a validation and a save point."""
    curves = {}
    for how in ("off", "pipeline"):
        cfg = tiny_config(synth_root, tmp_path / how, [{"name": "cwd"}, {"name": "cskd"}], teacher_stream=how,
                          budget={"iterations": 5}, val_every=2, save_every=3)
        result = Trainer(config_from_dict(cfg), progress=False).fit()
        assert result.iterations == 5
        curves[how] = [{k: v for k, v in r.items() if k not in ("time", "train_seconds", "data_wait_seconds")}
                       for r in read_records(tmp_path / how / "log.jsonl", "train")]
    assert len(curves["off"]) == 5 and curves["pipeline"] == curves["off"]


def test_teacher_stream_and_cuda_graphs_are_refused_together(synth_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(synth_root, tmp_path / "x", [{"name": "cwd"}], teacher_stream="forward",
                      compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match="teacher_stream=forward.*reduce-overhead"):
        config_from_dict(cfg)


def test_each_steps_terms_are_its_own_eager(synth_root: Path, tmp_path: Path) -> None:
    """The same checks on the CPU, eager: the helper above is exercised without a GPU."""
    _train_then_step_twice(synth_root, tmp_path / "eager", "cpu", compiled=False)


@register_loss("_test_nan_at_3")
class _NaNAtThree(DistillLoss):
    """Returns a finite value, except NaN at its third call: the engine must name iteration 3."""

    def __init__(self, *, student_channels: int, teacher_channels: int, num_classes: int) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, student, teacher, targets=None):  # noqa: ANN001, ANN201
        self.calls += 1
        value = student.logits.mean() * 0.0
        return {"probe": value + (float("nan") if self.calls == 3 else 0.0)}


def test_nonfinite_loss_stops_with_iteration_and_terms_and_keeps_the_checkpoint(
    synth_root: Path, tmp_path: Path
) -> None:
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "nan", [{"name": "_test_nan_at_3"}],
                                       budget={"iterations": 6}, save_every=2, log_every=5))
    with pytest.raises(TrainingError) as e:
        Trainer(cfg, progress=False).fit()
    msg = str(e.value)
    assert "iteration 3" in msg and "probe=nan" in msg and "last.pt" in msg
    assert safe_load(tmp_path / "nan" / "last.pt")["iteration"] == 2  # the good one, untouched


@pytest.fixture
def slow_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every training sample takes 50 ms more to load (in the workers too: they are forked with the patch)."""
    from cskd.engine.sampling import SeededSamples

    load = SeededSamples.__getitem__

    def slow(self, index):  # noqa: ANN001, ANN202
        time.sleep(0.05)
        return load(self, index)

    monkeypatch.setattr(SeededSamples, "__getitem__", slow)


@pytest.mark.parametrize("workers", [0, 2])
def test_time_budget_counts_a_loader_slower_than_the_step(
    synth_root: Path, tmp_path: Path, slow_samples: None, workers: int
) -> None:
    raw = tiny_config(synth_root, tmp_path / "slow", None, batch_size=4,
                      budget={"gpu_seconds": 2.0, "warmup_steps": 1, "calibration_steps": 3})
    raw["data"]["workers"] = workers
    trainer = Trainer(config_from_dict(raw), progress=False)
    # The calibration is fed by the loader: 4 images a batch, spread over the workers, set its pace.
    loader_seconds = 4 * 0.05 / max(1, workers)
    assert trainer.step_seconds >= loader_seconds * 0.9
    result = trainer.fit()
    # The run makes the planned steps, no more than the loader can feed within the budget (planned from a step on a
    # batch in memory, it would take several times its budget). Not its wall-clock time: a machine that slows down
    # after the calibration (a second load beside the suite) overruns any plan.
    assert result.iterations == int(2.0 / trainer.step_seconds) <= 2.0 / (loader_seconds * 0.9)
    budget = read_records(tmp_path / "slow" / "log.jsonl", "budget")[0]
    assert budget["step_seconds"] == pytest.approx(trainer.step_seconds)
    assert budget["planned_iterations"] == result.iterations


def test_the_run_records_its_wait_for_a_slow_loader(synth_root: Path, tmp_path: Path, slow_samples: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_config(synth_root, tmp_path / "slow", None, batch_size=4, budget={"iterations": 4}, save_every=2)
    result = Trainer(config_from_dict(raw), progress=False).fit()
    # 3 steady steps (the first step's wait is the first step's), each waiting for 4 images of 50 ms in process
    assert 3 * 4 * 0.05 * 0.9 <= result.data_wait_seconds <= result.train_seconds
    recs = read_records(tmp_path / "slow" / "log.jsonl", "train")
    waits = [r["data_wait_seconds"] for r in recs]
    assert waits == sorted(waits) and waits[-1] == pytest.approx(result.data_wait_seconds)
    summary = read_records(tmp_path / "slow" / "log.jsonl", "summary")[-1]
    assert summary["data_wait_seconds"] == pytest.approx(result.data_wait_seconds)
    assert safe_load(tmp_path / "slow" / "last.pt")["data_wait_seconds"] == pytest.approx(result.data_wait_seconds)
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")][-1]
    assert f"waiting for data {result.data_wait_seconds:.1f} s of it" in done


def test_step_tally_means_and_first_nonfinite_step() -> None:
    from cskd.engine.trainer import StepTally

    tally = StepTally(torch.device("cpu"))
    nan, inf = float("nan"), float("inf")
    steps = [(1.0, {"ce": 0.5, "kd": 0.5}), (3.0, {"ce": 1.5, "kd": 1.5}), (nan, {"ce": 2.0, "kd": nan}),
             (inf, {"ce": 7.0, "kd": inf})]
    for it, (loss, terms) in enumerate(steps[:2], 1):
        tally.add(it, torch.tensor(loss), {k: torch.tensor(v) for k, v in terms.items()})
    assert tally.first_nonfinite() is None
    assert tally.count == 2
    assert tally.read_means() == {"loss": 2.0, "ce": 1.0, "kd": 1.0}
    assert tally.count == 0
    for it, (loss, terms) in enumerate(steps[2:], 3):
        tally.add(it, torch.tensor(loss), {k: torch.tensor(v) for k, v in terms.items()})
    it, terms = tally.first_nonfinite()  # the first bad step and its own terms, not the later one's
    assert it == 3 and terms["ce"] == 2.0 and terms["kd"] != terms["kd"]


def test_calibration_times_the_loops_per_step_work_too(synth_root: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "cal", None, budget={"iterations": 2}))
    runner = Trainer(cfg, progress=False).runner
    batches = itertools.repeat(runner.random_batch(TINY))
    calls: list[float] = []
    bare = runner.calibrate(batches, warmup=1, steps=3)
    with_work = runner.calibrate(batches, warmup=1, steps=3,
                                 after_step=lambda loss, terms: (calls.append(loss.item()), time.sleep(0.25)))
    assert len(calls) == 4  # warm-up and timed steps
    # The timed part includes the per-step work. Not compared with `bare`: on a loaded machine one bare step of
    # this tiny model took 7 s (the two timings are minutes apart in load); a step of it takes ~0.03 s otherwise.
    assert with_work >= 0.25 * 0.9 and bare > 0


def test_calibration_takes_the_loaders_pace_from_when_batches_were_made(synth_root: Path, tmp_path: Path) -> None:
    # Batches already queued come at once, but were made 20 s apart by each of two workers (a batch every 10 s):
    # the loop will wait for that pace once the queue is empty, so the calibration must report it.
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "cal", None, budget={"iterations": 2}))
    runner = Trainer(cfg, progress=False).runner
    batch = runner.random_batch(TINY)
    made = [0.0, 0.0]  # both workers finish their first batches together, then every 20 s
    for _ in range(10):
        made.append(made[-2] + 20.0)
    stamped = iter([{**batch, "ready_at": 1000.0 + t} for t in made])
    bare = runner.calibrate(itertools.repeat(batch), warmup=1, steps=4)
    assert bare < 10.0  # the premise: the tiny step is faster than this loader
    # Timed batches 1..5: the span from batch 1 to batch 5 is two whole rounds of the two workers (40 s).
    assert runner.calibrate(stamped, warmup=1, steps=5, round_size=2) == pytest.approx(10.0)
    # A loader faster than the step changes nothing.
    fast = iter([{**batch, "ready_at": 1000.0 + 1e-6 * i} for i in range(10)])
    assert runner.calibrate(fast, warmup=1, steps=5, round_size=2) < 10.0


def test_calibration_leaves_weights_optimiser_and_rng_as_they_were(synth_root: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "cal", [{"name": "cskd"}], batch_size=4,
                                       budget={"iterations": 2}))
    trainer = Trainer(cfg, progress=False)
    runner = trainer.runner
    weights = {k: v.clone() for k, v in runner.step_module.state_dict().items()}
    lr = runner.optimizer.param_groups[0]["lr"]
    rng = torch.get_rng_state()
    seconds = runner.calibrate(iter(trainer._make_train_loader(0)), warmup=1, steps=2)
    assert seconds > 0
    after = runner.step_module.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # BN running statistics included
    assert not runner.optimizer.state  # no momentum left behind
    assert runner.optimizer.param_groups[0]["lr"] == lr
    assert torch.equal(torch.get_rng_state(), rng)


def test_cka_losses_refuse_small_batches(synth_root: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "b2", [{"name": "cskd"}], batch_size=2))
    with pytest.raises(ConfigError, match="needs at least 3 images per device"):
        Trainer(cfg, progress=False)
    mse = config_from_dict(tiny_config(synth_root, tmp_path / "mse", [{"name": "cskd", "similarity": "mse"}],
                                       batch_size=2))
    Trainer(mse, progress=False)  # MSE compares maps per sample: no batch requirement


def test_per_device_cka_refuses_two_images_per_process(synth_root: Path, tmp_path: Path) -> None:
    from cskd.distributed import DistEnv
    from cskd.engine.runner import StepRunner

    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "x", [{"name": "cskd"}], batch_size=4))
    with pytest.raises(ConfigError, match="gives 2.*cka_scope: global"):
        StepRunner(cfg, 13, DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")), 2)


def test_time_budget_plans_and_records_seconds(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a clock that only the steps move (1/8 s each: exact in binary, so the plan's division is too), so that the check holds on a loaded machine too (it did
    not on wall time: a stall of other processes during the three calibration steps once made the plan six times
    too short): the plan is the budget over the calibrated step, and the run's train time, which leaves out the
    first (warm-up) step, evaluation and checkpoints, is the plan's."""
    from cskd.engine.runner import StepRunner

    clock = [1000.0]
    step = StepRunner.step

    def step_of_an_eighth_of_a_second(self, *args):  # noqa: ANN001, ANN202
        clock[0] += 0.125
        return step(self, *args)

    monkeypatch.setattr(StepRunner, "step", step_of_an_eighth_of_a_second)
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.perf_counter = fake_time.monotonic = lambda: clock[0]
    for module in ("runner", "trainer", "sampling"):  # the engine's clocks; evaluation keeps the real one
        monkeypatch.setattr(f"cskd.engine.{module}.time", fake_time)
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "tb", None,
                                       budget={"gpu_seconds": 3.0, "warmup_steps": 1, "calibration_steps": 3}))
    trainer = Trainer(cfg, progress=False)
    assert trainer.step_seconds == 0.125
    planned = trainer.total_iterations
    assert planned == 24
    result = trainer.fit()
    assert result.iterations == planned
    assert result.planned_seconds == pytest.approx(3.0)
    assert result.warmup_seconds == pytest.approx(0.125)
    assert result.train_seconds == pytest.approx(23 * 0.125)
    budget = read_records(tmp_path / "tb" / "log.jsonl", "budget")
    assert budget and budget[0]["planned_iterations"] == planned


# ----------------------------------------------------------------------------------------------- DDP (gloo, CPU)


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from cskd.distributed import cleanup

    trainer = Trainer(config_from_dict(cfg_dict), progress=False)
    trainer.fit()
    state = {k: v for k, v in trainer.student.state_dict().items()}
    state.update({f"losses.{k}": v for k, v in trainer.step_module.losses.state_dict().items()})
    torch.save(state, Path(out) / f"rank{rank}.pt")
    cleanup()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_end_with_identical_weights(synth_root: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    # Two images per process: only CKA over the global batch (4) has the 3 samples it needs.
    losses = [{"name": "cwd", "weight": 3.0, "temperature": 2.0},
              {"name": "cskd", "pam_projection": "learned", "cka_scope": "global"}]
    cfg = tiny_config(synth_root, tmp_path / "ddp", losses, batch_size=4, budget={"iterations": 2})
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    changed = False
    for k in a:
        assert torch.equal(a[k], b[k]), k
    init = Trainer(config_from_dict(dict(cfg, output_dir=str(tmp_path / "init"))), progress=False)
    for k, v in init.student.state_dict().items():
        if v.is_floating_point() and not torch.equal(v, a[k]):
            changed = True
    assert changed, "training did not change the weights"
    assert (tmp_path / "ddp" / "last.pt").exists()
    recs = read_records(tmp_path / "ddp" / "log.jsonl", "train")
    assert [r["iteration"] for r in recs] == [1, 2]  # written once, by rank 0


def test_torchrun_launch(synth_root: Path, tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(synth_root, tmp_path / "tr", None, batch_size=6)))
    torchrun = Path(sys.executable).parent / "torchrun"
    res = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--master_port", str(_free_port()), "-m", "cskd", "train",
         str(cfg_path), "--no-progress"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: 2 iterations" in res.stdout
    summary = read_records(tmp_path / "tr" / "log.jsonl", "summary")
    assert len(summary) == 1 and json.dumps(summary[0])


def test_validation_on_a_frozen_copy_scores_the_same_and_leaves_the_student_training(
        synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval.fold_batchnorm: each validation scores a new BN-folded copy (the weights change between validations);
    the split's confusion matrix is the one of the student itself; the student keeps its BNs and its mode."""
    import dataclasses

    import cskd.engine.trainer as trainer_module
    from cskd.models.epilogue import frozen_copy

    copies: list[torch.nn.Module] = []

    def spy(net: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
        copies.append(frozen_copy(net, dtype))
        return copies[-1]

    monkeypatch.setattr(trainer_module, "frozen_copy", spy)
    trainer = Trainer(config_from_dict(tiny_config(synth_root, tmp_path / "fold")), progress=False)
    plain = trainer.evaluate()
    assert copies == []
    trainer.cfg = dataclasses.replace(trainer.cfg, eval=dataclasses.replace(trainer.cfg.eval, fold_batchnorm=True))
    folded, again = trainer.evaluate(), trainer.evaluate()
    trainer.close()
    assert len(copies) == 2 and copies[0] is not copies[1] and copies[0] is not trainer.student
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in copies[0].modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trainer.student.modules()) and trainer.student.training
    assert folded.confusion == plain.confusion == again.confusion and plain.num_pixels > 0


def test_folded_and_compiled_validation_do_not_mix(synth_root: Path, tmp_path: Path) -> None:
    raw = tiny_config(synth_root, tmp_path)
    raw["eval"].update(fold_batchnorm=True, compile=True)
    with pytest.raises(ConfigError, match="eval.fold_batchnorm .* eval.compile"):
        config_from_dict(raw)
