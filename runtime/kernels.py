"""Local kernels for the rules that are more than "the op on local shards" (`passes.rules.Rule.kind`).

Each is a module, so the lowered program shows it as one explicit node with its collectives:
- `PartialBias`: a contraction split on its contracted dim gives partial sums; the bias is added on
  the axis's first rank only, so the sum over ranks adds it once.
- `VocabEmbedding`: the table split by rows (vocabulary); ids outside this rank's rows give zero
  rows, and the partial sums over ranks are the lookup (Megatron's VocabParallelEmbedding).
- `VocabCrossEntropy`: logits split by class: the max, the sum of exponentials and the target's
  logit are all-reduced (Megatron's vocab-parallel cross-entropy); backward is local.
- `BatchMeanLoss`: a mean over a split batch is each rank's sum over the global count of targets
  (an all-reduce of one number), exact even when ranks hold different numbers of ignored targets.
- `SyncBatchNorm`: batch statistics all-reduced over the axes that split the batch.
- `Dropout`: the mask one device would draw for the whole tensor, of which each rank keeps its part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import Replicate

from autopar.runtime.collectives import transform
from autopar.runtime.world import World
from autopar.vocab import Placements, shard_count


def _shard_index(world: World, axes: tuple[int, ...]) -> tuple[int, int]:
    """(index, count) of this rank's block of a dim cut over `axes`, outer axis first."""
    index, count = 0, 1
    for a in axes:
        index = index * world.axis_size(a) + world.axis_rank(a)
        count *= world.axis_size(a)
    return index, count


def _all_reduce(x: torch.Tensor, world: World, axes: tuple[int, ...], op=dist.ReduceOp.SUM) -> torch.Tensor:
    y = x.clone()
    for a in axes:
        dist.all_reduce(y, op=op, group=world.groups[a])
    return y


class _SumOverRanks(torch.autograd.Function):
    """Σ over ranks of a partial value used by split work downstream: the adjoint is the same sum."""

    @staticmethod
    def forward(ctx, x, world, axes):
        ctx.world, ctx.axes = world, axes
        return _all_reduce(x, world, axes)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous(), ctx.world, ctx.axes), None, None


class PartialBias(nn.Module):
    """linear / conv2d / addmm whose output is a partial sum: the bias joins on one rank only."""

    def __init__(self, op, world: World, axes: tuple[int, ...]) -> None:
        super().__init__()
        self.op, self.world, self.axes = op, world, axes
        self.first = all(world.axis_rank(a) == 0 for a in axes)

    def forward(self, *args, **kwargs):
        aten = torch.ops.aten
        if self.op is aten.addmm.default:
            bias, a, b = args[:3]
            out, dim = a @ b, -1
        else:
            x, weight, bias, *rest = args
            out = self.op(x, weight, None, *rest, **kwargs)
            dim = 1 if self.op is aten.conv2d.default else -1
        shape = [1] * out.dim()
        shape[dim] = -1
        return out + bias.view(shape) * (1.0 if self.first else 0.0)

    def extra_repr(self) -> str:
        return f"{self.op} with its bias on the first rank of axes {list(self.axes)}"


