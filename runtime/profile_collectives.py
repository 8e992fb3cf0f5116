"""`autopar profile`'s collectives: every collective of `cost.profile.PROFILED` on every group size
and scope, timed as a training step meets it, and α and β fitted (`runtime.profiler`)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from autopar.cost.profile import PROFILED, CollectiveFit, fit_alpha_beta
from autopar.cost.sampling import trimmed_mean
from autopar.progress import Bar
from autopar.runtime.timing import max_over_ranks, seconds_per_call

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


def _collective(kind: str, members: list[int], group, nbytes: int, buffers: list[torch.Tensor]):
    """(call, bytes n as CommModel counts them) for one collective of about `nbytes` on this rank,
    on views of `buffers` (three flat fp32 tensors of the largest message), so that every size of
    every kind can be timed in turns without holding a message of each."""
    p, rank = len(members), dist.get_rank()
    per = max(nbytes // 4 // p, 1)  # fp32 elements of one rank's piece
    whole, piece, received = buffers[0][:per * p], buffers[1][:per], buffers[2][:per * p]
    if kind == "all_reduce":
        return (lambda: dist.all_reduce(whole, group=group)), whole.nbytes
    if kind == "all_gather":
        return (lambda: dist.all_gather_single(whole, piece, group=group)), whole.nbytes
    if kind == "reduce_scatter":
        return (lambda: dist.reduce_scatter_single(piece, whole, group=group)), whole.nbytes
    if kind == "broadcast":
        return (lambda: dist.broadcast(whole, src=members[0], group=group)), whole.nbytes
    if kind == "all_to_all":
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


def in_step_seconds(calls, device: torch.device, group, *, repeats, sample: float,
                    progress=None) -> list[float]:
    """Seconds of each collective of `calls` as a training step meets it: each timed repeat runs
    `inner` (chunk, collective) pairs in a row, and the same number of chunks alone is timed right
    after it,

        t = trimmed_mean(chunk + collective) − trimmed_mean(chunk alone)

    A mean, not a median: a step runs many collectives and pays the sum of their times, whose
    expectation is the sum of their means. Inside a step a few collectives wait several times longer
    than most (2 gloo ranks on 2 cores, 512 KiB all-reduces after a 4 ms matmul, one at a time: median
    3.0 ms, mean 3.7 ms; 64 KiB: 2.3 and 3.7 ms), and a median leaves that tail out. Trimmed
    (`trimmed_mean`): the slowest and fastest tenth of the repeats, where another program's burst on
    a shared machine lands, are dropped.

    A single collective timed right after a barrier finds every rank waiting and its connections
    hot; inside a step the ranks arrive from computing, apart, with their communication threads
    asleep, which on CPU ranks sharing cores costs about twice the barrier-aligned time (2 gloo
    ranks on 2 cores: all-reduce α fitted at 1.74 ms in-step against 0.77 ms after a barrier;
    BENCHMARKS.md, cost-model accuracy). `inner` is agreed over the group (each rank runs the same
    number of collectives), enough for a repeat to last `sample` seconds.

    The calls take turns: each round times one repeat of every call (`repeats[i]` of call i spread
    evenly over max(repeats) rounds), so that a burst of another program's load on a shared machine
    slows one repeat of many calls, which the trimming drops, instead of every repeat of a few: three
    back-to-back fits on 2 ranks read α up to 2.45× apart timed one call after the other, 1.25× in
    turns (BENCHMARKS.md, cost-model accuracy).
    `progress` is called after each round. On a GPU (no chunk) each repeat is the collective alone
    after a barrier, timed with CUDA events."""
    counts = [repeats] * len(calls) if isinstance(repeats, int) else list(repeats)
    chunk = _chunk(device)
    barrier = lambda: dist.barrier(group=group)  # noqa: E731
    inner = [_pairs_per_repeat(call, chunk, barrier, group, sample, device) for call in calls]
    both, alone = [[] for _ in calls], [[] for _ in calls]
    rounds = max(counts)
    for r in range(rounds):
        for i, call in enumerate(calls):
            if r * counts[i] % rounds >= counts[i]:
                continue  # call i has fewer repeats than there are rounds, and this is not one of its
            both[i].append(_repeat(chunk, call, inner[i], barrier, device))
            alone[i].append(_repeat(chunk, None, inner[i], barrier, device) if chunk is not None else 0.0)
        if progress is not None:
            progress()
    return [max(trimmed_mean(b) - trimmed_mean(a), 1e-7) for b, a in zip(both, alone)]


def _repeat(chunk, call, inner: int, barrier, device: torch.device) -> float:
    """Seconds per (chunk, call) pair over `inner` pairs in a row, after a barrier; the chunk alone
    when `call` is None, the call alone when `chunk` is None (`timing.seconds_per_call`)."""
    def pair() -> None:
        if chunk is not None:
            chunk()
        if call is not None:
            call()

    barrier()
    return seconds_per_call(pair, device, inner)


def _pairs_per_repeat(call, chunk, barrier, group, sample: float, device: torch.device) -> int:
    """(chunk, call) pairs in one timed repeat: enough to last `sample` seconds, the most any rank
    of the group needs, at most 200. Two warm-up pairs, the second timed."""
    for _ in range(2):
        once = _repeat(chunk, call, 1, barrier, device)
    agreed = torch.tensor([math.ceil(sample / max(once, 1e-9))], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    return max(1, min(int(agreed), 200))


def rounds(settings: Settings) -> int:
    """Rounds of `measure_collectives` per group: three times the repeats, which small messages
    (the noisiest) get, large ones a third of them."""
    return 3 * settings.repeats


def measure_collectives(settings: Settings, device: torch.device, per_node: int,
                        progress: Bar) -> tuple[CollectiveFit, ...]:
    """α and β of every collective of `PROFILED` on every (group size, scope) of `group_sizes`, with
    the measured times they were fitted to, every message size of every kind timed in turns
    (`in_step_seconds`); `progress` advances by one per round and group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    largest = max(settings.message_sizes)
    fits = []
    for p, scope in group_sizes(world, per_node):
        mine, handle = None, None
        for members in groups(p, world, per_node, scope):  # new_group is collective: every rank, same order
            g = dist.new_group(members)
            if rank in members:
                mine, handle = members, g
        kinds = [kind for kind in PROFILED if kind != "send_recv" or p == 2]
        label = f"collectives p={p} {scope}"
        seconds = {}
        if mine is not None:
            for _ in range(20):  # a new group's first collectives set up its connections: not timed
                dist.all_reduce(torch.zeros(16, device=device), group=handle)
            buffers = [torch.zeros(largest // 4 + 1, device=device) for _ in range(3)]
            keys = [(kind, nbytes) for kind in kinds for nbytes in settings.message_sizes]
            calls = {key: _collective(key[0], mine, handle, key[1], buffers) for key in keys}
            # Small messages are cheap and the noisiest: three times the repeats.
            counts = [rounds(settings) if calls[key][1] <= 256 * KiB else settings.repeats for key in keys]
            timed = in_step_seconds([calls[key][0] for key in keys], device, handle, repeats=counts,
                                    sample=settings.sample / 2, progress=lambda: progress.advance(label))
            seconds = {key: (calls[key][1], t) for key, t in zip(keys, timed)}
        else:
            progress.advance(label, by=rounds(settings))
        for kind in kinds:
            sizes = [seconds.get((kind, n), (n, 0.0))[0] for n in settings.message_sizes]
            times = max_over_ranks([seconds.get((kind, n), (n, 0.0))[1] for n in settings.message_sizes], device)
            logger.debug("%s p=%d %s: bytes %s, seconds %s", kind, p, scope, sizes, times)
            alpha, beta, residual = fit_alpha_beta(sizes, times)
            fits.append(CollectiveFit(kind=kind, group_size=p, scope=scope, alpha=alpha, beta=beta, residual=residual,
                                      sizes=tuple(sizes), times=tuple(times)))
    return tuple(fits)
