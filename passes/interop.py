"""The inter-op pass: Alpa's stage dynamic program over the captured layers.

Takes a captured graph, the cluster and the sharding options; gives pipeline stages (contiguous
layer ranges, each on a submesh with a logical mesh shape and an intra-op plan), the number of
microbatches, the schedule, and activation checkpointing per stage.

1. Blocks. The captured layers, clustered into at most `max_blocks` contiguous blocks of balanced
   FLOPs (Alpa's layer clustering); the ops before the first layer (embedding) go with the first
   block and those after the last (head, loss) with the last.
2. Stage costs (`passes.stage_costs`) from the intra-op pass, solved once per (part, logical
   mesh) (`passes.parts`): a part is the embedding side, the head side, or one distinct layer
   signature; identical layers share it. A stage's cost is the sum of its parts under the fastest
   combination of those plans that fits the device with the activations the schedule keeps
   alive, with or without checkpointing at layer boundaries.
3. The DP (after Alpa, Zheng et al. 2022, §5.2): for each bound t_max on the per-microbatch
   stage time, stages are placed front to back over the blocks [a, b) and submeshes, stage times
   above t_max excluded, keeping per (next block, devices used) every partial split that no other
   beats however it goes on, judged on Σ t and the tail of the once-per-step work (each stage's
   gradient synchronization and optimizer step, less the backward that follows it; `_undominated`);
   the step is
   T = m·max t + c·(Σ t - max t) + that tail (`passes.schedules`), plus the largest stage's first
   gradient bucket latency. Alpa's own DP keeps only the least Σ t, which misses the tail. Outer
   loops: schedule and microbatch count (divisors of the batch that the stages' data-parallel
   degree divides).

Submeshes are (1, 2^k) inside a node or 2^k whole nodes (Alpa's shapes with power-of-two node
counts). Approximations, stated: costs come from the whole-batch graph scaled by 1/m per
microbatch; ZeRO-3/FSDP is left out of pipelined stages (it would regather every microbatch;
DeepSpeed rules it out likewise); a tied parameter used in two stages is counted in its owner's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from autopar.assemble import borrowed, placements, step_workspace
from autopar.graph import CapturedGraph
from autopar.plan import Cost, Stage
from autopar.vocab import LogicalMesh
from autopar.passes import schedules
from autopar.passes.rules import tensor_args
from autopar.passes.split import chunk_of
from autopar.passes.stage_costs import StageChoice, StageCosts, _Submesh


@dataclass(frozen=True, slots=True)
class PipelinePlan:
    stages: tuple[StageChoice, ...]
    layers: tuple[tuple[int, int], ...]
    """Per stage, the original layer range [first, last)."""
    schedule: str
    microbatches: int
    step_time: float


def cluster_layers(captured: CapturedGraph, max_blocks: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, at most `max_blocks`, minimizing the largest block's FLOPs
    (embedding and head counted with the first and last layer)."""
    if max_blocks < 1:
        raise ValueError(f"max_blocks: found {max_blocks}, required >= 1")
    layers = captured.layers
    if not layers:
        return []
    flops = [float(l.flops) for l in layers]
    inside = {n for l in layers for n in l.nodes}
    order = list(captured.nodes)
    first = min(order.index(n) for n in layers[0].nodes)
    outside = [(order.index(n), info.flops) for n, info in captured.nodes.items() if n not in inside]
    flops[0] += sum(f for i, f in outside if i < first)
    flops[-1] += sum(f for i, f in outside if i > first)
    k = min(max_blocks, len(layers))
    prefix = [0.0]
    for f in flops:
        prefix.append(prefix[-1] + f)

    @functools.lru_cache(maxsize=None)
    def best(start: int, parts: int) -> tuple[float, tuple[int, ...]]:
        if parts == 1:
            return prefix[-1] - prefix[start], (len(flops),)
        result = (math.inf, ())
        for end in range(start + 1, len(flops) - parts + 2):
            rest, cuts = best(end, parts - 1)
            result = min(result, (max(prefix[end] - prefix[start], rest), (end, *cuts)))
        return result

    _, cuts = best(0, k)
    starts = (0, *cuts[:-1])
    return list(zip(starts, cuts))

def search(costs: StageCosts, submesh_list: list[_Submesh], *, schedules_: tuple[str, ...] = ("1f1b",),
           microbatches: list[int] | None = None, max_stages: int | None = None) -> PipelinePlan | None:
    """The fastest stage split: loops over schedule, microbatch count and number of stages p; for
    each, Alpa's DP over a bound U on each stage's busy time m·t + o, minimizing Σ t. The bound
    stops at the best step time found so far in any loop (a split whose busiest stage is as slow
    cannot win), so the loops run the likeliest winners first: most microbatches first."""
    total, blocks = costs.cluster.num_devices, len(costs.blocks)
    counts = microbatches or schedules.microbatch_counts(costs.batch)
    best: PipelinePlan | None = None
    for m in sorted(counts, reverse=True):
        for kind in schedules_:
            for p in range(1, min(blocks, max_stages or blocks) + 1):
                if kind == "interleaved" and p == 1:
                    continue
                found = _dp(costs, submesh_list, kind, m, p, total, best.step_time if best else math.inf)
                if found is not None:  # and each stage's first gradient bucket, after its last backward
                    found = dataclasses.replace(found, step_time=found.step_time + first_buckets(found.stages))
                if found is not None and (best is None or found.step_time < best.step_time):
                    best = found
    return best