class VocabEmbedding(nn.Module):
    def __init__(self, world: World, axes: tuple[int, ...]) -> None:
        super().__init__()
        self.world, self.axes = world, axes

    def forward(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        index, _ = _shard_index(self.world, self.axes)
        rows = weight.shape[0]
        local = ids - index * rows
        inside = (local >= 0) & (local < rows)
        out = F.embedding(local * inside, weight)
        return out * inside.unsqueeze(-1).to(out.dtype)

    def extra_repr(self) -> str:
        return f"vocabulary-parallel lookup over axes {list(self.axes)}: partial sums"


def _denominator(target, weight, ignore_index, world, batch_axes):
    valid = target != ignore_index
    local = weight[target.clamp(min=0)][valid].sum() if weight is not None else valid.sum()
    total = local.to(torch.float64).reshape(1)
    return _all_reduce(total, world, batch_axes)[0] if batch_axes else total[0]


class BatchMeanLoss(nn.Module):
    """cross_entropy(mean) over a batch split on `axes`: local sum / global denominator."""

    def __init__(self, world: World, axes: tuple[int, ...]) -> None:
        super().__init__()
        self.world, self.axes = world, axes

    def forward(self, logits, target, weight=None, reduction=1, ignore_index=-100, label_smoothing=0.0,
                count=None):
        total = F.cross_entropy(logits, target, weight=weight, reduction="sum", ignore_index=ignore_index,
                                label_smoothing=label_smoothing)
        denominator = count if count is not None else _denominator(target, weight, ignore_index, self.world,
                                                                   self.axes)
        return total / denominator.to(total.dtype)

    def extra_repr(self) -> str:
        return (f"mean over a batch split on axes {list(self.axes)}: local sum over the whole batch's target "
                f"count (an input of the step, or an all-reduce)")


class _VocabCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, world, vocab_axes, batch_axes, reduction, ignore_index, count):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        index, _ = _shard_index(world, vocab_axes)
        width = x.shape[1]
        top = _all_reduce(x.max(dim=1).values, world, vocab_axes, dist.ReduceOp.MAX)
        local = target - index * width
        valid = target != ignore_index
        mine = (local >= 0) & (local < width) & valid
        local = local * mine
        picked = (x.gather(1, local.unsqueeze(1)).squeeze(1) - top) * mine
        softmax = (x - top.unsqueeze(1)).exp_()  # one new tensor: exponentials, then (in place) softmax
        total = _all_reduce(softmax.sum(dim=1), world, vocab_axes)
        picked = _all_reduce(picked, world, vocab_axes)
        rows = (total.log() - picked) * valid
        denominator = None
        if reduction == 1:
            denominator = count if count is not None else _denominator(target, None, ignore_index, world, batch_axes)
        ctx.save_for_backward(softmax.div_(total.unsqueeze(1)), local, mine, valid)
        ctx.reduction, ctx.denominator, ctx.dtype = reduction, denominator, logits.dtype
        if reduction == 0:
            return rows.to(logits.dtype)
        out = rows.sum()
        return (out / denominator.to(out.dtype) if reduction == 1 else out).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        """d loss / d logits = (softmax - onehot(target)) · scale per row: one product, then the
        target column's -scale added where this rank holds the target."""
        softmax, local, mine, valid = ctx.saved_tensors
        scale = grad.to(softmax.dtype)
        if ctx.reduction == 1:
            scale = scale / ctx.denominator.to(scale.dtype)
        scale = (scale if ctx.reduction == 0 else scale.expand(valid.shape)) * valid
        out = softmax * scale.unsqueeze(1)
        out.scatter_add_(1, local.unsqueeze(1), -(scale * mine).unsqueeze(1))
        return out.to(ctx.dtype), None, None, None, None, None, None, None


class VocabCrossEntropy(nn.Module):
    def __init__(self, world: World, vocab_axes: tuple[int, ...], batch_axes: tuple[int, ...]) -> None:
        super().__init__()
        self.world, self.vocab_axes, self.batch_axes = world, vocab_axes, batch_axes

    def forward(self, logits, target, weight=None, reduction=1, ignore_index=-100, label_smoothing=0.0,
                count=None):
        if weight is not None or label_smoothing:
            raise ValueError("vocabulary-parallel cross-entropy: found class weights or label smoothing, "
                             "required neither")
        if logits.dim() > 2:  # (N, C, d1, …) → (N·d1·…, C)
            target = target.reshape(-1)
            logits = logits.movedim(1, -1).reshape(target.shape[0], -1)
        return _VocabCrossEntropy.apply(logits, target, self.world, self.vocab_axes, self.batch_axes, reduction,
                                        ignore_index, count)

    def extra_repr(self) -> str:
        return (f"vocabulary-parallel cross-entropy over axes {list(self.vocab_axes)}: all-reduce of max, sum of "
                f"exponentials and target logit" + (f"; batch split on {list(self.batch_axes)}" if self.batch_axes
                                                     else ""))


class SyncBatchNorm(nn.Module):
    def __init__(self, world: World, axes: tuple[int, ...]) -> None:
        super().__init__()
        self.world, self.axes = world, axes

    def forward(self, x, weight=None, bias=None, running_mean=None, running_var=None, training=True,
                momentum=0.1, eps=1e-5, cudnn_enabled=True):
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64)
        count = _all_reduce(count.reshape(1), self.world, self.axes)[0].to(x.dtype)
        mean = _SumOverRanks.apply(x.sum(dims), self.world, self.axes) / count
        centered = x - mean.view(1, -1, *[1] * (x.dim() - 2))
        var = _SumOverRanks.apply((centered * centered).sum(dims), self.world, self.axes) / count
        if running_mean is not None and training:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                running_var.mul_(1 - momentum).add_(var.detach() * (count / (count - 1)), alpha=momentum)
        shape = (1, -1, *[1] * (x.dim() - 2))
        out = centered * torch.rsqrt(var + eps).view(shape)
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        return out

    def extra_repr(self) -> str:
        return f"batch norm with statistics all-reduced over axes {list(self.axes)}"


