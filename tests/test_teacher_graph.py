"""train.teacher_graph (the teacher's forward replayed as a CUDA graph) and train.teacher_compile."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cskd.distributed import DistEnv
from cskd.engine.config import config_from_dict
from cskd.engine.cuda_graph import GraphedForward
from cskd.engine.runner import StepRunner
from cskd.errors import ConfigError
from test_engine import TINY, _step_values, tiny_config

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LOSSES = [{"name": "cwd", "weight": 3.0, "temperature": 2.0}, {"name": "cskd"}]


def _runner(root: Path, out: Path, device: str = "cpu", **train: object) -> StepRunner:
    cfg = config_from_dict(tiny_config(root, out, LOSSES, device=device, **train))
    torch.manual_seed(0)  # the same teacher, student, connectors and projections for every variant
    return StepRunner(cfg, 13, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device)), 3)


def _deterministic_cudnn(monkeypatch: pytest.MonkeyPatch) -> None:
    """One fixed algorithm per convolution, for this test only (the flags are process-wide)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval().requires_grad_(False)


def test_by_default_the_teacher_is_replayed_only_on_cuda(synth_root: Path, tmp_path: Path) -> None:
    runner = _runner(synth_root, tmp_path / "cpu")
    assert runner._teacher_call is runner.teacher  # off CUDA: the module itself
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "x", LOSSES))
    assert cfg.train.graphs_teacher(torch.device("cuda")) and not cfg.train.graphs_teacher(torch.device("cpu"))
    whole = config_from_dict(tiny_config(synth_root, tmp_path / "x", LOSSES, compile_mode="reduce-overhead"))
    assert not whole.train.graphs_teacher(torch.device("cuda"))  # torch.compile's own CUDA graphs hold it


def test_teacher_graph_true_is_refused_off_cuda_and_with_reduce_overhead(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.teacher_graph=true needs CUDA \(train.device is cpu\)"):
        _runner(synth_root, tmp_path / "a", teacher_graph=True)
    with pytest.raises(ConfigError, match="teacher_graph=true.*reduce-overhead"):
        config_from_dict(tiny_config(synth_root, tmp_path / "b", LOSSES, teacher_graph=True,
                                     compile_mode="reduce-overhead"))
    with pytest.raises(ConfigError, match="teacher_graph"):
        config_from_dict(tiny_config(synth_root, tmp_path / "c", LOSSES, teacher_graph="yes"))
    plain = _runner(synth_root, tmp_path / "d", teacher_graph=False)  # false: fine anywhere
    assert plain._teacher_call is plain.teacher


def test_a_graphed_forward_calls_straight_through_off_cuda() -> None:
    net = _net()
    graphed = GraphedForward(net)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(graphed(x), net(x)) and graphed.num_graphs == 0


def test_a_forward_that_cannot_be_captured_warns_once_and_runs_without_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The capture itself is simulated (no GPU here): its failure must cost one warning naming the forward and the
    error's first line, and every call after it is an ordinary one, with the forward's own result."""
    net = _net()
    graphed = GraphedForward(net, name="the test net")
    attempts = []

    def refuse(static, kwargs):  # noqa: ANN001, ANN202
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\n(the CUDA details)")

    monkeypatch.setattr(graphed, "_graphable", lambda x: True)
    monkeypatch.setattr(graphed, "_warm_up", lambda x, kwargs: x)
    monkeypatch.setattr(graphed, "_capture", refuse)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match=r"^CUDA graph: capturing the test net failed \(RuntimeError: operation "
                      r"not permitted when stream is capturing\); it runs without a graph from now on$"):
        out = graphed(x)
    assert torch.equal(out, net(x)) and graphed.num_graphs == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(graphed(x * 2), net(x * 2))  # no second warning, no second try
    assert len(attempts) == 1 and graphed.failed.startswith("RuntimeError: operation not permitted")


def test_teacher_compile_head_compiles_only_the_teachers_heads(synth_root: Path, tmp_path: Path) -> None:
    """Compilation is lazy, so the modules' compiled forwards can be checked without compiling anything."""
    head = _runner(synth_root, tmp_path / "h", compile=True, compile_cache=None, teacher_compile="head")
    whole = _runner(synth_root, tmp_path / "w", compile=True, compile_cache=None)
    assert head.teacher._compiled_call_impl is None and head.teacher.head._compiled_call_impl is not None
    assert whole.teacher._compiled_call_impl is not None and whole.teacher.head._compiled_call_impl is None
    assert head.student._compiled_call_impl is not None  # the student is compiled whole either way


@cuda_only
def test_a_graphed_forward_replays_each_new_input_and_captures_each_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    _deterministic_cudnn(monkeypatch)
    net = _net().cuda()
    graphed = GraphedForward(net, max_graphs=2)
    with torch.inference_mode():
        a, b = torch.randn(2, 3, 16, 16, device="cuda"), torch.randn(2, 3, 16, 16, device="cuda")
        want_a, want_b = net(a).clone(), net(b).clone()
        got_a = graphed(a).clone()
        got_b = graphed(b).clone()  # a replay on new data, not the first capture's output
        assert graphed.num_graphs == 1
        torch.testing.assert_close(got_a, want_a, rtol=0, atol=0)
        torch.testing.assert_close(got_b, want_b, rtol=0, atol=0)
        c = torch.randn(1, 3, 8, 12, device="cuda")
        torch.testing.assert_close(graphed(c), net(c), rtol=0, atol=0)
        assert graphed.num_graphs == 2
        d = torch.randn(3, 3, 8, 8, device="cuda")  # past max_graphs: an ordinary call
        torch.testing.assert_close(graphed(d), net(d), rtol=0, atol=0)
        assert graphed.num_graphs == 2
        with FlopCounterMode(display=False) as plain:
            net(a)
        with FlopCounterMode(display=False) as counted:
            graphed(a)  # under a dispatch mode it runs the ops, once: the counter sees one forward
        assert counted.get_total_flops() == plain.get_total_flops() > 0


@cuda_only
@pytest.mark.parametrize("teacher_compile", ["whole", "head"])
def test_steps_with_the_graphed_teacher_equal_the_plain_teachers(
    synth_root: Path, tmp_path: Path, teacher_compile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float32, cuDNN deterministic: the graph replays the kernels an ordinary call launches, so every step's
    loss and terms (which read the teacher's outputs) are the plain run's to rounding. Compiled, with the teacher
    compiled whole or only in its head."""
    _deterministic_cudnn(monkeypatch)
    values = {}
    for graph in (False, True):
        runner = _runner(synth_root, tmp_path / str(graph), "cuda", compile=True, compile_cache=None, amp="none",
                         teacher_graph=graph, teacher_compile=teacher_compile)
        assert isinstance(runner._teacher_call, GraphedForward) == graph
        steps = [runner.step(*runner.prepare(runner.random_batch(TINY, seed=s))) for s in (1, 2, 3, 2)]
        values[graph] = [_step_values(step) for step in steps]
        if graph:
            assert runner._teacher_call.num_graphs == 1
    for want, have in zip(values[False], values[True], strict=True):
        assert have.keys() == want.keys() and len(want) == 5
        for k in want:
            assert have[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (k, have, want)
