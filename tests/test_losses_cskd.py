"""CSKD's loss: CKA, CAM, PAM, the grid, and the registered "cskd" method against float64 references written here
from the formulas (explicit centring matrix, per-sample loops, slicing by ⌈H/5⌉), not by calling the module."""

from __future__ import annotations

import copy
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from cskd.errors import ConfigError
from cskd.losses import LOSSES, build_loss
from cskd.losses import cskd as cskd_module
from cskd.losses.attention import (
    Projections,
    channel_attention,
    chunk_sizes,
    draw_projections,
    grid_blocks,
    grid_groups,
    grid_tokens,
    position_attention,
)
from cskd.losses.cka import centre_gram, cka_loss, hsic, linear_cka, row_products
from cskd.losses.cskd import CSKDLoss
from cskd.models.segmentor import SegOutput

D64 = torch.float64


# --------------------------------------------------------------------------------------------------- references


def ref_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    n = x.shape[0]
    h = torch.eye(n, dtype=D64) - torch.ones(n, n, dtype=D64) / n
    k, l = x @ x.T, y @ y.T  # noqa: E741

    def hsic(a, b):
        return ((h @ a @ h) * (h @ b @ h)).sum()

    return hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))


def ref_neg_log_cka(x, y):
    return -torch.log(ref_cka(x, y).abs() + 1e-8)


def ref_softmax_rows(e: torch.Tensor) -> torch.Tensor:
    z = torch.exp(e - e.max(dim=1, keepdim=True).values)
    return z / z.sum(dim=1, keepdim=True)


def ref_cam(x: torch.Tensor, gamma: float, tau: float) -> torch.Tensor:
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        c = x.shape[1]
        xt = x[i].reshape(c, -1)
        a = xt @ xt.T
        e = a.max(dim=1, keepdim=True).values - a
        s = ref_softmax_rows(e / tau)
        out[i] = gamma * (s @ xt).reshape(x.shape[1:]) + x[i]
    return out


def ref_pam(x: torch.Tensor, gamma: float, tau: float, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    d = c // 8
    wq, wk, wv = weight[:d], weight[d : 2 * d], weight[2 * d :]
    bq, bk, bv = bias[:d], bias[d : 2 * d], bias[2 * d :]
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        xt = x[i].reshape(c, -1)
        q = wq @ xt + bq[:, None]
        k = wk @ xt + bk[:, None]
        v = wv @ xt + bv[:, None]
        s = ref_softmax_rows((q.T @ k) / tau)
        out[i] = gamma * (v @ s.T).reshape(x.shape[1:]) + x[i]
    return out


def ref_blocks(x: torch.Tensor, grid: int) -> list[torch.Tensor]:
    """Row bands then columns, each ⌈L/grid⌉ long except the last (torch.chunk's rule, written out)."""
    h, w = x.shape[2:]
    sh, sw = math.ceil(h / grid), math.ceil(w / grid)
    return [x[:, :, r : r + sh, c : c + sw] for r in range(0, h, sh) for c in range(0, w, sw)]


def features(b=4, cs=16, ct=32, h=6, w=10, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(b, cs, h, w, generator=g, dtype=dtype).relu()
    ft = torch.randn(b, ct, h, w, generator=g, dtype=dtype).relu() + 0.1 * fs.repeat(1, ct // cs, 1, 1)
    return fs, ft


def seg(f: torch.Tensor) -> SegOutput:
    return SegOutput(logits=f.new_zeros(f.shape[0], 3, *f.shape[2:]), aux_logits=None, features=f)


def make(cs=16, ct=32, **kw) -> CSKDLoss:
    return build_loss("cskd", kw, student_channels=cs, teacher_channels=ct, num_classes=3)  # type: ignore[return-value]


def set_gammas(loss: CSKDLoss, cam: float = 0.7, pam: float = -0.4) -> None:
    with torch.no_grad():
        if hasattr(loss, "gamma_cam"):
            loss.gamma_cam.fill_(cam)
        if hasattr(loss, "gamma_pam"):
            loss.gamma_pam.fill_(pam)


# ------------------------------------------------------------------------------------------------------------ CKA


def test_linear_cka_matches_reference_and_published_log_term():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 7, generator=g, dtype=D64), torch.randn(5, 3, 2, generator=g, dtype=D64)
    assert torch.allclose(linear_cka(x, y), ref_cka(x, y), atol=1e-12)
    assert torch.allclose(cka_loss(x, y), ref_neg_log_cka(x, y), atol=1e-12)


def test_hsic_and_centring_match_the_centring_matrix():
    g = torch.Generator().manual_seed(8)
    k, l = torch.randn(2, 5, 5, generator=g, dtype=D64)  # noqa: E741 - any matrices, not only Grams
    h = torch.eye(5, dtype=D64) - torch.ones(5, 5, dtype=D64) / 5
    assert torch.allclose(centre_gram(k), h @ k @ h, atol=1e-12)
    assert torch.allclose(hsic(k, l), ((h @ k @ h) * (h @ l @ h)).sum(), atol=1e-12)


def test_cka_invariances_and_range():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 9, generator=g, dtype=D64), torch.randn(6, 4, generator=g, dtype=D64)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=D64))
    assert torch.allclose(linear_cka(x, x @ q), torch.ones((), dtype=D64), atol=1e-12)
    assert torch.allclose(linear_cka(3.7 * x, y), linear_cka(x, y), atol=1e-12)
    assert torch.allclose(linear_cka(x, y), linear_cka(y, x), atol=1e-12)
    for seed in range(5):
        g.manual_seed(seed)
        v = linear_cka(torch.randn(4, 5, generator=g) - 2, torch.randn(4, 8, generator=g).relu())
        assert 0.0 <= float(v) <= 1.0 + 1e-6


