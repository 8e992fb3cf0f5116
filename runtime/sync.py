"""Gradient synchronization for DDP-level parameters, bucketed and overlapped with backward.

Takes the holders whose gradient is partial on some mesh axes and kept whole (storage level 0);
gives `GradientSync`, which all-reduces their gradients the way DistributedDataParallel does:
parameters are packed into buckets of about `bucket_bytes` in reverse order of first use (the order
backward produces their gradients); when every gradient of a bucket has been accumulated, one
asynchronous all-reduce of the flattened bucket starts, so communication overlaps the rest of
backward; `finish` waits for them and writes the sums back. A bucket whose parameters are partial
on several axes is reduced axis by axis when backward ends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import Partial

from autopar.runtime.params import Holder
from autopar.runtime.world import World

BUCKET_BYTES = 25 * 2 ** 20  # DistributedDataParallel's default


class _Bucket:
    def __init__(self, holders: list[Holder], axes: tuple[int, ...]) -> None:
        self.holders, self.axes = holders, axes
        self.ready: set[int] = set()
        self.buffer: torch.Tensor | None = None
        self.work = None


class GradientSync:
    def __init__(self, holders: list[Holder], world: World, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.world = world
        self.buckets: list[_Bucket] = []
        by_axes: dict[tuple[int, ...], list[Holder]] = {}
        for h in holders:
            by_axes.setdefault(partial_axes(h), []).append(h)
        for axes, group in by_axes.items():
            current, size = [], 0
            for h in reversed(group):
                current.append(h)
                size += h.leaf.numel() * h.leaf.element_size()
                if size >= bucket_bytes:
                    self.buckets.append(_Bucket(current, axes))
                    current, size = [], 0
            if current:
                self.buckets.append(_Bucket(current, axes))
        self.armed = False
        """Gradients accumulate without being reduced until `start` (a pipeline's earlier microbatches)."""
        self._where = {id(h.leaf): (b, i) for b in self.buckets for i, h in enumerate(b.holders)}
        for b in self.buckets:
            for h in b.holders:
                h.leaf.register_post_accumulate_grad_hook(self._ready)

    def _ready(self, leaf: torch.Tensor) -> None:
        if not self.armed:
            return
        bucket, index = self._where[id(leaf)]
        bucket.ready.add(index)
        if len(bucket.ready) == len(bucket.holders) and len(bucket.axes) == 1:
            self._launch(bucket, async_op=True)

    def _launch(self, bucket: _Bucket, async_op: bool) -> None:
        grads = [h.leaf.grad if h.leaf.grad is not None else torch.zeros_like(h.leaf) for h in bucket.holders]
        bucket.buffer = torch.cat([g.reshape(-1) for g in grads])
        for axis in bucket.axes:
            work = dist.all_reduce(bucket.buffer, group=self.world.groups[axis], async_op=async_op)
            if async_op:
                bucket.work = work

    def start(self) -> None:
        self.armed = True
        for b in self.buckets:
            b.ready.clear()
            b.buffer, b.work = None, None

    def finish(self) -> None:
        """After backward: every bucket reduced (waiting for the ones in flight), sums written back."""
        self.armed = False
        try:
            for b in self.buckets:
                if b.buffer is None:
                    self._launch(b, async_op=False)
                elif b.work is not None:
                    b.work.wait()
                offset = 0
                for h in b.holders:
                    n = h.leaf.numel()
                    h.leaf.grad = b.buffer[offset:offset + n].view_as(h.leaf)
                    offset += n
        except (RuntimeError, dist.DistBackendError) as e:
            raise self.world.failure("synchronizing gradients", e) from e


def partial_axes(holder: Holder) -> tuple[int, ...]:
    return tuple(a for a, p in enumerate(holder.raw) if isinstance(p, Partial))


def bucketed(holder: Holder) -> bool:
    """Level 0, trainable, with a partial gradient: synchronized here rather than in backward."""
    return holder.plan.level == 0 and holder.leaf.requires_grad and bool(partial_axes(holder))
