"""Export to ONNX / TorchScript, its built-in verification, the CLI, and the latency benchmark (tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cskd.cli import main
from cskd.deploy import exporters as ex
from cskd.deploy.export import export_model
from cskd.deploy.graph import adaptive_avg_pool2d_portable
from cskd.deploy.verification import Check, compare_outputs, verification_inputs
from cskd.deploy.wrapper import GraphOptions, InferenceWrapper
from cskd.errors import DataError, ExportError
from cskd.models import build_segmentor

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = (64, 64)


@pytest.fixture(scope="module")
def psp() -> torch.nn.Module:
    """PSPNet-R18, 3 classes: pyramid pooling with bins that do not divide the map, logits far from all-equal."""
    torch.manual_seed(0)
    return build_segmentor("pspnet", "resnet18", 3).eval()


def _reference_logits(model: torch.nn.Module, image_u8: torch.Tensor) -> torch.Tensor:
    """Written from the definition: ImageNet normalisation, the model, bilinear resize (align_corners=True)."""
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    x = ((image_u8.double() / 255.0 - mean) / std).float()
    with torch.no_grad():
        logits = model(x, with_aux=False).logits
    return F.interpolate(logits, size=image_u8.shape[-2:], mode="bilinear", align_corners=True)


def _image(batch: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------- graph pieces


@pytest.mark.parametrize("h,w", [(8, 16), (7, 13), (64, 128), (5, 3)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_portable_pooling_matches_adaptive_avg_pool(h: int, w: int, bins: int) -> None:
    x = torch.randn(2, 4, h, w, dtype=torch.float64)
    torch.testing.assert_close(adaptive_avg_pool2d_portable(x, bins), F.adaptive_avg_pool2d(x, bins))


def test_wrapper_folds_normalisation_and_resizes(psp: torch.nn.Module) -> None:
    image = _image(2, 40, 56)
    expected = _reference_logits(psp, image)
    logits = InferenceWrapper(psp, GraphOptions())(image)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    normalised = ((image.double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1).double())
                  / torch.tensor(STD).view(1, 3, 1, 1).double()).float()
    from_float = InferenceWrapper(psp, GraphOptions(input_format="float"))(normalised)
    torch.testing.assert_close(from_float, expected, atol=1e-5, rtol=1e-5)
    labels = InferenceWrapper(psp, GraphOptions(argmax=True))(image)
    assert labels.dtype == torch.uint8 and labels.shape == (2, 40, 56)
    assert torch.equal(labels.long(), expected.argmax(1))
    wide = InferenceWrapper(psp, GraphOptions(argmax=True, labels_dtype="int64"))(image)
    assert wide.dtype == torch.int64


def test_compare_outputs_flags_decisive_flips_only() -> None:
    ref = torch.zeros(1, 3, 100, 100)
    ref[:, 0] = 1.0  # class 0 wins everywhere by a margin of 1
    ref[:, 1, 0, 0] = 1.0 - 1e-6  # ... except one near-tie
    opts = GraphOptions(argmax=True)
    tie_flip = torch.zeros(1, 100, 100, dtype=torch.uint8)
    tie_flip[0, 0, 0] = 1
    assert compare_outputs("tie", tie_flip, ref, opts).passed
    decisive = torch.zeros(1, 100, 100, dtype=torch.uint8)
    decisive[0, 5, 5] = 2
    check = compare_outputs("flip", decisive, ref, opts)
    assert check.agreement == pytest.approx(0.9999) and check.decisive_disagreements == 1 and not check.passed
    off = ref + 0.01  # logits graph: 1 % of the logit scale is 10× the tolerance
    assert not compare_outputs("drift", off, ref, GraphOptions()).passed
    assert not compare_outputs("dtype", decisive.long(), ref, opts).passed  # int64 where uint8 was promised


# ---------------------------------------------------------------------------------------------------- export


def test_onnx_float_input_agrees_with_pytorch(psp: torch.nn.Module, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    result = export_model(psp, tmp_path / "m.onnx", fmt="onnx", size=SIZE, options=GraphOptions(input_format="float"))
    assert [c.passed for c in result.checks] == [True, True, True]  # random + 2 synthetic scenes
    proto = onnx.load(str(result.path))
    assert min(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["logits"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["input_format"] == "float" and json.loads(meta["num_classes"]) == 3

    image = _image(1, *SIZE, seed=7)
    expected = _reference_logits(psp, image)
    x = ((image.double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1).double())
         / torch.tensor(STD).view(1, 3, 1, 1).double()).float()
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])
    assert got.shape == (1, 3, *SIZE)
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.999


def test_onnx_dynamic_uint8_labels_runs_other_sizes(psp: torch.nn.Module, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    result = export_model(psp, tmp_path / "m.onnx", fmt="onnx", size=SIZE, dynamic=True,
                          options=GraphOptions(argmax=True))
    assert result.checks[-1].shape == (2, 51, 53) and all(c.passed for c in result.checks)
    proto = onnx.load(str(result.path))
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3] and proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in proto.graph.output] == ["labels"]

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    image = _image(3, 40, 72, seed=3)  # another batch, another size, 40/8 = 5 rows: bins 2, 3 and 6 overlap
    labels = session.run(None, {"image": image.numpy()})[0]
    assert labels.dtype == np.uint8 and labels.shape == (3, 40, 72)
    expected = _reference_logits(psp, image).argmax(1)
    assert (torch.from_numpy(labels).long() == expected).float().mean() >= 0.999


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream; the format still works
def test_torchscript_round_trip(psp: torch.nn.Module, tmp_path: Path) -> None:
    result = export_model(psp, tmp_path / "m.pt", fmt="torchscript", size=SIZE, dynamic=True)
    assert all(c.passed for c in result.checks)
    extra = {"cskd.json": ""}
    loaded = torch.jit.load(str(result.path), _extra_files=extra)
    assert json.loads(extra["cskd.json"])["output_name"] == "logits"
    image = _image(1, 48, 80, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), _reference_logits(psp, image), atol=1e-5, rtol=1e-5)


def test_failed_verification_raises_and_removes_file(
    psp: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def shifted(path: Path, fmt: str):  # noqa: ANN202 - a runner whose output is off by 5 % of the logit scale
        run = ex.torchscript_runner(path)
        return lambda x: run(x) * 1.05

    monkeypatch.setattr(ex, "load_runner", shifted)
    path = tmp_path / "bad.pt"
    with pytest.raises(ExportError, match="does not reproduce") as info:
        export_model(psp, path, fmt="torchscript", size=(32, 32), verify_count=1)
    assert "max |Δlogit|" in str(info.value) and "FAILED" in str(info.value)
    assert not path.exists()


def test_verification_inputs_from_files(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    inputs = verification_inputs((16, 24), images=[folder], count=2)
    assert [name for name, _ in inputs] == ["random", "0.png", "1.png"]
    assert all(t.dtype == torch.uint8 and t.shape == (1, 3, 16, 24) for _, t in inputs)
    assert int(inputs[2][1][0, 0, 0, 0]) == 40
    with pytest.raises(DataError, match="no such image"):
        verification_inputs((16, 24), images=[tmp_path / "missing"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read"):
        verification_inputs((16, 24), images=[tmp_path / "broken.png"])


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_export_checkpoint_end_to_end(psp: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    ckpt = tmp_path / "student.pth"
    dataset = {"name": "toy", "num_classes": 3, "class_names": ["road", "car", "sky"], "palette": [[0, 0, 0]] * 3}
    torch.save({"model": psp.state_dict(), "spec": psp.spec.to_dict(), "dataset": dataset, "iteration": 7}, ckpt)
    assert main(["export", str(ckpt), "--size", "64", "64"]) == 0
    out = capsys.readouterr().out
    written = tmp_path / "student_64x64.onnx"
    assert written.is_file() and str(written) in out
    assert '"image" uint8 1×3×64×64' in out and '"logits" float32 1×3×64×64' in out
    assert out.count("argmax agreement") == 3 and "FAILED" not in out
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(written)).metadata_props}
    assert json.loads(meta["class_names"]) == ["road", "car", "sky"] and meta["checkpoint"] == "student.pth"


def test_cli_bare_state_dict(psp: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bare = tmp_path / "weights.pt"
    torch.save(psp.state_dict(), bare)
    assert main(["export", str(bare), "--size", "32", "32", "--format", "torchscript"]) == 1
    assert "--model" in capsys.readouterr().err
    out = tmp_path / "custom" / "net.pt"
    args = ["export", str(bare), "--size", "32", "32", "--format", "torchscript", "--model", "pspnet",
            "--backbone", "resnet18", "--out", str(out), "--verify-count", "1"]
    assert main(args) == 0
    assert out.is_file() and "agreement 100.000%" in capsys.readouterr().out


def test_cli_bench_latency_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    js, md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["bench-latency", "--models", "deeplabv3:mobilenetv2", "--sizes", "64x128", "--backends",
            "eager,onnxruntime", "--device", "cpu", "--warmup", "1", "--iters", "2", "--out", str(js),
            "--markdown", str(md)]
    assert main(args) == 0
    rows = json.loads(js.read_text())["results"]
    assert [r["backend"] for r in rows] == ["eager", "onnxruntime"]
    assert all(r["timed"] == 2 and 0 < r["median_ms"] <= r["p90_ms"] and r["throughput"] > 0 for r in rows)
    assert rows[0]["params_m"] == pytest.approx(3.2, abs=0.2) and rows[0]["gflops"] > 0
    table = md.read_text()
    assert table.count("| DeepLabV3-MobileNetV2 | 64×128 |") == 2 and table in capsys.readouterr().out
    assert main(["bench-latency", "--sizes", "64by128", "--device", "cpu"]) == 1
    assert main(["bench-latency", "--backends", "tensorrt", "--device", "cpu"]) == 1
    assert "tensorrt" in capsys.readouterr().err


def test_check_describe_reports_numbers() -> None:
    check = Check("random", (1, 3, 8, 8), 2e-6, 1e-4, 1.0, 0, 0.999)
    text = check.describe()
    assert "2.00e-06" in text and "100.000%" in text and text.endswith("ok")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_latency_cuda_tiny() -> None:
    from cskd.deploy.latency import benchmark

    results = benchmark([("pspnet", "resnet18")], [(64, 128)], ["eager", "compile"], device="cuda", warmup=2,
                        iters=3)
    assert [(r.backend, r.device, r.precision, r.channels_last) for r in results] == [
        ("eager", "cuda", "bf16", True), ("compile", "cuda", "bf16", True)]
    assert all(r.timed == 3 and r.median_ms > 0 for r in results)
