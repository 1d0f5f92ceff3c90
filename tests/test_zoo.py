"""The model zoo: registries and contracts, every backbone × head, the CIRKDV2 students checkpoint-compatible with
the published code, timm backbones, and the errors for bad names and wrong checkpoints.

``data/cirkdv2_forward.pt`` holds the published CIRKDV2 code's outputs (github.com/winycg/CIRKD ``models/``:
``get_deeplabv3_mobilenet_ssseg``, ``get_psp_mobile``, ``get_upernet_lite(aux=True)``; run from a scratch copy, never
committed, with ``nn.SyncBatchNorm`` replaced by ``nn.BatchNorm2d`` for the CPU) on ``deterministic_state`` of each
``data/cirkdv2_keys_*.json`` layout, in float64 and eval mode, for ``reference_input()[:1]`` (1×3×64×96) and for an
odd-sized 1×3×67×101 input (``torch.randn`` with seed 7), which exercises the "same" padding of the strided convs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cskd.errors import CheckpointError
from cskd.checkpoints.official import to_official
from cskd.checkpoints.weights import load_backbone_weights, load_weights
from cskd.models import build_segmentor, count_parameters
from cskd.models.backbones import BACKBONES, BackboneDefaults, backbone_names, build_backbone
from cskd.models.heads import HEADS, head_names
from cskd.checkpoints.loading import load_model
from reference_weights import DATA, deterministic_state, layout, reference_input

CIRKDV2 = [  # (cskd model, backbone, layout stem)
    ("deeplabv3", "mobilenetv3_small", "cirkdv2_keys_deeplabv3_mobilenet_ssseg_mobilenetv3_small"),
    ("deeplabv3", "mobilenetv3_large", "cirkdv2_keys_deeplabv3_mobilenet_ssseg_mobilenetv3_large"),
    ("pspnet", "mobilenetv3_small", "cirkdv2_keys_psp_mobile_mobilenetv3_small"),
    ("upernet", "resnet18", "cirkdv2_keys_upernet_lite_resnet18"),
]
TIMM_SMALL = "timm:convnext_atto"  # 3.7 M parameters, supports output_stride=8


def _timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


# The Bottleneck ResNets share their module tree and heads with ResNet-18: one head each keeps the suite fast.
_SLOW = {"resnet50": "upernet", "resnet101": "pspnet"}
# MiT-B1…B5 share MiT-B0's module tree (wider / deeper): every head on them is checked on the meta device (shapes,
# strides, stages: no weights, no compute), MiT-B0 for real.
_META = {"mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"}
PAIRS = [(h, b) for b in backbone_names() if b not in _META for h in head_names() if _SLOW.get(b, h) == h]
META_PAIRS = [(h, b) for b in sorted(_META) for h in head_names()]
if _timm_available():
    PAIRS += [(h, TIMM_SMALL) for h in head_names()]


def _check_shapes(net, out, size: int) -> None:  # noqa: ANN001
    body = net.backbone
    assert len(body.out_channels) == len(body.reductions) and body.output_stride == body.reductions[-1]
    os_ = net.output_stride
    assert out.logits.shape == (1, 3, size // os_, size // os_)
    assert out.features.shape == (1, net.feature_channels, size // os_, size // os_)
    assert net.feature_stride == os_
    assert out.aux_logits is not None and out.aux_logits.shape[:2] == (1, 3)
    assert [tuple(s.shape[1:]) for s in out.stages] == [
        (c, size // r, size // r) for c, r in zip(net.stage_channels, net.stage_reductions)
    ]


# ----------------------------------------------------------------------------------------------- every pair


@pytest.mark.parametrize("model,backbone", PAIRS)
def test_every_backbone_and_head_builds_runs_and_round_trips(tmp_path: Path, model: str, backbone: str) -> None:
    torch.manual_seed(0)
    net = build_segmentor(model, backbone, num_classes=3, aux=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = net(x, with_aux=True)
    _check_shapes(net, out, 64)
    # a cskd checkpoint (spec + weights) rebuilds the same network
    path = tmp_path / "ckpt.pt"
    torch.save({"spec": net.spec.to_dict(), "model": net.state_dict()}, path)
    again = load_model(path).model.eval()
    path.unlink()  # up to 260 MB (the ResNet-50/101 pairs): read back, not kept on disk for the rest of the run
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, out.logits, rtol=0, atol=0)


@pytest.mark.parametrize("model,backbone", META_PAIRS)
def test_every_head_on_the_bigger_mit_variants_meta(model: str, backbone: str) -> None:
    with torch.device("meta"):
        net = build_segmentor(model, backbone, num_classes=3, aux=True).eval()
        out = net(torch.empty(1, 3, 64, 64), with_aux=True)
    _check_shapes(net, out, 64)


def test_registries_hold_the_published_families() -> None:
    assert {"resnet18", "resnet50", "resnet101", "mobilenetv2", "mobilenetv3_small", "mobilenetv3_large",
            "mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5", "mobilevit_xxs"} <= set(BACKBONES)
    assert {"deeplabv3", "pspnet", "fcn", "upernet", "segformer"} <= set(HEADS)
    # published defaults: head widths and aux heads come from the backbone, not from name tests
    assert build_segmentor("upernet", "resnet18", 19).feature_channels == 128
    assert build_segmentor("deeplabv3", "resnet101", 19).feature_channels == 256
    assert build_segmentor("pspnet", "resnet101", 19).feature_channels == 512
    assert build_segmentor("deeplabv3", "mobilenetv3_large", 19).aux_head is None
    assert build_segmentor("upernet", "resnet18", 19).aux_head is not None
    with torch.device("meta"):
        b0 = build_segmentor("segformer", "mit_b0", 19)
        b4 = build_segmentor("segformer", "mit_b4", 19)
        mvit = build_segmentor("pspnet", "mobilevit_xxs", 19)
    assert (b0.feature_channels, b0.output_stride, b0.aux_head) == (256, 4, None)
    assert (b4.feature_channels, b4.output_stride, b4.aux_head) == (768, 4, None)
    assert (mvit.feature_channels, mvit.output_stride, mvit.aux_head) == (128, 8, None)


def test_a_new_backbone_is_one_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backbone registered from outside the package works under every head, with its own defaults."""

    class Tiny(nn.Module):
        out_channels = (8, 16)
        reductions = (4, 16)
        output_stride = 16

        def __init__(self, norm_layer=nn.BatchNorm2d) -> None:  # noqa: ANN001
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, 4, 1)
            self.b = nn.Conv2d(8, 16, 3, 4, 1)

        def forward(self, x):  # noqa: ANN001, ANN202
            a = self.a(x)
            return [a, self.b(a)]

    from cskd.models.backbones import _registry

    monkeypatch.setattr(_registry, "BACKBONES", dict(_registry.BACKBONES))
    _registry.register_backbone("tiny_test", BackboneDefaults(head_channels={"deeplabv3": 24}))(Tiny)
    net = build_segmentor("deeplabv3", "tiny_test", 4).eval()
    assert net.feature_channels == 24 and net.output_stride == 16 and net.aux_head is None
    assert net(torch.randn(1, 3, 64, 64)).logits.shape == (1, 4, 4, 4)
    up = build_segmentor("upernet", "tiny_test", 4).eval()
    assert up.output_stride == 8 and up(torch.randn(1, 3, 64, 64)).logits.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="already registered"):
        _registry.register_backbone("tiny_test")(Tiny)


