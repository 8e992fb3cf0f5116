"""`autopar profile`'s collectives: every collective of `cost.profile.PROFILED` on every group size
and scope, timed as a training step meets it, and α and β fitted (`runtime.profiler`)."""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from autopar.cost.profile import PROFILED, CollectiveFit, fit_alpha_beta
from autopar.progress import Bar
from autopar.runtime.timing import max_over_ranks, median_seconds

if TYPE_CHECKING:
    from autopar.runtime.profiler import Settings

logger = logging.getLogger(__name__)
KiB = 1 << 10


def group_sizes(world: int, per_node: int) -> list[tuple[int, str]]:
    """(group size, scope) to measure: 2, 4, 8, ... and the node's size inside a node; 2, 4, ... and
    the world's across nodes, when there are several."""
    def sizes(top: int) -> list[int]:
        out = [1 << i for i in range(1, top.bit_length()) if 1 << i <= top]
        return sorted(set(out + ([top] if top > 1 else [])))

    found = [(p, "intra") for p in sizes(per_node)]
    if world > per_node:
        found += [(p, "inter") for p in sizes(world) if groups(p, world, per_node, "inter")]
    return found


def groups(p: int, world: int, per_node: int, scope: str) -> list[list[int]]:
    """Disjoint groups of p ranks that are measured at once: p consecutive ranks of a node
    ("intra"), or p / k ranks on each of k = min(p, nodes) nodes ("inter")."""
    nodes = world // per_node
    if scope == "intra":
        return [[n * per_node + o * p + j for j in range(p)] for n in range(nodes) for o in range(per_node // p)]
    k = min(p, nodes)
    if k < 2 or p % k or p // k > per_node:
        return []
    g = p // k
    return [[(b * k + node) * per_node + o * g + j for node in range(k) for j in range(g)]
            for b in range(nodes // k) for o in range(per_node // g)]


def _collective(kind: str, members: list[int], group, nbytes: int, device: torch.device):
    """(call, bytes n as CommModel counts them) for one collective of about `nbytes` on this rank."""
    p, rank = len(members), dist.get_rank()
    per = max(nbytes // 4 // p, 1)  # fp32 elements of one rank's piece
    whole = torch.zeros(per * p, device=device)
    piece = torch.zeros(per, device=device)
    if kind == "all_reduce":
        return (lambda: dist.all_reduce(whole, group=group)), whole.nbytes
    if kind == "all_gather":
        return (lambda: dist.all_gather_single(whole, piece, group=group)), whole.nbytes
    if kind == "reduce_scatter":
        return (lambda: dist.reduce_scatter_single(piece, whole, group=group)), whole.nbytes
    if kind == "broadcast":
        return (lambda: dist.broadcast(whole, src=members[0], group=group)), whole.nbytes
    if kind == "all_to_all":
        received = torch.empty_like(whole)
        return (lambda: dist.all_to_all_single(received, whole, group=group)), whole.nbytes
    if rank == members[0]:  # send_recv: the first member sends, the second receives
        return (lambda: dist.send(whole, dst=members[1])), whole.nbytes
    return (lambda: dist.recv(whole, src=members[0])), whole.nbytes


def _chunk(device: torch.device):
    """The computation a CPU rank does between two collectives of a step: a (512, 512) @ (512, 512)
    matmul, about 4 ms on one core, what a tensor-parallel or FSDP layer of the accuracy benchmark's
    models computes between two of its collectives: a collective costs more the longer the ranks
    computed before it. None on a GPU, where kernels queue asynchronously and a collective waits for its
    stream, not for the host."""
    if device.type == "cuda":
        return None
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    return lambda: torch.mm(a, b)


def in_step_seconds(call, device: torch.device, group, *, repeats: int, sample: float) -> float:
    """Seconds of one collective as a training step meets it: each timed repeat runs `inner`
    (chunk, collective) pairs in a row, and the same number of chunks alone is timed in alternation,

        t = median(chunk + collective) − median(chunk alone)

    A single collective timed right after a barrier finds every rank waiting and its connections
    hot; inside a step the ranks arrive from computing, apart, with their communication threads
    asleep, which on CPU ranks sharing cores costs about twice the barrier-aligned time (2 gloo
    ranks on 2 cores: all-reduce α fitted at 1.74 ms in-step against 0.77 ms after a barrier;
    BENCHMARKS.md, cost-model accuracy). `inner` is agreed over the group
    (each rank runs the same number of collectives), enough for a repeat to last `sample` seconds.
    On a GPU (no chunk) this is `median_seconds` of the collective after a barrier."""
    chunk = _chunk(device)
    barrier = lambda: dist.barrier(group=group)  # noqa: E731
    if chunk is None:
        return median_seconds(call, device, repeats=repeats, warmup=2, before=barrier)
    for _ in range(2):  # warm-up; the second pair's time sizes `inner`
        barrier()
        begin = time.perf_counter()
        chunk()
        call()
        once = time.perf_counter() - begin
    agreed = torch.tensor([math.ceil(sample / max(once, 1e-9))], dtype=torch.int64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    inner = max(1, min(int(agreed), 200))
    both, alone = [], []
    for _ in range(repeats):
        for times, collective in ((both, True), (alone, False)):
            barrier()
            begin = time.perf_counter()
            for _ in range(inner):
                chunk()
                if collective:
                    call()
            times.append((time.perf_counter() - begin) / inner)
    return max(statistics.median(both) - statistics.median(alone), 1e-7)


def measure_collectives(settings: Settings, device: torch.device, per_node: int,
                        progress: Bar) -> tuple[CollectiveFit, ...]:
    world, rank = dist.get_world_size(), dist.get_rank()
    fits = []
    for p, scope in group_sizes(world, per_node):
        mine, handle = None, None
        for members in groups(p, world, per_node, scope):  # new_group is collective: every rank, same order
            g = dist.new_group(members)
            if rank in members:
                mine, handle = members, g
        if mine is not None:  # a new group's first collectives set up its connections: not timed
            for _ in range(20):
                dist.all_reduce(torch.zeros(16, device=device), group=handle)
        for kind in PROFILED:
            if kind == "send_recv" and p != 2:
                continue
            sizes, times = [], []
            for nbytes in settings.message_sizes:
                progress.advance(f"{kind} p={p} {scope} {nbytes // KiB} KiB")
                seconds, n = 0.0, nbytes
                if mine is not None:
                    call, n = _collective(kind, mine, handle, nbytes, device)
                    # Small messages are cheap and the noisiest: three times the repeats (a count
                    # every rank of the group agrees on).
                    repeats = settings.repeats * (3 if n <= 256 * KiB else 1)
                    seconds = in_step_seconds(call, device, handle, repeats=repeats,
                                              sample=settings.sample / 2)
                sizes.append(n)
                times.append(seconds)
            times = max_over_ranks(times, device)
            logger.debug("%s p=%d %s: bytes %s, seconds %s", kind, p, scope, sizes, times)
            alpha, beta, residual = fit_alpha_beta(sizes, times)
            fits.append(CollectiveFit(kind=kind, group_size=p, scope=scope, alpha=alpha, beta=beta, residual=residual))
    return tuple(fits)