def test_cka_is_one_for_two_samples():
    g = torch.Generator().manual_seed(3)
    assert torch.allclose(linear_cka(torch.randn(2, 5, generator=g, dtype=D64),
                                     torch.randn(2, 3, generator=g, dtype=D64)), torch.ones((), dtype=D64))


def test_cka_finite_for_constant_samples():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 6, generator=g, dtype=D64), torch.randn(4, 5, generator=g, dtype=D64)
    x[1] = 0.0  # one constant sample: CKA stays well defined
    assert torch.allclose(linear_cka(x, y), ref_cka(x, y), atol=1e-12)
    # every sample identical on one side: 0/0 in the published code; here CKA = 1, term 0, gradient exactly 0
    for same in (torch.full((4, 6), 2.5), torch.zeros(4, 6), torch.randn(1, 6).expand(4, 6).clone()):
        a = same.float().requires_grad_()
        b = torch.randn(4, 5, generator=g).requires_grad_()
        loss = cka_loss(a, b)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


def test_cka_loss_finite_when_cka_is_zero():
    # Orthogonal centred Grams: CKA = 0 → −log(1e-8), the published epsilon keeps it finite.
    x = torch.tensor([[1.0, 0], [-1, 0], [0, 0], [0, 0]], dtype=D64)
    y = torch.tensor([[0.0, 0], [0, 0], [0, 1], [0, -1]], dtype=D64)
    assert torch.allclose(cka_loss(x, y), torch.tensor(-math.log(1e-8), dtype=D64))


def test_cka_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 300, generator=g), torch.randn(4, 200, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = cka_loss(x.bfloat16(), y.bfloat16())
    assert v.dtype == torch.float32
    assert torch.allclose(v.double(), ref_neg_log_cka(x.bfloat16(), y.bfloat16()), atol=1e-5)


def test_long_rows_are_multiplied_in_slices_exactly():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 96 * 1024, generator=g, dtype=D64, requires_grad=True)  # long enough to be sliced
    b = torch.randn(3, 96 * 1024, generator=g, dtype=D64)
    got = row_products(a, b)
    assert torch.allclose(got, a.detach() @ b.T, rtol=1e-12)
    (ga,) = torch.autograd.grad((got * torch.arange(9.0, dtype=D64).view(3, 3)).sum(), a)
    assert torch.allclose(ga, torch.arange(9.0, dtype=D64).view(3, 3) @ b, rtol=1e-12)