def first_buckets(stages) -> float:
    """What a split adds for its stages' first gradient buckets: each stage pays its own after its
    last backward, and the stages' ends overlap, so the step waits for the largest."""
    return max((s.latency for s in stages), default=0.0)


def _dp(costs: StageCosts, submesh_list: list[_Submesh], kind: str, m: int, p: int, total: int,
        limit: float = math.inf) -> PipelinePlan | None:
    """The fastest split into p stages with step time below `limit`, or None.

    Alpa's DP bounds each stage's busy time and minimizes Σ t; the step time (`schedules.step_time`)
    also holds the tail of the stages' once-per-step work, max_i (o_i − b·Σ_{j<i} t_j), which Σ t
    does not see (a split with a little less Σ t and its embedding's synchronization in the first
    stage can lose to one with a little more). So for each bound U on the slowest stage's t, the
    stages are placed front to back keeping, per (stages placed, next block, devices used), every
    split that no other beats however it goes on (`_undominated`). T = (m − c)·max t + g at the
    end, so the optimum's own bound finds a split at least as fast: the result is the fastest
    split."""
    blocks = len(costs.blocks)
    least = schedules.VIRTUAL if kind == "interleaved" else 1  # layers per stage: one per chunk
    # per stage (s stages left, itself included): its options from each first block, with the
    # activations the schedule keeps in flight there
    # (interleaved counts in halves of a stage; the DP rounds them up to whole ones, which shares
    # the tables with 1F1B's at the cost of at most half a microbatch of activations more)
    table = {s: costs.choices(m, math.ceil(schedules.in_flight(kind, p, m, p - s)), submesh_list, s, least)
             for s in range(1, p + 1)}
    bounds = sorted({o.time for t in table.values() for row in t for _, _, o in row})
    # the most once-per-step work any stage from block a on can add (`_undominated`)
    future = [max((o.once for t in table.values() for row in t[a:] for _, _, o in row), default=0.0)
              for a in range(blocks + 1)]
    ramp = schedules.ramp_factor(kind)
    best = None
    for bound in bounds:
        if m * bound >= (best[0] if best else limit):
            break  # T >= m · max t >= m · U: no larger bound can win
        beat = best[0] if best else limit
        frontier: dict[tuple[int, int], list] = {(0, 0): [(0.0, -math.inf, ())]}  # (next block, devices)
        for placed in range(p):
            left, grown = p - placed, {}
            for (a, d), points in frontier.items():
                for b, devices, o in table[left][a]:
                    if b > blocks - left + 1 or d + devices > total or o.time > bound:
                        continue
                    for sum_t, tail, stages in points:
                        point = (sum_t + o.time, max(tail, o.once - schedules.BACKWARD_SHARE * sum_t), (*stages, o))
                        if ramp * point[0] + max(point[1], 0.0) + (m - ramp) * o.time < beat:  # else T >= beat
                            grown.setdefault((b, d + devices), []).append(point)
            frontier = {key: _undominated(points, ramp, future[key[0]]) for key, points in grown.items()}
        for _, _, stages in frontier.get((blocks, total), []):
            t = schedules.step_time(kind, [o.time for o in stages], m, [o.once for o in stages])
            if best is None or t < best[0]:
                best = (t, stages)
    if best is None:
        return None
    step, stages = best
    layers = tuple((costs.blocks[o.blocks[0]][0], costs.blocks[o.blocks[1] - 1][1]) for o in stages)
    return PipelinePlan(stages=stages, layers=layers, schedule=kind if p > 1 else "none", microbatches=m,
                        step_time=step)


def _undominated(points: list, c: float, most: float = math.inf) -> list:
    """The (Σ t, tail, stages) points of partial splits that no other beats however they go on.
    With g = c·Σ t + max(tail, 0) and h = (c − b)·Σ t (b: `schedules.BACKWARD_SHARE`), a stage
    of time τ and once-per-step work o placed next gives

        g' = c·τ + max(g, o + h),    h' = h + (c − b)·τ,

    both non-decreasing in g and h, and a whole split takes T = (m − c)·max t + g. So a point
    with g and h both at most another's is at least as fast whatever follows, and only those
    that no other has so are kept. Where c ≥ b (1F1B, GPipe) a larger Σ t never helps; where
    c < b (interleaved: c = 1/2, b = 2/3) it can, by moving a later stage's once-per-step work
    behind the earlier stages' backwards, which keeping the points better on both Σ t and tail
    missed; where c = b (zero-bubble) one point per key is enough. And a point with
    `most` + h ≤ g, `most` the most once-per-step work a later stage can add, keeps
    g' = g + c·Σ τ whatever follows (o + h + (c − b)·Σ τ ≤ g + c·Σ τ), so it beats every point of
    larger g."""
    h_of = lambda q: (c - schedules.BACKWARD_SHARE) * q[0]  # noqa: E731
    kept, lowest = [], math.inf
    for point in sorted(points, key=lambda q: (c * q[0] + max(q[1], 0.0), h_of(q))):
        h = h_of(point)
        if h < lowest:
            kept.append(point)
            lowest = h
            if most + h <= c * point[0] + max(point[1], 0.0):
                break
    return kept


