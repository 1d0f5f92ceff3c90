"""Transformer students: MiT/SegFormer and MobileViT-XXS.

Published CIRKDV2 layouts load strictly and give the published code's outputs (reference values in
``tests/data/cirkdv2_forward_*.pt``, made by running the published model code on the weights of
:func:`transformer_weights.transformer_state`, float64, eval mode); the ImageNet files load; Hugging Face
``transformers`` SegFormer checkpoints give transformers' own logits; files of another family are refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cskd.errors import CheckpointError
from cskd.checkpoints.weights import load_weights
from cskd.models import build_segmentor
from cskd.models.backbones import BACKBONES, backbone_defaults
from cskd.models.backbones.mit import mit_b0, mit_b1, mit_b2, mit_b3, mit_b5
from cskd.models.backbones.mobilevit import mobilevit_xxs
from cskd.checkpoints.official import from_official, is_cirkd_segformer_layout, to_official
from cskd.checkpoints.huggingface import build_hf_segformer
from cskd.models.heads import SegFormerHead
from cskd.models.segmentor import Segmentor
from transformer_weights import DATA, cirkdv2_layout, reference_input, summarise, transformer_state

# published layout stem → (cskd model, backbone): every model is built by build_segmentor, the registered path
SEGFORMER = {"segformer_MiT_B0": ("segformer", "mit_b0"), "segformer_MiT_B4": ("segformer", "mit_b4")}
MOBILEVIT = {"deeplab_mobile_mobilevit_xx_small": ("deeplabv3", "mobilevit_xxs"),
             "psp_mobile_mobilevit_xx_small": ("pspnet", "mobilevit_xxs")}
MODELS = {**SEGFORMER, **MOBILEVIT}
# a: the default; b: 9×11 at 1/8, MobileViT's patch-resize path; s: small, for the 64M-parameter MiT-B4
INPUTS = {"a": ((1, 3, 64, 96), 7), "b": ((1, 3, 72, 88), 8), "s": ((1, 3, 32, 48), 7)}


@pytest.fixture(scope="module")
def published() -> dict[str, dict[str, torch.Tensor]]:
    """The deterministic published-layout state of each model, made once per module (MiT-B4's takes seconds)."""
    return {}


def _published_state(cache: dict[str, dict[str, torch.Tensor]], name: str) -> dict[str, torch.Tensor]:
    if name not in cache:
        cache[name] = transformer_state(cirkdv2_layout(name))
    return cache[name]


def _build(name: str) -> Segmentor:
    return build_segmentor(*MODELS[name], num_classes=19)


def _loaded(name: str, state: dict[str, torch.Tensor]) -> Segmentor:
    """``name`` built without initialising its weights (meta device) and given ``state`` strictly."""
    with torch.device("meta"):
        net = _build(name)
    net.load_state_dict(_converted(name, state), strict=True, assign=True)
    return net


def _converted(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return from_official(state, *MODELS[name])


def _run(net: Segmentor, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    out = net(x)
    return out.stages, out.logits, out.features


@pytest.mark.parametrize("name", [*SEGFORMER, *MOBILEVIT])
def test_cirkdv2_layout_loads_strictly_and_round_trips(name: str, published: dict) -> None:
    shapes = cirkdv2_layout(name)
    state = _published_state(published, name)
    if name in ("segformer_MiT_B0", "deeplab_mobile_mobilevit_xx_small"):
        # one full build with initialised weights, loaded strictly through the published-checkpoint path
        net = _build(name)
        load_weights(net, state)
        assert all(torch.equal(v, state[k]) for k, v in to_official(net.state_dict(), *MODELS[name]).items())
    ours = _loaded(name, state).state_dict()
    back = to_official(ours, *MODELS[name])
    assert list(back) == [k for k, _ in shapes]  # same keys, in the published order
    for key, _ in shapes:
        assert torch.equal(back[key], state[key]), key
    assert is_cirkd_segformer_layout(state) == (name in SEGFORMER)


def _close(ours: torch.Tensor, ref: dict[str, torch.Tensor]) -> None:
    got = summarise(ours)
    assert got.keys() == ref.keys()
    for k, want in ref.items():
        assert got[k].shape == want.shape
        torch.testing.assert_close(got[k], want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("name", [*SEGFORMER, *MOBILEVIT])
def test_outputs_equal_the_published_code(name: str, published: dict) -> None:
    net = _loaded(name, _published_state(published, name)).double().eval()
    reference = torch.load(DATA / f"cirkdv2_forward_{name}.pt", weights_only=True)
    for tag, ref in reference.items():
        shape, seed = INPUTS[tag]
        assert tuple(ref["input_shape"].tolist()) == shape
        with torch.no_grad():
            stages, logits, feats = _run(net, reference_input(shape, seed))
        _close(logits, ref["logits"])
        _close(feats, ref["features"])
        # The published SegFormer returns all four encoder maps; the published MobileViT only its last.
        for ours, want in zip(stages if name in SEGFORMER else stages[-1:], ref["stages"], strict=True):
            _close(ours, want)


@pytest.mark.parametrize(
    "factory,dims,depths",
    [(mit_b0, (32, 64, 160, 256), (2, 2, 2, 2)), (mit_b1, (64, 128, 320, 512), (2, 2, 2, 2)),
     (mit_b2, (64, 128, 320, 512), (3, 4, 6, 3)), (mit_b3, (64, 128, 320, 512), (3, 4, 18, 3)),
     (mit_b5, (64, 128, 320, 512), (3, 6, 40, 3))],
)
def test_mit_variants(factory, dims: tuple[int, ...], depths: tuple[int, ...]) -> None:
    with torch.device("meta"):  # structure only: no weight initialisation
        body = factory()
    assert body.out_channels == dims and body.reductions == (4, 8, 16, 32) and body.output_stride == 32
    assert tuple(len(getattr(body, f"block{i}")) for i in range(1, 5)) == depths
    assert BACKBONES[factory.__name__].builder is factory


def test_segformer_forward_shapes_and_stride_four() -> None:
    body = mit_b0().eval()
    head = SegFormerHead(body.out_channels, 32, 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stages = body(x)
        logits, feats = head(stages)
    assert [tuple(s.shape) for s in stages] == [(2, c, 64 // r, 64 // r) for c, r in zip((32, 64, 160, 256),
                                                                                          (4, 8, 16, 32))]
    assert logits.shape == (2, 5, 16, 16) and feats.shape == (2, 32, 16, 16)
    assert head.channels == 32 and head.classifier.out_channels == 5
    with pytest.raises(ValueError, match="takes 4 stages"):
        head(stages[-2:])
    with pytest.raises(TypeError, match="list of backbone stages"):
        head(stages[-1])


def test_mobilevit_stages() -> None:
    body = mobilevit_xxs().eval()
    with torch.no_grad():
        stages = body(torch.randn(1, 3, 64, 64))
    assert body.out_channels == (24, 48, 64, 320) and body.reductions == (4, 8, 8, 8) and body.output_stride == 8
    assert [tuple(s.shape[1:]) for s in stages] == [(24, 16, 16), (48, 8, 8), (64, 8, 8), (320, 8, 8)]


def test_stochastic_depth_only_in_training() -> None:
    torch.manual_seed(0)
    body = mit_b0(drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    body.train()
    assert not torch.equal(body(x)[-1], body(x)[-1])
    body.eval()
    with torch.no_grad():
        assert torch.equal(body(x)[-1], body(x)[-1])


def test_published_defaults() -> None:
    assert backbone_defaults("mit_b0").head_channels == {"segformer": 256}
    assert backbone_defaults("mit_b4").head_channels == {"segformer": 768}
    assert backbone_defaults("mobilevit_xxs").head_channels == {"deeplabv3": 128, "pspnet": 128}
    for name in ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5", "mobilevit_xxs"):
        d = backbone_defaults(name)
        assert d.aux is False and d.aux_stage == -2
    assert "mobilevit_xx_small" not in BACKBONES  # one name


# ----------------------------------------------------------------------------------------------- ImageNet files


def test_mit_b0_imagenet_file_loads(tmp_path: Path) -> None:
    # mit_b0.pth: the encoder keys of the published layout plus a 1000-class ``head`` (dropped on load).
    enc = [(k, s) for k, s in cirkdv2_layout("segformer_MiT_B0") if k.startswith(("patch_embed", "block", "norm"))]
    state = transformer_state(enc + [("head.weight", [1000, 256]), ("head.bias", [1000])], seed=3)
    path = tmp_path / "mit_b0.pth"
    torch.save(state, path)
    body = mit_b0(pretrained=path)
    loaded = body.state_dict()
    assert loaded.keys() == {k for k, _ in enc}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    # A CIRKDV2 SegFormer checkpoint initialises the encoder as well (its decoder is left out).
    full = transformer_state(cirkdv2_layout("segformer_MiT_B0"), seed=5)
    loaded = mit_b0(pretrained=full).state_dict()
    assert all(torch.equal(loaded[k], full[k]) for k in loaded)


def _mmpretrain_mobilevit_layout() -> list[tuple[str, list[int]]]:
    """The ImageNet file's layout, from the published segmentor's backbone keys by inverting the published
    loader's renames (backbone. prefix; attn.qkv / attn.proj; a 1000-class head.fc)."""
    out = []
    for key, shape in cirkdv2_layout("deeplab_mobile_mobilevit_xx_small"):
        if key.startswith("pretrained."):
            key = "backbone." + key[len("pretrained."):]
            key = key.replace("attn.attn.in_proj_", "attn.qkv.").replace("attn.attn.out_proj.", "attn.proj.")
            out.append((key, shape))
    return out + [("head.fc.weight", [1000, 320]), ("head.fc.bias", [1000])]


def test_mobilevit_imagenet_file_loads(tmp_path: Path) -> None:
    shapes = _mmpretrain_mobilevit_layout()
    state = transformer_state(shapes, seed=4)
    path = tmp_path / "mobilevit-xxsmall_3rdparty_in1k_20221018-77835605.pth"
    torch.save({"meta": {"epoch": 300}, "state_dict": state}, path)
    body = mobilevit_xxs(pretrained=path)
    loaded = body.state_dict()
    assert len(loaded) == len(shapes) - 2
    assert torch.equal(loaded["layers.2.1.global_rep.0.attn.attn.in_proj_weight"],
                       state["backbone.layers.2.1.global_rep.0.attn.qkv.weight"])
    assert torch.equal(loaded["conv_1x1_exp.bn.running_var"], state["backbone.conv_1x1_exp.bn.running_var"])


def test_checkpoint_of_another_family_is_refused_in_one_line(tmp_path: Path) -> None:
    mobilevit_file = tmp_path / "mobilevit.pth"
    torch.save({"state_dict": transformer_state(_mmpretrain_mobilevit_layout())}, mobilevit_file)
    with pytest.raises(CheckpointError) as err:
        mit_b0(pretrained=mobilevit_file)
    msg = str(err.value)
    assert "\n" not in msg and "missing: patch_embed1.proj.weight" in msg and "unexpected: stem.conv.weight" in msg
    mit_file = tmp_path / "mit_b0.pth"
    torch.save(mit_b0().state_dict(), mit_file)
    with pytest.raises(CheckpointError) as err:
        mobilevit_xxs(pretrained=mit_file)
    msg = str(err.value)
    assert "\n" not in msg and "missing: stem.conv.weight" in msg and "unexpected: patch_embed1.proj.weight" in msg
    with pytest.raises(CheckpointError, match="not a transformers SegFormer file") as err:
        build_hf_segformer(mit_file)
    assert "\n" not in str(err.value)
    wrong_width = {k: v for k, v in mit_b1().state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shape mismatch: patch_embed1\.proj\.weight") as err:
        mit_b0(pretrained=wrong_width)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ Hugging Face layout


def _tiny_hf(kind: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(
        attn_implementation="sdpa", num_channels=3, num_encoder_blocks=4, depths=[1, 2, 1, 1], sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[8, 16, 24, 32], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], num_attention_heads=[1, 2, 3, 4],
        mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=16, num_labels=5,
    )
    torch.manual_seed(0)
    model = getattr(transformers, kind)(config).eval()
    # Weights of O(1) effect (the default init makes every map tiny), float32 as in real files.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.weight.shape[1] ** -0.5)
                m.bias.normal_(0.0, 0.1)
            elif isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
    return model


def test_transformers_segformer_gives_transformers_logits(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    hf = _tiny_hf("SegformerForSemanticSegmentation")
    hf.save_pretrained(tmp_path / "hub")  # model.safetensors in the hub layout (segformer.encoder.*) + config.json
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # transformers-5 module names (segformer.stages.*)
    hf = hf.double()
    x = reference_input((1, 3, 64, 96), seed=9)
    with torch.no_grad():
        want = hf(pixel_values=x).logits
    for source in (tmp_path / "hub", tmp_path / "hub" / "model.safetensors", tmp_path / "pytorch_model.bin"):
        config = (tmp_path / "hub" / "config.json") if source.suffix == ".bin" else None
        net = build_hf_segformer(source, config=config).double().eval()
        assert isinstance(net, Segmentor) and net.backbone.output_stride == 32 and net.head.channels == 16
        with torch.no_grad():
            _, logits, _ = _run(net, x)
        assert logits.shape == want.shape == (1, 5, 16, 24)
        torch.testing.assert_close(logits, want, rtol=1e-12, atol=1e-12)


def test_transformers_encoder_only_file_gives_the_encoder(tmp_path: Path) -> None:
    hf = _tiny_hf("SegformerForImageClassification")  # the layout of nvidia/mit-b0
    hf.save_pretrained(tmp_path)
    hf = hf.double()
    x = reference_input((1, 3, 64, 64), seed=10)
    with torch.no_grad():
        want = hf.segformer(pixel_values=x, output_hidden_states=True).hidden_states
    bare = {k[len("segformer."):]: v for k, v in hf.float().segformer.state_dict(prefix="segformer.").items()}
    # The classification file; a bare SegformerModel state (no segformer. prefix) with the config given apart.
    for source, config in ((tmp_path, None), (bare, tmp_path / "config.json")):
        body = build_hf_segformer(source, config=config).double().eval()
        with torch.no_grad():
            got = body(x)
        assert len(got) == len(want) == 4
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- the normal loading paths (registered models)


def test_mit_b0_pth_through_backbone_state_dict_and_pretrained_base(tmp_path: Path) -> None:
    from cskd.checkpoints.official import backbone_state_dict
    from cskd.checkpoints.weights import load_backbone_weights

    enc = [(k, s) for k, s in cirkdv2_layout("segformer_MiT_B0") if k.startswith(("patch_embed", "block", "norm"))]
    state = transformer_state(enc + [("head.weight", [1000, 256]), ("head.bias", [1000])], seed=3)
    path = tmp_path / "mit_b0.pth"
    torch.save(state, path)
    assert set(backbone_state_dict(state)) == {k for k, _ in enc}  # the ImageNet classifier head.* is dropped
    net = build_segmentor("segformer", "mit_b0", 19)
    load_backbone_weights(net, path)
    assert torch.equal(net.backbone.block2[1].attn.kv.weight, state["block2.1.attn.kv.weight"])
    built = build_segmentor("segformer", "mit_b0", 19, pretrained_base=path)  # the builder's own loader
    assert all(torch.equal(v, state[k]) for k, v in built.backbone.state_dict().items())
    with pytest.raises(CheckpointError, match="holds a 'mit_b0' backbone") as err:
        load_backbone_weights(build_segmentor("segformer", "mit_b2", 19), path)
    assert "\n" not in str(err.value)


def test_cirkdv2_segformer_file_through_load_model_and_cskd_convert(tmp_path: Path, published: dict) -> None:
    from cskd.cli import main
    from cskd.checkpoints.loading import load_model

    state = _published_state(published, "segformer_MiT_B0")
    path = tmp_path / "segformer_MiT_B0_citys_best_model.pth"
    torch.save(state, path)
    loaded = load_model(path, model="segformer", backbone="mit_b0").model
    assert loaded.spec.num_classes == 19 and loaded.aux_head is None
    assert torch.equal(loaded.head.classifier.weight, state["linear_pred.weight"])
    assert main(["convert", str(path), "--to", "cskd", "--model", "segformer", "--backbone", "mit_b0",
                 "--out", str(tmp_path / "cskd.pth")]) == 0
    assert main(["convert", str(tmp_path / "cskd.pth"), "--to", "official", "--model", "segformer",
                 "--backbone", "mit_b0", "--out", str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_transformers_file_through_the_normal_loading_path(tmp_path: Path) -> None:
    """A transformers SegFormer file of a registered variant (MiT-B0 sizes) loads into
    ``build_segmentor("segformer", "mit_b0")`` through ``load_weights`` / ``load_model`` / the teacher path,
    detected by its layout. transformers' LayerNorms use ε = 1e-5 and the registered MiT 1e-6 (the published
    value), so the logits agree to ~1e-5 here; :func:`build_hf_segformer` builds with 1e-5 for exact agreement."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from cskd.checkpoints.weights import load_teacher_weights
    from cskd.checkpoints.loading import load_model

    config = transformers.SegformerConfig(attn_implementation="sdpa", num_labels=5)  # the MiT-B0 defaults
    torch.manual_seed(0)
    hf = transformers.SegformerForSemanticSegmentation(config).eval()
    hf.save_pretrained(tmp_path / "hub")
    x = reference_input((1, 3, 64, 64), seed=11).float()
    with torch.no_grad():
        want = hf(pixel_values=x).logits
    nets = [build_segmentor("segformer", "mit_b0", 5), build_segmentor("segformer", "mit_b0", 5)]
    load_weights(nets[0], hf.state_dict())  # transformers-5 module names (segformer.stages.*)
    load_teacher_weights(nets[1], str(tmp_path / "hub" / "model.safetensors"))
    nets.append(load_model(tmp_path / "hub" / "model.safetensors", model="segformer", backbone="mit_b0").model)
    nets.append(load_model(tmp_path / "hub", model="segformer", backbone="mit_b0").model)
    for net in nets:
        with torch.no_grad():
            got = net.eval()(x).logits
        assert got.shape == want.shape == (1, 5, 16, 16)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # the encoder of a transformers file as model.pretrained_base (the builder's own loader; decoder left out)
    body = build_segmentor("segformer", "mit_b0", 5, pretrained_base=tmp_path / "hub").backbone
    assert all(torch.equal(v, nets[0].backbone.state_dict()[k]) for k, v in body.state_dict().items())