def test_cka_gradcheck():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 5, generator=g, dtype=D64, requires_grad=True)
    y = torch.randn(4, 3, generator=g, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(cka_loss, (x, y))


# -------------------------------------------------------------------------------------------------- CAM and PAM


def test_channel_attention_matches_reference():
    x, _ = features(b=3, cs=8, h=3, w=5)
    for tau in (1.0, 2.0):
        out = channel_attention(x, torch.tensor(0.6, dtype=D64), tau)
        assert torch.allclose(out, ref_cam(x, 0.6, tau), atol=1e-10)


def test_position_attention_matches_reference():
    x, _ = features(b=3, cs=16, h=3, w=4)
    proj = draw_projections(16, dtype=D64, generator=torch.Generator().manual_seed(0))
    out = position_attention(x, torch.tensor(-0.3, dtype=D64), 2.0, proj)
    assert torch.allclose(out, ref_pam(x, -0.3, 2.0, proj.weight, proj.bias), atol=1e-10)


def test_attention_gradcheck():
    x, _ = features(b=2, cs=8, h=2, w=3)
    x.requires_grad_()
    gamma = torch.tensor(0.5, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, gm: channel_attention(a, gm, 2.0), (x, gamma))
    proj = draw_projections(8, dtype=D64, generator=torch.Generator().manual_seed(1))
    w, b = proj.weight.clone().requires_grad_(), proj.bias.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, gm, ww, bb: position_attention(a, gm, 2.0, Projections(ww, bb)), (x, gamma, w, b)
    )


def test_draw_projections_follow_default_conv_init():
    c = 64
    bound = 1.0 / math.sqrt(c)
    conv = nn.Conv2d(c, c, 1)
    assert float(conv.weight.detach().abs().max()) <= bound and float(conv.bias.detach().abs().max()) <= bound
    p = draw_projections(c, 20, generator=torch.Generator().manual_seed(0))
    assert p.weight.shape == (20, 2 * 8 + c, c) and p.bias.shape == (20, 2 * 8 + c)
    allv = torch.cat([p.weight.flatten(), p.bias.flatten()])
    assert float(allv.abs().max()) <= bound and float(allv.abs().max()) > 0.999 * bound
    assert abs(float(allv.mean())) < 0.01 * bound
    assert abs(float(allv.var()) - bound**2 / 3) < 0.02 * bound**2  # U(−a, a) has variance a²/3


# ------------------------------------------------------------------------------------------------------------ grid


@pytest.mark.parametrize(("length", "sizes"), [(64, [13, 13, 13, 13, 12]), (13, [3, 3, 3, 3, 1]), (6, [2, 2, 2]),
                                              (4, [1, 1, 1, 1]), (128, [26, 26, 26, 26, 24]), (5, [1] * 5)])
def test_chunk_sizes_follow_torch_chunk(length, sizes):
    assert chunk_sizes(length, 5) == sizes
    assert [t.shape[0] for t in torch.chunk(torch.zeros(length), 5)] == sizes


@pytest.mark.parametrize(("h", "w"), [(4, 13), (13, 64), (64, 128), (6, 6), (1, 7)])
def test_grid_groups_cover_the_map_like_torch_chunk(h, w):
    x = torch.randn(2, 8, h, w, dtype=D64)
    groups = grid_groups(h, w, 5)
    assert len(groups) <= 4
    expected = ref_blocks(x, 5)
    assert sum(g.count for g in groups) == len(expected) == len(grid_blocks(x, 5))
    got = []
    for gr, t in zip(groups, grid_tokens(x, groups)):
        assert t.shape == (gr.count, 2, gr.block_h * gr.block_w, 8)
        got += [blk.mT.reshape(2, 8, gr.block_h, gr.block_w) for blk in t]
    for e in expected:  # one-to-one: every published block appears exactly once
        assert sum(blk.shape == e.shape and torch.equal(blk, e) for blk in got) == 1


