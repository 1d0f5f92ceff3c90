"""Models: shapes, published layouts, equivalence with the published code, safe loading, cost figures."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from cskd.errors import CheckpointError
from cskd.checkpoints import backbone_state_dict, from_official, load_backbone_weights, load_weights, to_official
from cskd.models import build_segmentor, count_parameters, model_info
from reference_weights import DATA, deterministic_state, layout, reference_input

# (cskd model, backbone, published layout file stem)
PUBLISHED = [
    ("deeplabv3", "resnet18", "official_keys_deeplabv3_resnet18"),
    ("deeplabv3", "resnet101", "official_keys_deeplabv3_resnet101"),
    ("pspnet", "resnet18", "official_keys_psp_resnet18"),
    ("pspnet", "resnet101", "official_keys_psp_resnet101"),
    ("deeplabv3", "mobilenetv2", "official_keys_deeplab_mobile_mobilenetv2"),
    ("pspnet", "mobilenetv2", "official_keys_psp_mobile_mobilenetv2"),
]
FEATURE_CHANNELS = {
    ("deeplabv3", "resnet18"): 128, ("deeplabv3", "resnet101"): 256, ("pspnet", "resnet18"): 128,
    ("pspnet", "resnet101"): 512, ("deeplabv3", "mobilenetv2"): 128, ("pspnet", "mobilenetv2"): 128,
}


@pytest.fixture(scope="module")
def official_outputs() -> dict:
    return torch.load(DATA / "official_forward.pt", weights_only=True)


@pytest.mark.parametrize("model,backbone,stem", PUBLISHED)
def test_published_layout_loads_strictly_and_round_trips(model: str, backbone: str, stem: str) -> None:
    shapes = layout(stem)
    official = deterministic_state(shapes)
    net = build_segmentor(model, backbone, num_classes=19)
    load_weights(net, official)  # strict: raises on any missing/unexpected key or shape
    ours = net.state_dict()
    back = to_official(ours, model, backbone)
    assert [k for k, _ in shapes] == list(back.keys()) or set(back) == {k for k, _ in shapes}
    for k, shape in shapes:
        assert tuple(back[k].shape) == tuple(shape)
        assert torch.equal(back[k], official[k])
    assert from_official(back, model, backbone).keys() == ours.keys()


@pytest.mark.parametrize("model,backbone,stem", PUBLISHED)
def test_same_outputs_as_published_code(model: str, backbone: str, stem: str, official_outputs: dict) -> None:
    """Reference outputs were computed by running the published model code on the same deterministic weights."""
    ref = official_outputs[stem]
    net = build_segmentor(model, backbone, num_classes=19)
    load_weights(net, deterministic_state(layout(stem)))
    net = net.double().eval()
    with torch.no_grad():
        out = net(reference_input()[:1], with_aux=True)
    torch.testing.assert_close(out.logits, ref["logits"], rtol=1e-9, atol=1e-9 * ref["logits"].abs().max().item())
    torch.testing.assert_close(out.features, ref["features"], rtol=1e-9,
                               atol=1e-9 * ref["features"].abs().max().item())
    if "aux" in ref:
        torch.testing.assert_close(out.aux_logits, ref["aux"], rtol=1e-9, atol=1e-9 * ref["aux"].abs().max().item())
    else:
        assert out.aux_logits is None


@pytest.mark.parametrize("model,backbone,stem", PUBLISHED)
def test_output_shapes_and_stride(model: str, backbone: str, stem: str) -> None:
    import json

    expected = json.loads((DATA / f"{stem}.json").read_text())["forward_output_shapes_for_input_2x3x128x256"]
    net = build_segmentor(model, backbone, num_classes=19).train()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 128, 256))
    assert list(out.logits.shape) == expected[0]
    assert list(out.features.shape) == expected[-1]
    assert out.features.shape[1] == FEATURE_CHANNELS[(model, backbone)] == net.feature_channels
    assert net.output_stride == 8
    if backbone.startswith("resnet"):
        assert list(out.aux_logits.shape) == expected[1]
    else:
        assert out.aux_logits is None
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 96)).aux_logits is None  # inference skips the aux head


def test_odd_input_size_rounds_up_like_conv_arithmetic() -> None:
    net = build_segmentor("deeplabv3", "resnet18", num_classes=5).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 67, 101))
    assert out.logits.shape[-2:] == (9, 13)


@pytest.mark.parametrize("backbone,stem", [("resnet18", "official_backbone_keys_resnet18"),
                                           ("resnet101", "official_backbone_keys_resnet101"),
                                           ("mobilenetv2", "official_backbone_keys_mobilenetv2")])
def test_imagenet_backbone_files_load_into_a_segmentor(tmp_path: Path, backbone: str, stem: str) -> None:
    state = deterministic_state(layout(stem), seed=3)
    if backbone == "mobilenetv2":  # the ImageNet file has no 'net.' wrapper and carries a classifier
        state = {k.removeprefix("net."): v for k, v in state.items()}
        state["classifier.1.weight"] = torch.zeros(1000, 1280)
    else:
        state["fc.weight"] = torch.zeros(1000, 512)
    path = tmp_path / f"{backbone}-imagenet.pth"
    torch.save(state, path)
    net = build_segmentor("deeplabv3", backbone, num_classes=19)
    load_backbone_weights(net, path)
    got = net.backbone.state_dict()
    for k, v in backbone_state_dict(state).items():
        assert torch.equal(got[k], v)


def test_backbone_weights_from_a_full_published_checkpoint() -> None:
    state = deterministic_state(layout("official_keys_deeplabv3_resnet18"))
    net = build_segmentor("pspnet", "resnet18", num_classes=11)
    load_backbone_weights(net, state)
    assert torch.equal(net.backbone.conv1.weight, state["pretrained.conv1.weight"])


def test_ddp_and_compile_prefixes_are_stripped() -> None:
    net = build_segmentor("deeplabv3", "mobilenetv2", num_classes=4)
    wrapped = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}
    other = build_segmentor("deeplabv3", "mobilenetv2", num_classes=4)
    load_weights(other, wrapped)
    assert torch.equal(other.head.classifier.weight, net.head.classifier.weight)


# ----------------------------------------------------------------------------------------------- bad checkpoints


def test_wrong_num_classes_names_the_keys_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(build_segmentor("deeplabv3", "resnet18", num_classes=19).state_dict(), path)
    net = build_segmentor("deeplabv3", "resnet18", num_classes=11)
    with pytest.raises(CheckpointError) as e:
        load_weights(net, path)
    msg = str(e.value)
    assert str(path) in msg and "head.classifier.weight" in msg and "(19, 128, 1, 1)" in msg
    assert "num_classes=19" in msg


def test_wrong_architecture_lists_missing_and_unexpected(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(build_segmentor("pspnet", "resnet18", num_classes=19).state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_weights(build_segmentor("deeplabv3", "resnet18", num_classes=19), path)
    msg = str(e.value)
    assert "missing from the checkpoint" in msg and "head.aspp" in msg
    assert "not in the model" in msg and "head.psp" in msg


def test_missing_aux_head_is_explained() -> None:
    state = build_segmentor("deeplabv3", "resnet18", num_classes=19, aux=False).state_dict()
    with pytest.raises(CheckpointError, match="aux=False"):
        load_weights(build_segmentor("deeplabv3", "resnet18", num_classes=19), state)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save(build_segmentor("deeplabv3", "mobilenetv2", num_classes=3).state_dict(), good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth.*truncated or not a PyTorch checkpoint"):
        load_weights(build_segmentor("deeplabv3", "mobilenetv2", num_classes=3), bad)


def test_not_a_file_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_weights(build_segmentor("deeplabv3", "mobilenetv2", num_classes=3), tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_weights(build_segmentor("deeplabv3", "mobilenetv2", num_classes=3), junk)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_pickled_code_is_refused_and_never_runs(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": {"w": torch.zeros(1)}, "extra": _Payload(str(marker))}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        buf = io.BytesIO()
        pickle.dump(payload, buf, protocol=2)
        path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError) as e:
        load_weights(build_segmentor("deeplabv3", "mobilenetv2", num_classes=3), path)
    assert "evil.pth" in str(e.value)
    assert not marker.exists()


def test_no_state_dict_inside(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"iteration": 3, "config": {"a": 1}}, path)
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_weights(build_segmentor("deeplabv3", "mobilenetv2", num_classes=3), path)


# ----------------------------------------------------------------------------------------------- cost figures

# Issue 2's figures at 512×1024 (forward as the published code runs it, i.e. with the aux head), and parameters
# (the issue rounds them to one decimal: 61.1, 13.6, 12.9, 3.2 M; the published layouts give these exactly).
EXPECTED_COST = [
    ("deeplabv3", "resnet101", 1032, 61.12),
    ("deeplabv3", "resnet18", 259, 13.61),
    ("pspnet", "resnet18", 244, 12.92),
    ("deeplabv3", "mobilenetv2", 53, 3.23),
]


@pytest.mark.parametrize("model,backbone,gflops,mparams", EXPECTED_COST)
def test_flops_and_params_match_the_published_figures(model: str, backbone: str, gflops: float, mparams: float) -> None:
    net = build_segmentor(model, backbone, num_classes=19)
    info = model_info(net, (512, 1024))
    assert info.gflops + info.gflops_aux == pytest.approx(gflops, rel=0.01)
    assert info.params / 1e6 == pytest.approx(mparams, rel=0.01)
    assert count_parameters(net) == info.params


def test_param_counts_equal_the_published_layouts() -> None:
    for model, backbone, stem in PUBLISHED:
        expected = sum(
            torch.Size(s).numel() for k, s in layout(stem)
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )
        assert count_parameters(build_segmentor(model, backbone, num_classes=19)) == expected


def test_info_cli_prints_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    from cskd.cli import main

    assert main(["info", "deeplabv3", "resnet18", "--size", "512", "1024"]) == 0
    out = capsys.readouterr().out
    assert "13.61 M" in out and "258.7 with the aux head" in out and "128" in out


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_segmentor("deeplabv3", "resnet34", num_classes=19)
    with pytest.raises(ValueError, match="unknown model"):
        build_segmentor("unet", "resnet18", num_classes=19)


def test_convert_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cskd.cli import main

    official = deterministic_state(layout("official_keys_psp_resnet18"))
    src = tmp_path / "psp_resnet18_citys.pth"
    torch.save(official, src)
    ours = tmp_path / "ours.pth"
    assert main(["convert", str(src), "--to", "cskd", "--out", str(ours), "--model", "pspnet",
                 "--backbone", "resnet18"]) == 0
    assert any(k.startswith("backbone.") for k in torch.load(ours, weights_only=True))
    back = tmp_path / "back.pth"
    assert main(["convert", str(ours), "--to", "official", "--out", str(back), "--model", "pspnet",
                 "--backbone", "resnet18"]) == 0
    again = torch.load(back, weights_only=True)
    assert again.keys() == official.keys() and all(torch.equal(again[k], official[k]) for k in official)
    assert "published model name 'psp'" in capsys.readouterr().out
    assert main(["convert", str(ours), "--to", "official", "--out", str(back), "--model", "pspnet",
                 "--backbone", "resnet18"]) == 1  # exists: refused without --overwrite
