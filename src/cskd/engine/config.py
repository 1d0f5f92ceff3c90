"""The experiment config: one YAML file per experiment, validated on load, overridable from the command line.

A file has the blocks ``data``, ``model`` (the network being trained: a teacher, a baseline student or a distilled
student), ``teacher`` (only for distillation), ``losses`` (the distillation terms; empty for training alone),
``train`` and ``eval``. Every key is typed; an unknown key, a wrong type or a bad value is an error naming the file,
the key and what is allowed. ``--set train.lr=0.01 losses.1.lambda_cam=0.5`` overrides any key (values are parsed
as YAML, so numbers, booleans, null and lists work).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from ..schema import build_dataclass, validate_kwargs
from ..errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SynthConfig:
    """The built-in synthetic street scenes to generate under ``data.root`` if absent (or made with other
    parameters): the main job and the tests need no data on disk."""

    train: int = 2000
    val: int = 200
    size: tuple[int, int] = (256, 512)
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthscapes"
    root: str = "data/synthscapes"
    train_split: str = "train"
    val_split: str = "val"
    crop_size: tuple[int, int] = (512, 1024)
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    workers: int = 4
    decode: Literal["auto", "cpu", "gpu"] = "cpu"
    """Where training images are decoded: ``cpu`` in the loader workers; ``gpu`` JPEGs batched through nvJPEG on the
    training GPU, scaled, cropped and flipped there (the same draws; labels stay on the CPU); ``auto`` = gpu when
    training on CUDA and every training image is a JPEG (VOC, ADE20K, COCO-Stuff), else cpu. Validation always
    decodes on the CPU. The default stays ``cpu`` until the GPU path is measured on a GPU (docs/benchmarks.md §4).
    See cskd/data/gpu_decode.py."""
    skip_bad: bool = False
    """Skip unreadable / invalid samples with a counted warning instead of stopping."""
    synthetic: SynthConfig | None = None
    """For dataset ``synthscapes``: generate the data under ``root`` first if it is not there."""
    cache: str | None = None
    """A folder for decoded samples (raw uint8, memory-mapped; 4 bytes a pixel on disk): filled on first use, then
    read instead of decoding the files (:mod:`cskd.data.cache`). Null: decode every time."""

    def __post_init__(self) -> None:
        if min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < min ≤ max, got {self.scale_range}")
        if self.workers < 0:
            raise ValueError(f"workers must be ≥ 0, got {self.workers}")
        if self.synthetic is not None and self.dataset != "synthscapes":
            raise ValueError(f"data.synthetic only applies to dataset 'synthscapes', not {self.dataset!r}")


@dataclass(frozen=True)
class ModelConfig:
    model: str = "deeplabv3"
    backbone: str = "resnet18"
    aux: bool | None = None
    """Auxiliary FCN head; null = the backbone's published choice (ResNets: yes, MobileNets and timm: no)."""
    pretrained_base: str | None = None
    """ImageNet backbone file (e.g. resnet18-imagenet.pth) to start from."""
    weights: str | None = None
    """A full segmentor checkpoint (cskd or published layout) to start from / to use as the teacher."""

    def __post_init__(self) -> None:
        from ..models.backbones import check_backbone_name
        from ..models.segmentor import canonical_model_name

        canonical_model_name(self.model)  # raises ValueError naming the choices
        check_backbone_name(self.backbone)  # likewise (and for timm:<name>, the closest timm names)


