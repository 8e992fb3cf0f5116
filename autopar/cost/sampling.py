"""Timings that take turns: several calls sampled round by round, each figure the trimmed mean of
its samples (`cost.ops`, the profiler's kernels and collectives).

A shared machine's speed drifts over seconds: on a 2-core virtual machine the fastest of seven
6 ms samples of a 512³ matmul read 92 to 156 GFLOP/s within half a minute, while the bandwidth of
a large add stayed within 11.4–13.7 GB/s. Timing one call after another gives each call its own
moment of the machine (summed over a graph's nodes, the fastest-of-seven totals of one model read
41.9 to 60.9 ms in three processes a minute apart); timing every call once per round spreads each
call's samples over the whole window, so that calls timed together are timed alike, and the
reference kernels that scale them (`cost.ops`) see the same machine as the nodes they scale.

The trimmed mean, not the fastest sample: a step pays each op's mean time, and the drift is part
of it (a model's eager step, one process: 50.9 ms median; its nodes' samples taken in turns alongside:
50.9 ms at their medians, 52.5 ms at their means; at their fastest, one node after another: 41.9 ms). Trimmed: the slowest and fastest tenth,
where another program's burst lands, are dropped.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Sequence

import torch

from autopar.runtime.timing import max_over_ranks, seconds_per_call, sync


def trimmed_mean(values: Sequence[float], share: float = 0.1) -> float:
    """The mean of `values` less the ceil(share · n) smallest and as many largest (none of fewer
    than 3 values)."""
    ordered = sorted(values)
    k = math.ceil(share * len(ordered)) if len(ordered) >= 3 else 0
    return statistics.fmean(ordered[k:len(ordered) - k])


class Sampler:
    """One call timed in turns with others: `sample()` times `calls` calls in a row, enough to last
    `least` seconds, and `seconds()` is the trimmed mean of the samples so far. The count is set
    from a second call, timed after a first that is not (made here: a call that fails raises
    here): a first call loads its kernels. On an H100 the first tiny multiplication of a process
    took milliseconds, its sampler timed 2 calls per sample, each read 141 µs against 20 µs, and
    the `torch.autograd.grad` cost taken from it (`timers.Reference.grad_call`) read 0: the first
    plan of a process priced GPT-3 111M at 81.8 ms, the next ones at 27.8 ms."""

    def __init__(self, fn: Callable[[], object], device: torch.device, least: float = 0.005):
        self.fn, self.device = fn, device
        self.first = first_call(fn, device)
        """Seconds the untimed first call took (loading kernels is not the call's time)."""
        self.calls = max(1, math.ceil(least / max(seconds_per_call(fn, device, 1), 1e-9)))
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(seconds_per_call(self.fn, self.device, self.calls))

    def seconds(self) -> float:
        return trimmed_mean(self.samples)


def first_call(fn: Callable[[], object], device: torch.device) -> float:
    """Call `fn` once, to the device's end; the seconds it took."""
    begin = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - begin


def in_turns(samplers: Sequence[Sampler], rounds: int, *, deadline: float | None = None, warm: bool = False) -> int:
    """Samples every sampler once per round, for `rounds` rounds or until a round would end after
    `deadline` (time.perf_counter), whichever is first (always one round); returns the rounds run.
    `warm`: one round first whose samples are dropped."""
    if warm:
        for sampler in samplers:
            sampler.sample()
            sampler.samples.pop()
    done, began = 0, time.perf_counter()
    while done < rounds:
        for sampler in samplers:
            sampler.sample()
        done += 1
        now = time.perf_counter()
        if deadline is not None and now + (now - began) / done > deadline:
            break
    return done


def agree_calls(samplers: Sequence[Sampler], device: torch.device) -> None:
    """Every rank's samplers time the same number of calls per sample, the most any rank chose, so
    that ranks started together do the same work (a collective: every rank calls it)."""
    calls = max_over_ranks([float(s.calls) for s in samplers], device)
    for sampler, agreed in zip(samplers, calls):
        sampler.calls = int(agreed)
