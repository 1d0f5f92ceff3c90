"""``cskd demo`` with the model zoo: display names from the registries, ``--teacher``, the backbones' published
optimisers, and end-to-end runs at the tiny preset with SegFormer / UperNet students and a SegFormer teacher (maps
at 1/4 distilled from maps at 1/8 and the reverse)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cskd.cli import main
from cskd.models import build_segmentor
from cskd.models.backbones import BACKBONES, backbone_defaults
from cskd.models.heads import HEADS
from cskd.studies import demo

GPU_STUDENTS = "segformer:mit_b0,deeplabv3:mobilenetv3_large,deeplabv3:mobilevit_xxs,upernet:resnet18"
METHODS = ("baseline", "kd", "cwd", "cskd")
TERMS = {"kd": {"kd"}, "cwd": {"cwd"}, "cskd": {"cwd", "cam", "pam"}}


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(("pair", "name"), [
    (("deeplabv3", "resnet18"), "DeepLabV3-R18"),
    (("deeplabv3", "resnet101"), "DeepLabV3-R101"),
    (("deeplabv3", "mobilenetv2"), "DeepLabV3-MobileNetV2"),
    (("pspnet", "resnet18"), "PSPNet-R18"),
    (("psp", "resnet18"), "PSPNet-R18"),
    (("segformer", "mit_b0"), "SegFormer-MiT-B0"),
    (("segformer", "mit_b4"), "SegFormer-MiT-B4"),
    (("deeplabv3", "mobilenetv3_large"), "DeepLabV3-MobileNetV3-Large"),
    (("pspnet", "mobilenetv3_small"), "PSPNet-MobileNetV3-Small"),
    (("deeplabv3", "mobilevit_xxs"), "DeepLabV3-MobileViT-XXS"),
    (("upernet", "resnet18"), "UperNet-R18"),
    (("fcn", "resnet50"), "FCN-R50"),
    (("deeplabv3", "timm:convnext_tiny"), "DeepLabV3-timm:convnext_tiny"),
])
def test_pair_names_come_from_the_registries(pair: tuple[str, str], name: str) -> None:
    assert demo.pair_name(pair) == name


def test_every_registered_model_has_a_display_name_and_folders_are_file_names() -> None:
    assert all(e.display for e in HEADS.values())
    assert all(e.display for e in BACKBONES.values())
    names = {demo.pair_name((h, b)) for h in HEADS for b in BACKBONES}
    assert len(names) == len(HEADS) * len(BACKBONES)  # no two pairs print alike
    assert demo.folder_name(("deeplabv3", "resnet18")) == "DeepLabV3-R18"  # report folders keep their names
    assert demo.folder_name(("deeplabv3", "timm:convnext_tiny")) == "DeepLabV3-timm_convnext_tiny"


def test_latency_tables_use_the_registry_names() -> None:
    from cskd.deploy.latency import _model_label

    assert _model_label(SimpleNamespace(model="deeplabv3", backbone="mobilenetv2")) == "DeepLabV3-MobileNetV2"
    assert _model_label(SimpleNamespace(model="segformer", backbone="mit_b0")) == "SegFormer-MiT-B0"


# ------------------------------------------------------------------------------------------------ plans


def _train(cfg) -> tuple[str, float, float]:
    return cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay


def test_published_optimisers_are_backbone_defaults() -> None:
    assert _recipe("mobilevit_xxs") == ("adamw", 9e-4, 0.01)
    for b in ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"):
        assert _recipe(b) == ("adamw", 2e-4, 1e-4), b
    for b in ("resnet18", "resnet101", "mobilenetv2", "mobilenetv3_small", "mobilenetv3_large"):
        assert backbone_defaults(b).optimizer is None, b


def _recipe(backbone: str) -> tuple[str, float, float]:
    r = backbone_defaults(backbone).optimizer
    assert r is not None
    return r.optimizer, r.lr, r.weight_decay


def test_paper_plan_with_zoo_students(tmp_path: Path) -> None:
    plan = demo.plan("paper", out=tmp_path, device="cuda", methods=METHODS, seeds=3,
                     students=demo.parse_pairs(GPU_STUDENTS))
    assert list(plan.students) == ["SegFormer-MiT-B0", "DeepLabV3-MobileNetV3-Large", "DeepLabV3-MobileViT-XXS",
                                   "UperNet-R18"]
    expected = {"SegFormer-MiT-B0": ("adamw", 2e-4, 1e-4), "DeepLabV3-MobileNetV3-Large": ("sgd", 0.02, 1e-4),
                "DeepLabV3-MobileViT-XXS": ("adamw", 9e-4, 0.01), "UperNet-R18": ("sgd", 0.02, 1e-4)}
    for name, cfgs in plan.students.items():
        assert len(cfgs) == len(METHODS) * 3
        assert {_train(cfg) for _, cfg in cfgs} == {expected[name]}, name
        assert all(cfg.run_dir.parent.parent == tmp_path / name for _, cfg in cfgs)
        for method, cfg in cfgs:
            assert (cfg.teacher is not None) == (method != "baseline")
            if cfg.teacher is not None:
                assert (cfg.teacher.model, cfg.teacher.backbone) == ("deeplabv3", "resnet101")
                assert cfg.teacher.weights == str(plan.teacher.run_dir / "last.pt")
    assert _train(plan.teacher) == ("sgd", 0.02, 1e-4)
    assert plan.teacher.run_dir.name.startswith("teacher_DeepLabV3-R101_")
    text = demo.describe(plan.preset)
    assert "DeepLabV3-R101 teacher" in text and "UperNet-R18 students" in text and "PSPNet" not in text


def test_transformer_teacher_plan(tmp_path: Path) -> None:
    default = demo.plan("paper", out=tmp_path, device="cuda", methods=METHODS)
    plan = demo.plan("paper", out=tmp_path, device="cuda", methods=METHODS, seeds=3,
                     teacher=("segformer", "mit_b4"), students=(("deeplabv3", "resnet18"),))
    assert _train(plan.teacher) == ("adamw", 2e-4, 1e-4)
    assert (plan.teacher.model.model, plan.teacher.model.backbone) == ("segformer", "mit_b4")
    assert plan.teacher.run_dir.name.startswith("teacher_SegFormer-MiT-B4_")
    assert plan.teacher.run_dir != default.teacher.run_dir
    # another teacher of the same pair (other iterations) gets another folder too: the name holds the digest
    longer = demo.plan("paper", out=tmp_path, device="cuda", teacher=("segformer", "mit_b4"), teacher_iterations=7)
    assert longer.teacher.run_dir != plan.teacher.run_dir
    [(name, cfgs)] = plan.students.items()
    assert name == "DeepLabV3-R18"
    assert all(_train(cfg) == ("sgd", 0.02, 1e-4) for _, cfg in cfgs)
    distilled = [cfg for method, cfg in cfgs if method != "baseline"]
    assert distilled and all((c.teacher.model, c.teacher.backbone) == ("segformer", "mit_b4") for c in distilled)


def test_adamw_student_leaves_norms_and_biases_undecayed(tmp_path: Path) -> None:
    from cskd.engine.optim import build_optimizer

    plan = demo.plan("tiny", out=tmp_path, device="cpu", students=(("segformer", "mit_b0"),))
    [(_, cfg)] = plan.students["SegFormer-MiT-B0"][:1]
    net = build_segmentor(cfg.model.model, cfg.model.backbone, 19)
    opt = build_optimizer(net, cfg.train, fused=False)
    assert isinstance(opt, torch.optim.AdamW)
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    assert decays == [0.0, 1e-4] and all(g["lr"] == 2e-4 for g in opt.param_groups)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(p) in no_decay for n, p in net.named_parameters() if p.ndim <= 1)


def test_repo_configs_follow_the_backbone_recipes() -> None:
    """A config for cskd train / distill states its optimiser; where the student's backbone declares one, it is
    that one (configs/cityscapes/*-mvitxxs.yaml, *_segformer-*.yaml)."""
    from cskd.engine.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    checked = 0
    for path in sorted(root.rglob("*.yaml")):
        if path.parent.name == "_base":
            continue
        cfg = load_config(path)
        recipe = backbone_defaults(cfg.model.backbone).optimizer
        if recipe is not None:
            assert _train(cfg) == (recipe.optimizer, recipe.lr, recipe.weight_decay), path
            checked += 1
    assert checked >= 3


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--teacher", "segformer", "--teacher 'segformer': expected MODEL:BACKBONE"),
    ("--teacher", "segformer:mit_b9", "--teacher 'segformer:mit_b9': unknown backbone 'mit_b9'"),
    ("--teacher", "segformr:mit_b4", "--teacher 'segformr:mit_b4': unknown model 'segformr'"),
    ("--students", "deeplabv3:resnet18,foo:resnet18", "--students 'foo:resnet18': unknown model 'foo'"),
    ("--students", "deeplabv3:resnet18,deeplab:resnet18", "--students lists DeepLabV3-R18 more than once"),
    ("--students", ",", "--students ',': expected MODEL:BACKBONE"),
])
def test_bad_pairs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str,
                                       value: str, message: str) -> None:
    args = ["demo", "--preset", "tiny", "--out", str(tmp_path / "demo"), "--data-root", str(tmp_path / "data"),
            "--device", "cpu", "--no-progress", option, value]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "data").exists()  # nothing was started


def test_models_command_shows_the_optimiser() -> None:
    from cskd.cli.models import collect

    rows = {r["backbone"]: r for r in collect((64, 64), 19, False, [])["backbones"]}
    assert rows["mobilevit_xxs"]["optimiser"] == "AdamW lr 0.0009, weight decay 0.01"
    assert rows["mit_b0"]["optimiser"] == "AdamW lr 0.0002, weight decay 0.0001"
    assert rows["resnet18"]["optimiser"] == "the config's"


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthscapes")


def _run(out: Path, data: Path, *extra: str) -> dict:
    args = ["demo", "--preset", "tiny", "--out", str(out), "--data-root", str(data), "--device", "cpu",
            "--no-progress", "--teacher-iterations", "2", "--student-iterations", "2", *extra]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


def _stride(pair: tuple[str, str]) -> int:
    with torch.device("meta"):
        return build_segmentor(*pair, 19, aux=False).output_stride


def _check_runs(out: Path, results: dict, students: dict[str, tuple[str, str]], teacher: tuple[str, str],
                methods: tuple[str, ...]) -> str:
    report = (out / "report.md").read_text()
    assert "## Failed runs" not in report
    assert set(results["students"]) == set(students)
    for name, pair in students.items():
        assert set(results["students"][name]) == {"baseline", *methods}
        for method, recs in results["students"][name].items():
            [rec] = recs
            assert rec["status"] == "done" and rec["miou"] is not None, (name, method, rec["error"])
            if method == "baseline":
                continue
            # the distillation terms were computed, finite, on maps of the two strides
            logged = [json.loads(line) for line in Path(rec["run_dir"], "log.jsonl").read_text().splitlines()]
            train = [r for r in logged if r["kind"] == "train"]
            assert train and TERMS[method] <= set(train[-1]), (name, method, train)
            assert all(math.isfinite(train[-1][k]) and train[-1][k] > 0 for k in TERMS[method])
        rows = re.findall(rf"^\| {re.escape(name)} \| (\w+) \| \d+\.\d\d \|", report, flags=re.M)
        assert sorted(rows) == sorted({"baseline", *methods}), name
        for kind in ("curves", "panels"):
            png = f"{kind}_{demo.folder_name(pair)}.png"
            assert f"]({png})" in report and (out / png).is_file()
        assert re.search(rf"^- {re.escape(name)}: ", report, flags=re.M)  # its optimiser
    assert f"| {demo.pair_name(teacher)} (teacher) | — |" in report
    assert f"- {demo.pair_name(teacher)} (teacher): " in report
    return report


@pytest.mark.slow
def test_segformer_and_upernet_students_of_a_cnn_teacher(tmp_path: Path, data_root: Path) -> None:
    methods = ("cskd",)  # its terms include cwd's (λ 3, τ 2, as method cwd); kd across strides: test_losses_xarch
    students = {"SegFormer-MiT-B0": ("segformer", "mit_b0"), "UperNet-R18": ("upernet", "resnet18")}
    teacher = ("deeplabv3", "resnet18")
    assert _stride(students["SegFormer-MiT-B0"]) == 4 and _stride(teacher) == 8
    results = _run(tmp_path, data_root, "--students", "segformer:mit_b0,upernet:resnet18", "--methods",
                   ",".join(methods))
    report = _check_runs(tmp_path, results, students, teacher, methods)
    assert re.search(r"^- SegFormer-MiT-B0: AdamW lr 0\.0002, weight decay 0\.0001 .*mit_b0's published recipe",
                     report, flags=re.M)
    assert re.search(r"^- UperNet-R18: SGD lr 0\.02, momentum 0\.9, weight decay 0\.0001", report, flags=re.M)
    assert results["optimizers"]["SegFormer-MiT-B0"]["optimizer"] == "adamw"
    assert "a DeepLabV3-R18 teacher and the SegFormer-MiT-B0 and UperNet-R18 students" in report
    assert "DeepLabV3-MobileNetV2" not in report  # the preset's own student is not mentioned


@pytest.mark.slow
def test_students_of_a_segformer_teacher(tmp_path: Path, data_root: Path) -> None:
    methods = ("cskd",)  # its terms include cwd's (λ 3, τ 2, as method cwd): fewer runs, the same losses
    students = {"DeepLabV3-R18": ("deeplabv3", "resnet18"), "DeepLabV3-MobileViT-XXS": ("deeplabv3", "mobilevit_xxs")}
    teacher = ("segformer", "mit_b0")
    assert _stride(teacher) == 4 and all(_stride(p) == 8 for p in students.values())
    results = _run(tmp_path, data_root, "--teacher", "segformer:mit_b0", "--students",
                   ",".join(":".join(p) for p in students.values()), "--methods", ",".join(methods))
    report = _check_runs(tmp_path, results, students, teacher, methods)
    assert results["optimizers"]["teacher"]["optimizer"] == "adamw"
    assert results["optimizers"]["DeepLabV3-MobileViT-XXS"]["lr"] == 9e-4
    assert "- SegFormer-MiT-B0 (teacher): AdamW lr 0.0002" in report
    assert [p.name for p in tmp_path.glob("teacher_*")] == [Path(results["teacher"]["run_dir"]).name]
    assert Path(results["teacher"]["run_dir"]).name.startswith("teacher_SegFormer-MiT-B0_")
    header = next(line for line in report.splitlines() if line.startswith("| class |"))
    assert header.count("|") - 1 == 2 + len(students) * (1 + len(methods))  # class, teacher, every student run