# --------------------------------------------------------------------------------------------- the CSKD method


def ref_cskd(fs, ft, gc, gp, tau, grid, ps, pt, lam_cam=0.3, lam_pam=0.8, mse=False, conv=None):
    """The published recipe in float64, one block at a time; ``ps``/``pt`` one projection set per side or a
    list with one per block."""
    if conv is not None:
        fs = torch.einsum("oc,bchw->bohw", conv, fs)
    sim = (lambda a, b: ((a - b) ** 2).mean()) if mse else ref_neg_log_cka
    cam = sim(ref_cam(fs, gc, tau), ref_cam(ft, gc, tau))
    bs, bt = ref_blocks(fs, grid), ref_blocks(ft, grid)
    per = lambda p, i: p[i] if isinstance(p, list) else p  # noqa: E731
    pam = sum(sim(ref_pam(s, gp, tau, *per(ps, i)), ref_pam(t, gp, tau, *per(pt, i)))
              for i, (s, t) in enumerate(zip(bs, bt))) / len(bs)
    return lam_cam * cam, lam_pam * pam


@pytest.mark.parametrize(("h", "w", "grid"), [(6, 10, 5), (13, 7, 5), (4, 4, 5), (5, 6, 1)])
def test_cskd_fixed_matches_reference(h, w, grid):
    fs, ft = features(h=h, w=w)
    loss = make(pam_projection="fixed", pam_grid=grid, projection_seed=3).double()
    set_gammas(loss)
    out = loss(seg(fs), seg(ft))
    ps = (loss.pam_student_weight, loss.pam_student_bias)
    pt = (loss.pam_teacher_weight, loss.pam_teacher_bias)
    cam, pam = ref_cskd(fs, ft, 0.7, -0.4, 2.0, grid, ps, pt)
    assert set(out) == {"cam", "pam"}
    assert torch.allclose(out["cam"], cam, atol=1e-10) and torch.allclose(out["pam"], pam, atol=1e-10)


def test_cskd_resample_uses_fresh_per_block_draws(monkeypatch):
    fs, ft = features(h=13, w=7)
    loss = make(temperature=1.5).double()
    set_gammas(loss)
    drawn: list[Projections] = []
    real = cskd_module.draw_projections

    def record(*args, **kwargs):
        p = real(*args, **kwargs)
        drawn.append(Projections(p.weight.double(), p.bias.double()))
        return p

    monkeypatch.setattr(cskd_module, "draw_projections", record)
    out = loss(seg(fs), seg(ft))
    assert len(drawn) == 2 and drawn[0].weight.shape[0] == 20  # 13 → 5 row chunks, 7 → 4 column chunks
    # draws are stacked group by group, row-major inside a group: map them back to the published block order
    order = []
    for gr in grid_groups(13, 7, 5):
        order += [(gr.top + i * gr.block_h, gr.left + j * gr.block_w) for i in range(gr.rows) for j in range(gr.cols)]
    published = [(r, c) for r in range(0, 13, 3) for c in range(0, 7, 2)]
    per_block = [[(p.weight[order.index(rc)], p.bias[order.index(rc)]) for rc in published] for p in drawn]
    cam, pam = ref_cskd(fs, ft, 0.7, -0.4, 1.5, 5, per_block[0], per_block[1])
    assert torch.allclose(out["pam"], pam, atol=1e-10) and torch.allclose(out["cam"], cam, atol=1e-10)
    assert not torch.equal(drawn[0].weight[0], drawn[0].weight[1])


