"""Parameters on a rank: the local leaf the optimizer updates, and how the program gets them whole.

Takes a `ParamPlan` and the full tensor; gives a `Holder` whose `leaf` is what this rank stores
and updates, and whose `gather` module is the parameter's one entry into the lowered program,
producing it in the placement its (first) op uses. The gradient comes back through `gather`:

| level | leaf (stored, updated)         | forward                      | backward (the gradient)        | after the step        |
|-------|--------------------------------|------------------------------|--------------------------------|-----------------------|
| 0 DDP | the use placement              | nothing                      | all-reduce on data-parallel axes | nothing             |
| 1, 2  | a 1/d shard (ZeRO)             | the whole copy kept since the last step | reduce-scatter into the shard | all-gather the copy |
| 3 FSDP| a 1/d shard                    | all-gather (freed after use, gathered again for backward) | reduce-scatter | nothing |

d is the parameter's data-parallel degree. In the runtime, levels 1 and 2 both reduce-scatter as
the gradient is made, so level 1 keeps no more gradient than level 2.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torch.distributed.tensor import Partial, Replicate

from autopar.plan import ParamPlan
from autopar.runtime.collectives import Reshard, ReshardSpec, transform
from autopar.runtime.world import World
from autopar.vocab import Placements


class _Cached(torch.autograd.Function):
    """ZeRO-1/2: forward hands out the whole copy kept since the last step; backward reduce-scatters
    the gradient into the shard."""

    @staticmethod
    def forward(ctx, leaf, holder):
        ctx.holder = holder
        return holder.cache

    @staticmethod
    def backward(ctx, grad):
        h = ctx.holder
        return transform(grad.contiguous(), h.raw, h.plan.grad, h.world), None


class ZeroGather(nn.Module):
    def __init__(self, holder: Holder) -> None:
        super().__init__()
        self.holder = holder

    def forward(self, leaf: torch.Tensor) -> torch.Tensor:
        return _Cached.apply(leaf, self.holder)

    def extra_repr(self) -> str:
        h = self.holder
        return (f"{h.name}: ZeRO-{h.plan.level} copy (all-gathered after each step), backward reduce-scatter "
                f"into {h.plan.grad}")


class FsdpGather(nn.Module):
    """FSDP: all-gather before use; the gathered weight is not kept for backward but gathered again
    (`regather`), so only one shard per parameter stays resident."""

    def __init__(self, holder: Holder, reshard: Reshard) -> None:
        super().__init__()
        self.holder, self.reshard = holder, reshard

    def forward(self, leaf: torch.Tensor) -> torch.Tensor:
        out = self.reshard(leaf)
        h = self.holder
        note_gathered(out, lambda: transform(h.leaf.detach(), h.plan.storage, h.plan.use, h.world))
        return out

    def extra_repr(self) -> str:
        return f"{self.holder.name}: FSDP all-gather, gathered again for backward"


_GATHERED: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor]]] = {}


def note_gathered(tensor: torch.Tensor, again: Callable[[], torch.Tensor]) -> None:
    """Marks `tensor` as a gathered weight that `again()` can rebuild. Keyed by address, guarded by
    a weak reference: once the tensor is gone, another tensor at the same address must not be
    mistaken for it (ranks would then disagree on gathers)."""
    _GATHERED[tensor.untyped_storage().data_ptr()] = (weakref.ref(tensor), again)


@contextlib.contextmanager
def regather():
    """While a step's forward runs: autograd keeps, instead of each FSDP-gathered weight, a note to
    gather it again when backward needs it."""
    def pack(t: torch.Tensor):
        entry = _GATHERED.get(t.untyped_storage().data_ptr())
        if entry is None or entry[0]() is None:
            return t
        return (entry[1], t.size(), t.stride(), t.storage_offset())

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        again, size, stride, offset = packed
        return torch.as_strided(again(), size, stride, offset)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _GATHERED.clear()


@dataclass(eq=False)
class Holder:
    name: str
    plan: ParamPlan
    world: World
    leaf: nn.Parameter
    raw: Placements
    dp_partial: bool
    """Whether the gradient is partial anywhere (the parameter has data-parallel axes)."""
    cache: torch.Tensor | None = None
    gather: nn.Module | None = field(default=None, repr=False)
    """The parameter's own entry into the program; None when it is used as stored or enters with
    its group (`runtime.groups`)."""
    group: Any = field(default=None, repr=False)
    """Its `ParamGroup`, when it is gathered and reduced with the other parameters of its layer."""

    @property
    def leaf_placement(self) -> Placements:
        return self.plan.grad if self.plan.level in (1, 2) else self.plan.storage

    def refresh(self) -> None:
        """ZeRO-1/2: rebuild the whole copy from the updated shard (the step's all-gather)."""
        if self.plan.level in (1, 2):
            self.cache = transform(self.leaf.detach(), self.plan.grad, self.plan.use, self.world)

    def full(self) -> torch.Tensor:
        """The whole parameter, on every rank."""
        return transform(self.leaf.detach(), self.leaf_placement, _replicated(self.plan), self.world)

    def load(self, full: torch.Tensor) -> None:
        with torch.no_grad():
            self.leaf.copy_(transform(full.to(self.leaf.device, self.leaf.dtype), _replicated(self.plan),
                                      self.leaf_placement, self.world))
        self.refresh()


def _replicated(plan: ParamPlan) -> Placements:
    return tuple(Replicate() for _ in plan.use)


def make_holder(name: str, plan: ParamPlan, full: torch.Tensor, raw: Placements, requires_grad: bool,
                world: World, bucketed: bool = True) -> Holder:
    """`raw`: the gradient's placement as the parameter's first op produces it (partial on the axes
    where that op splits the work but keeps the parameter whole; a partial sum over one device is
    whole, so an axis of size 1 makes no gather node). `bucketed`: a DDP-level partial
    gradient is left partial here and all-reduced in buckets after backward (`runtime.sync`)."""
    raw = tuple(Replicate() if isinstance(p, Partial) and world.axis_size(a) == 1 else p for a, p in enumerate(raw))
    leaf_placement = plan.grad if plan.level in (1, 2) else plan.storage
    local = transform(full.detach().to(world.device), _replicated(plan), leaf_placement, world).clone()
    holder = Holder(name=name, plan=plan, world=world, leaf=nn.Parameter(local, requires_grad=requires_grad),
                    raw=raw if requires_grad else plan.use, dp_partial=requires_grad and raw != plan.use)
    if plan.level in (1, 2):
        holder.refresh()
        holder.gather = ZeroGather(holder)
    else:  # 0: identity forward, all-reduce backward; 3: all-gather forward, reduce-scatter backward
        grad_in = raw if requires_grad else None
        if plan.level == 0 and (grad_in is None or grad_in == plan.storage or bucketed):
            return holder  # used as stored; its gradient is whole already, or synchronized in buckets
        gather = Reshard(ReshardSpec(src=plan.storage, dst=plan.use, grad_in=grad_in,
                                     grad_out=plan.storage if requires_grad else None,
                                     nbytes=full.numel() * full.element_size(), label=name), world)
        holder.gather = FsdpGather(holder, gather) if plan.level == 3 else gather
    return holder
