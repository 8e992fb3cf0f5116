"""Parameter groups: one collective per layer instead of one per parameter (FSDP2's unit of work).

Takes the holders of sharded-storage parameters (ZeRO-1/2 and FSDP) whose shard is one even slice
along one dim on one mesh axis (`groupable`); groups them by layer of first use, level, axis and
dtype (`form_groups`); gives one autograd node per group (`GroupGather`):
- FSDP: forward all-gathers every shard of the group in one flat buffer, backward reduce-scatters
  every gradient in one flat buffer; the gathered weights are not kept for backward but gathered
  again, once per group, when backward first needs them (`runtime.params.regather`);
- ZeRO-1/2: forward hands out the whole copies kept since the last step, backward reduce-scatters
  like FSDP, and after the optimizer step one flat all-gather refreshes the copies (`refresh`).
Flat buffers are rank-major: rank r's part is the concatenation of every parameter's r-th piece,
so a reduce-scatter leaves each rank exactly its shards and an all-gather every rank all pieces.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Partial, Shard

from autopar.runtime.params import Holder, note_gathered
from autopar.units import fmt_bytes
from autopar.runtime.world import World
from autopar.vocab import shard_count


class ParamGroup:
    def __init__(self, name: str, holders: list[Holder], axis: int, world: World) -> None:
        self.name, self.holders, self.axis, self.world = name, holders, axis, world
        self.level = holders[0].plan.level
        self.dims = [h.leaf_placement[axis].dim for h in holders]
        self.regathered: list[torch.Tensor] | None = None
        for h in holders:
            h.gather, h.group = None, self

    @property
    def n(self) -> int:
        return self.world.axis_size(self.axis)

    def gather(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """Whole tensors (as used) from this rank's shards: one flat all-gather."""
        flat = torch.cat([s.reshape(-1) for s in shards])
        out = flat.new_empty(flat.numel() * self.n)
        dist.all_gather_single(out, flat, group=self.world.groups[self.axis])
        parts = out.view(self.n, -1)
        whole, offset = [], 0
        for s, dim in zip(shards, self.dims):
            k = s.numel()
            whole.append(torch.cat([parts[r, offset:offset + k].view(s.shape) for r in range(self.n)], dim=dim))
            offset += k
        return whole

    def again(self, position: int) -> torch.Tensor:
        """FSDP backward: member `position` whole, the group gathered again once for all members."""
        if self.regathered is None:
            with torch.no_grad():
                self.regathered = self.gather([h.leaf.detach() for h in self.holders])
        return self.regathered[position]

    def reduce_scatter(self, grads: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor]:
        """This rank's shard of each summed gradient: one flat reduce-scatter."""
        chunks = []
        for g, h, dim in zip(grads, self.holders, self.dims):
            if g is None:  # a member backward did not reach: its gradient is zero
                shape = list(h.leaf.shape)
                shape[dim] *= self.n
                g = h.leaf.new_zeros(shape)
            chunks.append(g.chunk(self.n, dim))
        flat = torch.cat([c[r].reshape(-1) for r in range(self.n) for c in chunks])
        out = flat.new_empty(flat.numel() // self.n)
        dist.reduce_scatter_single(out, flat, group=self.world.groups[self.axis])
        shards, offset = [], 0
        for c in chunks:
            k = c[0].numel()
            shards.append(out[offset:offset + k].view(c[0].shape))
            offset += k
        return shards

    def refresh(self) -> None:
        """ZeRO-1/2 after the optimizer step: the whole copies from the updated shards, one all-gather."""
        if self.level in (1, 2):
            with torch.no_grad():
                whole = self.gather([h.leaf.detach() for h in self.holders])
            for h, w in zip(self.holders, whole):
                h.cache = w


def sharded_axis(holder: Holder) -> int | None:
    """The one mesh axis on which the stored shard differs from the use, when it is a groupable
    one: an even Shard of a dim no other axis splits, with the gradient partial (summed) there only."""
    plan, stored = holder.plan, holder.leaf_placement
    if plan.level == 0 or not holder.leaf.requires_grad:
        return None
    differ = [a for a, (s, u) in enumerate(zip(stored, plan.use)) if s != u]
    if len(differ) != 1:
        return None
    a = differ[0]
    partial = [x for x, p in enumerate(holder.raw) if isinstance(p, Partial)]
    if not isinstance(stored[a], Shard) or partial != [a] or holder.raw[a].reduce_op != "sum":
        return None
    dim, mesh = stored[a].dim, holder.world.mesh.shape
    if sum(isinstance(p, Shard) and p.dim == dim for p in stored) != 1 or plan.shape[dim] % shard_count(
            stored, mesh, dim) or any(isinstance(p, Shard) and p.dim == dim for p in plan.use):
        return None
    return a


def form_groups(holders: list[Holder], layer_of: dict[str, object], world: World) -> list[ParamGroup]:
    """Groups of the groupable holders, in order of first use (`holders` comes in that order);
    `layer_of` names each holder's unit (its layer, or the stretch before or after the layers)."""
    keyed: dict[tuple, list[Holder]] = {}
    for h in holders:
        axis = sharded_axis(h)
        if axis is not None and world.axis_size(axis) > 1:
            keyed.setdefault((layer_of[h.name], h.plan.level, axis, h.leaf.dtype), []).append(h)
    return [ParamGroup(str(key[0]), members, key[2], world) for key, members in keyed.items()]


class _Gather(torch.autograd.Function):
    """FSDP: all-gather forward, reduce-scatter backward, for a whole group."""

    @staticmethod
    def forward(ctx, group: ParamGroup, *shards):
        ctx.group = group
        group.regathered = None
        whole = group.gather(list(shards))
        for position, w in enumerate(whole):
            note_gathered(w, functools.partial(group.again, position))
        return tuple(whole)

    @staticmethod
    def backward(ctx, *grads):
        group = ctx.group
        group.regathered = None  # every use of the weights gathered again for backward is behind us
        return (None, *group.reduce_scatter(grads))


class _Cached(torch.autograd.Function):
    """ZeRO-1/2: the whole copies forward, reduce-scatter backward, for a whole group."""

    @staticmethod
    def forward(ctx, group: ParamGroup, *shards):
        ctx.group = group
        return tuple(h.cache for h in group.holders)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.group.reduce_scatter(grads))


class GroupGather(nn.Module):
    """One node of the lowered program: the group's parameters, whole, from this rank's shards."""

    def __init__(self, group: ParamGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, *shards: torch.Tensor) -> tuple[torch.Tensor, ...]:
        try:
            return (_Gather if self.group.level == 3 else _Cached).apply(self.group, *shards)
        except (RuntimeError, dist.DistBackendError) as e:
            raise self.group.world.failure(f"gathering {self.group.name}", e) from e

    def extra_repr(self) -> str:
        g = self.group
        where = f"axis {g.axis}, ranks {list(g.world.mesh.group(g.axis, of=g.world.rank))}"
        whole = fmt_bytes(sum(h.leaf.numel() * h.leaf.element_size() for h in g.holders) * g.n)
        gather = f"all_gather({where}, {whole})"
        how = (f"forward {gather}, again in backward" if g.level == 3 else
               f"ZeRO-{g.level} copies forward, after the step {gather}")
        return (f"{g.name}: {len(g.holders)} parameter(s) [{', '.join(h.name for h in g.holders)}]; {how}; "
                f"backward reduce_scatter({where}, {whole})")