@dataclass(frozen=True)
class LossConfig:
    """One distillation term: ``name`` (a registered loss) and its hyper-parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetConfig:
    """Train for a number of iterations, or for a number of seconds of training-step time (GPU seconds on a GPU).

    With ``gpu_seconds`` the iteration count is fixed up front from a timed calibration of this method's own
    iterations fed by the training loader (``calibration_steps``, at least one per worker plus one, after
    ``warmup_steps`` plus the loader's start-up queue), so that the poly LR schedule has its total."""

    iterations: int | None = None
    """Default (neither set): 40,000, the published schedule."""
    gpu_seconds: float | None = None
    warmup_steps: int = 5
    calibration_steps: int = 50
    """Enough to average out the jitter of launch-bound steps (docs/benchmarks.md, "Time budgets")."""

    def __post_init__(self) -> None:
        if self.iterations is None and self.gpu_seconds is None:
            object.__setattr__(self, "iterations", 40000)
        if self.iterations is not None and self.gpu_seconds is not None:
            raise ValueError("set exactly one of budget.iterations and budget.gpu_seconds")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"budget.iterations must be ≥ 1, got {self.iterations}")
        if self.gpu_seconds is not None and self.gpu_seconds <= 0:
            raise ValueError(f"budget.gpu_seconds must be > 0, got {self.gpu_seconds}")
        if self.calibration_steps < 1 or self.warmup_steps < 0:
            raise ValueError("budget.calibration_steps must be ≥ 1 and budget.warmup_steps ≥ 0")


def _triton_switch(key: str, value: bool | None, device: torch.device) -> bool:
    """A ``train`` switch for one of cskd's Triton kernels, settled for ``device``: null is on where the kernels
    run (CUDA with Triton), true where they cannot run is a config error."""
    from .._triton import available

    if value is None:
        return device.type == "cuda" and available(device)
    if value and not available(device):
        raise ConfigError(f"train.{key}=true needs CUDA with Triton (train.device is {device}); set it to null (on "
                          "CUDA only) or false")
    return value


