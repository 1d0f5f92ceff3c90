"""The Triton stem max-pool (train.fused_maxpool) against ATen's ``F.max_pool2d`` on float64: values, the tie rule
(ReLU zeros), NaN, padding, layouts, and gradients placed and summed as ATen places them. On the CPU the kernels
run under Triton's interpreter, in a subprocess (the interpreter is chosen when the kernels are defined)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cskd.models import maxpool
from triton_kernels import (assert_switch_refused_off_cuda, engine_step_both_ways, run_interpreted,
                            step_both_ways)

pytestmark = pytest.mark.skipif(maxpool.triton is None, reason="needs Triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (B, C, H, W, dtype, channels_last): odd and even sizes, one-pixel maps, more channels than a power of two.
CASES = [
    (2, 5, 7, 9, "float32", False),
    (1, 3, 6, 8, "bfloat16", True),
    (1, 2, 1, 1, "float32", False),
    (2, 3, 2, 3, "float32", True),
    (1, 19, 5, 70, "float16", False),
]

_CHILD = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.functional as F
    from cskd.models.maxpool import TritonMaxPool, max_pool_3x3s2
    out = []
    for (b, c, h, w, dt, cl) in json.loads(sys.argv[1]):
        g = torch.Generator().manual_seed(b * 100 + w)
        # ReLU-like: a third exact zeros (ties), small integers (more ties), so a misplaced gradient shows
        x = torch.randint(-3, 4, (b, c, h, w), generator=g).clamp(min=0).double()
        x = x + torch.randint(0, 2, x.shape, generator=g) * 0.5
        x = x.to(getattr(torch, dt))
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        ref_in = x.double().requires_grad_()
        x.requires_grad_()
        y = TritonMaxPool()(x)
        ref = F.max_pool2d(ref_in, 3, 2, 1)
        gy = torch.randint(1, 9, ref.shape, generator=g).double()  # integers: every sum exact in each dtype
        y.backward(gy.to(y.dtype))
        ref.backward(gy)
        out.append({"value_diff": (y.double() - ref).abs().max().item(),
                    "grad_diff": (x.grad.double() - ref_in.grad).abs().max().item(),
                    "grad_sum": ref_in.grad.sum().item(), "cl_kept": y.is_contiguous(memory_format=torch.channels_last),
                    "grad_cl": x.grad.is_contiguous(memory_format=torch.channels_last)})
    # NaN: ATen's window takes it (and the gradient goes to the last NaN of the window)
    x = torch.tensor([[[[1.0, float("nan"), 2.0], [float("nan"), 0.0, 5.0], [3.0, 4.0, 0.0]]]], requires_grad=True)
    r = x.detach().double().requires_grad_()
    y, ref = TritonMaxPool()(x), F.max_pool2d(r, 3, 2, 1)
    y.sum().backward()
    ref.sum().backward()
    nan = {"y": str(y.flatten().tolist()), "ref": str(ref.flatten().tolist()),
           "grad": x.grad.flatten().tolist(), "ref_grad": r.grad.flatten().tolist()}
    # windows of -inf only: ATen's index starts at the window's first pixel inside the map, which takes the gradient
    x = torch.full((1, 2, 5, 6), float("-inf"))
    x[0, 1, 2:, 3:] = torch.arange(9.0).view(3, 3)  # and some finite windows beside them
    x.requires_grad_()
    r = x.detach().double().requires_grad_()
    gy = torch.arange(1.0, 1.0 + 2 * 3 * 3).view(1, 2, 3, 3)
    y = TritonMaxPool()(x)
    y.backward(gy)
    F.max_pool2d(r, 3, 2, 1).backward(gy.double())
    neg_inf = {"y": str(y.flatten().tolist()), "ref": str(F.max_pool2d(r.detach(), 3, 2, 1).flatten().tolist()),
               "grad": x.grad.flatten().tolist(), "ref_grad": r.grad.flatten().tolist()}
    # a gradient in another layout than the saved taps (channels-last input, contiguous incoming gradient)
    x = torch.rand(1, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = x.detach().double().requires_grad_()
    gy = torch.rand(1, 4, 3, 3)
    TritonMaxPool()(x).backward(gy.contiguous())
    F.max_pool2d(r, 3, 2, 1).backward(gy.double())
    layout = (x.grad.double() - r.grad).abs().max().item()
    # the custom ops' registrations (schema, fake tensors, autograd, AOT dispatch as torch.compile uses them)
    x = torch.rand(2, 3, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    checks = torch.library.opcheck(max_pool_3x3s2, (x,))
    # inside a compiled graph (fullgraph: the ops do not break it), forward and backward as the eager nn.MaxPool2d
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), TritonMaxPool(),
                              torch.nn.Conv2d(8, 4, 1))
    ref = torch.nn.Sequential(net[0], net[1], torch.nn.MaxPool2d(3, 2, 1), net[3])
    x = torch.randn(2, 3, 12, 18)
    y = torch.compile(net, fullgraph=True)(x)
    y.square().mean().backward()
    g = net[0].weight.grad.clone()
    net.zero_grad()
    e = ref(x)
    e.square().mean().backward()
    compiled = [(y - e).abs().max().item(), (g - net[0].weight.grad).abs().max().item(), g.abs().max().item()]
    print(json.dumps({"cases": out, "nan": nan, "neg_inf": neg_inf, "layout": layout, "opcheck": checks,
                      "compiled": compiled}))
""")


