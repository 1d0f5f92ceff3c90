"""Checking an exported model against eager PyTorch: the inputs (random, real or synthetic images), the
comparison and its tolerance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2.functional import resize

from ..data.io import IMAGE_SUFFIXES, read_image
from ..data.normalize import normalize
from ..errors import DataError, first_line
from .exporters import GraphRunner
from .wrapper import LABEL_DTYPES, GraphOptions, InferenceWrapper



@dataclass(frozen=True)
class Tolerance:
    """When an exported model counts as reproducing the PyTorch model (fp32 on both sides).

    - ``max |Δlogit| ≤ atol + rtol · max |logit|``: exporters fold BatchNorm into the convolutions, pick other
      convolution algorithms and fuse the resize, which reorders fp32 sums: that moves logits by ~1e-6 to 1e-5
      of their scale. Bugs an export can have (normalisation, channel order, ``align_corners``, a dropped or
      frozen-at-one-size layer) move them by a sizable fraction of it. 1e-3 sits two orders of magnitude from
      both. ``atol`` only keeps the bound positive for a model whose logits are all ~0.
    - argmax agreement ≥ ``min_agreement`` (99.9 %): a pixel whose two best classes are within the tolerance
      may flip legitimately; a flip where the reference's margin exceeds twice the tolerance cannot come from
      differences within it, so any such *decisive* flip is an error too. For a labels graph, which has no
      logits to compare, these two checks are the verification.
    """

    rtol: float = 1e-3
    atol: float = 1e-5
    min_agreement: float = 0.999


@dataclass(frozen=True)
class Check:
    """One verification input: how the exported model's output compares with eager PyTorch."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float | None
    """max |Δlogit|; None for a labels graph."""
    tolerance: float
    agreement: float
    """Fraction of pixels whose argmax class matches."""
    decisive_disagreements: int
    """Pixels whose class differs although the reference's top-2 margin exceeds 2 × tolerance."""
    min_agreement: float
    problem: str = ""
    """A structural mismatch (shape, dtype), if any."""

    @property
    def passed(self) -> bool:
        if self.problem or self.decisive_disagreements or self.agreement < self.min_agreement:
            return False
        return self.max_abs_diff is None or self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        dims = "×".join(str(s) for s in self.shape)
        parts = [f"{self.name} ({dims})"]
        if self.problem:
            return f"{parts[0]}: {self.problem}  FAILED"
        if self.max_abs_diff is not None:
            parts.append(f"max |Δlogit| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.2e})")
        parts.append(f"argmax agreement {100 * self.agreement:.3f}%")
        if self.decisive_disagreements:
            parts.append(f"{self.decisive_disagreements} decisive flips")
        return ", ".join(parts) + ("  ok" if self.passed else "  FAILED")


def compare_outputs(
    name: str, exported: Tensor, reference_logits: Tensor, options: GraphOptions, tolerance: Tolerance = Tolerance()
) -> Check:
    """Score the exported model's output against the eager model's (float32) logits for the same input."""
    ref = reference_logits.float()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    tol = tolerance.atol + tolerance.rtol * scale
    shape = tuple(ref.shape)
    want_shape = (shape[0], *shape[2:]) if options.argmax else shape
    want_dtype = LABEL_DTYPES[options.labels_dtype] if options.argmax else torch.float32
    common = {"name": name, "shape": tuple(exported.shape), "tolerance": tol, "min_agreement": tolerance.min_agreement}
    if tuple(exported.shape) != want_shape or exported.dtype != want_dtype:
        problem = (f"output {exported.dtype} {tuple(exported.shape)}, expected {want_dtype} {want_shape}")
        return Check(max_abs_diff=None, agreement=0.0, decisive_disagreements=0, problem=problem, **common)
    ref_labels = ref.argmax(dim=1)
    if options.argmax:
        labels, diff = exported.long(), None
    else:
        labels, diff = exported.argmax(dim=1), float((exported.float() - ref).abs().max())
    differ = labels != ref_labels
    agreement = 1.0 - float(differ.float().mean())
    decisive = 0
    if bool(differ.any()) and ref.shape[1] > 1:
        top2 = ref.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        decisive = int((differ & (margin > 2 * tol)).sum())
    return Check(max_abs_diff=diff, agreement=agreement, decisive_disagreements=decisive, **common)


def _image_files(sources: Sequence[str | Path], limit: int) -> list[Path]:
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{src}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            files.extend(found[:limit])
        elif src.is_file():
            files.append(src)
        else:
            raise DataError(f"{src}: no such image file or folder (--verify-images)")
    return files


def _resized(path: Path, size: tuple[int, int]) -> Tensor:
    """1×3×H×W uint8 RGB of the file, resized (bilinear, antialiased) to ``size``."""
    return resize(read_image(path), list(size), antialias=True).unsqueeze(0).contiguous()


def synthetic_images(count: int, size: tuple[int, int], seed: int = 0) -> list[Tensor]:
    """``count`` synthetic street scenes (1×3×H×W uint8, :mod:`cskd.data.synthetic`): images with the structure
    of photographs (large regions, edges, thin objects), on which a trained model's logits behave as on real ones."""
    from ..data.synthetic import render_sample

    images = (render_sample(seed, "val", i, size)[0] for i in range(count))
    return [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).unsqueeze(0).contiguous() for im in images]


def verification_inputs(
    size: tuple[int, int],
    *,
    images: Sequence[str | Path] | None = None,
    count: int = 2,
    dynamic: bool = False,
    seed: int = 0,
) -> list[tuple[str, Tensor]]:
    """Named uint8 N×3×H×W inputs: one random image, ``count`` real images (``images``: files or folders; default:
    synthetic street scenes) at ``size``, and with ``dynamic`` a random batch of 2 at another, odd size."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    inputs = [("random", torch.randint(0, 256, (1, 3, h, w), generator=gen, dtype=torch.uint8))]
    if images:
        inputs += [(p.name, _resized(p, size)) for p in _image_files(images, count)]
    else:
        inputs += [(f"synthetic #{i + 1}", im) for i, im in enumerate(synthetic_images(count, size, seed))]
    if dynamic:
        other = (max(9, h * 3 // 4 + 3), max(9, w * 3 // 4 + 5))
        inputs.append(("random, other size", torch.randint(0, 256, (2, 3, *other), generator=gen, dtype=torch.uint8)))
    return inputs


def verify(
    runner: GraphRunner,
    reference: InferenceWrapper,
    inputs: Sequence[tuple[str, Tensor]],
    tolerance: Tolerance = Tolerance(),
) -> list[Check]:
    """Run ``runner`` (the exported model) and ``reference`` (eager) on each uint8 input; ``float`` graphs get the
    input normalised first. Returns one :class:`Check` per input; raising is the caller's choice."""
    checks = []
    for name, image in inputs:
        x = normalize(image) if reference.options.input_format == "float" else image
        with torch.no_grad():
            expected = reference.logits(x)
        try:
            got = runner(x)
        except Exception as e:  # a runtime failing on a valid input is a verification failure, not a crash
            checks.append(Check(name, tuple(x.shape), None, 0.0, 0.0, 0, tolerance.min_agreement,
                                problem=f"the exported model failed to run: {first_line(e)}"))
            continue
        checks.append(compare_outputs(name, got, expected, reference.options, tolerance))
    return checks


__all__ = ["Check", "Tolerance", "compare_outputs", "synthetic_images", "verification_inputs", "verify"]