@dataclass(frozen=True)
class TrainConfig:
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    batch_size: int = 16
    """Total over all processes (the published recipe: 16 over 2 GPUs)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD as published for the CNN students; AdamW as CIRKDV2 publishes for MobileViT (lr 9e-4, wd 0.01) and
    SegFormer (lr 2e-4, wd 1e-4)."""
    lr: float = 0.02
    momentum: float = 0.9
    """SGD only."""
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW only."""
    eps: float = 1e-8
    """AdamW only."""
    no_decay_norm_bias: bool | None = None
    """No weight decay on norm weights, biases and position terms; null = yes for AdamW, no for SGD (the published
    SGD recipes decay every parameter)."""
    poly_power: float = 0.9
    aux_weight: float = 0.4
    seed: int = 0
    deterministic: bool = False
    """Deterministic kernels (slower); with it, a run and its kill-and-resume twin give identical losses on CPU. On
    CUDA, ops that have no deterministic kernel there (the 2-D cross-entropy's forward, bilinear upsampling's
    backward, adaptive pooling's backward) warn once, naming the op, and run as usual."""
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    """auto: bf16 autocast on CUDA, none on CPU. fp16 uses a GradScaler."""
    teacher_precision: Literal["amp", "fp8"] = "amp"
    """amp: the frozen teacher runs in the autocast dtype (``amp``), as the student does. fp8: its eligible 1×1
    convolutions (stride 1, channels multiples of 16) run as FP8 GEMMs (float8_e4m3fn, ``torch._scaled_mm``) after
    a calibration forward on the first ``batch_size / processes`` training images (cskd/models/fp8.py); the 3×3
    convolutions stay in the autocast dtype. Needs CUDA compute capability ≥ 8.9 (Ada, Hopper) on GPUs; ignored
    without a teacher (no distillation). Opt-in: on an H200 it saved 2.6 % of the teacher-only step and cost a
    trained DeepLabV3-R101 teacher 0.22 mIoU points (docs/benchmarks.md §8)."""
    teacher_conv_fusion: bool = True
    """On CUDA, the frozen teacher's conv epilogues (bias, ReLU, a ResNet block's residual add) run inside cuDNN's
    convolution call instead of as separate elementwise kernels (cskd/models/epilogue.py): the same function,
    with the epilogue added in float32 before rounding to the autocast dtype. On an H200 it took a DeepLabV3-R101
    teacher's compiled forward from 20.2 to 17.1 ms and the compiled CSKD step from 44.8 to 41.5 ms (B = 8,
    512×1024; docs/benchmarks.md §8). Not applied with teacher_precision fp8, nor off CUDA."""
    teacher_stream: Literal["off", "forward", "pipeline"] = "off"
    """On CUDA, run the frozen teacher's forward on a second CUDA stream, so that its compute-bound convolutions
    share the GPU with the student's memory-bound kernels: "forward" alongside the student's forward of the same
    batch; "pipeline" also alongside the previous step's backward (the Trainer hands each step the next batch, and
    the step launches that batch's teacher forward before its own backward). The same values either way; only the
    kernels' order on the GPU changes. Refused with CUDA graphs ("reduce-overhead"); without a teacher it does
    nothing; off CUDA "pipeline" runs the next batch's teacher forward before the backward, in order. On an H200
    the B = 8 CSKD step went 41.1 → 40.9 ms ("forward") and → 43.3 ms ("pipeline"): the step's kernels already
    fill the GPU (docs/benchmarks.md §8), so "off" is the default."""
    teacher_graph: bool | None = None
    """Replay the frozen teacher's forward as one CUDA graph per input shape (cskd/engine/cuda_graph.py), captured
    at its first call: its kernels are then launched by one call instead of one by one from Python. The same
    kernels, so the same values. null: on CUDA, unless compile_mode is "reduce-overhead" (the teacher then runs in
    torch.compile's own CUDA graphs); true elsewhere is a config error. On an H200 the compiled B = 8 CSKD step
    went 42.5 [49.3] → 36.9 [38.5] ms p50 [p90] and its CWD step 36.1 → 35.5 ms; the graph's own memory keeps the
    teacher's activations, +0.7 GiB at that size (docs/benchmarks.md §8)."""
    teacher_compile: Literal["whole", "head"] = "whole"
    """What of the teacher torch.compile compiles when the run compiles: the whole network, or only its head (and
    aux head), the backbone running its fused cuDNN convolutions eagerly (inside the teacher's CUDA graph). On an
    H200 "head" took 9 s off a cold start-up's compile (78.7 → 69.5 s) but 1 ms onto the B = 8 CWD step (35.5 →
    36.5 ms), so "whole" is the default (docs/benchmarks.md §8)."""
    channels_last: bool = True
    compile: bool | None = None
    """torch.compile the trained model, the teacher and the losses; null = on CUDA yes, on the CPU no."""
    compile_cache: str | None = "auto"
    """Folder of the persistent compile cache (one sub-folder per torch / device / model-and-method key, see
    cskd/engine/compile_cache.py); "auto" = ``$XDG_CACHE_HOME/cskd/compile`` (``~/.cache/cskd/compile``); null =
    torch's own default (/tmp/torchinductor_$USER), untouched. Used only when compiling."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode of the model, the teacher and (unless loss_compile_mode) the losses. "reduce-overhead"
    (CUDA graphs over the whole step) removed the B = 8 CSKD step's host-bound slow phases in each H200 run
    measured; opt-in because at the configs' B = 16 the host has slack and the real loop ran 1 % slower under it
    (docs/benchmarks.md §8)."""
    loss_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    """For the distillation losses (null: as compile_mode). Their many small kernels make them launch-bound; CUDA
    graphs ("reduce-overhead") take the launch cost away: on an H200 the B = 8 CSKD step's p90 went 43.5 → 39.8 ms
    at the same p50 (one run; docs/benchmarks.md §8)."""
    cudnn_benchmark: bool = True
    fused_ce: bool | None = False
    """The cross-entropy of the upsampled logits (main and aux head) fused: one product along the height, one
    Triton kernel for the columns, the softmax, the loss and its gradient, one product back; nothing of full
    resolution is stored (cskd/engine/fused_ce.py). The same function to float32 rounding, deterministic. null:
    on CUDA where Triton is installed (it comes with PyTorch's CUDA builds); false: the tensor version (two matrix
    products, then the library's cross-entropy, compiled with the model); true where it cannot run is a config
    error. Opt-in until timed on a GPU: the first version of the kernel (gathers from the class-strided logits)
    took 2.5 ms per call on an H100 against 1.8 ms for the compiled tensor version; the current one has not been
    timed there yet (docs/benchmarks.md §8)."""
    fused_maxpool: bool | None = False
    """The trained student's 3×3/2 max-pools (the ResNet stem's) as two Triton kernels that save each window's
    winning tap as one int8, where inductor's backward recomputes every window's argmax (0.95 ms per step on an
    H200, ~9× its bandwidth bound). Exactly nn.MaxPool2d, ties and NaN included (cskd/models/maxpool.py). null:
    on CUDA where Triton is installed; true where it cannot run is a config error. Opt-in until timed on a GPU."""
    dilated_convs: Literal["auto", "native", "space_to_batch", "row_taps"] = "auto"
    """How the dilated 3×3 convolutions of the student and the teacher run: the library's dilated kernels
    ("native"); exactly the same convolutions as dense ones on a space-to-batch rearrangement; or, where ≥ 10 % of
    their taps' rows read only padding (ASPP's d = 12–36 on a 64-row map), as one matrix product per tap row over
    the rows it reaches, switching only the convs that take that path at the training crop ("row_taps";
    cskd/models/atrous.py; ``benchmarks/conv_levers.py`` and ``kernel_levers.py`` time them). "auto": row_taps on
    CUDA, native elsewhere; a model that cannot run row taps' shape-only pass keeps native, with a warning. On an
    H200 row taps took the compiled CWD step (B = 8, 512×1024) from 38.7 to 36.3 ms and the CSKD step's p10 from
    39.6 to 37.0 ms (docs/benchmarks.md §8); the CPU keeps the library's kernels."""
    log_every: int = 50
    val_every: int = 4000
    val_points: int | None = None
    """Evaluate this many times, evenly spread (overrides val_every; for curves of runs whose length is only known
    after a time-budget calibration)."""
    save_every: int = 1000
    device: str = "auto"
    sync_bn: bool = True
    """Under torchrun with several processes, convert the trained model's BatchNorm to SyncBatchNorm."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every", "val_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas) or self.eps <= 0:
            raise ValueError(f"train.betas must lie in [0, 1) and train.eps be > 0, got {self.betas}, {self.eps}")
        if self.teacher_stream != "off" and "reduce-overhead" in (self.compile_mode, self.loss_compile_mode):
            raise ValueError(f"train.teacher_stream={self.teacher_stream} runs the teacher on a second CUDA stream, "
                             "which CUDA graphs over the step (compile_mode reduce-overhead) do not take: set "
                             "teacher_stream: off or another compile_mode")
        if self.teacher_graph and self.compile_mode == "reduce-overhead":
            raise ValueError("train.teacher_graph=true captures the teacher's forward in a CUDA graph, which "
                             "compile_mode reduce-overhead already does with its own: set teacher_graph: null or false")

    def fuses_teacher_epilogues(self, device: torch.device) -> bool:
        """Whether a teacher run on ``device`` gets its conv epilogues fused (``teacher_conv_fusion``): on CUDA, in
        the autocast dtype (not fp8). The runner fuses on this answer and the compile cache keys on it."""
        return self.teacher_conv_fusion and device.type == "cuda" and self.teacher_precision == "amp"

    def graphs_teacher(self, device: torch.device) -> bool:
        """Whether the teacher's forward is replayed as a CUDA graph (``teacher_graph`` settled for ``device``)."""
        if self.teacher_graph is None:
            return device.type == "cuda" and self.compile_mode != "reduce-overhead"
        return self.teacher_graph

    def fuses_ce(self, device: torch.device) -> bool:
        """Whether the cross-entropy runs as the fused kernel (``fused_ce`` settled for ``device``)."""
        return _triton_switch("fused_ce", self.fused_ce, device)

    def fuses_maxpool(self, device: torch.device) -> bool:
        """Whether the student's stem max-pools run as the Triton kernels (``fused_maxpool`` settled for
        ``device``). The runner swaps on this answer and the compile cache keys on it."""
        return _triton_switch("fused_maxpool", self.fused_maxpool, device)

    def resolved_dilated_convs(self, device: torch.device) -> str:
        """``dilated_convs`` with "auto" settled for ``device``: row_taps on CUDA, native elsewhere. The runner
        rewrites on this answer and the compile cache keys on it."""
        if self.dilated_convs == "auto":
            return "row_taps" if device.type == "cuda" else "native"
        return self.dilated_convs


@dataclass(frozen=True)
class EvalConfig:
    mode: Literal["whole", "slide"] = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    batch_size: int = 1
    max_images: int | None = None
    """Evaluate on the first N images of the split only (quick checks; the report says so)."""
    compile: bool = False
    """Validate with the compiled student (when train.compile is on). Off: eagerly, because the full-size images
    and eval mode would compile a second, dynamic-shape graph at the first validation (tens of seconds cold) for
    a pass that runs a few times per run."""
    fold_batchnorm: bool = False
    """Validate a frozen copy of the student, made at each validation as the teacher is made for training
    (cskd/models/epilogue.py ``frozen_copy``): BatchNorms folded into their convs, on CUDA the conv epilogues (bias,
    residual add, ReLU) inside cuDNN's call, weights in the autocast dtype. Eager validation then skips the BN and
    ReLU passes over every activation. The same function up to rounding, so a near-tie pixel may flip its class.
    Not with ``compile`` (which validates the compiled student itself)."""

    def __post_init__(self) -> None:
        if self.compile and self.fold_batchnorm:
            raise ConfigError("eval.fold_batchnorm validates an eager frozen copy of the student, eval.compile the "
                              "compiled student itself: set one of them to false")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str | None = None
    """Where checkpoints and logs go; default runs/<name>."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    method: str | None = None
    """A named method from :mod:`cskd.losses.methods` (e.g. ``cskd``, ``cwd``, ``baseline``): fills ``losses``."""
    losses: tuple[LossConfig, ...] = ()
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    @property
    def is_distillation(self) -> bool:
        return bool(self.losses)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["losses"] = [{"name": lc.name, **lc.params} for lc in self.losses]
        return _plain(out)

    def digest(self) -> str:
        """A short hash of the resolved config (what a comparison report records per run)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------ loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], parsed value); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: cannot parse the value: {e}") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = out
        for i, part in enumerate(path[:-1]):
            nxt = _child(node, part, text)
            if nxt is None:
                nxt = {}
                _set(node, part, nxt, text)
            node = nxt
        _set(node, path[-1], value, text)
    return out


