"""The slowest rank's excess: what a step that synchronizes its ranks pays beyond each rank's mean
computation (`autopar.cost.profile.StraggleFit`).

Every rank runs the same chunk of computation (matmuls, an add, a layer norm, a GELU: the kinds of
kernel a step runs), `rounds` times, each round started together after a barrier; the per-rank
times of every round are gathered, and for every group size p of `profile_collectives.group_sizes`
and each of its groups g:

    share_g = trimmed_mean_round(max_{r∈g} t_r) / max_{r∈g} trimmed_mean_round(t_r) − 1

averaged over the groups (trimmed: a burst of another program's load lands on a few rounds). The
denominator is how the profile's rates are taken (each the slowest rank's mean, `max_over_ranks`),
so the share adds only what those rates miss: that the slowest rank changes from round to round.
How much it adds depends on the chunk's length (4 gloo ranks on 2 cores: +40%, +10% and +14% over
chunks of 20, 60 and 150 ms), so the chunk lasts about a step (`profiler.Settings`); over 20 steps
of the zoo's GPT and Llama, data-parallel on those 4 ranks, each step's slowest forward and backward
took 17% and 7% longer than the slowest rank's mean, and the profile of BENCHMARKS.md read +14.1%
(2 ranks on the 2 cores: +0.8%).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autopar.cost.profile import StraggleFit
from autopar.cost.sampling import trimmed_mean
from autopar.runtime.profile_collectives import group_sizes, groups
from autopar.runtime.timing import max_over_ranks, seconds_per_call


def chunk(device: torch.device, seconds: float):
    """A call of about `seconds`: a matmul, an add, a layer norm and a GELU on (256, 256) fp32
    tensors (1024 on a GPU), about 0.65 ms on one core of the 2-core machine of BENCHMARKS.md,
    repeated; the same number of repeats on every rank (collective)."""
    side = 1024 if device.type == "cuda" else 256
    a, b = torch.randn(side, side, device=device), torch.randn(side, side, device=device)
    x, y = torch.randn(side * side, device=device), torch.randn(side * side, device=device)

    def once() -> None:
        torch.mm(a, b)
        torch.add(x, y)
        torch.nn.functional.layer_norm(a, (side,))
        torch.nn.functional.gelu(a)

    once()
    each = max_over_ranks([seconds_per_call(once, device, 4)], device)[0]
    repeats = max(1, round(seconds / max(each, 1e-9)))

    def call() -> None:
        for _ in range(repeats):
            once()
    return call


def round_times(call, device: torch.device, rounds: int, progress=None) -> list[list[float]]:
    """Seconds of `call` on every rank (outer list) in each of `rounds` rounds started together."""
    mine = []
    for _ in range(rounds):
        dist.barrier()
        mine.append(seconds_per_call(call, device, 1))
        if progress is not None:
            progress()
    local = torch.tensor(mine, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [t.tolist() for t in gathered]


def shares(times: list[list[float]], per_node: int) -> tuple[StraggleFit, ...]:
    """`StraggleFit` per group size of `group_sizes(len(times), per_node)`, from every rank's round
    times (see the module docstring)."""
    world, out = len(times), {}
    for p, scope in group_sizes(world, per_node):
        if p in out:
            continue
        found = []
        for members in groups(p, world, per_node, scope):
            slowest = trimmed_mean([max(times[r][i] for r in members) for i in range(len(times[0]))])
            found.append(slowest / max(trimmed_mean(times[r]) for r in members) - 1.0)
        if found:
            out[p] = StraggleFit(group_size=p, share=max(sum(found) / len(found), 0.0))
    return tuple(out.values())


def measure_straggle(device: torch.device, per_node: int, *, seconds: float, rounds: int,
                     progress=None) -> tuple[StraggleFit, ...]:
    """Collective over every rank: the chunk timed in `rounds` rounds, and the shares fitted."""
    return shares(round_times(chunk(device, seconds), device, rounds, progress), per_node)
