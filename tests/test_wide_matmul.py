"""wide_bmm / exact_bmm: low-precision operands, float32 results equal to the float64 product of the same values,
and the CAM energies they serve keep float32 resolution. References are float64 products of the rounded values."""

from __future__ import annotations

import pytest
import torch

from cskd.losses.attention import cam_context
from cskd.losses.cka import residual_gram
from cskd.losses._numerics import exact_bmm, wide_bmm

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


def _operands(dtype, device, seed=0, g=3, m=5, k=700, n=6):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(g, m, k, generator=gen) * 4).to(dtype)
    b = (torch.randn(g, k, n, generator=gen) * 4).to(dtype)
    return a.to(device), b.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wide_bmm_is_the_float32_product_of_the_low_precision_values(device, dtype):
    a, b = _operands(dtype, device)
    out = wide_bmm(a, b)
    ref = a.double() @ b.double()
    assert out.dtype == torch.float32 and out.shape == (3, 5, 6)
    # Exact products, float32 accumulation over k = 700 terms: a few float32 ulps of the largest partial sums.
    scale = (a.double().abs() @ b.double().abs()).max()
    assert (out.double() - ref).abs().max() <= 1e-6 * scale
    # What a plain low-precision product returns is off by far more (its result is rounded to 8 or 11 bits).
    plain = (a @ b).double()
    assert (plain - ref).abs().max() > 1e2 * (out.double() - ref).abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_wide_bmm_backward_matches_float64_gradients(device):
    a, b = _operands(torch.bfloat16, device, k=64)
    a.requires_grad_(), b.requires_grad_()
    w = torch.randn(3, 5, 6, device=device, dtype=torch.float64)
    (wide_bmm(a, b).double() * w).sum().backward()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ((a64 @ b64) * w).sum().backward()
    assert a.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.bfloat16
    # Autocast's backward precision: the gradient rounded to bf16, then a bf16 product. Bound each entry by a few
    # bf16 ulps of the sum of absolute terms it adds up.
    bound_a = 2**-6 * (w.abs() @ b64.detach().abs().mT)
    bound_b = 2**-6 * (a64.detach().abs().mT @ w.abs())
    assert ((a.grad.double() - a64.grad).abs() <= bound_a).all()
    assert ((b.grad.double() - b64.grad).abs() <= bound_b).all()
    assert not torch.equal(a.grad.double(), torch.zeros_like(a64.grad))


def test_exact_bmm_keeps_wide_inputs_wide():
    a, b = _operands(torch.float64, "cpu")
    assert exact_bmm(a, b).dtype == torch.float64
    assert exact_bmm(a.float(), b.float()).dtype == torch.float32
    assert exact_bmm(a.bfloat16(), b.float()).dtype == torch.float32  # mixed: promoted, not narrowed


@pytest.mark.parametrize("device", DEVICES)
def test_cam_context_of_bf16_features_keeps_float32_energies(device):
    # Energies in the thousands (N = 2048 positions): in bf16 their spacing is 8-16, far above τ = 2.
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 16, 2048, generator=gen).relu() + 0.5).bfloat16().to(device)
    out = cam_context(x, temperature=2.0)
    ref = cam_context(x.double(), temperature=2.0)
    assert out.dtype == torch.bfloat16
    # The only roundings left are the attention weights' and the result's (to bf16): ~2⁻⁸ relative.
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    energy_bf16 = (x @ x.mT).double()  # what bf16 energies would be
    rounded = torch.softmax(energy_bf16 * -0.5, -1) @ x.double()
    assert (rounded - ref).abs().max() > 10 * (out.double() - ref).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(), (3,)])
def test_residual_gram_of_bf16_rows_matches_float64_with_gradients(device, lead):
    # D = 4096 is cut into slices, so the sliced, stacked layout is exercised; leading dims are PAM's block groups.
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(*lead, 4, 4096, generator=gen).bfloat16().to(device).requires_grad_()
    x = (torch.randn(*lead, 4, 4096, generator=gen).relu() + 1).bfloat16().to(device).requires_grad_()
    gamma = torch.tensor(0.3, device=device, requires_grad=True)
    k = residual_gram(m, x, gamma)
    assert k.dtype == torch.float32 and k.shape == (*lead, 4, 4)
    w = torch.randn(k.shape, generator=gen, dtype=torch.float64).to(device)
    (k.double() * w).sum().backward()

    m64, x64 = m.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    g64 = gamma.detach().double().requires_grad_()
    y = g64 * m64 + x64
    k64 = y @ y.mT
    (k64 * w).sum().backward()
    # Forward: exact products, float32 sums of 4096 terms.
    torch.testing.assert_close(k.double(), k64, rtol=1e-5, atol=1e-3)
    # Backward: the B×B gradient rounded to bf16 before its product with the rows (autocast's precision).
    for got, ref in ((m.grad, m64.grad), (x.grad, x64.grad)):
        assert got.dtype == torch.bfloat16
        assert (got.double() - ref).abs().max() <= 2**-6 * ref.abs().max()
    torch.testing.assert_close(gamma.grad.double(), g64.grad, rtol=1e-2, atol=1e-2 * g64.grad.abs().item())

    with torch.no_grad():  # the teacher's side: same Gram, nothing kept for backward
        torch.testing.assert_close(residual_gram(m.detach(), x.detach(), gamma.detach()), k.detach())


def test_compiles_as_one_opaque_op():
    a, b = _operands(torch.bfloat16, "cpu", k=32)
    a.requires_grad_()
    f = torch.compile(lambda a, b: wide_bmm(a, b).sum(), backend="aot_eager", fullgraph=True)
    f(a, b).backward()
    assert a.grad is not None and a.grad.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inductor_compiles_wide_bmm_on_cuda():
    a, b = _operands(torch.bfloat16, "cuda", k=512)
    a.requires_grad_()
    f = torch.compile(lambda a, b: (wide_bmm(a, b) * 2).sum(), fullgraph=True)
    out = f(a, b)
    out.backward()
    torch.testing.assert_close(out.double(), 2 * (a.double() @ b.double()).sum(), rtol=1e-5, atol=1e-2)
    assert a.grad is not None
