"""How much does an FP8 teacher (``train.teacher_precision: fp8``) change what distillation sees?

Builds the config's teacher the engine's way twice (StepRunner: BN folded, weights in the autocast dtype), once in
``amp`` and once in ``fp8`` (calibrated on the first training images, as the Trainer does), then

- scores both on the validation split with the engine's evaluation (``--max-images`` for the first N only);
- compares their logits (relative RMS difference, argmax agreement) on a few training batches (the training
  transform, seeded), and every loss term of the config's method computed against the same student with each
  teacher's outputs (same weights, same dropout draws; ``ce`` / ``aux`` do not read the teacher: 0 by design).

Prints a summary and writes JSON (``--out``). Eager (``train.compile=false`` unless ``--set`` says otherwise).

    python benchmarks/teacher_fp8.py --config configs/synthscapes/cskd_deeplabv3-r101_deeplabv3-r18.yaml \\
        --set teacher.weights=runs/teacher_deeplabv3-r101/last.pt --max-images 50 --out teacher_fp8.json
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from cskd.data import build_dataset, build_eval_transform, build_train_transform
from cskd.distributed import DistEnv
from cskd.engine.config import ExperimentConfig, load_config
from cskd.engine.runner import StepRunner, calibration_images
from cskd.evaluation import evaluate
from cskd.evaluation.evaluate import collate_eval


def build_runner(cfg: ExperimentConfig, precision: str, num_classes: int, device: torch.device,
                 calibration: torch.Tensor) -> StepRunner:
    cfg = replace(cfg, train=replace(cfg.train, teacher_precision=precision))
    torch.manual_seed(cfg.train.seed)  # the same student and loss modules in both runners
    runner = StepRunner(cfg, num_classes, DistEnv(0, 1, 0, device), cfg.train.batch_size)
    runner.quantize_teacher(calibration)  # 0 for amp
    return runner


def score(runner: StepRunner, val_set: Any, n: int, cfg: ExperimentConfig) -> float:
    loader = DataLoader(Subset(val_set, range(n)), batch_size=cfg.eval.batch_size, shuffle=False, num_workers=0,
                        collate_fn=collate_eval)
    e = cfg.eval
    assert runner.teacher is not None
    metrics = evaluate(runner.teacher, loader, num_classes=runner.num_classes, device=runner.device, mode=e.mode,
                       crop_size=e.crop_size, stride=e.stride, scales=e.scales, flip=e.flip,
                       amp_dtype=runner.amp_dtype, progress=False, channels_last=runner.channels_last)
    return float(metrics.miou)


def training_batches(train_set: Any, cfg: ExperimentConfig, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of the training transform (seeded: the same every run)."""
    d = cfg.data
    transform = build_train_transform(d.crop_size, d.scale_range, d.hflip)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.train.seed)
    b = cfg.train.batch_size
    out = []
    for k in range(count):
        items = [transform(train_set[(k * b + i) % len(train_set)]) for i in range(b)]
        out.append({"image": torch.stack([s["image"].as_subclass(torch.Tensor) for s in items]),
                    "mask": torch.stack([s["mask"].as_subclass(torch.Tensor) for s in items])})
    torch.random.set_rng_state(gen_state)
    return out


