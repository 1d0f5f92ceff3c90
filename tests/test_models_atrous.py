"""Dilated convolutions computed otherwise (cskd.models.atrous): space-to-batch and row taps, exact against the
library's dilated kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cskd.models.atrous import (RowTapConv2d, SpaceToBatchConv2d, dilated_input_heights, eligible, row_tap_saving,
                                row_taps_conv2d, row_taps_dilated_, space_to_batch_conv2d, space_to_batch_dilated_)


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


@pytest.mark.parametrize("size", [(9, 13), (16, 24), (5, 40)])
@pytest.mark.parametrize("dilation,k", [(2, 3), (4, 3), (7, 3), (10, 3), (14, 3), (50, 3), (3, 5), (6, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_row_taps_equal_the_dilated_convolution_in_float64(size, dilation, k, channels_last):
    # d ≥ H drops the outer tap rows, d ≥ W the outer tap columns as well (50: only the centre tap is left)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, *size, dtype=torch.float64, generator=g)
    w = torch.randn(6, 5, k, k, dtype=torch.float64, generator=g)
    b = torch.randn(6, dtype=torch.float64, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, w, b, padding=dilation * (k - 1) // 2, dilation=dilation)
    out = row_taps_conv2d(x, w, b, dilation)
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(row_taps_conv2d(x, w, None, dilation), ref - b[:, None, None], rtol=1e-12, atol=1e-12)


def test_row_taps_gradients_equal_the_dilated_convolutions():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 11, 18, dtype=torch.float64, generator=g, requires_grad=True)
    conv = nn.Conv2d(4, 6, 3, padding=6, dilation=6).double()
    ref = conv(x)
    weight = ref.detach().cos()
    grads_ref = torch.autograd.grad((ref * weight).sum(), (x, conv.weight, conv.bias))
    assert row_taps_dilated_(conv, min_saving=0.0) == 1
    out = conv(x)
    grads = torch.autograd.grad((out * weight).sum(), (x, conv.weight, conv.bias))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_row_tap_saving_counts_the_tap_rows_that_read_only_padding():
    # 64 rows (a 512×1024 crop at output stride 8): the two outer tap rows lose d rows each, of 3 × 64
    assert row_tap_saving(64, 3, 12) == pytest.approx(24 / 192)
    assert row_tap_saving(64, 3, 36) == pytest.approx(72 / 192)
    assert row_tap_saving(64, 3, 4) == pytest.approx(8 / 192)
    assert row_tap_saving(32, 3, 36) == pytest.approx(2 / 3)  # d ≥ H: only the centre row is left
    assert row_tap_saving(10, 5, 3) == pytest.approx((2 * 3 + 2 * 6) / 50)


def test_row_taps_apply_only_where_enough_work_reads_padding(monkeypatch):
    conv = nn.Conv2d(4, 4, 3, padding=4, dilation=4)
    assert row_taps_dilated_(conv) == 1 and type(conv) is RowTapConv2d
    calls = []
    monkeypatch.setattr("cskd.models.atrous.row_taps_conv2d",
                        lambda *a: calls.append(a) or conv._conv_forward(a[0], conv.weight, conv.bias))
    conv(torch.randn(1, 4, 64, 64))  # 8 of 192 tap rows: 4 %, below the 10 % default
    assert calls == []
    conv(torch.randn(1, 4, 24, 64))  # 8 of 72: 11 %
    assert len(calls) == 1


def test_row_taps_leave_grouped_convolutions_and_keep_a_segmentors_outputs():
    from cskd.models.segmentor import build_segmentor

    grouped = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)
    assert row_taps_dilated_(grouped) == 0 and type(grouped) is nn.Conv2d
    torch.manual_seed(0)
    net = build_segmentor("deeplabv3", "resnet18", num_classes=5).double().eval()
    dilated = [m for m in net.modules() if eligible(m)]
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    ref = net(x).logits
    assert row_taps_dilated_(net, min_saving=0.0) == len(dilated)
    assert all(type(m) is RowTapConv2d for m in dilated)
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(net(x).logits, ref, rtol=1e-10, atol=1e-10)


def test_row_taps_at_an_input_size_switch_only_the_convs_that_take_that_path_and_leave_the_rest_fusable():
    """At a 512×1024 crop, DeepLabV3's ASPP (d = 12, 24, 36) sees a 64-row map and takes the row-tap path; the
    ResNet's layer3/4 (d = 2, 4: 2 and 4 % of their tap rows read padding) do not, and must stay plain convs, so
    that a frozen teacher's blocks still get their epilogues fused (in the step they had lost them all)."""
    from cskd.models.epilogue import fuse_conv_epilogues_
    from cskd.models.fusion import fold_batchnorm_
    from cskd.models.segmentor import build_segmentor

    def teacher() -> nn.Module:
        torch.manual_seed(0)
        net = build_segmentor("deeplabv3", "resnet18", num_classes=5).eval()
        fold_batchnorm_(net)
        return net

    net = teacher()
    dilated = {m: m.dilation[0] for m in net.modules() if eligible(m)}
    heights = dilated_input_heights(net, (512, 1024))
    assert heights.keys() == dilated.keys() and not any(p.is_meta for p in net.parameters())
    aspp = {m for m, d in dilated.items() if d >= 12}
    assert sorted(dilated[m] for m in aspp) == [12, 24, 36] and {heights[m] for m in aspp} == {64}
    assert row_taps_dilated_(net, input_size=(512, 1024)) == 3
    assert {m for m in net.modules() if type(m) is RowTapConv2d} == aspp
    assert net.training is False

    plain = teacher()
    fused_plain = fuse_conv_epilogues_(plain)
    assert fuse_conv_epilogues_(net) == fused_plain - 3  # only ASPP's three conv + ReLU pairs stay apart
    everywhere = teacher()
    row_taps_dilated_(everywhere)
    assert fuse_conv_epilogues_(everywhere) < fused_plain - 3  # the old behaviour: the dilated blocks unfused
    # a smaller crop reaches further: at 64×128 layer4's d = 4 on an 8-row map reads padding in 4 of 24 tap rows
    small = teacher()
    assert row_taps_dilated_(small, input_size=(64, 128)) > 3


