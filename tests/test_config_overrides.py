"""Issue #22 items 4, 5, 7 (config part): overrides of a method's terms, float notation, finite floats, and a
missing ``base:`` file named with the config that references it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cskd.schema import check_value
from cskd.engine.config import config_from_dict, load_config
from cskd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CSKD_CONFIG = REPO / "configs/cityscapes/cskd_deeplabv3-r101_deeplabv3-r18.yaml"


def write(tmp_path: Path, name: str, data: dict | str) -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_the_readme_override_example_works_on_a_method_config() -> None:
    readme = (REPO / "README.md").read_text()
    example = re.search(r"--set (train\.lr=0\.01) --set (losses\.1\.lambda_cam=0\.5)", readme)
    assert example, "the README's override example changed: update this test"
    cfg = load_config(CSKD_CONFIG, list(example.groups()))
    assert cfg.method == "cskd" and cfg.train.lr == 0.01
    assert [lc.name for lc in cfg.losses] == ["cwd", "cskd"]
    assert cfg.losses[1].params["lambda_cam"] == 0.5
    assert cfg.losses[1].params["lambda_pam"] == 0.8 and cfg.losses[0].params["weight"] == 3.0  # the rest as published
    again = config_from_dict(cfg.to_dict())  # what a run's config.yaml and --resume read back
    assert again == cfg and again.digest() == cfg.digest()


def test_the_batch_size_errors_advice_cka_scope_global_works_as_an_override() -> None:
    cfg = load_config(CSKD_CONFIG, ["losses.1.cka_scope=global"])
    assert cfg.losses[1].params["cka_scope"] == "global" and cfg.method == "cskd"
    with pytest.raises(ConfigError, match=r"losses\[1\].cka_scope"):
        load_config(CSKD_CONFIG, ["losses.1.cka_scope=everywhere"])
    with pytest.raises(ConfigError, match="not an index of a list of 2"):
        load_config(CSKD_CONFIG, ["losses.2.lambda_cam=0.5"])


def test_a_method_with_other_terms_is_still_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "c.yaml", {"method": "cskd", "teacher": {"backbone": "resnet101"},
                                   "losses": [{"name": "kd"}]})
    with pytest.raises(ConfigError, match="either 'method' .* or 'losses'"):
        load_config(p)


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("1E5", 1e5), (".5", 0.5), ("1.5e3", 1500.0), ("3.", 3.0)])
def test_float_notation_in_set_and_in_files(tmp_path: Path, text: str, value: float) -> None:
    plain = write(tmp_path, "c.yaml", {"name": "x"})
    assert load_config(plain, [f"train.lr={text}"]).train.lr == value
    assert load_config(write(tmp_path, "f.yaml", f"train:\n  lr: {text}\n")).train.lr == value
    assert load_config(CSKD_CONFIG, [f"losses.1.lambda_cam={text}"]).losses[1].params["lambda_cam"] == value


def test_negative_exponent_notation_and_non_numbers() -> None:
    assert check_value("-2e-4", float, "k", "w") == -2e-4
    assert check_value("+2E+4", float | None, "k", "w") == 2e4
    for bad in ("fast", "1e", "e5", "inf", "nan", "1e-3x", "0x10"):
        with pytest.raises(ConfigError, match="expected float"):
            check_value(bad, float, "k", "w")
    with pytest.raises(ConfigError, match="expected int"):
        check_value("1e3", int, "k", "w")  # an int key stays an int


@pytest.mark.parametrize("override,key", [
    ("train.lr=.nan", "train.lr"), ("train.lr=.inf", "train.lr"), ("train.weight_decay=-.inf", "train.weight_decay"),
    ("train.lr=1e999", "train.lr"), ("data.scale_range=[0.5, .nan]", "data.scale_range[1]"),
    ("train.budget={gpu_seconds: .inf}", "train.budget.gpu_seconds"),
    ("losses.1.lambda_cam=.nan", "losses[1].lambda_cam"),
])
def test_non_finite_floats_are_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(CSKD_CONFIG, [override])
    assert f"key '{key}'" in str(e.value) and "finite" in str(e.value) and "with --set overrides" in str(e.value)


def test_non_finite_float_in_a_file(tmp_path: Path) -> None:
    p = write(tmp_path, "c.yaml", "train:\n  momentum: .nan\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'train.momentum' has value nan; expected a finite float"):
        load_config(p)


def test_a_missing_base_file_is_named_with_the_config_that_references_it(tmp_path: Path) -> None:
    child = write(tmp_path, "child.yaml", {"base": "../_base/nope.yaml", "name": "x"})
    with pytest.raises(ConfigError) as e:
        load_config(child)
    msg = str(e.value)
    assert str(child) in msg and "'../_base/nope.yaml'" in msg and "does not exist" in msg
    middle = write(tmp_path, "middle.yaml", {"base": "gone.yaml"})
    top = write(tmp_path, "top.yaml", {"base": "middle.yaml"})
    with pytest.raises(ConfigError, match=r"middle\.yaml: its base file 'gone\.yaml' does not exist"):
        load_config(top)


def test_an_unquoted_off_is_the_word_where_the_choices_are_words(tmp_path: Path) -> None:
    """YAML 1.1 reads ``off`` as false: ``train.teacher_stream: off`` (a file) and ``--set train.teacher_stream=off``
    must mean the choice "off", while a bool key keeps its bool and a choice list without the word refuses it."""
    plain = write(tmp_path, "c.yaml", {"name": "x"})
    assert load_config(plain, ["train.teacher_stream=off"]).train.teacher_stream == "off"
    assert load_config(write(tmp_path, "f.yaml", "train:\n  teacher_stream: off\n")).train.teacher_stream == "off"
    assert load_config(plain, ["train.teacher_graph=off"]).train.teacher_graph is False  # a bool key: false
    with pytest.raises(ConfigError, match=r"key 'train.dilated_convs' has value False; expected one of 'auto'"):
        load_config(plain, ["train.dilated_convs=off"])  # no word "off" among its choices
    from typing import Literal

    assert check_value(True, Literal["on", "off"], "k", "w") == "on"
