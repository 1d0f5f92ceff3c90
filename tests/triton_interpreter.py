"""Running cskd's Triton kernels on the CPU for the tests: a fresh Python with Triton's interpreter on (the
interpreter is chosen when a kernel is defined, so it cannot be switched on inside the test process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any


def run_interpreted(code: str, *args: str) -> Any:
    """Run ``code`` under ``TRITON_INTERPRET=1``; the JSON value its last line of output prints."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_ENGINE_STEP = textwrap.dedent("""
    import json, sys
    import torch
    from cskd.distributed import DistEnv
    from cskd.engine import fused_ce
    from cskd.engine.config import config_from_dict
    from cskd.engine.runner import StepRunner
    from cskd.models.maxpool import TritonMaxPool
    out = []
    for on in (True, False):
        torch.manual_seed(0)
        cfg = config_from_dict({"model": {"model": "deeplabv3", "backbone": "resnet18"},
                                "data": {"crop_size": [64, 96]},
                                "train": {"device": "cpu", sys.argv[1]: on, "compile": False, "amp": "none",
                                          "batch_size": 2}}, "test")
        runner = StepRunner(cfg, 5, DistEnv(0, 1, 0, torch.device("cpu")), 2)
        _, t = runner.step(*runner.prepare(runner.random_batch((64, 96))))
        out.append({"fused_ce": runner.step_module._upsampled_ce is fused_ce.fused_upsampled_ce,
                    "triton_pools": sum(isinstance(m, TritonMaxPool) for m in runner.student.modules()),
                    "ce": float(t["ce"]), "aux": float(t["aux"]),
                    "grad_norms": [p.grad.double().norm().item() for p in runner.student.parameters()
                                   if p.grad is not None]})
    print(json.dumps(out))
""")


def engine_step_both_ways(key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One eager float32 step of the engine (DeepLabV3-R18, B = 2, 64×96, CPU, Triton's interpreter) with
    ``train.<key>`` true, then false, from the same seed: which kernels it used, its cross-entropy terms, and the
    norm of each parameter's gradient."""
    on, off = run_interpreted(_ENGINE_STEP, key)
    return on, off
