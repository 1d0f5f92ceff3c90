"""CWD and pixel-wise KD against float64 references written here from the formulas (explicit loops over channels
and pixels, KL as Σ p log(p/q))."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cskd.errors import ConfigError
from cskd.losses import LOSSES, build_loss
from cskd.losses.cwd import CWDLoss, channel_wise_kl
from cskd.losses.kd import KDLoss, pixel_wise_kl
from cskd.models.segmentor import SegOutput

D64 = torch.float64


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * torch.log(p / q)).sum()


def softmax(v: torch.Tensor) -> torch.Tensor:
    e = torch.exp(v - v.max())
    return e / e.sum()


def ref_cwd(zs: torch.Tensor, zt: torch.Tensor, tau: float) -> torch.Tensor:
    b, c = zs.shape[:2]
    total = torch.zeros((), dtype=D64)
    for i in range(b):
        for j in range(c):
            total = total + kl(softmax(zt[i, j].flatten() / tau), softmax(zs[i, j].flatten() / tau))
    return tau**2 * total / (b * c)


def ref_kd(zs: torch.Tensor, zt: torch.Tensor, tau: float) -> torch.Tensor:
    b, _, h, w = zs.shape
    total = torch.zeros((), dtype=D64)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                total = total + kl(softmax(zt[i, :, y, x] / tau), softmax(zs[i, :, y, x] / tau))
    return tau**2 * total / (b * h * w)


def logits(b=2, c=4, h=3, w=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, h, w, generator=g, dtype=D64),
            scale * torch.randn(b, c, h, w, generator=g, dtype=D64))


def seg(z: torch.Tensor, f: torch.Tensor | None = None) -> SegOutput:
    return SegOutput(logits=z, aux_logits=None, features=z if f is None else f)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_cwd_matches_reference(tau):
    zs, zt = logits()
    assert torch.allclose(channel_wise_kl(zs, zt, tau), ref_cwd(zs, zt, tau), atol=1e-10)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_matches_reference(tau):
    zs, zt = logits()
    assert torch.allclose(pixel_wise_kl(zs, zt, tau), ref_kd(zs, zt, tau), atol=1e-10)


def test_registered_losses_apply_weights_and_defaults():
    assert LOSSES["cwd"] is CWDLoss and LOSSES["kd"] is KDLoss
    zs, zt = logits()
    cwd = build_loss("cwd", {}, student_channels=8, teacher_channels=16, num_classes=4)
    assert cwd.weight == 3.0 and cwd.temperature == 2.0 and cwd.connector is None  # the CSKD recipe
    assert torch.allclose(cwd(seg(zs), seg(zt))["cwd"], 3.0 * ref_cwd(zs, zt, 2.0), atol=1e-10)
    kd = build_loss("kd", {"weight": 0.5, "temperature": 2}, student_channels=8, teacher_channels=16, num_classes=4)
    assert torch.allclose(kd(seg(zs), seg(zt))["kd"], 0.5 * ref_kd(zs, zt, 2.0), atol=1e-10)


def test_losses_vanish_when_student_equals_teacher():
    zs, _ = logits()
    assert abs(float(channel_wise_kl(zs, zs, 2.0))) < 1e-12 and abs(float(pixel_wise_kl(zs, zs, 2.0))) < 1e-12


def test_extreme_logits_stay_finite():
    zs, zt = logits(scale=300.0)  # teacher probabilities underflow to 0 in places
    for fn in (channel_wise_kl, pixel_wise_kl):
        v = fn(zs.float().requires_grad_(), zt.float(), 1.0)
        v.backward()
        assert torch.isfinite(v)


def test_gradcheck():
    zs, zt = logits(b=2, c=3, h=2, w=3)
    zs.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: channel_wise_kl(a, zt, 2.0), (zs,))
    assert torch.autograd.gradcheck(lambda a: pixel_wise_kl(a, zt, 2.0), (zs,))


def test_cwd_on_features_maps_the_student_width():
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, 8, 3, 4, generator=g, dtype=D64), torch.randn(2, 16, 3, 4, generator=g, dtype=D64)
    cwd = build_loss("cwd", {"on": "features", "weight": 1.0}, student_channels=8, teacher_channels=16,
                     num_classes=4).double()
    assert isinstance(cwd.connector, nn.Conv2d) and cwd.connector.bias is None
    out = cwd(seg(torch.zeros(2, 4, 3, 4), fs), seg(torch.zeros(2, 4, 3, 4), ft))["cwd"]
    mapped = torch.einsum("oc,bchw->bohw", cwd.connector.weight[:, :, 0, 0], fs)
    assert torch.allclose(out, ref_cwd(mapped, ft, 2.0), atol=1e-10)


@pytest.mark.parametrize("name", ["cwd", "kd"])
def test_teacher_gets_no_gradient_and_inference_tensors_work(name):
    torch.manual_seed(0)
    student, teacher = nn.Conv2d(3, 5, 1), nn.Conv2d(3, 5, 1)
    x = torch.randn(2, 3, 4, 6)
    loss = build_loss(name, {}, student_channels=5, teacher_channels=5, num_classes=5)
    with torch.inference_mode():
        zt_inf = teacher(x)
    for zt in (zt_inf, teacher(x)):
        zs = student(x)
        term = loss(seg(zs), seg(zt))[name]
        term.backward()
        assert teacher.weight.grad is None
        assert student.weight.grad is not None and torch.isfinite(student.weight.grad).all()


def test_bf16_autocast_computes_in_float32():
    zs, zt = logits(b=2, c=5, h=8, w=8)
    for fn in (channel_wise_kl, pixel_wise_kl):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = fn(zs.bfloat16(), zt.bfloat16(), 2.0)
        assert v.dtype == torch.float32
        assert torch.allclose(v.double(), fn(zs.bfloat16().double(), zt.bfloat16().double(), 2.0), rtol=1e-4)


def test_bad_input_and_config_are_rejected():
    zs, zt = logits()
    with pytest.raises(ValueError, match="shape"):
        channel_wise_kl(zs, zt[:, :3])
    with pytest.raises(ValueError, match="shape"):
        pixel_wise_kl(zs, zt[..., :4])
    for name, bad in (("cwd", {"temperature": 0}), ("kd", {"weight": -1}), ("cwd", {"on": "logit"}),
                      ("kd", {"tau": 2})):
        with pytest.raises(ConfigError):
            build_loss(name, bad, student_channels=8, teacher_channels=8, num_classes=4)


def test_compile_without_graph_breaks():
    zs = torch.randn(2, 4, 3, 5, requires_grad=True)
    with torch.inference_mode():
        zt = torch.randn(2, 4, 3, 5)
    for name in ("cwd", "kd"):
        loss = build_loss(name, {}, student_channels=4, teacher_channels=4, num_classes=4)
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        out = compiled(seg(zs), seg(zt))[name]
        assert torch.allclose(out, loss(seg(zs), seg(zt))[name])
        out.backward()
