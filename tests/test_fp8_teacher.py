"""The FP8 teacher (``train.teacher_precision: fp8``, cskd/models/fp8.py): the FP8 1×1 conv against a float64
reference of its documented formulas and against the conv it replaces; which convs the quantizer replaces; the
engine's runner and Trainer with it (deterministic calibration); the config and device checks; both benchmarks
at CPU sizes."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cskd.distributed import DistEnv
from cskd.engine.config import config_from_dict
from cskd.engine.runner import StepRunner, calibration_images, check_teacher_precision
from cskd.errors import ConfigError
from cskd.models.fp8 import FP8Conv1x1, cpu_scaled_mm_available, quantize_1x1_fp8_
from cskd.models.fusion import fold_batchnorm_
from cskd.models.segmentor import build_segmentor

pytestmark = pytest.mark.skipif(not cpu_scaled_mm_available(),
                                reason=f"torch {torch.__version__} has no CPU torch._scaled_mm")

F8 = torch.float8_e4m3fn
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def conv_and_input(cin: int = 32, cout: int = 48, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 1, bias=bias).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=g))
    x = torch.randn(2, cin, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    return conv, x


def reference(conv: nn.Conv2d, x: torch.Tensor, input_scale: float) -> torch.Tensor:
    """The documented formulas in float64: y = q(x / s_a) · q(W / s_w)ᵀ · s_a · s_w + b, with s_w = row amax / 448
    and q = round to e4m3 after clamping to ±448."""
    w = conv.weight.detach().double().reshape(conv.out_channels, conv.in_channels)
    s_w = w.abs().amax(dim=1) / 448.0
    wq = (w / s_w[:, None]).to(F8).double()
    xq = (x.double() / input_scale).clamp(-448.0, 448.0).to(F8).double()
    y = torch.einsum("nchw,oc->nohw", xq, wq) * input_scale * s_w.view(1, -1, 1, 1)
    if conv.bias is not None:
        y = y + conv.bias.detach().double().view(1, -1, 1, 1)
    return y


# ------------------------------------------------------------------------------------------------ (a), (b)


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_conv_matches_a_float64_reference_of_its_formulas(bias: bool) -> None:
    conv, x = conv_and_input(bias=bias)
    s_a = 2.0 * float(x.abs().amax()) / 448.0
    q = FP8Conv1x1(conv, input_scale=s_a)
    assert q.weight.dtype == F8 and q.weight.shape == (48, 32)
    assert q.weight_scale.dtype == torch.float32 and q.input_scale.dtype == torch.float32
    assert set(q.state_dict()) == {"weight", "weight_scale", "input_scale"} | ({"bias"} if bias else set())
    ref = reference(conv, x, s_a)
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (2, 48, 5, 7)
    assert y.is_contiguous(memory_format=torch.channels_last)  # a view of the NHWC GEMM result
    assert rel_rms(y, ref) < 1e-5  # float32 accumulation and scaling only
    # an NCHW input gives the same numbers (its pixel matrix is copied instead of viewed)
    assert torch.equal(q(x.contiguous()), y)
    # bf16 in, bf16 out: one bf16 rounding of the GEMM result, then the scale and the bias in bf16
    xb = x.bfloat16()  # compared with the reference of the rounded input
    yb = q(xb)
    assert yb.dtype == torch.bfloat16
    assert rel_rms(yb, reference(conv, xb.float(), s_a)) < 1e-2


def test_fp8_conv_is_within_fp8_tolerance_of_the_conv_and_wrong_scales_break_it() -> None:
    conv, x = conv_and_input(cin=64, cout=32, seed=1)
    with torch.no_grad():
        exact = conv(x)
    s_a = 2.0 * float(x.abs().amax()) / 448.0
    q = FP8Conv1x1(conv, input_scale=s_a)
    err = rel_rms(q(x), exact)
    # e4m3 rounds each value by ≤ 6.25 % (≈ 3.6 % RMS); over 64 products the output's RMS error stays far lower
    assert 1e-3 < err < 0.08, err  # > 0: the values were really quantized
    saturating = FP8Conv1x1(conv, input_scale=s_a / 50)  # most inputs beyond ±448 · scale: clamped
    assert rel_rms(saturating(x), exact) > 0.08
    wrong_w = copy.deepcopy(q)
    wrong_w.weight_scale.mul_(1.25)  # a per-channel scale that does not undo the weight's quantization scale
    assert rel_rms(wrong_w(x), exact) > 0.08
    with pytest.raises(TypeError, match="cast the model to its dtype before"):
        q.to(torch.bfloat16)  # would turn the float8 weights into plain numbers without their scales
    q.to("cpu")  # device moves are fine


def test_fp8_conv_refuses_what_is_not_a_plain_1x1_conv() -> None:
    for conv in (nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 1, stride=2), nn.Conv2d(24, 32, 1),
                 nn.Conv2d(32, 32, 1, groups=2)):
        with pytest.raises(ValueError, match="1×1"):
            FP8Conv1x1(conv.eval())
    with pytest.raises(ValueError, match="eval"):
        FP8Conv1x1(nn.Conv2d(32, 32, 1))  # training mode


# ------------------------------------------------------------------------------------------------ (c), (d)


def count_plain_1x1(model: nn.Module) -> tuple[int, int]:
    """(1×1 stride-1 ungrouped convs with channels multiples of 16, all other convs), counted here from the
    definition rather than with cskd.models.fp8.eligible."""
    one, other = 0, 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            plain = (m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
                     and m.dilation == (1, 1) and m.groups == 1)
            if plain and m.in_channels % 16 == 0 and m.out_channels % 16 == 0:
                one += 1
            else:
                other += 1
    return one, other


@pytest.mark.parametrize("backbone,tolerance", [("resnet18", 0.1), ("resnet50", 0.2)])
def test_quantize_replaces_exactly_the_eligible_convs(backbone: str, tolerance: float) -> None:
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3", backbone, num_classes=5).eval()
    fold_batchnorm_(model)
    eligible, others = count_plain_1x1(model)
    assert eligible > 0 and others > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exact = model(x)
    n = quantize_1x1_fp8_(model, x)
    assert n == eligible
    assert sum(isinstance(m, FP8Conv1x1) for m in model.modules()) == eligible
    assert count_plain_1x1(model) == (0, others)  # the 3×3, strided and classifier convs are untouched
    with torch.no_grad():
        out = model(x)
    # random weights: 6 (R18) or 38 (R50) quantized layers in a row; the trained teacher's error is measured by
    # benchmarks/teacher_fp8.py
    assert rel_rms(out.logits, exact.logits) < tolerance
    assert rel_rms(out.features, exact.features) < tolerance


def test_activation_scale_is_margin_times_amax_of_the_calibration_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 1), nn.Conv2d(16, 16, 3)).eval()
    x = torch.randn(3, 16, 6, 6)
    with torch.no_grad():
        mid = model[1](model[0](x))
    assert quantize_1x1_fp8_(model, x, margin=3.0) == 2
    assert isinstance(model[0], FP8Conv1x1) and isinstance(model[2], FP8Conv1x1)
    assert isinstance(model[3], nn.Conv2d)
    assert float(model[0].input_scale) == pytest.approx(3.0 * float(x.abs().amax()) / 448, rel=1e-6)
    assert float(model[2].input_scale) == pytest.approx(3.0 * float(mid.abs().amax()) / 448, rel=1e-6)
    zero = nn.Sequential(nn.Conv2d(16, 16, 1)).eval()
    quantize_1x1_fp8_(zero, torch.zeros(1, 16, 2, 2))
    assert float(zero[0].input_scale) == 1.0  # amax 0: scale 1, not 0


def test_a_module_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(16, 16, 1))
    with pytest.raises(ValueError, match=r"eval mode: call teacher\.eval\(\)"):
        quantize_1x1_fp8_(model, torch.randn(1, 16, 2, 2))


# ------------------------------------------------------------------------------------------------ (e) the engine


def fp8_config(**train: object) -> dict:
    return {
        "name": "fp8",
        "model": {"model": "deeplabv3", "backbone": "resnet18"},
        "teacher": {"model": "deeplabv3", "backbone": "resnet18"},
        "method": "cwd",
        "data": {"crop_size": [32, 64]},
        "train": {"batch_size": 2, "device": "cpu", "amp": "none", "teacher_precision": "fp8", **train},
    }


def fp8_buffers(teacher: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, m in teacher.named_modules() if isinstance(m, FP8Conv1x1)
            for k, v in m.state_dict().items()}


def test_step_runner_with_an_fp8_teacher_calibrates_deterministically_and_trains() -> None:
    cfg = config_from_dict(fp8_config())
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    runners = []
    for _ in range(2):
        torch.manual_seed(0)
        runners.append(StepRunner(cfg, 5, env, 2))
    a, b = runners
    batch = a.random_batch((32, 64))
    x, masks = a.prepare(batch)
    with pytest.raises(RuntimeError, match="quantize_teacher"):
        a.step(x, masks)  # not calibrated yet
    n = a.quantize_teacher(batch["image"])  # uint8, as the loader gives it
    assert n == sum(isinstance(m, FP8Conv1x1) for m in a.teacher.modules()) == 6  # R18: see the test above
    assert a.quantize_teacher(batch["image"]) == n  # once only
    assert b.quantize_teacher(x) == n  # already normalised: the same scales
    fa, fb = fp8_buffers(a.teacher), fp8_buffers(b.teacher)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    for _ in range(2):
        loss, terms = a.step(x, masks)
        assert torch.isfinite(loss) and "cwd" in terms


def test_amp_runner_is_unchanged_and_fp8_without_a_teacher_is_ignored() -> None:
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    amp = StepRunner(config_from_dict(fp8_config(teacher_precision="amp")), 5, env, 2)
    assert not amp.fp8_pending and amp.quantize_teacher(torch.zeros(2, 3, 32, 64, dtype=torch.uint8)) == 0
    assert not any(isinstance(m, FP8Conv1x1) for m in amp.teacher.modules())
    raw = fp8_config()
    raw.pop("teacher"), raw.pop("method")
    student_only = StepRunner(config_from_dict(raw), 5, env, 2)
    assert student_only.teacher is None and not student_only.fp8_pending
    assert student_only.quantize_teacher(torch.zeros(2, 3, 32, 64, dtype=torch.uint8)) == 0


def test_trainer_calibrates_on_the_first_training_images(synth_root: Path, tmp_path: Path) -> None:
    from cskd.data import build_dataset
    from cskd.engine.trainer import Trainer

    def raw(out: Path) -> dict:
        cfg = fp8_config(budget={"iterations": 2}, batch_size=2, log_every=1, val_every=1000, save_every=1000,
                         lr=0.01)
        cfg["data"] = {"dataset": "synthscapes", "root": str(synth_root), "crop_size": [32, 64], "workers": 0}
        cfg["eval"] = {"max_images": 1}
        cfg["output_dir"] = str(out)
        return cfg

    first = Trainer(config_from_dict(raw(tmp_path / "a")), progress=False)
    scales = fp8_buffers(first.runner.teacher)
    assert first.runner.teacher_fp8_convs == len({k.rsplit(".", 1)[0] for k in scales}) > 0
    result = first.fit()
    assert result.iterations == 2
    second = Trainer(config_from_dict(raw(tmp_path / "b")), progress=False)  # e.g. after a kill and resume
    again = fp8_buffers(second.runner.teacher)
    assert scales.keys() == again.keys() and all(torch.equal(scales[k], again[k]) for k in scales)
    # the calibration batch: the first batch_per_device training images, resized to the crop
    images = calibration_images(build_dataset("synthscapes", synth_root, "train"), 2, (32, 64))
    assert images.shape == (2, 3, 32, 64) and images.dtype == torch.uint8
    second._lock.release()


# ------------------------------------------------------------------------------------------------ (f) config


def test_teacher_precision_values_and_devices() -> None:
    with pytest.raises(ConfigError, match=r"train.teacher_precision.*'fp4'.*one of 'amp', 'fp8'"):
        config_from_dict({"train": {"teacher_precision": "fp4"}})
    assert config_from_dict({}).train.teacher_precision == "amp"
    check_teacher_precision("amp", torch.device("cuda:0"))  # nothing asked of the device
    check_teacher_precision("fp8", torch.device("cpu"))


def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_one_line_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError) as info:
        check_teacher_precision("fp8", torch.device("cuda:0"))
    text = str(info.value)
    assert "\n" not in text
    for part in ("train.teacher_precision", "cuda:0", "A100", "8.0", "8.9", "use amp"):
        assert part in text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_teacher_precision("fp8", torch.device("cuda:0"))  # Hopper


# ------------------------------------------------------------------------------------------------ benchmarks


def test_train_step_benchmark_with_set_and_an_fp8_teacher(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(BENCH))
    import train_step

    out = tmp_path / "step.json"
    train_step.main(["--device", "cpu", "--batch", "2", "--size", "32", "64", "--iters", "1", "--warmup", "1",
                     "--methods", "teacher,cwd", "--teacher", "deeplabv3", "resnet18", "--num-classes", "5",
                     "--dtype", "fp32", "--no-flops", "--set", "train.teacher_precision=fp8", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["meta"]["set"] == ["train.teacher_precision=fp8"]
    assert [r["method"] for r in res["rows"]] == ["teacher", "cwd"]
    assert "cwd:" in capsys.readouterr().out


def test_teacher_fp8_accuracy_tool(synth_root: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    import teacher_fp8

    torch.manual_seed(0)
    weights = tmp_path / "teacher.pth"
    torch.save(build_segmentor("deeplabv3", "resnet18", 13).state_dict(), weights)
    config = Path(__file__).resolve().parents[1] / "configs/synthscapes/cskd_deeplabv3-r101_deeplabv3-r18.yaml"
    out = tmp_path / "fp8.json"
    rc = teacher_fp8.main([
        "--config", str(config), "--set", f"teacher.weights={weights}", "--set", "teacher.backbone=resnet18",
        "--set", f"data.root={synth_root}", "--set", "data.synthetic=null", "--set", "data.crop_size=[32,64]",
        "--set", "train.batch_size=3", "--set", "eval.batch_size=1", "--max-images", "2", "--batches", "1",
        "--device", "cpu", "--out", str(out),
    ])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["fp8_convs"] > 0 and res["val_images"] == 2
    assert set(res["miou"]) == {"amp", "fp8", "delta"}
    assert res["miou"]["delta"] == pytest.approx(res["miou"]["fp8"] - res["miou"]["amp"])
    assert {"ce", "cwd", "cam", "pam"} <= set(res["terms"])  # the CSKD method's terms (CWD + CAM + PAM)
    assert res["terms"]["ce"]["rel_diff"] == 0.0  # the student's own term does not read the teacher
    assert 0 < res["logits_rel_rms"] < 0.1 and res["argmax_agreement"] > 0.9


def test_the_compile_cache_key_tells_an_fp8_teacher_apart_and_keeps_amp_keys() -> None:
    from cskd.engine.compile_cache import cache_key, key_parts

    def parts(precision: str) -> dict:
        return key_parts(config_from_dict(fp8_config(teacher_precision=precision)), torch.device("cpu"), 5, 2, 1)

    assert "teacher_precision" not in parts("amp")  # the keys of existing (amp) caches are unchanged
    assert parts("fp8")["teacher_precision"] == "fp8"
    assert cache_key(parts("amp")) != cache_key(parts("fp8"))


def test_a_compiled_run_compiles_the_fp8_teacher_only_after_quantizing() -> None:
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    amp = StepRunner(config_from_dict(fp8_config(teacher_precision="amp", compile=True, compile_cache=None)), 5,
                     env, 2)
    assert amp.teacher._compiled_call_impl is not None  # as before: compiled (lazily) at construction
    runner = StepRunner(config_from_dict(fp8_config(compile=True, compile_cache=None)), 5, env, 2)
    assert runner.teacher._compiled_call_impl is None  # not yet: the calibration's hooks must run eagerly
    runner.quantize_teacher(runner.random_batch((32, 64))["image"])
    assert runner.teacher._compiled_call_impl is not None