def test_row_taps_on_a_model_that_cannot_run_on_the_meta_device_is_a_one_line_config_error():
    from cskd.engine.runner import _rewrite_dilated_convs
    from cskd.errors import ConfigError

    class NeedsValues(nn.Module):  # reads a value, which the meta device does not hold
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=12, dilation=12)

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.conv(x) if x.sum().item() >= 0 else x

    with pytest.raises(ConfigError) as e:
        _rewrite_dilated_convs(NeedsValues(), "row_taps", (64, 128))
    msg = str(e.value)
    assert "\n" not in msg and "train.dilated_convs=row_taps" in msg and "NeedsValues" in msg
    assert "data.crop_size=[64, 128]" in msg and "use dilated_convs: native" in msg
    with pytest.warns(UserWarning, match="train.dilated_convs=auto: NeedsValues could not run") as w:
        _rewrite_dilated_convs(NeedsValues(), "row_taps", (64, 128), chosen=False)  # auto: keep native
    assert len(w) == 1 and "stay native" in str(w[0].message)


def test_auto_dilated_convs_take_row_taps_on_cuda_only():
    from cskd.engine.config import TrainConfig

    auto = TrainConfig()
    assert auto.dilated_convs == "auto"
    assert auto.resolved_dilated_convs(torch.device("cuda", 0)) == "row_taps"
    assert auto.resolved_dilated_convs(torch.device("cpu")) == "native"
    for chosen in ("native", "space_to_batch", "row_taps"):  # an explicit choice holds on every device
        for device in ("cpu", "cuda"):
            assert TrainConfig(dilated_convs=chosen).resolved_dilated_convs(torch.device(device)) == chosen


@pytest.mark.parametrize("mode,cls,attr", [("space_to_batch", SpaceToBatchConv2d, "min_phase"),
                                           ("row_taps", RowTapConv2d, "min_saving")])
def test_a_distillation_step_with_rewritten_dilated_convs_matches_the_native_one(mode, cls, attr):
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

    native, other = runner("native"), runner(mode)
    converted = [m for m in other.student.modules() if type(m) is cls]
    assert converted and other.teacher is not None
    assert any(type(m) is cls for m in other.teacher.modules())
    assert not any(type(m) is cls for m in native.student.modules())
    for m in [*converted, *other.teacher.modules()]:
        if type(m) is cls:
            setattr(m, attr, 1 if attr == "min_phase" else 0.0)  # 64×64 crops: convert every dilated conv
    for _ in range(2):
        batch = native.random_batch((64, 64))
        torch.manual_seed(1)  # the same dropout masks in both
        a, ta = native.step(*native.prepare(batch))
        torch.manual_seed(1)
        b, tb = other.step(*other.prepare(batch))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        assert ta.keys() == tb.keys()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_row_taps_compiled_on_cuda_in_bf16_stay_as_close_to_float32_as_the_library_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 3, padding=12, dilation=12).cuda()
    x = torch.randn(2, 64, 32, 48, device="cuda").contiguous(memory_format=torch.channels_last)
    want = conv(x)
    native = torch.compile(lambda t: conv(t))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = native(x).float()
    row_taps_dilated_(conv)
    taps = torch.compile(lambda t: conv(t))
    xg = x.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = taps(xg)
    out.float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and conv.weight.grad is not None
    err_ref, err = (ref - want).abs().max().item(), (out.float() - want).abs().max().item()
    assert err <= 1.25 * err_ref + 1e-3, (err, err_ref)
