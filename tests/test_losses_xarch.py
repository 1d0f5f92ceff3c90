"""Every registered distillation loss across architectures: a CNN teacher (DeepLabV3-R18, maps at 1/8) → a
transformer student (SegFormer-MiT-B0, maps at 1/4) and the reverse, with real tiny segmentors; the package's one
resizing rule (:mod:`cskd.losses._spatial`: the student's map to the teacher's size, bilinear,
align_corners=False; labels by nearest) checked in float64; and 2-iteration engine runs of both pairs."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cskd.losses import LOSSES, _load_all, build_loss
from cskd.losses.methods import METHODS
from cskd.models import build_segmentor
from cskd.models.segmentor import SegOutput

_load_all()
NUM_CLASSES = 5
SIZE = 64
B = 3
CNN = ("deeplabv3", "resnet18")
VIT = ("segformer", "mit_b0")
PAIRS = {"cnn_to_vit": (CNN, VIT), "vit_to_cnn": (VIT, CNN)}


def _recipe_params(name: str) -> dict:
    """The loss's params in the first method that uses it (defaults where no method does)."""
    for method in METHODS.values():
        for lc in method.losses:
            if lc["name"] == name:
                return {k: v for k, v in lc.items() if k != "name"}
    return {}


_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def _model(spec: tuple[str, str]) -> torch.nn.Module:
    if spec not in _MODELS:
        torch.manual_seed(0)
        _MODELS[spec] = build_segmentor(spec[0], spec[1], NUM_CLASSES).float()
    return _MODELS[spec]


def _loss_for(name: str, student: torch.nn.Module, teacher: torch.nn.Module):
    return build_loss(name, _recipe_params(name), student_channels=student.feature_channels,
                      teacher_channels=teacher.feature_channels, num_classes=NUM_CLASSES,
                      student_stage_channels=student.stage_channels, teacher_stage_channels=teacher.stage_channels)


# The built-in losses only: other test modules register throw-away losses in the same registry.
BUILT_IN = sorted(n for n, cls in LOSSES.items() if cls.__module__.startswith("cskd.losses."))


@pytest.mark.parametrize("direction", sorted(PAIRS))
@pytest.mark.parametrize("name", BUILT_IN)
def test_every_loss_across_architectures(name: str, direction: str) -> None:
    t_spec, s_spec = PAIRS[direction]
    teacher, student = _model(t_spec), _model(s_spec)
    torch.manual_seed(1)
    loss = _loss_for(name, student, teacher)
    student.train()
    teacher.eval()
    x = torch.randn(B, 3, SIZE, SIZE)
    targets = torch.randint(0, NUM_CLASSES, (B, SIZE, SIZE))
    targets[:, :4] = 255
    with torch.no_grad():
        t_out = teacher(x, with_aux=True)
    s_out = student(x)
    assert s_out.logits.shape[-2:] != t_out.logits.shape[-2:]  # the pair really differs in stride
    student.zero_grad(set_to_none=True)
    terms = loss(s_out, t_out, targets)
    assert terms and all(isinstance(k, str) for k in terms)
    for key, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), (key, value)
    total = sum(terms.values())
    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads, "no gradient reached the student"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    aux = loss.auxiliary_loss(SegOutput(*[v.detach() if torch.is_tensor(v) else v for v in s_out[:3]],
                                        tuple(s.detach() for s in s_out.stages)), t_out, targets)
    for key, value in aux.items():
        assert torch.isfinite(value), (key, value)


