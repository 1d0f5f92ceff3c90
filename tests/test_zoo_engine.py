"""The new students in the engine (2-iteration distillation runs) and the optimiser choice (SGD / AdamW with no
decay on norms, biases and position terms)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cskd.engine.config import config_from_dict
from cskd.engine.optim import build_optimizer, is_no_decay
from cskd.engine.records import read_records
from cskd.engine.trainer import Trainer
from cskd.errors import ConfigError

TINY = (32, 64)


def _config(root: Path, out: Path, model: str, backbone: str, losses: list[dict], **train: object) -> dict:
    cfg = {
        "name": "zoo",
        "output_dir": str(out),
        "data": {"dataset": "synthscapes", "root": str(root), "crop_size": list(TINY), "workers": 0},
        "model": {"model": model, "backbone": backbone},
        "teacher": {"model": "deeplabv3", "backbone": "resnet18"},
        "losses": losses,
        "train": {"budget": {"iterations": 2}, "batch_size": 3, "lr": 0.01, "log_every": 1, "val_every": 1000,
                  "save_every": 1000, "device": "cpu", "amp": "none", **train},
        "eval": {"max_images": 1},
    }
    return cfg


@pytest.mark.parametrize("model,backbone,losses,train", [
    ("deeplabv3", "mobilenetv3_small", [{"name": "cwd"}, {"name": "cskd"}], {}),
    ("upernet", "resnet18", [{"name": "kd"}, {"name": "cskd"}], {"optimizer": "adamw", "lr": 1e-4}),
    # the transformer students: SegFormer-MiT-B0 (at 1/4, under a SegFormer teacher, as CIRKDV2's MiT-B4 → MiT-B0;
    # the losses compare maps of one stride) and MobileViT-XXS (at 1/8, under the DeepLabV3-R18 teacher)
    ("segformer", "mit_b0", [{"name": "kd"}, {"name": "cskd"}], {"optimizer": "adamw", "lr": 2e-4}),
    ("deeplabv3", "mobilevit_xxs", [{"name": "cwd"}, {"name": "cskd"}], {"optimizer": "adamw", "lr": 9e-4,
                                                                          "weight_decay": 0.01}),
])
def test_two_iteration_distillation(synth_root: Path, tmp_path: Path, model: str, backbone: str,
                                    losses: list[dict], train: dict) -> None:
    raw = _config(synth_root, tmp_path / "run", model, backbone, losses, **train)
    if model == "segformer":
        raw["teacher"] = {"model": "segformer", "backbone": "mit_b0"}
    cfg = config_from_dict(raw)
    result = Trainer(cfg, progress=False).fit()
    assert result.iterations == 2
    recs = read_records(tmp_path / "run" / "log.jsonl", "train")
    assert [r["iteration"] for r in recs] == [1, 2]
    assert all(v == v for r in recs for k, v in r.items() if isinstance(v, float))  # finite
    assert ("aux" in recs[0]) == (backbone == "resnet18")  # the published aux head of the ResNet students


def test_adamw_leaves_norms_biases_and_position_terms_undecayed() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 2, 2))
            self.linear = nn.Linear(4, 4)

    net = Net()
    cfg = config_from_dict({"train": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01,
                                      "betas": [0.8, 0.99]}}).train
    opt = build_optimizer(net, cfg, fused=False)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.99)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.01 for p in g["params"]}
    assert decayed == {id(net.conv.weight), id(net.linear.weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    assert is_no_decay("backbone.block1.0.attn.pos_block.0.weight", net.conv.weight)
    sgd = build_optimizer(net, config_from_dict({}).train, fused=False)  # the published SGD decays everything
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1
    assert sgd.param_groups[0]["weight_decay"] == 1e-4 and sgd.param_groups[0]["momentum"] == 0.9


def test_bad_optimizer_settings_are_config_errors(tmp_path: Path) -> None:
    from cskd.engine.config import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  optimizer: adam\n")
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(bad)
    bad.write_text("train:\n  optimizer: adamw\n  betas: [0.9, 1.5]\n")
    with pytest.raises(ConfigError, match="betas"):
        load_config(bad)
    bad.write_text("model:\n  backbone: timm:convnext_tinyy\n")
    with pytest.raises(ConfigError, match="convnext_tiny"):
        load_config(bad)


def test_segformer_student_from_mit_b0_pth_and_cirkdv2_teacher(synth_root: Path, tmp_path: Path) -> None:
    """``model.pretrained_base: mit_b0.pth`` (ImageNet file: encoder keys + a 1000-class ``head.*``) and a
    published CIRKDV2 SegFormer teacher (top-level encoder, ``linear_pred``) through ``teacher.weights``."""
    from cskd.models import build_segmentor
    from cskd.checkpoints.official import to_official

    with torch.device("meta"):
        enc = build_segmentor("segformer", "mit_b0", 3).backbone.state_dict()
    g = torch.Generator().manual_seed(0)
    imagenet = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in enc.items()}
    imagenet.update({"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})
    torch.save(imagenet, tmp_path / "mit_b0.pth")
    teacher = build_segmentor("segformer", "mit_b0", 13)  # synthscapes: 13 classes
    torch.save(to_official(teacher.state_dict(), "segformer", "mit_b0"), tmp_path / "segformer_MiT_B0_teacher.pth")
    cfg = _config(synth_root, tmp_path / "run", "segformer", "mit_b0", [{"name": "kd"}], optimizer="adamw", lr=2e-4)
    cfg["model"]["pretrained_base"] = str(tmp_path / "mit_b0.pth")
    cfg["teacher"] = {"model": "segformer", "backbone": "mit_b0",
                      "weights": str(tmp_path / "segformer_MiT_B0_teacher.pth")}
    trainer = Trainer(config_from_dict(cfg), progress=False)
    assert torch.equal(trainer.student.backbone.block4[1].mlp.fc2.weight.detach(), imagenet["block4.1.mlp.fc2.weight"])
    assert trainer.runner.teacher is not None
    assert torch.equal(trainer.runner.teacher.backbone.patch_embed1.proj.weight,
                       teacher.backbone.patch_embed1.proj.weight)
    assert trainer.fit().iterations == 2
