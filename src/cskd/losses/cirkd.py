"""CIRKD: cross-image relational KD (Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic
Segmentation", CVPR 2022; github.com/winycg/CIRKD).

The student learns how the teacher relates pixels *across* images. Every relation is a row of similarities turned
into a distribution by a softmax; the student's rows match the teacher's in KL divergence.

- **Mini-batch pixel-to-pixel** (``cirkd_minibatch_pixel``), on the raw head features (channel counts may differ):
  for every ordered pair (i, j) of images of the per-device batch, including i = j,
  S_ij = f̂_iᵀ f̂_j (n×n, n = h·w, f̂ L2-normalised over channels);
  L = 1/B² Σ_ij 1/n Σ_rows KL(softmax(T_ij/τ) ‖ softmax(S_ij/τ)).
- **Memory pixel-to-pixel / pixel-to-region** (``cirkd_memory_pixel``, ``cirkd_memory_region``): the student's
  features go through a projection head (1×1 conv C_s→C_t, BN, ReLU, 1×1 conv C_t→C_t, no biases) and are
  normalised; anchors are all labelled pixels of the per-device batch. Contrast sets are drawn from per-class
  queues of normalised *teacher* embeddings: the same random ⌊P/K⌋+1 slots of every class queue (P = 4096 pixels,
  1024 regions in total). With z = ⟨anchor, entry⟩/τ and T the relation-KD temperature,
  L = T² · mean over anchors of KL(softmax(z_t/T) ‖ softmax(z_s/T)).
  After the loss, the batch's teacher embeddings enter the queues — gathered over all ranks under DDP, so every
  rank keeps the same memory: per image and class present, the normalised mean embedding (region queue) and up to
  16 randomly chosen pixels of that class (pixel queue); each class queue is a FIFO ring buffer.

Labels are brought to the feature size by nearest-neighbour sampling, as published; 255 (and anything outside
0…K−1) is ignored.

Published recipe (github.com/winycg/CIRKD @2d8ad0f, train_cirkd.py and train_scripts/train_cirkd/*): pixel-wise KD
on the logits (the registered ``kd`` loss, weight 1, τ = 1) plus this module with mini-batch weight 1, memory
weights 0.1 / 0.1 (0.01 / 0.01 on Pascal VOC), τ = 0.1, T = 1, queues of 20000 pixels and 2000 regions per class,
contrast sets of 4096 pixels and 1024 regions, 16 pixels per class and image enqueued. These are the defaults here.

Differences from the published code, and why:

- Pixel queue: the published enqueue indexes the image's pixels with a permutation of ``range(count of class c)``,
  so "class c" entries are pixels taken from the first positions of the image, whatever their class. Here they
  are pixels *of* class c, as the paper describes.
- Enqueue happens after the loss (MoCo order; the lead's spec), not before: the current batch is never its own
  contrast set. With 16 of 20000 slots per image and class this changes the contrast sets negligibly.
- True ring buffers: the published pixel pointer, when a write would cross the end, writes the *last* K slots and
  restarts at 0; here writes wrap around modulo the queue size (identical while 16 divides the queue size and
  every class has ≥ 16 pixels).
- Under DDP the published code all-gathers the full teacher feature maps and labels (B·C·h·w floats per rank) and
  loops over images and classes in Python; here each rank first reduces its batch to queue entries (K region
  vectors and K·16 pixel vectors per image, with presence flags) and gathers only those. Same entries, same order
  (rank-major, then image), a small fraction of the traffic.
- No host synchronisation: no ``nonzero``/``unique``/``.item()``/boolean-mask indexing. Ignored pixels stay in the
  anchor matrix with weight 0 (the mean is over labelled pixels, as published); an all-ignored batch gives 0.
- The KL terms are computed by a fused function (:func:`relation_kd`) that forms the gradient block by block in
  the forward pass and keeps only it for backward, instead of n×n (mini-batch) or anchors×contrast (memory)
  matrices per pair: the mini-batch term at B = 8, 64×128 features would otherwise hold ~34 GB for backward.
- ``nn.BatchNorm2d`` in the projection head (the published uses SyncBatchNorm); convert with
  ``nn.SyncBatchNorm.convert_sync_batchnorm`` when training on several GPUs to match.

Maps of other sizes: the student's features are resized to the teacher's h×w (bilinear, align_corners=False) before
the pixel relations and the memory projection, so both index the same pixels; labels go to that size by nearest.
Widths: relations are pixel×pixel (width-free); the memory terms project the student with their own head.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..distributed import all_gather_cat
from ..models.segmentor import SegOutput
from ._numerics import compute_dtype, no_autocast
from ._spatial import to_teacher_size
from .base import DistillLoss, check_non_negative, check_positive, register_loss
from .ifvd import class_one_hot, downsample_labels

#: Upper bound on the logits one block of :func:`relation_kd` materialises (2^26 float32 = 256 MiB per temporary).
BLOCK_ELEMENTS = 1 << 26

# ------------------------------------------------------------------------------------------------ relation KD


def _blocks(pairs: int, rows: int, cols: int, budget: int) -> Iterator[tuple[int, int, int, int]]:
    """(p0, p1, r0, r1) blocks whose logit matrices hold at most ``budget`` elements (at least one row)."""
    per_pair = rows * cols
    if per_pair <= budget:
        step = max(1, budget // per_pair)
        for p0 in range(0, pairs, step):
            yield p0, min(pairs, p0 + step), 0, rows
    else:
        step = max(1, budget // cols)
        for p0 in range(pairs):
            for r0 in range(0, rows, step):
                yield p0, p0 + 1, r0, min(rows, r0 + step)


def _pick(x: Tensor, p0: int, p1: int) -> Tensor:
    """Pairs p0…p1−1 of ``x``, or ``x`` itself when it has a single pair shared by all (broadcast)."""
    return x if x.shape[0] == 1 else x[p0:p1]


def _accumulate(grad: Tensor, p0: int, p1: int, r0: int, r1: int, block: Tensor) -> None:
    """Add a block's gradient; a shared (broadcast) operand sums it over the block's pairs."""
    if grad.shape[0] == 1:
        grad[0, r0:r1] += block.sum(dim=0)
    else:
        grad[p0:p1, r0:r1] += block


class _RelationKD(torch.autograd.Function):
    """See :func:`relation_kd`. The forward pass also forms the gradient with respect to the student's rows and
    columns (when they need one), block by block, so backward needs none of the large matrices."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, s_rows: Tensor, s_cols: Tensor, t_rows: Tensor, t_cols: Tensor, row_weight: Tensor,
        temperature: float, kd_temperature: float, block_elements: int,
    ) -> Tensor:
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        pairs = max(s_rows.shape[0], s_cols.shape[0])
        rows, cols = s_rows.shape[1], s_cols.shape[1]
        scale = 1.0 / (temperature * kd_temperature)
        # d(T²·KL)/d⟨s_r, s_c⟩ = w_r · T² · scale · (q_s − q_t)
        grad_scale = kd_temperature**2 * scale
        weight = row_weight.expand(pairs, rows)
        grad_rows = torch.zeros_like(s_rows, memory_format=torch.contiguous_format) if need_rows else None
        grad_cols = torch.zeros_like(s_cols, memory_format=torch.contiguous_format) if need_cols else None
        total = s_rows.new_zeros(())
        for p0, p1, r0, r1 in _blocks(pairs, rows, cols, block_elements):
            # Shared operands are expanded (a copy of at most rows×C) so that every product is a plain bmm with
            # a contiguous result: matmul's broadcasting folds the batch into an mm whose big result is transposed.
            sr, sc = _pick(s_rows, p0, p1)[:, r0:r1], _pick(s_cols, p0, p1)
            sr, sc = sr.expand(p1 - p0, -1, -1), sc.expand(p1 - p0, -1, -1)
            w = weight[p0:p1, r0:r1]
            log_qs = torch.log_softmax(torch.bmm(sr, sc.mT).mul_(scale), dim=-1)
            tr = _pick(t_rows, p0, p1)[:, r0:r1].expand(p1 - p0, -1, -1)
            t_logits = torch.bmm(tr, _pick(t_cols, p0, p1).expand(p1 - p0, -1, -1).mT)
            log_qt = torch.log_softmax(t_logits.mul_(scale), dim=-1)
            qt = log_qt.exp()
            kl = log_qt.sub_(log_qs).mul_(qt).sum(dim=-1)
            total = total + (w * kl).sum()
            if need_rows or need_cols:
                g = log_qs.exp_().sub_(qt).mul_((w * grad_scale)[..., None])
                if grad_rows is not None:
                    _accumulate(grad_rows, p0, p1, r0, r1, torch.bmm(g, sc))
                if grad_cols is not None:
                    _accumulate(grad_cols, p0, p1, 0, cols, torch.bmm(g.mT, sr))
        ctx.grads = (grad_rows, grad_cols)
        return total * kd_temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]  # noqa: ANN205
        grad_rows, grad_cols = ctx.grads
        ctx.grads = None
        return (
            grad_rows * grad_out if grad_rows is not None else None,
            grad_cols * grad_out if grad_cols is not None else None,
            None, None, None, None, None, None,
        )