def test_the_resizing_rule_kd_float64() -> None:
    """KD on a student at 1/4 equals KD on that student pre-resized (bilinear, align_corners=False) to the
    teacher's 1/8 grid; and equal sizes go through untouched (the same tensor)."""
    from cskd.losses._spatial import to_teacher_size

    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, NUM_CLASSES, 16, 16, generator=g, dtype=torch.float64)
    zt = torch.randn(2, NUM_CLASSES, 8, 8, generator=g, dtype=torch.float64)
    kd = build_loss("kd", {}, student_channels=8, teacher_channels=8, num_classes=NUM_CLASSES)
    up = F.interpolate(zs, size=(8, 8), mode="bilinear", align_corners=False)
    raw = kd(SegOutput(zs, None, zs), SegOutput(zt, None, zt))["kd"]
    pre = kd(SegOutput(up, None, up), SegOutput(zt, None, zt))["kd"]
    assert raw.dtype == torch.float64 and torch.equal(raw, pre)
    assert to_teacher_size(zt, zt) is zt
    # the other direction: a 1/8 student upsampled to a 1/4 teacher
    small = kd(SegOutput(zt, None, zt), SegOutput(zs, None, zs))["kd"]
    big = F.interpolate(zt, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(small, kd(SegOutput(big, None, big), SegOutput(zs, None, zs))["kd"])


@pytest.mark.parametrize("name", ["skd", "ifvd", "cskd", "afdcd"])
def test_the_resizing_rule_pairwise_and_label_losses_float64(name: str) -> None:
    """Losses on features, stages and labels: the raw student at 1/4 gives the same terms as the student's maps
    pre-resized to the teacher's 1/8 grid (bilinear, align_corners=False); labels go to that grid by nearest."""
    from cskd.losses._spatial import to_teacher_size

    g = torch.Generator().manual_seed(0)
    fs = torch.randn(3, 16, 16, 16, generator=g, dtype=torch.float64)
    ft = torch.randn(3, 32, 8, 8, generator=g, dtype=torch.float64)
    zs, zt = (torch.randn(3, NUM_CLASSES, *s, generator=g, dtype=torch.float64) for s in ((16, 16), (8, 8)))
    targets = torch.randint(0, NUM_CLASSES, (3, 64, 64), generator=g)
    params = {"pam_projection": "fixed"} if name == "cskd" else {}
    params.update({k: v for k, v in _recipe_params(name).items() if k != "pam_projection"})
    torch.manual_seed(0)
    loss = build_loss(name, params, student_channels=16, teacher_channels=32, num_classes=NUM_CLASSES,
                      student_stage_channels=(16,) * 4, teacher_stage_channels=(32,) * 4).double()
    raw_s = SegOutput(zs, None, fs, (fs,) * 4)
    pre = to_teacher_size(fs, ft)
    pre_s = SegOutput(to_teacher_size(zs, zt), None, pre, (pre,) * 4)
    t_out = SegOutput(zt, None, ft, (ft,) * 4)
    if name == "afdcd":
        loss.mask = "centre"  # deterministic
    a, b = loss(raw_s, t_out, targets), loss(pre_s, t_out, targets)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == torch.float64 and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["kd", "cwd", "dist", "dsd", "adv"])
def test_class_counts_must_agree(name: str) -> None:
    zs = torch.randn(3, 4, 8, 8)
    zt = torch.randn(3, 5, 8, 8)
    loss = build_loss(name, _recipe_params(name), student_channels=4, teacher_channels=5, num_classes=5)
    fs = torch.randn(3, 4, 8, 8)
    with pytest.raises(ValueError, match="class"):
        loss(SegOutput(zs, zs, fs), SegOutput(zt, zt, torch.randn(3, 5, 8, 8)))


TINY = (32, 64)


@pytest.mark.parametrize("teacher,student,method,train", [
    (CNN, VIT, "cskd", {"optimizer": "adamw", "lr": 2e-4}),  # DeepLabV3-R18 (1/8) → SegFormer-MiT-B0 (1/4)
    (VIT, CNN, "kd", {}),  # SegFormer-MiT-B0 (1/4) → DeepLabV3-R18 (1/8)
])
def test_two_iteration_cross_architecture_run(synth_root: Path, tmp_path: Path, teacher: tuple[str, str],
                                              student: tuple[str, str], method: str, train: dict) -> None:
    from cskd.engine.config import config_from_dict
    from cskd.engine.records import read_records
    from cskd.engine.trainer import Trainer

    cfg = config_from_dict({
        "name": "xarch",
        "output_dir": str(tmp_path / "run"),
        "data": {"dataset": "synthscapes", "root": str(synth_root), "crop_size": list(TINY), "workers": 0},
        "model": {"model": student[0], "backbone": student[1]},
        "teacher": {"model": teacher[0], "backbone": teacher[1]},
        "method": method,
        "train": {"budget": {"iterations": 2}, "batch_size": 3, "lr": 0.01, "log_every": 1, "val_every": 1000,
                  "save_every": 1000, "device": "cpu", "amp": "none", **train},
        "eval": {"max_images": 1},
    })
    result = Trainer(cfg, progress=False).fit()
    assert result.iterations == 2
    recs = read_records(tmp_path / "run" / "log.jsonl", "train")
    assert [r["iteration"] for r in recs] == [1, 2]
    expected = {"cskd": ("cwd", "cam", "pam"), "kd": ("kd",)}[method]
    for r in recs:
        for key in expected:
            assert key in r and r[key] == r[key] and abs(r[key]) != float("inf"), (key, r)


@pytest.mark.parametrize("name", BUILT_IN)
def test_state_from_before_the_first_batch_loads_back(name: str) -> None:
    """The time-budget calibration runs steps and then restores the state saved before them: a loss whose buffers
    take their shape at the first batch (CIRKDV2's channel memory) must load its unsized state back."""
    teacher, student = _model(CNN), _model(CNN)
    torch.manual_seed(1)
    loss = _loss_for(name, student, teacher)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    x = torch.randn(B, 3, SIZE, SIZE)
    targets = torch.randint(0, NUM_CLASSES, (B, SIZE, SIZE))
    with torch.no_grad():
        t_out = teacher.eval()(x, with_aux=True)
    sum(loss(student.train()(x), t_out, targets).values()).backward()
    loss.load_state_dict(before)
    after = loss.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key
