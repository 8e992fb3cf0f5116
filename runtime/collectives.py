"""Placement changes on local tensors, with the gradient's change in backward.

Takes a local shard, its placement and the placement wanted (one per mesh axis); gives the new
local shard, executing the steps of `passes.reshard.steps` with torch.distributed collectives over
the mesh axes' process groups. `Reshard` is the autograd node the lowered program uses: its
forward changes `src → dst`, its backward changes the gradient from the placement the consumer's
backward produces (`grad_in`) to the one the producer expects (`grad_out`), the conjugate the cost
model priced (all-gather ↔ reduce-scatter, identity ↔ all-reduce). The gradient of a local piece of a
value partial by average on an axis of size n is the whole gradient over n, so backward scales by
n for each such axis of `dst` and by 1/n for each of `src`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.units import fmt_bytes
from autopar.passes.reshard import COMMUNICATING, _after, steps
from autopar.vocab import Placements, fmt, shard_count
from autopar.runtime.world import World


def _gather(x: torch.Tensor, dim: int, world: World, axis: int) -> torch.Tensor:
    n = world.axis_size(axis)
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((n * moved.shape[0], *moved.shape[1:]))
    dist.all_gather_single(out, moved, group=world.groups[axis])
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, world: World, axis: int, op: str) -> torch.Tensor:
    n = world.axis_size(axis)
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // n, *moved.shape[1:]))
    dist.reduce_scatter_single(out, moved, group=world.groups[axis])
    out = out.movedim(0, dim)
    return out / n if op == "avg" else out


def _all_reduce(x: torch.Tensor, world: World, axis: int, op: str) -> torch.Tensor:
    y = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(y, group=world.groups[axis])
    return y / world.axis_size(axis) if op == "avg" else y


def _all_to_all(x: torch.Tensor, src_dim: int, dst_dim: int, world: World, axis: int) -> torch.Tensor:
    """S(src_dim) → S(dst_dim): cut along dst_dim, exchange, join along src_dim."""
    n = world.axis_size(axis)
    send = torch.stack(x.chunk(n, dim=dst_dim), 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=world.groups[axis])
    return torch.cat(list(recv.unbind(0)), dim=src_dim)


def _pad(x: torch.Tensor, dim: int, world: World, axis: int) -> torch.Tensor:
    """S(dim) → P: this rank's chunk in place, zeros elsewhere."""
    n, index = world.axis_size(axis), world.axis_rank(axis)
    pieces = [x if i == index else torch.zeros_like(x) for i in range(n)]
    return torch.cat(pieces, dim=dim)


@functools.lru_cache(maxsize=None)
def _steps(src: Placements, dst: Placements) -> tuple:
    """`steps`, planned once per pair: a step runs them every time a tensor changes placement."""
    return tuple(steps(src, dst))


def transform(x: torch.Tensor, src: Placements, dst: Placements, world: World) -> torch.Tensor:
    """The local shard of the same global tensor in placement `dst`: the steps `passes.reshard.steps`
    plans (and the cost model prices), executed."""
    if src == dst or world.size == 1:
        return x
    for step in _steps(src, dst):
        a = step.axis
        if step.kind == "all_to_all":
            x = _all_to_all(x, step.source_dim, step.dim, world, a)
        elif step.kind == "all_gather":
            x = _gather(x, step.dim, world, a)
        elif step.kind == "reduce_scatter":
            x = _reduce_scatter(x, step.dim, world, a, step.op)
        elif step.kind == "all_reduce":
            x = _all_reduce(x, world, a, step.op)
        elif step.kind == "cut":
            x = x.chunk(world.axis_size(a), dim=step.dim)[world.axis_rank(a)]
        elif step.kind == "pad":
            x = _pad(x, step.dim, world, a) * (world.axis_size(a) if step.op == "avg" else 1)
        elif step.kind == "scale":  # P(sum) ↔ P(avg)
            x = x * world.axis_size(a) if step.op == "avg" else x / world.axis_size(a)
        elif step.op == "sum" and world.axis_rank(a) != 0:  # zero: R → P(sum)
            x = torch.zeros_like(x)
    return x


@dataclass(frozen=True, slots=True)
class ReshardSpec:
    src: Placements
    dst: Placements
    grad_in: Placements | None
    """The gradient's placement as the consumer's backward produces it; None: no gradient flows."""
    grad_out: Placements | None
    """The placement the producer expects its gradient in."""
    nbytes: float = 0.0
    """The whole tensor's size, for the dump."""
    label: str = ""
    """What moves (a node or parameter name), for the dump."""


class _Reshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec: ReshardSpec, world: World):
        ctx.spec, ctx.world = spec, world
        return transform(x, spec.src, spec.dst, world)

    @staticmethod
    def backward(ctx, grad):
        spec = ctx.spec
        if grad is None or spec.grad_in is None:
            return None, None, None
        out = transform(grad.contiguous(), spec.grad_in, spec.grad_out, ctx.world)
        factor = _avg_factor(spec.dst, ctx.world) / _avg_factor(spec.src, ctx.world)
        return (out * factor if factor != 1 else out), None, None


def _avg_factor(placements: Placements, world: World) -> float:
    """A value partial by average on axis a is avg_r(x_r), so the gradient of the local x_r is the
    whole gradient over n_a: the product of the n_a over such axes."""
    return math.prod(world.axis_size(a) for a, p in enumerate(placements)
                     if isinstance(p, Partial) and p.reduce_op == "avg")


class Reshard(nn.Module):
    """One placement change of one tensor: an explicit node of the lowered program."""

    def __init__(self, spec: ReshardSpec, world: World) -> None:
        super().__init__()
        self.spec, self.world = spec, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            if self.spec.grad_in is None:  # no gradient: a plain local change (a buffer's slice stays a view)
                return transform(x, self.spec.src, self.spec.dst, self.world)
            return _Reshard.apply(x, self.spec, self.world)
        except (RuntimeError, dist.DistBackendError) as e:
            raise self.world.failure(f"resharding {self.extra_repr()}", e) from e

    def extra_repr(self) -> str:
        s = self.spec
        text = f"{s.label + ' ' if s.label else ''}{fmt(s.src)} → {fmt(s.dst)}: {self._describe(s.src, s.dst)}"
        if s.grad_in is not None and s.grad_in != s.grad_out:
            text += f"; backward {fmt(s.grad_in)} → {fmt(s.grad_out)}: {self._describe(s.grad_in, s.grad_out)}"
        return text

    def _describe(self, src: Placements, dst: Placements) -> str:
        """Each step: a collective with its group and bytes, or the local change."""
        parts, current = [], list(src)
        for step in steps(src, dst):
            group = list(self.world.mesh.group(step.axis, of=self.world.rank))
            if step.kind in COMMUNICATING:
                local = self.spec.nbytes / shard_count(current, self.world.mesh.shape)
                n = local * len(group) if step.kind == "all_gather" else local
                parts.append(f"{step.kind}(axis {step.axis}, ranks {group}, {fmt_bytes(n)})")
            else:
                parts.append(f"{step.kind}(axis {step.axis}, local)")
            current[step.axis] = _after(step, current[step.axis])
        return ", ".join(parts) or "no change"
