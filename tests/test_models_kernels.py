"""cskd.models.epilogue: a frozen network with its conv epilogues fused computes the unfused network, eagerly and
under torch.compile; on CUDA the compiled graph keeps cuDNN's fused calls, and their shape function gives the
strides the kernel returns."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cskd.models import build_segmentor
from cskd.models.epilogue import ConvReLU, FusedBasicBlock, FusedBottleneck, frozen_copy, fuse_conv_epilogues_
from cskd.models.fusion import fold_batchnorm_

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ops_in_graph(fn, *args) -> set[str]:  # type: ignore[no-untyped-def]
    """Names of the ops in the graph(s) torch.compile captures of ``fn(*args)`` (after AOT autograd)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    seen: set[str] = set()

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        def record(g, _inputs):  # type: ignore[no-untyped-def]
            seen.update(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return make_boxed_func(g)

        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend)(*args)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.backward()
    return seen


def _frozen(model: str, backbone: str) -> nn.Module:
    torch.manual_seed(0)
    net = build_segmentor(model, backbone, 5, aux=True).eval()
    for m in net.modules():  # statistics and affine terms far from the identity, so a wrong fold would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    fold_batchnorm_(net)
    return net.double().requires_grad_(False)


# convs: blocks × convs per block + the stem's 3 + the head's conv-BN-ReLUs + the aux head's 1
@pytest.mark.parametrize("model,backbone,blocks,convs", [("deeplabv3", "resnet50", FusedBottleneck, 16 * 3 + 3 + 7 + 1),
                                                          ("pspnet", "resnet18", FusedBasicBlock, 8 * 2 + 3 + 5 + 1)])
def test_fused_epilogues_compute_the_unfused_network(model: str, backbone: str, blocks: type, convs: int) -> None:
    net = _frozen(model, backbone)
    fused = copy.deepcopy(net)
    assert fuse_conv_epilogues_(fused) == convs
    assert fuse_conv_epilogues_(fused) == 0  # a second call finds nothing left to fuse
    assert any(isinstance(m, blocks) for m in fused.modules())
    assert all(isinstance(getattr(fused.backbone, f"relu{n}"), nn.Identity) for n in (1, 2, 3))  # the stem's
    assert list(fused.state_dict()) == list(net.state_dict())  # same names: weights load either way
    x = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    ref, got = net(x), fused(x)
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.aux_logits, ref.aux_logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.compile(fused)(x).logits, ref.logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model,backbone", [("upernet", "resnet18"), ("fcn", "resnet18"), ("segformer", "mit_b0"),
                                            ("deeplabv3", "mobilenetv2"), ("deeplabv3", "mobilevit_xxs")])
def test_every_teacher_architecture_computes_the_same_function_fused(model: str, backbone: str) -> None:
    """The fusion is on by default for every CUDA teacher: whatever it finds to fuse (or not) in other heads and
    backbones, the network's outputs stay the unfused network's."""
    net = _frozen(model, backbone)
    fused = copy.deepcopy(net)
    fuse_conv_epilogues_(fused)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ref, got = net(x), fused(x)
    for a, b in ((got.logits, ref.logits), (got.features, ref.features), *zip(got.stages, ref.stages)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_fusing_needs_an_eval_mode_network_and_leaves_unfolded_blocks_alone() -> None:
    net = build_segmentor("deeplabv3", "resnet18", 5, aux=False)
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_epilogues_(net)
    assert fuse_conv_epilogues_(net.eval()) == 0  # BatchNorms still there: nothing is fused
    assert not any(isinstance(m, ConvReLU) for m in net.modules())


FUSED_OPS = {"aten.cudnn_convolution_relu.default", "aten.cudnn_convolution_add_relu.default"}


@pytest.mark.parametrize("dtype,x_cl,w_cl,expect_cl", [(torch.bfloat16, True, True, True),
                                                       (torch.float32, True, False, True),
                                                       (torch.float32, False, True, True),
                                                       (torch.float32, False, False, False),
                                                       (torch.float64, True, True, False)])
def test_shape_function_gives_the_conv_size_in_cudnns_memory_format(dtype, x_cl, w_cl, expect_cl) -> None:
    """cuDNN writes its output channels-last when the input or the weight is (never for float64); the output size
    is the convolution's (checked against F.conv2d's own shape function)."""
    x = torch.empty(2, 6, 13, 20, device="meta", dtype=dtype)
    w = torch.empty(8, 6, 3, 3, device="meta", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if x_cl else x
    w = w.contiguous(memory_format=torch.channels_last) if w_cl else w
    args = ([2, 1], [2, 3], [2, 1], 1)
    expected = torch.nn.functional.conv2d(x, w, None, *args)
    for out in (torch.ops.aten.cudnn_convolution_relu(x, w, None, *args),
                torch.ops.aten.cudnn_convolution_add_relu(x, w, expected, 1.0, None, *args)):
        assert out.shape == expected.shape and out.dtype == dtype
        fmt = torch.channels_last if expect_cl else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)


@CUDA
@pytest.mark.parametrize("model,backbone", [("deeplabv3", "resnet50"), ("pspnet", "resnet18")])
def test_fused_teacher_on_cuda_compiles_to_cudnn_fused_calls_and_rounds_no_worse(model: str, backbone: str) -> None:
    torch.backends.cudnn.allow_tf32 = False
    net = _frozen(model, backbone).float().cuda().to(memory_format=torch.channels_last)
    fused = copy.deepcopy(net)
    fuse_conv_epilogues_(fused)
    x = torch.randn(2, 3, 128, 256, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = net(x).logits  # float32
        outs = []
        for m in (net, fused):
            m = copy.deepcopy(m).to(torch.bfloat16)
            outs.append(torch.compile(m)(x.bfloat16()).logits.float())  # strides checked against the shape function
    assert FUSED_OPS <= _ops_in_graph(copy.deepcopy(fused).to(torch.bfloat16), x.bfloat16())
    unfused_err, fused_err = ((o - ref).abs().max().item() / ref.abs().max().item() for o in outs)
    # the same function, rounded at other places: the fused one (epilogue in float32) is no further from float32
    assert fused_err <= 1.25 * unfused_err, (fused_err, unfused_err)
    assert torch.nn.functional.cosine_similarity(outs[1].flatten(), ref.flatten(), dim=0).item() > 0.999


def test_frozen_copy_computes_the_training_network_in_eval_mode_and_leaves_it_alone() -> None:
    """The validation copy (eval.fold_batchnorm): the same function as the network in eval mode (float64), with its
    BNs folded and epilogues fused; the network keeps its mode, BNs and gradients; a compiled network's copy runs
    its own forward, not the original's (nn.Module.compile's bound forward is left out of the copy)."""
    torch.manual_seed(0)
    net = build_segmentor("deeplabv3", "resnet18", 5, aux=True).double()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.compile()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    frozen = frozen_copy(net)
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(isinstance(m, ConvReLU) for m in frozen.modules()) > 0
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        calls: list[str] = []
        handle = frozen.register_forward_hook(lambda *_: calls.append("copy"))
        out = frozen(x).logits
        handle.remove()
        assert calls == ["copy"]
        expected = net.eval()(x).logits
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert frozen_copy(net, torch.bfloat16).backbone.conv1.weight.dtype == torch.bfloat16
