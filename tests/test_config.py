"""Experiment configs: validation errors name the file, the key and what is allowed; overrides; inheritance."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cskd.engine.config import apply_overrides, config_from_dict, load_config, parse_override
from cskd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, data: dict) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_are_the_published_recipe(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "c.yaml", {"name": "x"}))
    t = cfg.train
    assert (t.lr, t.momentum, t.weight_decay, t.poly_power, t.batch_size, t.aux_weight) == (0.02, 0.9, 1e-4, 0.9, 16, 0.4)
    assert t.budget.iterations == 40000 and t.budget.gpu_seconds is None
    assert not cfg.is_distillation and cfg.run_dir == Path("runs/x")


def test_unknown_key_names_file_key_and_allowed(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.yaml", {"train": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.learning_rate" in msg and "lr" in msg and "momentum" in msg


def test_unknown_top_level_block(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'optimizer'.*allowed keys: data, eval, losses|unknown key 'optimizer'"):
        load_config(write(tmp_path, "c.yaml", {"optimizer": {}}))


@pytest.mark.parametrize(
    "block,value,expect",
    [
        ({"train": {"lr": "fast"}}, "train.lr", "expected float"),
        ({"train": {"batch_size": 2.5}}, "train.batch_size", "expected int"),
        ({"train": {"amp": "fp8"}}, "train.amp", "one of 'auto', 'bf16', 'fp16', 'none'"),
        ({"data": {"crop_size": [512]}}, "data.crop_size", "needs 2 values"),
        ({"train": {"deterministic": "yes"}}, "train.deterministic", "expected bool"),
        ({"eval": {"mode": "sliding"}}, "eval.mode", "one of 'whole', 'slide'"),
    ],
)
def test_wrong_types_and_values(tmp_path: Path, block: dict, value: str, expect: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "c.yaml", block))
    assert value in str(e.value) and expect in str(e.value) and "c.yaml" in str(e.value)


def test_bad_values_caught_by_the_schema(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of budget.iterations and budget.gpu_seconds"):
        load_config(write(tmp_path, "c.yaml", {"train": {"budget": {"iterations": 10, "gpu_seconds": 5}}}))
    with pytest.raises(ConfigError, match="unknown backbone 'resnet34'"):
        load_config(write(tmp_path, "c.yaml", {"model": {"backbone": "resnet34"}}))
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        load_config(write(tmp_path, "c.yaml", {"train": {"lr": 0}}))


def test_losses_are_checked_against_the_loss_constructors(tmp_path: Path) -> None:
    teacher = {"model": "deeplabv3", "backbone": "resnet101"}
    with pytest.raises(ConfigError, match="unknown loss 'foo'"):
        load_config(write(tmp_path, "c.yaml", {"teacher": teacher, "losses": [{"name": "foo"}]}))
    with pytest.raises(ConfigError, match=r"losses\[0\].cskd.lambda_cma|unknown key 'losses\[0\].lambda_cma'"):
        load_config(write(tmp_path, "c.yaml", {"teacher": teacher, "losses": [{"name": "cskd", "lambda_cma": 1}]}))
    with pytest.raises(ConfigError, match="pam_projection"):
        load_config(write(tmp_path, "c.yaml",
                          {"teacher": teacher, "losses": [{"name": "cskd", "pam_projection": "random"}]}))
    with pytest.raises(ConfigError, match="no 'teacher' block"):
        load_config(write(tmp_path, "c.yaml", {"losses": [{"name": "kd"}]}))


def test_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, "c.yaml", {"teacher": {"backbone": "resnet101"},
                                   "losses": [{"name": "cwd"}, {"name": "cskd", "lambda_cam": 0.3}]})
    cfg = load_config(p, ["train.lr=0.01", "data.root=/data/cityscapes", "losses.1.lambda_cam=0.5",
                          "train.budget={gpu_seconds: 60}", "data.crop_size=[64, 128]"])
    assert cfg.train.lr == 0.01 and cfg.data.root == "/data/cityscapes"
    assert cfg.losses[1].params["lambda_cam"] == 0.5
    assert cfg.train.budget.gpu_seconds == 60 and cfg.train.budget.iterations is None
    assert cfg.data.crop_size == (64, 128)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"losses": [{}]}, ["losses.3.x=1"])
    with pytest.raises(ConfigError, match="with --set overrides"):
        load_config(p, ["train.lr=-1"])


def test_base_inheritance_and_cycles(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", {"train": {"lr": 0.05, "batch_size": 8}, "data": {"dataset": "camvid"}})
    child = write(tmp_path, "child.yaml", {"base": "base.yaml", "train": {"batch_size": 4}})
    cfg = load_config(child)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.data.dataset) == (0.05, 4, "camvid")
    write(tmp_path, "a.yaml", {"base": "b.yaml"})
    write(tmp_path, "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_round_trip_through_to_dict(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "c.yaml", {"teacher": {"backbone": "resnet101"},
                                                  "losses": [{"name": "kd", "temperature": 4.0}]}))
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.digest() == cfg.digest()


def test_every_shipped_config_validates() -> None:
    files = sorted((REPO / "configs").rglob("*.yaml"))
    files = [f for f in files if "_base" not in f.parts]
    assert len(files) >= 20
    for f in files:
        cfg = load_config(f)
        assert cfg.name == f.stem, f"{f}: name should match the file name"
