"""The fused cross-entropy kernel (train.fused_ce) against an independent float64 reference (F.interpolate +
F.cross_entropy): values, gradients, ignore labels, degenerate sizes, layouts, bad labels. On the CPU the kernel
runs under Triton's interpreter, in a subprocess (the interpreter is chosen when the kernel is defined)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

from cskd.engine import fused_ce
from cskd.engine.step import _interpolation_matrix, segmentation_ce
from triton_kernels import (assert_switch_refused_off_cuda, engine_step_both_ways, run_interpreted,
                            step_both_ways)

pytestmark = pytest.mark.skipif(fused_ce.triton is None, reason="needs Triton")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Each case: (B, C, h, w, H, W, logits dtype, channels_last, targets dtype). Degenerate sizes: h = 1, w = 1, the
# same size (no upsampling), a downsampling; widths that are not multiples of the kernel's blocks; runs of 8 and 9
# output columns per input column, as at 64×128 → 512×1024 (the kernel's 8 + 2 lanes), and of 4 to 5 (4 + 2).
CASES = [
    (2, 5, 4, 6, 13, 22, "float32", False, "int64"),
    (1, 3, 1, 5, 4, 9, "float32", False, "int64"),
    (2, 4, 5, 1, 7, 3, "float32", False, "int64"),
    (2, 3, 3, 4, 3, 4, "float32", False, "int64"),
    (1, 6, 9, 70, 5, 41, "float32", False, "uint8"),
    (2, 19, 5, 40, 33, 300, "bfloat16", True, "int64"),
    (1, 19, 3, 16, 5, 128, "float32", False, "int64"),
]

_CHILD = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.functional as F
    from cskd.engine.fused_ce import fused_upsampled_ce
    from cskd.engine.step import _interpolation_matrix
    out = []
    for (b, c, h, w, oh, ow, dt, cl, tdt) in json.loads(sys.argv[1]):
        g = torch.Generator().manual_seed(b * 1000 + ow)
        ref_logits = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
        t = torch.randint(0, c, (b, oh, ow), generator=g)
        t[torch.rand(b, oh, ow, generator=g) < 0.2] = 255
        x = ref_logits.to(getattr(torch, dt))
        ref_in = x.double().requires_grad_()  # the reference starts from the same (rounded) logits
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        loss = fused_upsampled_ce(x, t.to(getattr(torch, tdt)), _interpolation_matrix(oh, h, x.device, torch.float32))
        loss.backward()
        ref = F.cross_entropy(F.interpolate(ref_in, (oh, ow), mode="bilinear", align_corners=True), t,
                              ignore_index=255)
        ref.backward()
        gd = (x.grad.double() - ref_in.grad).abs().max().item()
        out.append({"loss": loss.item(), "ref": ref.item(), "grad_diff": gd,
                    "grad_max": ref_in.grad.abs().max().item(), "grad_dtype": str(x.grad.dtype)})
    # every label ignored: NaN (0/0), as the library's mean; a label outside the classes: NaN
    x = torch.randn(1, 3, 2, 2)
    mh = _interpolation_matrix(4, 2, x.device, torch.float32)
    allign = fused_upsampled_ce(x, torch.full((1, 4, 4), 255), mh).item()
    bad_t = torch.zeros(1, 4, 4, dtype=torch.long)
    bad_t[0, 1, 2] = 3
    bad = fused_upsampled_ce(x, bad_t, mh).item()
    print(json.dumps({"cases": out, "all_ignored": str(allign), "bad_label": str(bad)}))
""")


def test_fused_ce_matches_the_float64_reference_under_the_interpreter() -> None:
    got = run_interpreted(_CHILD, json.dumps(CASES))
    for case, r in zip(CASES, got["cases"]):
        assert abs(r["loss"] - r["ref"]) <= 2e-6 * max(1.0, abs(r["ref"])), (case, r)
        # float32 arithmetic against float64: far under 1e-4 of the largest gradient entry; a bf16 gradient is
        # the float32 one rounded to 8 bits (≤ 2⁻⁸ of an entry)
        tol = 1e-5 if case[6] == "float32" else 2**-8
        assert r["grad_diff"] <= tol * r["grad_max"], (case, r)
        assert r["grad_dtype"] == f"torch.{case[6]}"
    assert got["all_ignored"] == "nan"
    assert got["bad_label"] == "nan"


def test_the_engine_step_with_the_fused_ce_under_the_interpreter() -> None:
    """train.fused_ce=true in the runner (CPU, Triton's interpreter): the kernel used, the same main and aux terms
    and the same gradients as the tensor version."""
    fused, plain = engine_step_both_ways("fused_ce")
    assert (fused["fused_ce"], plain["fused_ce"]) == (True, False)
    for k in ("ce", "aux"):
        assert abs(fused[k] - plain[k]) <= 2e-6 * abs(plain[k]), k
    assert len(fused["grad_norms"]) == len(plain["grad_norms"]) > 0
    torch.testing.assert_close(torch.tensor(fused["grad_norms"]), torch.tensor(plain["grad_norms"]), rtol=1e-4, atol=0)


def test_lanes_cover_every_run_with_power_of_two_tiles() -> None:
    for max_run in range(0, 70):
        run, tail = fused_ce._lanes(max_run)
        for n in (run, tail):
            assert n == 0 or n & (n - 1) == 0
        assert run >= 2 and run + tail >= max_run and (tail == 0 or run <= max_run)
        assert run + tail < 2 * max(max_run, 2)  # never the next power of two's padding (16 lanes for 9 columns)


def test_fused_ce_is_refused_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 3, 2, 2)
    with pytest.raises(RuntimeError, match="CUDA and Triton"):
        fused_ce.fused_upsampled_ce(x, torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(4, 2))
    assert_switch_refused_off_cuda("fused_ce")  # null: the tensor version off CUDA


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_on_cuda_matches_the_tensor_version_and_is_deterministic(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    logits = torch.randn(2, 19, 64, 128, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 19, (2, 512, 1024), device=dev)
    targets[:, :40] = 255
    ref_in = logits.double().detach().requires_grad_()
    ref = F.cross_entropy(F.interpolate(ref_in, (512, 1024), mode="bilinear", align_corners=True), targets,
                          ignore_index=255)
    (g_ref,) = torch.autograd.grad(ref, ref_in)
    grads, values = [], []
    for _ in range(2):
        x = logits.detach().requires_grad_()
        loss = segmentation_ce(x, targets, fused_ce.fused_upsampled_ce)
        (g,) = torch.autograd.grad(loss, x)
        values.append(loss)
        grads.append(g)
    assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1])  # no atomics: bit for bit
    torch.testing.assert_close(values[0].double(), ref, rtol=2e-6, atol=0)
    scale = g_ref.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded to bf16 at the end
    assert (grads[0].double() - g_ref).abs().max().item() <= tol * scale
    mh = _interpolation_matrix(512, 64, dev, torch.float32)
    bad = targets.clone()
    bad[0, 3, 5] = 19
    assert torch.isnan(fused_ce.fused_upsampled_ce(logits.float(), bad, mh))


@cuda
def test_a_cuda_step_with_the_fused_ce_gives_the_tensor_versions_terms() -> None:
    """The engine's step with train.fused_ce on and off (eager, float32): the same cross-entropy terms."""
    fused, plain = step_both_ways("fused_ce", "cuda", (128, 256))
    assert (fused["fused_ce"], plain["fused_ce"]) == (True, False)
    for k in ("ce", "aux"):
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-5, atol=0)