def compare_terms(amp: StepRunner, fp8: StepRunner, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Every loss term with the amp and the fp8 teacher's outputs, against the amp runner's student."""
    step = amp.step_module
    step.train()
    values: dict[str, list[tuple[float, float]]] = {}
    rms, agree = [], []
    for k, batch in enumerate(batches):
        x, masks = amp.prepare(batch)
        t_amp, t_fp8 = amp.teacher_forward(x), fp8.teacher_forward(x)
        assert t_amp is not None and t_fp8 is not None
        la, lf = t_amp.logits.float(), t_fp8.logits.float()
        rms.append(float((lf - la).norm() / la.norm().clamp_min(1e-12)))
        agree.append(float((lf.argmax(1) == la.argmax(1)).float().mean()))
        state = copy.deepcopy(step.state_dict())  # memory banks, BN statistics: both calls start from the same
        terms = []
        for teacher_out in (t_amp, t_fp8):
            step.load_state_dict(state)
            torch.manual_seed(1000 + k)  # the same dropout draws
            with torch.no_grad(), amp.autocast():
                _, t = step(x, masks, teacher_out)
            terms.append({name: float(v.float()) for name, v in t.items()})
        step.load_state_dict(state)
        for name in terms[0]:
            values.setdefault(name, []).append((terms[0][name], terms[1][name]))
    out: dict[str, Any] = {}
    for name, pairs in values.items():
        mean_a = sum(a for a, _ in pairs) / len(pairs)
        mean_f = sum(f for _, f in pairs) / len(pairs)
        out[name] = {
            "amp": mean_a, "fp8": mean_f, "rel_diff": abs(mean_f - mean_a) / max(abs(mean_a), 1e-12),
            "max_rel_diff": max(abs(f - a) / max(abs(a), 1e-12) for a, f in pairs),
        }
    return {"terms": out, "logits_rel_rms": sum(rms) / len(rms), "argmax_agreement": sum(agree) / len(agree)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a distillation config (teacher block and method)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override; repeatable")
    p.add_argument("--max-images", type=int, default=None, help="score the first N validation images only")
    p.add_argument("--batches", type=int, default=2, help="training batches for the loss-term comparison")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    cfg = load_config(args.config, ["train.compile=false", *args.set])
    if not cfg.is_distillation:
        raise SystemExit(f"{args.config}: not a distillation config (no teacher, no losses)")
    device = torch.device(args.device)
    d = cfg.data
    if d.synthetic is not None:
        from cskd.data.synthetic import ensure

        ensure(d.root, d.synthetic.train, d.synthetic.val, d.synthetic.size, d.synthetic.seed)
    train_set = build_dataset(d.dataset, d.root, d.train_split, cache=d.cache)
    val_set = build_dataset(d.dataset, d.root, d.val_split, build_eval_transform(), cache=d.cache)
    calibration = calibration_images(train_set, cfg.train.batch_size, d.crop_size)
    amp = build_runner(cfg, "amp", train_set.num_classes, device, calibration)
    fp8 = build_runner(cfg, "fp8", train_set.num_classes, device, calibration)

    limit = args.max_images if args.max_images is not None else cfg.eval.max_images
    n = len(val_set) if limit is None else min(limit, len(val_set))
    miou_amp, miou_fp8 = score(amp, val_set, n, cfg), score(fp8, val_set, n, cfg)
    comparison = compare_terms(amp, fp8, training_batches(train_set, cfg, args.batches))
    result = {
        "config": args.config, "set": list(args.set), "device": str(device), "torch": torch.__version__,
        "teacher": [cfg.teacher.model, cfg.teacher.backbone] if cfg.teacher else None,
        "amp_dtype": str(amp.amp_dtype).replace("torch.", "") if amp.amp_dtype else "fp32",
        "fp8_convs": fp8.teacher_fp8_convs, "val_images": n,
        "miou": {"amp": miou_amp, "fp8": miou_fp8, "delta": miou_fp8 - miou_amp},
        "batches": args.batches, **comparison,
    }
    print(f"teacher {result['teacher']}, {result['amp_dtype']} vs fp8 ({result['fp8_convs']} 1×1 convs in FP8), "
          f"{n} val images")
    print(f"mIoU: amp {100 * miou_amp:.2f} %, fp8 {100 * miou_fp8:.2f} %, Δ {100 * (miou_fp8 - miou_amp):+.2f} pt")
    print(f"teacher logits: relative RMS difference {100 * comparison['logits_rel_rms']:.2f} %, argmax agreement "
          f"{100 * comparison['argmax_agreement']:.2f} % ({args.batches} training batches)")
    print("| term | amp | fp8 | rel. diff (of the means) | max rel. diff (per batch) |")
    print("|---|---|---|---|---|")
    for name, t in comparison["terms"].items():
        print(f"| {name} | {t['amp']:.6g} | {t['fp8']:.6g} | {100 * t['rel_diff']:.3f} % | "
              f"{100 * t['max_rel_diff']:.3f} % |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
