"""Timing on every rank of a profile: seconds per call of a kernel or collective, and the slowest
rank's figure (`autopar profile`, `runtime.profiler`)."""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.distributed as dist


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, *, repeats: int, inner: int = 1, warmup: int = 1, before=None,
                   sample: float = 0.0) -> float:
    """Seconds per call of `fn`: the median over `repeats` of `inner` calls in a row (more, so that
    each repeat lasts `sample` seconds), after `warmup` calls; `before` (a barrier) runs ahead of
    each repeat, outside the time. CUDA events on a GPU."""
    for _ in range(warmup):
        sync(device)
        begin = time.perf_counter()
        fn()
        sync(device)
        once = time.perf_counter() - begin
    if sample > 0 and warmup > 0:
        inner = max(inner, math.ceil(sample / max(once, 1e-9)))
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        times.append(seconds_per_call(fn, device, inner))
    return statistics.median(times)


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over every rank of the world (ranks that did not take part send 0)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def seconds_per_call(fn, device: torch.device, calls: int) -> float:
    """Seconds per call of `fn` over `calls` calls in a row, after a synchronize (CUDA events on a
    GPU, the wall clock on a CPU)."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls
