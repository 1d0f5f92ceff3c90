"""Helpers for the tests of cskd's Triton kernels: running them on the CPU under Triton's interpreter (a fresh
Python: the interpreter is chosen when a kernel is defined, so it cannot be switched on inside the test process),
and one engine step with a kernel's switch on, then off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def run_interpreted(code: str, *args: str) -> Any:
    """Run ``code`` under ``TRITON_INTERPRET=1``; the JSON value its last line of output prints."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_switch_refused_off_cuda(key: str) -> None:
    """``train.<key>`` (``fused_ce``, ``fused_maxpool``) on the CPU without Triton's interpreter (the caller unsets
    ``TRITON_INTERPRET``): null settles to off, and true makes the runner raise the config error naming the key."""
    import pytest

    from cskd.distributed import DistEnv
    from cskd.engine.config import config_from_dict
    from cskd.engine.runner import StepRunner
    from cskd.errors import ConfigError

    cpu = torch.device("cpu")

    def config(value: bool | None) -> Any:
        return config_from_dict({"model": {"model": "fcn", "backbone": "resnet18", "aux": False},
                                 "train": {"device": "cpu", key: value, "batch_size": 2}}, "test")

    settled = getattr(config(None).train, "fuses_" + key.removeprefix("fused_"))
    assert settled(cpu) is False  # null: off CUDA
    with pytest.raises(ConfigError, match=f"train.{key}=true needs CUDA"):
        StepRunner(config(True), 3, DistEnv(0, 1, 0, cpu), 2)


def step_both_ways(key: str, device: str, crop: tuple[int, int]) -> list[dict[str, Any]]:
    """One eager float32 step of the engine (DeepLabV3-R18, B = 2) with ``train.<key>`` true, then false, from the
    same seed: which kernels it used, its cross-entropy terms, the norm of each parameter's gradient, and the
    stem's first conv's gradient (below the stem's pool)."""
    from cskd.distributed import DistEnv
    from cskd.engine import fused_ce
    from cskd.engine.config import config_from_dict
    from cskd.engine.runner import StepRunner
    from cskd.models.maxpool import TritonMaxPool

    out = []
    for on in (True, False):
        torch.manual_seed(0)
        cfg = config_from_dict({"model": {"model": "deeplabv3", "backbone": "resnet18"},
                                "data": {"crop_size": list(crop)},
                                "train": {"device": device, key: on, "compile": False, "amp": "none",
                                          "batch_size": 2}}, "test")
        runner = StepRunner(cfg, 7, DistEnv(0, 1, 0, torch.device(device)), 2)
        _, t = runner.step(*runner.prepare(runner.random_batch(crop)))
        stem = runner.student.backbone.conv1.weight.grad
        out.append({"fused_ce": runner.step_module._upsampled_ce is fused_ce.fused_upsampled_ce,
                    "triton_pools": sum(isinstance(m, TritonMaxPool) for m in runner.student.modules()),
                    "ce": float(t["ce"]), "aux": float(t["aux"]),
                    "grad_norms": [p.grad.double().norm().item() for p in runner.student.parameters()
                                   if p.grad is not None],
                    "stem_grad": None if stem is None else stem.double().flatten().tolist()})
    return out


_ENGINE_STEP = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from triton_kernels import step_both_ways
print(json.dumps(step_both_ways(sys.argv[1], "cpu", (64, 96))))
"""


def engine_step_both_ways(key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`step_both_ways` on the CPU under Triton's interpreter (64×96 crops)."""
    on, off = run_interpreted(_ENGINE_STEP, key)
    return on, off
