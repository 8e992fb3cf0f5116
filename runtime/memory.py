"""Measured tensor memory of one rank: the bytes of live tensor storages, and their peak over a step.

On a GPU, `torch.cuda.max_memory_allocated` answers this; a CPU allocator keeps no such count, so
here a dispatch mode watches every op: a storage an op returns is counted once, when first seen,
and uncounted when Python frees it (a finalizer on the storage object, which PyTorch keeps alive
as long as any tensor uses it). What is alive before the step is found by walking the garbage
collector's objects once. What it sees is what the cost model predicts, tensor bytes: weights,
gradients, optimizer state, activations and communication buffers; not the allocator's slack, the
interpreter or the libraries.

    with LiveMemory() as live:
        compiled.step(*inputs, target=target)
    live.peak, live.start                         # bytes
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage(t: torch.Tensor):
    """The storage holding `t`'s bytes; None for meta and fake tensors (shapes only, no bytes)."""
    if not isinstance(t, torch.Tensor) or is_fake(t):
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without one storage
        return None
    return None if storage.device.type == "meta" else storage


class LiveMemory(TorchDispatchMode):
    """Counts live tensor-storage bytes on the CPU or a GPU; `peak` is the most seen at once since
    entering, `start` what was alive on entry."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.start = 0

    def _track(self, storage) -> None:
        key = id(storage)
        if storage is None or key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __enter__(self) -> LiveMemory:
        gc.collect()
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # not isinstance: it asks deprecated proxies for __class__
                self._track(_storage(obj))
        self.start = self.peak = self.current
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(_storage(t))
        return out