def relation_kd(
    s_rows: Tensor,
    s_cols: Tensor,
    t_rows: Tensor,
    t_cols: Tensor,
    row_weight: Tensor,
    temperature: float,
    kd_temperature: float = 1.0,
    block_elements: int = BLOCK_ELEMENTS,
) -> Tensor:
    """Σ_p Σ_r w_pr · T² · KL(softmax(⟨t_pr, t_p·⟩/(τT)) ‖ softmax(⟨s_pr, s_p·⟩/(τT))).

    ``s_rows`` P×N×C_s and ``s_cols`` P×M×C_s are the student's (either may need a gradient), ``t_rows`` P×N×C_t
    and ``t_cols`` P×M×C_t the teacher's (constants); a leading size of 1 is shared by all P pairs, and
    ``row_weight`` broadcasts to P×N. Inputs should already be in the compute dtype (float32 or float64). Peak
    extra memory is a few blocks of ``block_elements`` logits plus the gradients of the student's inputs.
    """
    if s_rows.dim() != 3 or s_cols.dim() != 3 or t_rows.dim() != 3 or t_cols.dim() != 3:
        raise ValueError("relation_kd takes P×N×C rows and P×M×C columns")
    if s_rows.shape[:2] != t_rows.shape[:2] or s_cols.shape[:2] != t_cols.shape[:2]:
        raise ValueError(f"student and teacher relations differ in shape: rows {tuple(s_rows.shape)} / "
                         f"{tuple(t_rows.shape)}, columns {tuple(s_cols.shape)} / {tuple(t_cols.shape)}")
    if s_rows.shape[0] != s_cols.shape[0] and 1 not in (s_rows.shape[0], s_cols.shape[0]):
        raise ValueError(f"rows and columns hold {s_rows.shape[0]} and {s_cols.shape[0]} pairs; they must agree "
                         f"or one must be 1")
    return _RelationKD.apply(s_rows, s_cols, t_rows.detach(), t_cols.detach(), row_weight.detach(),
                             float(temperature), float(kd_temperature), int(block_elements))