def test_triton_max_pool_matches_aten_under_the_interpreter() -> None:
    got = run_interpreted(_CHILD, json.dumps(CASES))
    for case, r in zip(CASES, got["cases"]):
        assert r["value_diff"] == 0.0, (case, r)  # a selection: exact
        assert r["grad_diff"] == 0.0, (case, r)  # integer gradients on the same winners: exact
        assert r["grad_sum"] > 0
        if case[2] * case[3] > 1:  # (a 1×1 map is contiguous in both formats)
            assert r["cl_kept"] == case[5] and r["grad_cl"] == case[5], case
    nan = got["nan"]
    assert nan["y"] == nan["ref"] == "[nan, nan, nan, 5.0]"
    assert nan["grad"] == nan["ref_grad"]
    neg_inf = got["neg_inf"]
    assert neg_inf["y"] == neg_inf["ref"] and "-inf" in neg_inf["y"]
    assert neg_inf["grad"] == neg_inf["ref_grad"] and sum(neg_inf["ref_grad"]) == sum(range(1, 19))
    assert got["layout"] < 1e-6
    assert got["opcheck"] and set(got["opcheck"].values()) == {"SUCCESS"}, got["opcheck"]
    out_diff, grad_diff, grad_max = got["compiled"]
    assert out_diff < 1e-5 and grad_diff <= 1e-5 * grad_max and grad_max > 0


def test_the_engine_step_with_the_triton_pool_under_the_interpreter() -> None:
    """train.fused_maxpool=true in the runner (CPU, Triton's interpreter): the stem's pool swapped, the same loss
    and gradients as nn.MaxPool2d."""
    fused, plain = engine_step_both_ways("fused_maxpool")
    assert (fused["triton_pools"], plain["triton_pools"]) == (1, 0)
    assert abs(fused["ce"] - plain["ce"]) <= 1e-6 * abs(plain["ce"])
    assert len(fused["grad_norms"]) == len(plain["grad_norms"]) > 0
    torch.testing.assert_close(torch.tensor(fused["grad_norms"]), torch.tensor(plain["grad_norms"]), rtol=1e-5, atol=0)


def test_only_plain_3x3_stride_2_pools_are_swapped() -> None:
    net = nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.Sequential(nn.MaxPool2d(3, 2, 1)), nn.MaxPool2d(2, 2),
                        nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(3, 1, 1))
    assert maxpool.triton_max_pools_(net) == 2
    kinds = [type(m).__name__ for m in (net[0], net[1][0], net[2], net[3], net[4])]
    assert kinds == ["TritonMaxPool", "TritonMaxPool", "MaxPool2d", "MaxPool2d", "MaxPool2d"]
    # float64 is not what the kernels compare in: ATen's pool, the same values
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert torch.equal(net[0](x), F.max_pool2d(x, 3, 2, 1))


def test_fused_maxpool_is_refused_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert_switch_refused_off_cuda("fused_maxpool")  # null: nn.MaxPool2d off CUDA


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_max_pool_on_cuda_matches_aten(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 64, 66, 130, device="cuda", generator=g).relu().to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    r = x.detach().double().requires_grad_()
    y = maxpool.TritonMaxPool()(x)
    ref = F.max_pool2d(r, 3, 2, 1)
    gy = torch.randint(1, 9, ref.shape, device="cuda", generator=g).double()
    y.backward(gy.to(dtype))
    ref.backward(gy)
    assert torch.equal(y.double(), ref)
    assert torch.equal(x.grad.double(), r.grad)


@cuda
def test_triton_max_pool_compiles_into_a_graph() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), maxpool.TritonMaxPool(), nn.Conv2d(8, 4, 1)).cuda()
    ref = nn.Sequential(*[m for m in net[:2]], nn.MaxPool2d(3, 2, 1), net[3])
    x = torch.randn(2, 3, 32, 48, device="cuda")
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    grad = net[0].weight.grad.clone()
    net.zero_grad()
    expect = ref(x)
    expect.square().mean().backward()
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(grad, net[0].weight.grad)


@cuda
def test_a_cuda_step_with_the_triton_pool_gives_the_same_terms_and_gradients() -> None:
    """The engine's step with train.fused_maxpool on and off (eager, float32): the same terms and gradients."""
    fused, plain = step_both_ways("fused_maxpool", "cuda", (128, 256))
    assert (fused["triton_pools"], plain["triton_pools"]) == (1, 0)
    for k in ("ce", "aux"):
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-6, atol=0)
    assert fused["stem_grad"] is not None  # the stem's first conv, below the pool: its gradient went through it
    torch.testing.assert_close(torch.tensor(fused["stem_grad"]), torch.tensor(plain["stem_grad"]), rtol=1e-4,
                               atol=1e-6)