class Dropout(nn.Module):
    """`aten.dropout` on a placed tensor, drawing the mask one device draws. ATen's dropout (CPU;
    `_dropout_impl` in aten/src/ATen/native/Dropout.cpp) is

        noise = empty_like(x).bernoulli_(1 − p) / (1 − p);   y = x · noise

    Here `noise` is drawn for the whole tensor, in the memory order one device's tensor has (its
    strides' order, as `empty_like` keeps it), from the default generator, and this rank keeps its part of it. So every plan
    draws the same mask, the one-device mask, as long as every rank's generator holds the same state
    as the one device's (the compiler checks the ranks agree: `autopar.compiler`). Each rank draws
    the whole tensor, what a replicated tensor costs. On a GPU one device runs the fused kernel
    (`native_dropout`), whose mask comes from another stream: plans there agree with each other
    and train like one device in distribution, not bit for bit."""

    def __init__(self, world: World, placements: Placements, order: tuple[int, ...], masks: Masks | None = None,
                 name: str = "") -> None:
        """`order`: the dims from the outermost in memory to the innermost. `masks`: the step's masks
        drawn ahead (a pipeline's microbatches), this node's under `name`."""
        super().__init__()
        self.world, self.placements, self.order, self.masks, self.name = world, placements, order, masks, name

    def forward(self, x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        if p == 0 or not train or x.numel() == 0:
            return x
        if p == 1:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        if self.masks is not None and self.name in self.masks.noise:
            noise = self.masks.part(self.name)
        else:
            mesh = [self.world.axis_size(a) for a in range(len(self.placements))]
            noise = _noise([n * shard_count(self.placements, mesh, d) for d, n in enumerate(x.shape)], self.order,
                           p, x.dtype, x.device)
        local = transform(noise, tuple(Replicate() for _ in self.placements), self.placements, self.world)
        if local.untyped_storage().nbytes() > local.nbytes:  # keep (for backward) only this rank's part
            local = local.clone()
        return x * local

    def extra_repr(self) -> str:
        return f"placements={self.placements}"


def _noise(shape: list[int], order: tuple[int, ...], p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """bernoulli(1 − p) / (1 − p) of `shape`, laid out in memory in `order` (outermost first)."""
    noise = torch.empty([shape[d] for d in order], dtype=dtype, device=device)
    noise = noise.permute([order.index(d) for d in range(len(shape))])
    return noise.bernoulli_(1 - p).div_(1 - p)


@dataclass(frozen=True, slots=True)
class Drawn:
    """One dropout of the step: its node, the whole batch's shape and memory order, p, and the dim
    the microbatches cut (None when its tensor does not follow the batch)."""

    name: str
    shape: tuple[int, ...]
    order: tuple[int, ...]
    p: float
    dtype: torch.dtype
    batch_dim: int | None


class Masks:
    """A pipelined step's dropout masks, drawn as one device draws them. One device draws each
    dropout's mask for the whole batch, in the order of the forward; a pipeline runs each stage on
    its own ranks, microbatch by microbatch. So every rank draws the whole step's masks at its start,
    in the one device's order from the same generator state (`draw`: every rank's generator then
    advances as the one device's does), and each `Dropout` keeps its microbatch's part (`current`,
    set by the pipeline) of its node's mask. The price: every rank holds the step's masks, what one
    device holds."""

    def __init__(self, drawn: list[Drawn], microbatches: int) -> None:
        self.drawn, self.m = {d.name: d for d in drawn}, microbatches
        self.noise: dict[str, torch.Tensor] = {}
        self.current = 0

    def draw(self, device) -> None:
        self.noise = {d.name: _noise(list(d.shape), d.order, d.p, d.dtype, device) for d in self.drawn.values()}
        self.current = 0

    def part(self, name: str) -> torch.Tensor:
        drawn = self.drawn[name]
        noise = self.noise[name]
        return noise if drawn.batch_dim is None else noise.chunk(self.m, drawn.batch_dim)[self.current]