def _child(node: Any, part: str, text: str) -> Any:
    if isinstance(node, list):
        try:
            return node[int(part)]
        except (ValueError, IndexError):
            raise ConfigError(f"--set {text!r}: {part!r} is not an index of a list of {len(node)}") from None
    if isinstance(node, dict):
        return node.get(part)
    raise ConfigError(f"--set {text!r}: cannot descend into a value of type {type(node).__name__}")


def _set(node: Any, part: str, value: Any, text: str) -> None:
    if isinstance(node, list):
        try:
            node[int(part)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"--set {text!r}: {part!r} is not an index of a list of {len(node)}") from None
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"--set {text!r}: cannot set a key inside a value of type {type(node).__name__}")


def _read_one(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of blocks (data, model, train, ...)")
    return data


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else (lists included) is replaced."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, resolving ``base: [files...]`` (paths relative to the file; later bases and the file
    itself win) so that a recipe is written once and each experiment states only what differs."""
    path = Path(path).resolve() if _seen else Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other in a cycle")
    data = _read_one(path)
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: key 'base' must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for b in bases:
        if not (path.parent / b).is_file():
            raise ConfigError(f"{path}: its base file {b!r} does not exist (looked for {path.parent / b})")
        merged = merge(merged, read_yaml(path.parent / b, _seen + (path.resolve(),)))
    return merge(merged, data)


def config_from_dict(raw: Mapping[str, Any], where: str = "config") -> ExperimentConfig:
    """Validate a plain mapping (as read from YAML) into an :class:`ExperimentConfig`."""
    raw = dict(raw)
    losses_raw = raw.pop("losses", None) or []
    if not isinstance(losses_raw, list):
        raise ConfigError(f"{where}: key 'losses' must be a list of {{name: ..., <params>}} entries")
    method = raw.get("method")
    if method is not None:
        from ..losses.methods import METHODS

        if method not in METHODS:
            raise ConfigError(f"{where}: unknown method '{method}'; choose one of {', '.join(METHODS)} (or list "
                              "'losses' yourself)")
        recipe = [dict(lc) for lc in METHODS[method].losses]
        if losses_raw and [_loss_name(e) for e in losses_raw] != [lc["name"] for lc in recipe]:
            raise ConfigError(f"{where}: set either 'method' ({method}) or 'losses', not both (a method's own "
                              f"terms, {', '.join(lc['name'] for lc in recipe) or 'none'}, in that order, may be "
                              "listed with other hyper-parameters)")
        losses_raw = losses_raw or recipe
    cfg = build_dataclass(ExperimentConfig, raw, where)
    losses = []
    for i, entry in enumerate(losses_raw):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ConfigError(f"{where}: losses[{i}] must be a mapping with a 'name' key, got {entry!r}")
        params = {k: v for k, v in entry.items() if k != "name"}
        losses.append(LossConfig(name=str(entry["name"]), params=_check_loss_params(entry["name"], params, where, i)))
    cfg = replace(cfg, losses=tuple(losses))
    if cfg.losses and cfg.teacher is None:
        raise ConfigError(f"{where}: distillation losses are listed but there is no 'teacher' block")
    return cfg


def _check_loss_params(name: str, params: dict[str, Any], where: str, index: int) -> dict[str, Any]:
    from ..losses import LOSSES, _load_all
    from ..losses.base import CONTEXT_ARGS, STAGE_CONTEXT_ARGS

    _load_all()
    if name not in LOSSES:
        raise ConfigError(f"{where}: losses[{index}]: unknown loss '{name}'; registered: {', '.join(sorted(LOSSES))}")
    return validate_kwargs(LOSSES[name], params, where, prefix=f"losses[{index}]",
                           reserved=CONTEXT_ARGS + STAGE_CONTEXT_ARGS)


def _loss_name(entry: Any) -> Any:
    return entry.get("name") if isinstance(entry, Mapping) else None


def expand_method(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """When ``--set losses.N.key=value`` addresses the terms of a ``method:`` config that lists no ``losses``,
    write the method's recipe out as ``losses`` first, so that the override changes that term (the method's name
    stays: its terms with other hyper-parameters)."""
    method = raw.get("method")
    touches = any(text.split("=", 1)[0].split(".")[0] == "losses" for text in overrides)
    if not touches or raw.get("losses") or not isinstance(method, str):
        return raw
    from ..losses.methods import METHODS

    if method not in METHODS:
        return raw  # config_from_dict names the unknown method
    return {**raw, "losses": [dict(lc) for lc in METHODS[method].losses]}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    raw = apply_overrides(expand_method(read_yaml(path), overrides), overrides)
    where = str(path) + (" (with --set overrides)" if overrides else "")
    return config_from_dict(raw, where)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = [
    "BudgetConfig", "DataConfig", "SynthConfig", "EvalConfig", "ExperimentConfig", "LossConfig", "ModelConfig", "TrainConfig",
    "apply_overrides", "config_from_dict", "load_config", "merge", "parse_override", "read_yaml", "save_config",
]
