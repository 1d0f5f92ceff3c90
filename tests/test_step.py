"""The pieces of a training step that replace library calls for speed must compute the same function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cskd.engine.step import segmentation_ce, upsample_bilinear
from cskd.models import build_segmentor
from cskd.models.fusion import fold_batchnorm_


@pytest.mark.parametrize("src,dst", [((8, 16), (64, 128)), ((1, 5), (4, 9)), ((7, 3), (7, 3)), ((5, 5), (1, 1)),
                                     ((9, 13), (67, 101))])
def test_matmul_upsampling_equals_interpolate_values_and_gradients(src: tuple, dst: tuple) -> None:
    z = torch.randn(2, 3, *src, dtype=torch.float64, requires_grad=True)
    ref = F.interpolate(z, dst, mode="bilinear", align_corners=True)
    got = upsample_bilinear(z, dst)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-13)
    g = torch.randn_like(ref)
    (ga,) = torch.autograd.grad(ref, z, g)
    (gb,) = torch.autograd.grad(got, z, g)
    torch.testing.assert_close(gb, ga, rtol=0, atol=1e-12)


def test_segmentation_ce_is_ce_of_the_interpolated_logits_with_ignore() -> None:
    logits = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 32, 48))
    targets[0, :10] = 255
    up = F.interpolate(logits, (32, 48), mode="bilinear", align_corners=True)
    expected = F.cross_entropy(up, targets, ignore_index=255)
    torch.testing.assert_close(segmentation_ce(logits, targets), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model,backbone", [("deeplabv3", "resnet18"), ("pspnet", "mobilenetv2"),
                                            ("deeplabv3", "resnet101"), ("deeplabv3", "mobilenetv3_small"),
                                            ("upernet", "resnet18")])
def test_batchnorm_folding_is_exact_and_complete(model: str, backbone: str) -> None:
    torch.manual_seed(0)
    net = build_segmentor(model, backbone, num_classes=7).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.normal_(1, 0.1)
            m.bias.data.normal_(0, 0.1)
    net = net.double()
    x = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    with torch.no_grad():
        before = net(x, with_aux=True)
    folded = fold_batchnorm_(net)
    assert folded > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    with torch.no_grad():
        after = net(x, with_aux=True)
    for a, b in zip((*before[:3], *before.stages), (*after[:3], *after.stages)):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * a.abs().max().item())


def test_folding_refuses_a_training_module() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm_(build_segmentor("deeplabv3", "mobilenetv2", num_classes=3).train())


def test_compiled_cross_entropy_gives_the_eager_value_and_gradient() -> None:
    """StepModule.compile_ce's path against the eager one, on an independent reference (F.interpolate + CE)."""
    from cskd.engine.step import StepModule

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 32, 48))
    targets[1, :, :7] = 255
    up = F.interpolate(logits, (32, 48), mode="bilinear", align_corners=True)
    expected = F.cross_entropy(up, targets, ignore_index=255)
    (g_ref,) = torch.autograd.grad(expected, logits)
    step = StepModule(build_segmentor("fcn", "resnet18", 5, aux=False))
    step.compile_ce()
    got = segmentation_ce(logits, targets, step._upsampled_ce)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12)