def test_resample_draws_anew_each_call_and_follows_the_seed():
    fs, ft = features()
    loss = make(lambda_cam=0.0).double()
    set_gammas(loss)
    torch.manual_seed(0)
    a, b = loss(seg(fs), seg(ft))["pam"], loss(seg(fs), seg(ft))["pam"]
    torch.manual_seed(0)
    c = loss(seg(fs), seg(ft))["pam"]
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def test_fixed_is_reproducible_across_save_and_load(tmp_path):
    fs, ft = features()
    a = make(pam_projection="fixed", projection_seed=11).double()
    set_gammas(a)
    assert torch.equal(a.pam_teacher_weight, make(pam_projection="fixed", projection_seed=11).pam_teacher_weight)
    torch.save(a.state_dict(), tmp_path / "loss.pt")
    b = make(pam_projection="fixed", projection_seed=99).double()
    assert "pam_student_weight" in b.state_dict() and "pam_teacher_bias" in b.state_dict()
    b.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    va, vb = a(seg(fs), seg(ft)), b(seg(fs), seg(ft))
    assert torch.equal(va["pam"], vb["pam"]) and torch.equal(va["cam"], vb["cam"])
    assert torch.equal(va["pam"], a(seg(fs), seg(ft))["pam"])


def test_learned_projections_are_parameters_with_gradient():
    fs, ft = features()
    loss = make(pam_projection="learned").double()
    set_gammas(loss)
    names = {n for n, _ in loss.named_parameters()}
    assert {"gamma_cam", "gamma_pam", "pam_student_weight", "pam_student_bias", "pam_teacher_weight",
            "pam_teacher_bias"} <= names
    sum(loss(seg(fs), seg(ft)).values()).backward()
    for n in ("pam_student_weight", "pam_teacher_weight", "pam_teacher_bias"):
        g = getattr(loss, n).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_cskd_gradcheck_through_features_and_gammas():
    fs, ft = features(b=3, cs=8, ct=16, h=3, w=4)
    loss = make(cs=8, ct=16, pam_projection="fixed", pam_grid=2).double()
    fixed = {n: b for n, b in loss.named_buffers()}

    def f(x, gc, gp):
        out = torch.func.functional_call(loss, {**fixed, "gamma_cam": gc, "gamma_pam": gp}, (seg(x), seg(ft)))
        return out["cam"] + out["pam"]

    args = (fs.clone().requires_grad_(), torch.tensor(0.4, dtype=D64, requires_grad=True),
            torch.tensor(-0.2, dtype=D64, requires_grad=True))
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("mode", ["resample", "fixed", "learned"])
@pytest.mark.parametrize("similarity", ["cka", "mse"])
def test_teacher_gets_no_gradient_and_inference_tensors_work(mode, similarity):
    torch.manual_seed(0)
    student, teacher = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 32, 1)
    x = torch.randn(4, 3, 6, 10)
    loss = make(pam_projection=mode, similarity=similarity)
    for grid in (5, 1):
        loss.pam_grid = grid
        fs = student(x).relu()
        with torch.inference_mode():
            ft_inf = teacher(x).relu()
        ft_grad = teacher(x).relu()  # a teacher run with autograd on: the loss still must not reach it
        for ft in (ft_inf, ft_grad):
            out = loss(seg(fs), seg(ft))
            sum(out.values()).backward(retain_graph=True)
            assert teacher.weight.grad is None and teacher.bias.grad is None
            for gname in ("gamma_cam", "gamma_pam"):
                g = getattr(loss, gname).grad
                assert g is not None and torch.isfinite(g) and g != 0
            assert student.weight.grad is not None and torch.isfinite(student.weight.grad).all()