# ----------------------------------------------------------------------------------------------- CIRKDV2 layouts


@pytest.mark.parametrize("model,backbone,stem", CIRKDV2)
def test_cirkdv2_layout_loads_strictly_and_converts_back(model: str, backbone: str, stem: str) -> None:
    shapes = layout(stem)
    official = deterministic_state(shapes)
    net = build_segmentor(model, backbone, num_classes=19)
    load_weights(net, official)  # strict, through the converter
    back = to_official(net.state_dict(), model, backbone)
    assert list(back) == [k for k, _ in shapes] or set(back) == {k for k, _ in shapes}
    assert all(torch.equal(back[k], official[k]) for k, _ in shapes)
    assert count_parameters(net) == json.loads((DATA / f"{stem}.json").read_text())["params"]


@pytest.mark.parametrize("model,backbone,stem", CIRKDV2)
def test_cirkdv2_same_outputs_as_published_code(model: str, backbone: str, stem: str) -> None:
    ref = torch.load(DATA / "cirkdv2_forward.pt", weights_only=True)[stem]
    net = build_segmentor(model, backbone, num_classes=19)
    load_weights(net, deterministic_state(layout(stem)))
    net = net.double().eval()
    odd = torch.randn(1, 3, 67, 101, generator=torch.Generator().manual_seed(7)).double()
    with torch.no_grad():
        out = net(reference_input()[:1], with_aux=True)
        out_odd = net(odd)

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item())

    close(out.logits, ref["logits"])
    close(out.features, ref["features"])
    close(out_odd.logits, ref["odd_logits"])
    if "aux" in ref:
        close(out.aux_logits, ref["aux"])
    else:
        assert out.aux_logits is None