def assemble(result: PipelinePlan, costs: StageCosts, virtual: int = 1) -> tuple[Stage, ...]:
    """The plan's stages: each stage's nodes and parameters with the placements its parts chose,
    on its own devices (stages take consecutive device ranges, first stage first). Interleaved
    (`virtual` v > 1): each stage's layers become v chunks, chunk c·p + g on stage g's devices, so
    the model's layers run round-robin over the devices (Megatron-LM); the embedding stays in
    chunk 0 and the head in the last."""
    p = len(result.stages)
    firsts = [0]
    for choice_ in result.stages:
        firsts.append(firsts[-1] + choice_.devices)
    pieces = [_cut(b - a, virtual) for a, b in result.layers]
    chunks, start = [], 0
    for c in range(virtual):
        for g in range(p):
            chunks.append((g, (start, start + pieces[g][c])))
            start += pieces[g][c]
    owner = chunk_of(costs.captured, [layers for _, layers in chunks])
    return tuple(_chunk(result, costs, j, g, layers, firsts[g], len(chunks), owner)
                 for j, (g, layers) in enumerate(chunks))


def _cut(n: int, v: int) -> list[int]:
    if n < v:
        raise ValueError(f"interleaved: found a stage of {n} layer(s), required at least {v} (one per chunk)")
    return [n // v + (1 if c < n % v else 0) for c in range(v)]


def _chunk(result: PipelinePlan, costs: StageCosts, j: int, g: int, layers: tuple[int, int], first: int,
           count: int, owner: dict[str, int]) -> Stage:
    choice_ = result.stages[g]
    parts = costs.parts(choice_.mesh_shape)
    choice: dict[int, int] = {}
    for _, plan in choice_.plans:
        choice.update(dict(plan.choice))
    units = []
    for u in parts.problem.units:
        where = parts.part_of[u.index]
        inside = (u.layer is not None and layers[0] <= u.layer < layers[1]) or (where == "pre" and j == 0) or (
            where == "post" and j == count - 1) or where == "input"
        if inside:
            choice.setdefault(u.canonical, 0)
            units.append(u)
    nodes, params = placements(parts.problem, choice, units)
    # an op on an input (a target's reshape) runs in the chunk that the graph order gives it; an
    # input goes where it is read, and to the first and last chunk
    nodes = {n: plan for n, plan in nodes.items() if n in costs.captured.inputs or owner.get(n, j) == j}
    graph = {n.name: n for n in costs.captured.program.graph.nodes}
    read = {a.name for n in nodes if n not in costs.captured.inputs for a in tensor_args(graph[n])}
    nodes = {n: plan for n, plan in nodes.items()
             if n not in costs.captured.inputs or n in read or j in (0, count - 1)}
    params.update(borrowed(parts.problem, choice, units, nodes, params))
    device = costs.cluster.device
    dtype = "fp32" if costs.options.precision == "fp32" else costs.options.precision
    m = result.microbatches
    group = result.layers[g]
    share = (layers[1] - layers[0]) / max(group[1] - group[0], 1)  # of the stage's layers this chunk runs
    scale = costs.part_counts(*choice_.blocks)
    fixed = sum(scale[p] * plan.fixed for p, plan in choice_.plans) * share  # every microbatch pays it
    compute = sum(scale[p] * plan.compute for p, plan in choice_.plans) * share + fixed * (m - 1)
    state = sum(scale[p] * plan.state for p, plan in choice_.plans)
    busy = (m * choice_.time + choice_.once) * share
    flops = sum(costs.captured.nodes[n].flops + costs.captured.nodes[n].backward_flops for n in nodes)
    once = sum(scale[p] * plan.once for p, plan in choice_.plans) * share
    cost = Cost(step_time=busy, compute=compute, communication=max(busy - compute - once, 0.0), optimizer=once,
                peak_memory=max(choice_.memory, state + step_workspace(parts.problem, params)),
                activations=choice_.memory - state, parameter_state=state, fixed=fixed,
                mfu=flops / result.step_time / (choice_.devices * device.peak(dtype)))
    return Stage(index=j, layers=layers, mesh=LogicalMesh.build(costs.cluster, choice_.mesh_shape, first),
                 nodes=nodes, params=params, cost=cost, checkpoint=choice_.checkpoint,
                 microbatch_time=choice_.time * share)