def minibatch_pixel_relation(
    student: Tensor, teacher: Tensor, temperature: float, pool: int = 1, block_elements: int = BLOCK_ELEMENTS
) -> Tensor:
    """CIRKD's mini-batch pixel-to-pixel term for B×C×h×w maps (C may differ between student and teacher).

    ``pool`` > 1 average-pools both maps over pool×pool cells first (ceil mode), an option of the published code
    (off in its recipe) that divides the cost by pool⁴."""
    if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(f"CIRKD needs student and teacher maps of one batch and spatial size, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    b = student.shape[0]
    with no_autocast(student):
        dtype = compute_dtype(student, teacher)
        fs, ft = student.to(dtype), teacher.to(dtype)
        if pool > 1:
            fs = F.avg_pool2d(fs, kernel_size=pool, stride=pool, ceil_mode=True)
            ft = F.avg_pool2d(ft, kernel_size=pool, stride=pool, ceil_mode=True)
        s = F.normalize(fs.flatten(2), dim=1).mT  # B×n×C_s
        t = F.normalize(ft.flatten(2), dim=1).mT
        n = s.shape[1]
        weight = s.new_full((1, 1), 1.0 / (n * b * b))
        # Image i against every image j: i's positions are the rows, shared by the B pairs; j's are the columns.
        terms = [
            relation_kd(s[i : i + 1], s, t[i : i + 1], t, weight, temperature, 1.0, block_elements)
            for i in range(b)
        ]
        return torch.stack(terms).sum()


# ------------------------------------------------------------------------------------------------ memory


@torch.no_grad()
def fifo_enqueue(queue: Tensor, ptr: Tensor, entries: Tensor, keep: Tensor) -> None:
    """Append, per class, the kept entries (in order) to a ring buffer, overwriting the oldest.

    ``queue`` K×M×C and ``ptr`` K (int64, next slot to write) are updated in place; ``entries`` K×E×C,
    ``keep`` K×E (bool). Vectorised and free of host syncs: each class writes the same number of slots,
    min(E, M) consecutive ones from its pointer; slots beyond its count of kept entries get their own old value
    back. These slots are distinct, so the scatter is deterministic. If a class has more than M new entries, only
    its last M survive, as a FIFO would leave it.
    """
    k, m, _ = queue.shape
    e = entries.shape[1]
    if entries.shape[0] != k or keep.shape != entries.shape[:2]:
        raise ValueError(f"entries {tuple(entries.shape)} / keep {tuple(keep.shape)} do not fit queue "
                         f"{tuple(queue.shape)}")
    if e == 0:
        return
    width = min(e, m)
    count = keep.sum(dim=1)  # K
    # Kept entries first, in their original order (stable sort of 0 = kept, 1 = dropped).
    order = torch.sort((~keep).to(torch.int32), dim=1, stable=True).indices
    skip = (count - width).clamp_min(0)  # entries overwritten within this same call
    rank = skip[:, None] + torch.arange(width, device=queue.device)  # K×width, rank among kept entries
    is_new = rank < count[:, None]
    cls = torch.arange(k, device=queue.device)[:, None].expand(k, width)
    dest = (ptr[:, None] + rank) % m
    new = entries[cls, order.gather(1, rank.clamp(max=e - 1))].to(queue.dtype)
    queue[cls, dest] = torch.where(is_new[..., None], new, queue[cls, dest])
    ptr.copy_((ptr + count) % m)


def sample_class_pixels(labels: Tensor, num_classes: int, per_class: int) -> tuple[Tensor, Tensor]:
    """Up to ``per_class`` random pixels of every class in every image, without replacement.

    ``labels`` B×n (values outside 0…K−1 belong to no class). Returns ``index`` B×K×per_class (pixel positions)
    and ``keep`` B×K×per_class (False where the class has fewer pixels; those indices are meaningless).
    One sort per image: keys class·2³² + a random 32-bit number group the pixels by class in random order.
    """
    b, n = labels.shape
    lab = torch.where((labels >= 0) & (labels < num_classes), labels, torch.full_like(labels, num_classes))
    counts = (lab[..., None] == torch.arange(num_classes + 1, device=labels.device)).sum(dim=1)  # B×(K+1)
    keys = (lab << 32) + torch.randint(0, 1 << 32, (b, n), device=labels.device, dtype=torch.int64)
    order = keys.argsort(dim=1)
    starts = counts.cumsum(dim=1) - counts
    j = torch.arange(per_class, device=labels.device)
    pos = starts[:, :num_classes, None] + j  # B×K×per_class
    keep = j < counts[:, :num_classes, None]
    index = order.gather(1, pos.clamp(max=n - 1).flatten(1)).view(b, num_classes, per_class)
    return index, keep


# ------------------------------------------------------------------------------------------------ the loss


@register_loss("cirkd")
class CIRKDLoss(DistillLoss):
    """CIRKD's relational terms: ``{"cirkd_minibatch_pixel", "cirkd_memory_pixel", "cirkd_memory_region"}``,
    each already weighted. A term whose weight is 0 is neither computed nor returned, and a memory term at weight 0
    has no queue (with both memory weights 0 there is no projection head either: the mini-batch form alone).

    Memory state — ``pixel_queue`` K×M_p×C_t, ``region_queue`` K×M_r×C_t (float32) and their ``*_ptr`` — is made of
    persistent buffers: checkpoints carry it (K = 19, C_t = 256: 389 MB + 39 MB at the published sizes). Queues
    start as random unit vectors (as published) and are updated only in training mode.
    """

    needs_targets = True

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        minibatch_pixel_weight: float = 1.0,
        memory_pixel_weight: float = 0.1,
        memory_region_weight: float = 0.1,
        contrast_temperature: float = 0.1,
        contrast_kd_temperature: float = 1.0,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixel_contrast_size: int = 4096,
        region_contrast_size: int = 1024,
        pixels_per_class: int = 16,
        minibatch_pool: int = 1,
    ) -> None:
        super().__init__()
        check_non_negative(minibatch_pixel_weight=minibatch_pixel_weight, memory_pixel_weight=memory_pixel_weight,
                           memory_region_weight=memory_region_weight)
        if minibatch_pixel_weight == memory_pixel_weight == memory_region_weight == 0:
            raise ValueError("all three weights are 0: the loss would do nothing")
        check_positive(contrast_temperature=contrast_temperature, contrast_kd_temperature=contrast_kd_temperature)
        for name, count in (("pixel_memory_size", pixel_memory_size), ("region_memory_size", region_memory_size),
                            ("pixel_contrast_size", pixel_contrast_size),
                            ("region_contrast_size", region_contrast_size),
                            ("pixels_per_class", pixels_per_class), ("minibatch_pool", minibatch_pool),
                            ("num_classes", num_classes), ("student_channels", student_channels),
                            ("teacher_channels", teacher_channels)):
            if count < 1:
                raise ValueError(f"{name} must be ≥ 1, got {count}")
        self.num_classes = int(num_classes)
        self.minibatch_pixel_weight = float(minibatch_pixel_weight)
        self.memory_pixel_weight = float(memory_pixel_weight)
        self.memory_region_weight = float(memory_region_weight)
        self.contrast_temperature = float(contrast_temperature)
        self.contrast_kd_temperature = float(contrast_kd_temperature)
        self.pixels_per_class = int(pixels_per_class)
        self.minibatch_pool = int(minibatch_pool)
        # The published trainer passes ⌊P/K⌋ + 1 slots per class to its memory module.
        self.pixel_contrast_per_class = pixel_contrast_size // num_classes + 1
        self.region_contrast_per_class = region_contrast_size // num_classes + 1

        self.project: nn.Module | None = None
        if self.uses_memory:
            self.project = nn.Sequential(
                nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                nn.BatchNorm2d(teacher_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
            )
        if self.memory_pixel_weight > 0:
            self.register_buffer("pixel_queue", _random_unit(num_classes, pixel_memory_size, teacher_channels))
            self.register_buffer("pixel_queue_ptr", torch.zeros(num_classes, dtype=torch.long))
        if self.memory_region_weight > 0:
            self.register_buffer("region_queue", _random_unit(num_classes, region_memory_size, teacher_channels))
            self.register_buffer("region_queue_ptr", torch.zeros(num_classes, dtype=torch.long))

    @property
    def uses_memory(self) -> bool:
        return self.memory_pixel_weight > 0 or self.memory_region_weight > 0

    def extra_repr(self) -> str:
        parts = [f"classes={self.num_classes}", f"τ={self.contrast_temperature}"]
        for kind, per_class in (("pixel", self.pixel_contrast_per_class), ("region", self.region_contrast_per_class)):
            queue = getattr(self, f"{kind}_queue", None)
            if queue is not None:
                parts.append(f"{kind}_queue={tuple(queue.shape)}, contrast/class={min(per_class, queue.shape[1])}")
        return ", ".join(parts)

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        ft = teacher.features.detach()
        fs = to_teacher_size(student.features, ft)
        if fs.shape[0] != ft.shape[0] or fs.shape[-2:] != ft.shape[-2:]:
            raise ValueError(f"CIRKD needs student and teacher features of one batch and spatial size, got "
                             f"{tuple(fs.shape)} and {tuple(ft.shape)}")
        terms: dict[str, Tensor] = {}
        if self.minibatch_pixel_weight > 0:
            terms["cirkd_minibatch_pixel"] = self.minibatch_pixel_weight * minibatch_pixel_relation(
                fs, ft, self.contrast_temperature, self.minibatch_pool)
        if self.uses_memory:
            if targets is None:
                raise ValueError("cirkd's memory terms need the labels (targets); the engine passes them when "
                                 "needs_targets is set")
            terms.update(self._memory_terms(fs, ft, downsample_labels(targets, tuple(fs.shape[-2:]))))
        return terms

    def _memory_terms(self, fs: Tensor, ft: Tensor, labels: Tensor) -> dict[str, Tensor]:
        assert self.project is not None
        projected = self.project(fs)
        terms = {}
        with no_autocast(projected):
            dtype = compute_dtype(projected, ft)
            s = F.normalize(projected.to(dtype), dim=1)
            t = F.normalize(ft.to(dtype), dim=1)
            c = s.shape[1]
            anchors_s = s.permute(0, 2, 3, 1).reshape(1, -1, c)
            anchors_t = t.permute(0, 2, 3, 1).reshape(1, -1, c)
            valid = ((labels >= 0) & (labels < self.num_classes)).flatten()
            # Mean over labelled anchors without selecting them (no host sync); 0 if there are none.
            weight = (valid.to(dtype) / valid.sum().clamp_min(1))[None]
            for name, w, queue, per_class in (
                ("cirkd_memory_pixel", self.memory_pixel_weight, "pixel_queue", self.pixel_contrast_per_class),
                ("cirkd_memory_region", self.memory_region_weight, "region_queue", self.region_contrast_per_class),
            ):
                if w > 0:
                    bank = _sample_slots(getattr(self, queue), per_class).to(dtype)[None]
                    terms[name] = w * relation_kd(anchors_s, bank, anchors_t, bank, weight,
                                                  self.contrast_temperature, self.contrast_kd_temperature)
        if self.training:
            self._enqueue(t.detach(), labels)
        return terms

    @torch.no_grad()
    def _enqueue(self, t: Tensor, labels: Tensor) -> None:
        """Queue entries from normalised teacher features ``t`` B×C×h×w and labels B×h×w, gathered over ranks."""
        k, per = self.num_classes, self.pixels_per_class
        b, c = t.shape[:2]
        x = t.flatten(2)  # B×C×n
        lab = labels.flatten(1)
        payload = []
        if self.memory_region_weight > 0:
            one_hot = class_one_hot(lab, k, x.dtype)
            region = F.normalize((x @ one_hot).mT, dim=-1)  # B×K×C: normalised class mean (= normalised sum)
            present = one_hot.sum(dim=1) > 0
            payload.append(torch.cat([region, present[..., None].to(x.dtype)], dim=-1).flatten(1))
        if self.memory_pixel_weight > 0:
            index, keep = sample_class_pixels(lab, k, per)
            pixels = x.gather(2, index.flatten(1)[:, None, :].expand(b, c, k * per))
            pixels = pixels.view(b, c, k, per).permute(0, 2, 3, 1)  # B×K×per×C
            payload.append(torch.cat([pixels, keep[..., None].to(x.dtype)], dim=-1).flatten(1))
        # One collective for both queues: entries and presence flags travel together.
        gathered = all_gather_cat(torch.cat(payload, dim=1))
        offset = 0
        if self.memory_region_weight > 0:
            block = gathered[:, : k * (c + 1)].view(-1, k, c + 1).transpose(0, 1)  # K×(W·B)×(C+1)
            offset = k * (c + 1)
            fifo_enqueue(self.region_queue, self.region_queue_ptr, block[..., :c], block[..., c] > 0.5)
        if self.memory_pixel_weight > 0:
            block = gathered[:, offset:].reshape(-1, k, per, c + 1).transpose(0, 1).reshape(k, -1, c + 1)
            fifo_enqueue(self.pixel_queue, self.pixel_queue_ptr, block[..., :c], block[..., c] > 0.5)


def _random_unit(k: int, m: int, c: int) -> Tensor:
    return F.normalize(torch.randn(k, m, c), dim=2)


def _sample_slots(queue: Tensor, per_class: int) -> Tensor:
    """The same ``per_class`` random slots (without replacement) of every class queue, flattened class-major to
    (K·per_class)×C. ``rand().argsort()`` rather than ``randperm`` keeps the draw on the device."""
    slots = torch.rand(queue.shape[1], device=queue.device).argsort()[:per_class]
    return queue.index_select(1, slots).flatten(0, 1)


__all__ = [
    "BLOCK_ELEMENTS", "CIRKDLoss", "fifo_enqueue", "minibatch_pixel_relation", "relation_kd",
    "sample_class_pixels",
]