@pytest.mark.parametrize("model,backbone,stem", CIRKDV2)
def test_cirkdv2_forward_shapes(model: str, backbone: str, stem: str) -> None:
    expected = json.loads((DATA / f"{stem}.json").read_text())["outputs"]
    net = build_segmentor(model, backbone, num_classes=19).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 128, 256), with_aux=True)
    assert list(out.logits.shape) == expected[0] and list(out.features.shape) == expected[-1]
    if len(expected) == 3:
        assert list(out.aux_logits.shape) == expected[1]


@pytest.mark.parametrize("backbone", ["mobilenetv3_small", "mobilenetv3_large"])
@pytest.mark.parametrize("wrapper", ["bare", "mmcls"])
def test_imagenet_mobilenetv3_file_loads_into_the_backbone(tmp_path: Path, backbone: str, wrapper: str) -> None:
    """``mobilenet_v3_{small,large}-*.pth`` (OpenMMLab) follow the backbone's own module tree, as the published
    code's loader (which strips ``backbone.``) expects; an mmcls-style file nests them under ``state_dict`` with a
    ``backbone.`` prefix and a ``head.`` classifier."""
    stem = {"mobilenetv3_small": CIRKDV2[0][2], "mobilenetv3_large": CIRKDV2[1][2]}[backbone]
    shapes = [(k.removeprefix("pretrained."), s) for k, s in layout(stem) if k.startswith("pretrained.")]
    state = deterministic_state(shapes, seed=5)
    if wrapper == "mmcls":
        obj = {"state_dict": {**{f"backbone.{k}": v for k, v in state.items()},
                              "head.layers.1.weight": torch.zeros(1000, 1280)}, "meta": {}}
    else:
        obj = state
    path = tmp_path / f"{backbone}-imagenet.pth"
    torch.save(obj, path)
    net = build_segmentor("deeplabv3", backbone, 19)
    load_backbone_weights(net, path)
    assert all(torch.equal(net.backbone.state_dict()[k], v) for k, v in state.items())
    via_build = build_segmentor("pspnet", backbone, 19, pretrained_base=path)
    assert torch.equal(via_build.backbone.layer0.conv.weight, state["layer0.conv.weight"])


# ----------------------------------------------------------------------------------------------- timm


@pytest.mark.skipif(not _timm_available(), reason="timm not installed")
def test_timm_backbone_reads_feature_info_and_loads_a_local_file(tmp_path: Path) -> None:
    import timm

    body = build_backbone(TIMM_SMALL)
    assert body.out_channels == (40, 80, 160, 320) and body.reductions == (4, 8, 8, 8)
    full = timm.create_model("convnext_atto", pretrained=False)
    path = tmp_path / "convnext_atto.pth"
    torch.save(full.state_dict(), path)  # the timm layout, classifier included
    loaded = build_backbone(TIMM_SMALL, pretrained=path)
    w = full.state_dict()["stem.0.weight"]
    assert torch.equal(loaded.body.stem_0.weight, w)
    assert not torch.equal(body.body.stem_0.weight, w)
    with pytest.raises(ValueError, match="no such file"):
        build_backbone(TIMM_SMALL, pretrained=tmp_path / "missing.pth")


@pytest.mark.skipif(not _timm_available(), reason="timm not installed")
def test_timm_model_without_output_stride_keeps_native_strides() -> None:
    body = build_backbone("timm:vit_tiny_patch16_224")  # no output_stride argument: built without it
    assert body.reductions[-1] == 16