def test_gamma_gradients_match_reference_with_both_branches():
    # γ is shared: the teacher's CAM/PAM output depends on it too, so its gradient has a teacher part.
    fs, ft = features()
    loss = make(pam_projection="fixed").double()
    set_gammas(loss)
    sum(loss(seg(fs.clone().requires_grad_()), seg(ft)).values()).backward()
    gc = torch.tensor(0.7, dtype=D64, requires_grad=True)
    gp = torch.tensor(-0.4, dtype=D64, requires_grad=True)
    ps = (loss.pam_student_weight, loss.pam_student_bias)
    pt = (loss.pam_teacher_weight, loss.pam_teacher_bias)
    sum(ref_cskd(fs, ft, gc, gp, 2.0, 5, ps, pt)).backward()
    assert torch.allclose(loss.gamma_cam.grad, gc.grad, atol=1e-10)
    assert torch.allclose(loss.gamma_pam.grad, gp.grad, atol=1e-10)
    # without the teacher's part the gradient would differ
    gs = torch.tensor(0.7, dtype=D64, requires_grad=True)
    ref_neg_log_cka(ref_cam(fs, gs, 2.0), ref_cam(ft, 0.7, 2.0)).backward()
    assert not torch.allclose(0.3 * gs.grad, gc.grad, atol=1e-6)


def test_mse_ablation_matches_reference():
    fs, ft = features()
    loss = make(similarity="mse", pam_projection="fixed").double()
    set_gammas(loss)
    assert loss.min_batch_per_device == 1 and isinstance(loss.connector, nn.Conv2d)
    out = loss(seg(fs), seg(ft))
    ps = (loss.pam_student_weight, loss.pam_student_bias)
    pt = (loss.pam_teacher_weight, loss.pam_teacher_bias)
    assert ps[0].shape == pt[0].shape == (2 * 4 + 32, 32)  # the student's PAM runs after the connector
    cam, pam = ref_cskd(fs, ft, 0.7, -0.4, 2.0, 5, ps, pt, mse=True, conv=loss.connector.weight[:, :, 0, 0])
    assert torch.allclose(out["cam"], cam, atol=1e-10) and torch.allclose(out["pam"], pam, atol=1e-10)
    sum(out.values()).backward()
    assert loss.connector.weight.grad is not None


def test_switching_a_branch_off_skips_it(monkeypatch):
    fs, ft = features()
    cam_only = make(lambda_pam=0.0)
    pam_only = make(lambda_cam=0.0)
    assert not hasattr(pam_only, "gamma_cam") and not hasattr(cam_only, "gamma_pam")
    monkeypatch.setattr(cskd_module, "grid_tokens", lambda *a: pytest.fail("PAM computed while switched off"))
    assert set(cam_only(seg(fs.float()), seg(ft.float()))) == {"cam"}
    monkeypatch.undo()
    monkeypatch.setattr(cskd_module, "cam_context", lambda *a: pytest.fail("CAM computed while switched off"))
    assert set(pam_only(seg(fs.float()), seg(ft.float()))) == {"pam"}


def test_small_batches_and_bad_configs_are_rejected():
    assert LOSSES["cskd"] is CSKDLoss and CSKDLoss.min_batch_per_device == 3
    fs, ft = features(b=2)
    with pytest.raises(ConfigError, match="at least 3"):
        make()(seg(fs.float()), seg(ft.float()))
    with pytest.raises(ValueError, match="channels"):
        make(cs=8)(seg(fs.float()), seg(ft.float()))
    for bad in ({"lambda_cam": 0, "lambda_pam": 0}, {"similarity": "l2"}, {"pam_grid": 0}, {"temperature": 0},
                {"similarity": "mse", "cka_scope": "global"}, {"pam_projection": "random"}, {"gamma": 1.0}):
        with pytest.raises(ConfigError):
            make(**bad)
    with pytest.raises(ConfigError, match="8"):
        make(cs=4)


