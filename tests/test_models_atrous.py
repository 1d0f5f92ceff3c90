"""Space-to-batch dilated convolutions (cskd.models.atrous): exact against the library's dilated kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cskd.models.atrous import SpaceToBatchConv2d, eligible, space_to_batch_conv2d, space_to_batch_dilated_


@pytest.mark.parametrize("size", [(16, 24), (17, 23), (9, 40)])
@pytest.mark.parametrize("dilation,k,groups", [(2, 3, 1), (4, 3, 1), (3, 5, 1), (2, 3, 4), (6, 3, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_the_dilated_convolution_in_float64(size, dilation, k, groups, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, *size, dtype=torch.float64, generator=g)
    w = torch.randn(12, 8 // groups, k, k, dtype=torch.float64, generator=g)
    b = torch.randn(12, dtype=torch.float64, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, w, b, padding=dilation * (k - 1) // 2, dilation=dilation, groups=groups)
    out = space_to_batch_conv2d(x, w, b, dilation, groups)
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_gradients_equal_the_dilated_convolutions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 13, 18, dtype=torch.float64, generator=g, requires_grad=True)
    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2).double()
    ref = conv(x)
    gx_ref, gw_ref = torch.autograd.grad((ref * ref.detach().cos()).sum(), (x, conv.weight))
    space_to_batch_dilated_(conv, min_phase=1)
    out = conv(x)
    gx, gw = torch.autograd.grad((out * ref.detach().cos()).sum(), (x, conv.weight))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)


def test_small_maps_keep_the_dilated_kernel(monkeypatch):
    conv = nn.Conv2d(4, 4, 3, padding=4, dilation=4)
    space_to_batch_dilated_(conv, min_phase=8)
    calls = []
    monkeypatch.setattr("cskd.models.atrous.space_to_batch_conv2d", lambda *a: calls.append(a) or conv._conv_forward(a[0], conv.weight, conv.bias))
    conv(torch.randn(1, 4, 31, 64))  # 31 // 4 = 7 rows per phase: below 8
    assert calls == []
    conv(torch.randn(1, 4, 32, 64))
    assert len(calls) == 1


def test_rewrites_only_the_eligible_convolutions_of_a_segmentor_and_keeps_its_outputs():
    from cskd.models.segmentor import build_segmentor

    torch.manual_seed(0)
    net = build_segmentor("deeplabv3", "resnet18", num_classes=5).double().eval()
    dilated = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.dilation[0] > 1 and m.kernel_size[0] > 1]
    assert dilated  # layer3/4 and the ASPP branches
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    ref = net(x).logits
    assert space_to_batch_dilated_(net, min_phase=1) == len(dilated)
    assert all(type(m) is SpaceToBatchConv2d for m in dilated)
    assert not any(eligible(m) for m in net.modules())
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(net(x).logits, ref, rtol=1e-10, atol=1e-10)


def test_strided_or_unpadded_convolutions_are_not_eligible():
    assert not eligible(nn.Conv2d(4, 4, 3, padding=1))
    assert not eligible(nn.Conv2d(4, 4, 3, padding=2, dilation=2, stride=2))
    assert not eligible(nn.Conv2d(4, 4, 3, padding=0, dilation=2))
    assert not eligible(nn.Conv2d(4, 4, 1, dilation=2))
    assert eligible(nn.Conv2d(4, 4, 3, padding=2, dilation=2))


def test_a_distillation_step_with_space_to_batch_matches_the_native_one():
    from cskd.distributed import DistEnv
    from cskd.engine.config import config_from_dict
    from cskd.engine.runner import StepRunner
    from cskd.losses.methods import get_method

    def runner(mode: str) -> StepRunner:
        torch.manual_seed(0)
        cfg = config_from_dict({
            "name": "atrous", "model": {"model": "deeplabv3", "backbone": "resnet18"},
            "teacher": {"model": "deeplabv3", "backbone": "resnet18"},
            "losses": [dict(lc) for lc in get_method("cwd").losses], "data": {"crop_size": [64, 64]},
            "train": {"device": "cpu", "amp": "none", "compile": False, "batch_size": 2, "dilated_convs": mode},
        })
        return StepRunner(cfg, 5, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), 2)

    native, s2b = runner("native"), runner("space_to_batch")
    converted = [m for m in s2b.student.modules() if type(m) is SpaceToBatchConv2d]
    assert converted and s2b.teacher is not None
    assert any(type(m) is SpaceToBatchConv2d for m in s2b.teacher.modules())
    assert not any(type(m) is SpaceToBatchConv2d for m in native.student.modules())
    for m in converted:
        m.min_phase = 1  # 64×64 crops: phases of 4×4 at d = 2 on the 1/8 map; convert them all
    for m in s2b.teacher.modules():
        if type(m) is SpaceToBatchConv2d:
            m.min_phase = 1
    for _ in range(2):
        batch = native.random_batch((64, 64))
        torch.manual_seed(1)  # the same dropout masks in both
        a, ta = native.step(*native.prepare(batch))
        torch.manual_seed(1)
        b, tb = s2b.step(*s2b.prepare(batch))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        assert ta.keys() == tb.keys()