@pytest.mark.skipif(not _timm_available(), reason="timm not installed")
def test_timm_errors_name_the_value_and_the_closest_names(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'convnext_tinyy'.*closest timm names: convnext_tiny"):
        build_segmentor("deeplabv3", "timm:convnext_tinyy", 19)
    import timm

    def no_features(name: str, **kwargs: object) -> nn.Module:
        raise RuntimeError(f"features_only not implemented for {name}")

    monkeypatch.setattr(timm, "create_model", no_features)
    with pytest.raises(ValueError, match=r"timm:convnext_atto.*no features_only mode") as e:
        build_segmentor("deeplabv3", TIMM_SMALL, 19)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- bad inputs


def test_unknown_backbone_and_head_name_the_value_and_the_choices() -> None:
    with pytest.raises(ValueError) as e:
        build_segmentor("deeplabv3", "mobilenetv3", 19)
    msg = str(e.value)
    assert "'mobilenetv3'" in msg and "mobilenetv3_small" in msg and "timm:" in msg and "\n" not in msg
    with pytest.raises(ValueError) as e:
        build_segmentor("uper", "resnet18", 19)
    assert "'uper'" in str(e.value) and "upernet" in str(e.value) and "\n" not in str(e.value)


def test_head_needing_more_stages_than_the_backbone_has(monkeypatch: pytest.MonkeyPatch) -> None:
    class OneStage(nn.Module):
        out_channels = (16,)
        reductions = (8,)
        output_stride = 8

        def __init__(self, norm_layer=nn.BatchNorm2d) -> None:  # noqa: ANN001
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 8, 8)

        def forward(self, x):  # noqa: ANN001, ANN202
            return [self.conv(x)]

    from cskd.models.backbones import _registry

    monkeypatch.setattr(_registry, "BACKBONES", dict(_registry.BACKBONES))
    _registry.register_backbone("one_stage_test")(OneStage)
    with pytest.raises(ValueError) as e:
        build_segmentor("upernet", "one_stage_test", 19)
    msg = str(e.value)
    assert "'upernet' needs at least 2 backbone stages" in msg and "'one_stage_test' has 1" in msg
    assert "deeplabv3" in msg and "\n" not in msg
    assert build_segmentor("deeplabv3", "one_stage_test", 19).aux_head is None


def test_checkpoint_of_another_family_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mnv3.pth"
    torch.save(build_segmentor("deeplabv3", "mobilenetv3_small", 19).state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_weights(build_segmentor("deeplabv3", "mobilenetv2", 19), path)
    msg = str(e.value)
    assert "\n" not in msg and "'mobilenetv3_small' backbone" in msg and "'mobilenetv2'" in msg
    assert str(path) in msg and "resnet18" in msg  # the choices
    # the published layout of another family too (converted with the model's rules first)
    official = deterministic_state(layout("official_keys_deeplab_mobile_mobilenetv2"))
    with pytest.raises(CheckpointError, match="holds a 'mobilenetv2' backbone and the model a 'resnet18'"):
        load_weights(build_segmentor("deeplabv3", "resnet18", 19, aux=False), official)


# ----------------------------------------------------------------------------------------------- CLI


def test_models_and_info_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from cskd.cli import main

    assert main(["models", "--size", "64", "128"]) == 0
    out = capsys.readouterr().out
    for name in [*backbone_names(), *head_names()]:
        assert name in out
    assert main(["info", "upernet", "resnet18", "--size", "64", "128"]) == 0
    out = capsys.readouterr().out
    assert "16.57 M" in out and "output stride     8" in out
    if _timm_available():
        assert main(["info", "deeplabv3", TIMM_SMALL, "--size", "64", "64"]) == 0
    assert main(["info", "deeplabv3", "resnet34"]) == 1
    assert "unknown backbone 'resnet34'" in capsys.readouterr().err


def test_pretrained_base_of_another_family_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mobilenetv2-imagenet.pth"
    torch.save(build_backbone("mobilenetv2").state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        build_segmentor("deeplabv3", "mobilenetv3_large", 19, pretrained_base=path)
    assert "\n" not in str(e.value) and "holds a 'mobilenetv2' backbone" in str(e.value)


def test_a_builder_taking_pretrained_loads_its_own_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The contract lets a backbone read its own file layouts (SegFormer's, Hugging Face's): a builder with a
    ``pretrained`` parameter receives the path instead of the generic strict load."""
    from cskd.models.backbones import _registry

    seen: list[object] = []

    def builder(norm_layer=nn.BatchNorm2d, pretrained=None):  # noqa: ANN001, ANN202
        seen.append(pretrained)
        return build_backbone("mobilenetv3_small")

    monkeypatch.setattr(_registry, "BACKBONES", dict(_registry.BACKBONES))
    _registry.register_backbone("self_loading_test")(builder)
    build_segmentor("fcn", "self_loading_test", 3, pretrained_base=tmp_path / "any-layout.bin")
    assert seen == [tmp_path / "any-layout.bin"]