def test_bf16_autocast_gives_float32_terms_close_to_fp32():
    fs, ft = features(b=4, cs=16, ct=32, h=8, w=10, dtype=torch.float32)
    loss = make(pam_projection="fixed")
    set_gammas(loss, 0.2, 0.3)
    ref = loss(seg(fs), seg(ft))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(seg(fs.bfloat16().requires_grad_()), seg(ft.bfloat16()))
    for k in ("cam", "pam"):
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k])
        assert abs(out[k].item() - ref[k].item()) < 0.05 * abs(ref[k].item()) + 1e-3
    sum(out.values()).backward()


@pytest.mark.parametrize("mode", ["resample", "learned"])
def test_compiles_without_graph_breaks(mode):
    # aot_eager traces the backward too; the teacher's features are inference tensors, as the engine passes them.
    fs, _ = features(b=4, cs=16, ct=32, h=6, w=10, dtype=torch.float32)
    with torch.inference_mode():
        ft = features(b=4, cs=16, ct=32, h=6, w=10, dtype=torch.float32)[1]
    fs.requires_grad_()
    loss = make(pam_projection=mode)
    set_gammas(loss)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    out = compiled(seg(fs), seg(ft))
    torch.manual_seed(1)
    eager = loss(seg(fs), seg(ft))
    assert torch.allclose(out["pam"], eager["pam"]) and torch.allclose(out["cam"], eager["cam"])
    sum(out.values()).backward()
    assert fs.grad is not None and loss.gamma_pam.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["resample", "fixed", "learned"])
def test_cuda_agrees_with_cpu_and_never_waits_for_the_device(mode):
    fs, ft = features(b=4, cs=16, ct=32, h=13, w=20, dtype=torch.float32)
    loss = make(pam_projection=mode)
    set_gammas(loss)
    gpu = copy.deepcopy(loss).cuda()
    xs, xt = fs.cuda().requires_grad_(), ft.cuda()
    with torch.inference_mode():
        xt = xt.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        out = gpu(seg(xs), seg(xt))
        sum(out.values()).backward()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = gpu(seg(xs.bfloat16()), seg(xt.bfloat16()))
        sum(half.values()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(v) for v in half.values())
    if mode != "resample":  # the same projections on both devices
        ref = loss.double()(seg(fs.double()), seg(ft.double()))
        for k in ("cam", "pam"):
            assert torch.allclose(out[k].double().cpu(), ref[k], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------- cka_scope=global


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fs, ft = features(b=6, seed=7)
        loss = make(pam_projection="fixed", cka_scope="global").double()
        set_gammas(loss)
        mine = slice(3 * rank, 3 * rank + 3)
        x = fs[mine].clone().requires_grad_()
        out = loss(seg(x), seg(ft[mine]))
        sum(out.values()).backward()
        torch.save({"cam": out["cam"].detach(), "pam": out["pam"].detach(), "grad": x.grad,
                    "gc": loss.gamma_cam.grad, "gp": loss.gamma_pam.grad}, os.path.join(outdir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_global_scope_equals_single_process_on_the_whole_batch():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_global_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(d, f"{r}.pt"), weights_only=True) for r in range(2)]
    fs, ft = features(b=6, seed=7)
    loss = make(pam_projection="fixed").double()
    set_gammas(loss)
    x = fs.clone().requires_grad_()
    out = loss(seg(x), seg(ft))
    sum(out.values()).backward()
    for r, got in enumerate(ranks):
        assert torch.allclose(got["cam"], out["cam"], atol=1e-12) and torch.allclose(got["pam"], out["pam"], atol=1e-12)
        # all_gather's backward sums every rank's gradient; data-parallel averaging divides by the world size
        assert torch.allclose(got["grad"] / 2, x.grad[3 * r : 3 * r + 3], atol=1e-12)
    assert torch.allclose((ranks[0]["gc"] + ranks[1]["gc"]) / 2, loss.gamma_cam.grad, atol=1e-12)
    assert torch.allclose((ranks[0]["gp"] + ranks[1]["gp"]) / 2, loss.gamma_pam.grad, atol=1e-12)
