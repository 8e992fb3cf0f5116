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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from autopar.runtime.world import World


def _shard_index(world: World, axes: tuple[int, ...]) -> tuple[int, int]:
    """(index, count) of this rank's block of a dim cut over `axes`, outer axis first."""
    index, count = 0, 1
    for a in axes:
        index = index * world.axis_size(a) + world.axis_rank(a)
        count *= world.axis_size(a)
    return index, count


def _all_reduce(x: torch.Tensor, world: World, axes: tuple[int, ...], op=dist.ReduceOp.SUM) -> torch.Tensor:
    y = x.clone()
    for a in axes if not world.timing else ():
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

