"""The inter-op pass: Alpa's stage dynamic program over the captured layers.

Takes a captured graph, the cluster and the sharding options; gives pipeline stages (contiguous
layer ranges, each on a submesh with a logical mesh shape and an intra-op plan), the number of
microbatches, the schedule, and activation checkpointing per stage.

1. Blocks. The captured layers, clustered into at most `max_blocks` contiguous blocks of balanced
   FLOPs (Alpa's layer clustering); the ops before the first layer (embedding) go with the first
   block and those after the last (head, loss) with the last.
2. Stage costs from the intra-op pass, solved once per (part, logical mesh) (`passes.parts`): a
   part is the embedding side, the head side, or one distinct layer signature; identical layers
   share it. A stage's cost is the sum of its parts under the fastest combination of
   those plans that fits the device with the activations the schedule keeps alive, with or
   without checkpointing at layer boundaries.
3. The DP (Alpa, Zheng et al. 2022, §5.2): for each bound t_max on the per-microbatch stage time,
   F(s, a, d) = min over the first stage's blocks [a, b) and submesh of t(a, b, submesh, s) +
   F(s - 1, b, d - |submesh|), stage times above t_max excluded; the step is
   T = m·max t + c·(Σ t - max t) (`passes.schedules`) plus the once-per-step gradient
   synchronization and optimizer step of the slowest stage. Outer loops: schedule and microbatch
   count (divisors of the batch that the stages' data-parallel degree divides).

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
from typing import Any

from autopar.cluster import Cluster
from autopar.cost.memory import state_bytes_per_param
from autopar.assemble import borrowed, placements
from autopar.graph import CapturedGraph
from autopar.plan import Cost, Stage
from autopar.vocab import LogicalMesh, candidate_meshes
from autopar.passes import schedules
from autopar.passes.parts import Parts, PartPlan
from autopar.passes.rules import tensor_args
from autopar.passes.sharding import ShardingOptions, ShardingProblem, build_problem
from autopar.passes.split import chunk_of, transfer_time


@dataclass(frozen=True, slots=True)
class StageChoice:
    blocks: tuple[int, int]
    devices: int
    mesh_shape: tuple[int, ...]
    time: float
    """Per microbatch, forward and backward, with the transfers in and out."""
    once: float
    memory: float
    checkpoint: bool
    plans: tuple[tuple[str, PartPlan], ...]


@dataclass(frozen=True, slots=True)
class _Figures:
    """A stage under one pick of part plans, before the microbatch count m and the in-flight count
    k: per microbatch it takes `per_microbatch(m)`, and holds state + (flight·k + largest)/m bytes."""
    work: float
    """Whole batch, forward and backward (and the forward again where checkpointed)."""
    once: float
    state: float
    flight: float
    """Bytes kept for backward by the whole batch (a microbatch keeps flight/m)."""
    largest: float
    """Checkpointed: the largest layer's activations, rebuilt in backward one layer at a time."""
    shards: int
    """How many ways the batch is split (a microbatch's samples must divide evenly)."""
    plans: tuple[PartPlan, ...]
    fixed: float = 0.0
    """The part of `work` every microbatch pays whole (`parts.PartPlan.fixed`)."""

    def per_microbatch(self, m: int) -> float:
        """A microbatch's share of `work`: f + (work − f) / m, f what a cut of the batch does not
        shrink (`strategies.fixed_time`)."""
        return self.fixed + (self.work - self.fixed) / m

    @property
    def busy(self) -> float:
        return self.work + self.once


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

@dataclass(frozen=True, slots=True)
class _Submesh:
    devices: int
    meshes: tuple[LogicalMesh, ...]


def submeshes(cluster: Cluster) -> list[_Submesh]:
    """(1, 2^k) inside a node, and 2^k whole nodes; each with its candidate logical meshes. A 1-D
    mesh over several nodes is left out: its data parallelism is a 2-D mesh's with the batch split
    on both axes, and its tensor parallelism would cross nodes."""
    sizes = []
    k = 1
    while k < cluster.devices_per_node:
        sizes.append(k)
        k *= 2
    n = 1
    while n <= cluster.nodes:
        sizes.append(n * cluster.devices_per_node)
        n *= 2
    out = []
    for d in sorted(set(sizes)):
        meshes = candidate_meshes(cluster, d)
        if d > cluster.devices_per_node and len(meshes) > 1:  # across nodes: 2-D only (see above)
            meshes = meshes[1:]
        out.append(_Submesh(devices=d, meshes=tuple(meshes)))
    return out


class StageCosts:
    """Stage time, once-per-step time and memory of a block range on a submesh, memoized."""

    def __init__(self, captured: CapturedGraph, cluster: Cluster, options: ShardingOptions, blocks: list[tuple[int, int]],
                 batch: int, time_limit: float, problems: dict[tuple[int, ...], ShardingProblem] | None = None) -> None:
        """`problems`: sharding problems already built for some mesh shapes (with these options, or
        with ZeRO-3 as well, which the parts leave out)."""
        self.captured, self.cluster, self.options, self.blocks = captured, cluster, options, blocks
        self.batch, self.time_limit = batch, time_limit
        self.budget = options.memory_budget or cluster.device.memory * (1 - options.workspace)
        self._problems = dict(problems or {})
        self._parts: dict[tuple[int, ...], Parts] = {}
        self._memo: dict[tuple, Any] = {}
        self.signature = {l.index: l.signature for l in captured.layers}

    def parts(self, shape: tuple[int, ...]) -> Parts:
        """The parts of the sharding problem on a mesh of this shape (built on first use)."""
        if shape not in self._parts:
            problem = self._problems.pop(shape, None) or build_problem(
                self.captured, LogicalMesh.build(self.cluster, shape), self.cluster, self.options)
            self._parts[shape] = Parts(problem, self.time_limit)
        return self._parts[shape]

    def part_counts(self, a: int, b: int) -> dict[str, int]:
        """How many instances of each part blocks [a, b) hold."""
        key = ("counts", a, b)
        if key in self._memo:
            return self._memo[key]
        counts: dict[str, int] = {}
        whole = a == 0 and b == len(self.blocks)
        if a == 0 and not whole:
            counts["pre"] = 1
        for layer in range(self.blocks[a][0], self.blocks[b - 1][1]):
            key_ = f"layer:{self.signature[layer]}"
            counts[key_] = counts.get(key_, 0) + 1
        if whole:
            counts["ends"] = 1  # embedding and head planned together (a tied weight joins them)
        elif b == len(self.blocks):
            counts["post"] = 1
        self._memo[key] = counts
        return counts

    def choices(self, m: int, k: float, submesh_list: list[_Submesh], left: int = 1, least: int = 1
                ) -> list[list[tuple[int, int, StageChoice]]]:
        """Per first block a, every stage [a, b) of at least `least` layers that leaves a block for
        each of the `left` - 1 stages after it and fits on a submesh with m microbatches and k in
        flight: (b, devices, choice). Memoized: the DP asks again for every stage count."""
        key = ("choices", m, k, left, least)
        if key not in self._memo:
            n, total = len(self.blocks), self.cluster.num_devices
            self._memo[key] = [
                [(b, sub.devices, o) for b in range(a + 1, n - left + 2)
                 if self.blocks[b - 1][1] - self.blocks[a][0] >= least for sub in submesh_list
                 if ((a, b) == (0, n)) == (sub.devices == total)  # all devices: the whole model, one stage
                 for o in [self.stage(a, b, sub, m, k)] if o is not None] for a in range(n)]
        return self._memo[key]

    def stage(self, a: int, b: int, submesh: _Submesh, microbatches: int, in_flight: float) -> StageChoice | None:
        key = (a, b, submesh.devices, microbatches, in_flight)
        if key not in self._memo and self._floor(a, b) / submesh.devices > self.budget:
            self._memo[key] = None  # its parameter state alone, spread over every device, does not fit
        if key not in self._memo:
            options = []
            for mesh in submesh.meshes:
                plain = self._on_mesh(a, b, mesh, microbatches, in_flight, False)
                options.append(plain)
                if plain is None or plain.plans is not self._untraded(a, b, mesh, microbatches, False)[1].plans:
                    options.append(self._on_mesh(a, b, mesh, microbatches, in_flight, True))  # only helps a trade
            options = [o for o in options if o is not None]
            self._memo[key] = min(options, key=lambda o: (microbatches * o.time + o.once, o.memory), default=None)
        return self._memo[key]

    def _floor(self, a: int, b: int) -> float:
        """Bytes of the weights, gradients and optimizer state of blocks [a, b): a stage holds at
        least this much over its devices."""
        key = ("floor", a, b)
        if key not in self._memo:
            per = state_bytes_per_param(self.options.precision, self.options.optimizer)
            layers = self.captured.layers[self.blocks[a][0]:self.blocks[b - 1][1]]
            infos = [self.captured.params[name] for layer in layers for name in layer.params]
            self._memo[key] = sum(i.meta.numel * (per.total if i.requires_grad else per.weights) for i in infos)
        return self._memo[key]

    def _on_mesh(self, a: int, b: int, mesh: LogicalMesh, m: int, k: float, ckpt: bool) -> StageChoice | None:
        """Blocks [a, b) on `mesh` with m microbatches, k of them in flight: from the fastest pick of
        part plans, trade time for memory (the next plan of the part that saves the most bytes per
        second lost) until the stage fits. Every pick splits a microbatch's samples evenly."""
        fastest = self._untraded(a, b, mesh, m, ckpt)
        if fastest is None:
            return None
        figures, choice = fastest

        def memory(f: _Figures) -> float:
            return f.state + (f.flight * k + f.largest) / m

        if memory(figures) <= self.budget:
            return dataclasses.replace(choice, memory=memory(figures))
        micro = self.batch // m
        pick = list(self._fastest(a, b, mesh.shape, ckpt, micro))
        while memory(figures) > self.budget:
            best, best_rate = None, -1.0
            for i in range(len(pick)):
                pick[i] += 1
                found = self._figures(a, b, mesh.shape, ckpt, tuple(pick))
                pick[i] -= 1
                if found is None or micro % found.shards or memory(found) >= memory(figures):
                    continue
                rate = (memory(figures) - memory(found)) / max(found.busy - figures.busy, 1e-12)
                if rate > best_rate:
                    best, best_rate = (i, found), rate
            if best is None:
                return None
            pick[best[0]] += 1
            figures = best[1]
        chosen = dict(zip(self.part_counts(a, b), figures.plans))
        time = figures.per_microbatch(m) + self.transfer(a, mesh, chosen, m)
        return StageChoice(blocks=(a, b), devices=mesh.size, mesh_shape=mesh.shape, time=time, once=figures.once,
                           memory=memory(figures), checkpoint=ckpt, plans=tuple(chosen.items()))

    def _untraded(self, a: int, b: int, mesh: LogicalMesh, m: int, ckpt: bool
                  ) -> tuple[_Figures, StageChoice] | None:
        """The stage at its fastest pick (`_fastest`), whatever its memory (filled in by the caller)."""
        key = ("untraded", a, b, mesh.shape, ckpt, m)
        if key not in self._memo:
            start = self._fastest(a, b, mesh.shape, ckpt, self.batch // m)
            found = None
            if start is not None:
                figures = self._figures(a, b, mesh.shape, ckpt, start)
                chosen = dict(zip(self.part_counts(a, b), figures.plans))
                time = figures.per_microbatch(m) + self.transfer(a, mesh, chosen, m)
                found = figures, StageChoice(blocks=(a, b), devices=mesh.size, mesh_shape=mesh.shape, time=time,
                                             once=figures.once, memory=math.nan, checkpoint=ckpt,
                                             plans=tuple(chosen.items()))
            self._memo[key] = found
        return self._memo[key]

    def _fastest(self, a: int, b: int, shape: tuple[int, ...], ckpt: bool, micro: int) -> tuple[int, ...] | None:
        """The pick (one plan index per part) that starts the memory trade: every layer part at its
        i-th plan, the sides solved against them, for the i that gives the fastest stage whose
        batch split divides a microbatch of `micro` samples."""
        key = ("fastest", a, b, shape, ckpt, micro)
        if key not in self._memo:
            parts, names = self.parts(shape), list(self.part_counts(a, b))
            layer_parts = [p for p in names if p.startswith("layer:")]
            best = None
            if all(parts.plans(p) for p in layer_parts):
                for i in range(max((len(parts.plans(p)) for p in layer_parts), default=1)):
                    pick = tuple(min(i, len(parts.plans(p)) - 1) if p.startswith("layer:") else 0 for p in names)
                    found = self._figures(a, b, shape, ckpt, pick)
                    if found is not None and not micro % found.shards and (best is None or found.busy < best[0]):
                        best = (found.busy, pick)
            self._memo[key] = best[1] if best else None
        return self._memo[key]

    def _figures(self, a: int, b: int, shape: tuple[int, ...], ckpt: bool, pick: tuple[int, ...]) -> _Figures | None:
        """The stage's figures under one pick of part plans (indices in `part_counts` order; a side's
        index is into its plans solved against the picked layer plans); None when an index is out of
        range. Memoized: the trade revisits picks for every microbatch count."""
        key = ("figures", a, b, shape, ckpt, pick)
        if key in self._memo:
            return self._memo[key]
        parts, counts = self.parts(shape), self.part_counts(a, b)
        index = dict(zip(counts, pick))
        layers = tuple(index.get(l, 0) for l in parts.layer_parts)
        chosen = {}
        for part, i in index.items():
            options = parts.plans(part) if part.startswith("layer:") else parts.plans(part, layers)
            if i >= len(options):
                self._memo[key] = None
                return None
            chosen[part] = options[i]
        self._memo[key] = figures = self.figures_of(a, b, shape, ckpt, chosen)
        return figures

    def figures_of(self, a: int, b: int, shape: tuple[int, ...], ckpt: bool, chosen: dict[str, PartPlan]) -> _Figures:
        """Blocks [a, b) on a mesh of `shape` with these plans of their parts (`part_counts`)."""
        work = once = state = flight = largest = fixed = 0.0
        for part, n in self.part_counts(a, b).items():
            plan = chosen[part]
            layer = part.startswith("layer:")
            work += n * (plan.work + (plan.forward if ckpt and layer else 0.0))
            fixed += n * plan.fixed
            once += n * plan.once
            state += n * plan.state
            if ckpt and layer:
                flight += n * plan.boundary
                largest = max(largest, plan.activations)
            else:
                flight += n * plan.activations
        work += self._cross(a, b, shape, {part: dict(plan.choice) for part, plan in chosen.items()})
        return _Figures(work=work, once=once, state=state, flight=flight, largest=largest,
                        shards=max(plan.batch_shards for plan in chosen.values()), plans=tuple(chosen.values()),
                        fixed=fixed)

    def _cross(self, a: int, b: int, shape: tuple[int, ...], picks: dict[str, dict[int, int]]) -> float:
        """The resharding between layers of different signatures that the stage holds."""
        parts, units = self.parts(shape), self.parts(shape).problem.units
        first, last = self.blocks[a][0], self.blocks[b - 1][1]

        def inside(u: int) -> bool:
            where = parts.part_of[u]
            return (where == "pre" and a == 0) or (where == "post" and b == len(self.blocks)) or (
                units[u].layer is not None and first <= units[u].layer < last)

        return sum(e.cost[e.rows[picks[ps][e.src]]][e.cols[picks[pd][e.dst]]]
                   for e, s, d in parts.cross if inside(s) and inside(d)
                   for ps, pd in [(parts.part_of[s], parts.part_of[d])])

    def transfer(self, a: int, mesh: LogicalMesh, chosen: dict[str, PartPlan], m: int) -> float:
        """Receiving the previous stage's output and sending back its gradient, per microbatch
        (`passes.split.transfer_time`)."""
        if a == 0:
            return 0.0
        first = next(p for p in chosen if p.startswith("layer:"))
        return transfer_time(self.cluster, mesh.size, chosen[first].boundary / m)


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
                if found is not None and (best is None or found.step_time < best.step_time):
                    best = found
    return best


def _dp(costs: StageCosts, submesh_list: list[_Submesh], kind: str, m: int, p: int, total: int,
        limit: float = math.inf) -> PipelinePlan | None:
    """The fastest split into p stages with step time below `limit`, or None."""
    blocks = len(costs.blocks)
    least = schedules.VIRTUAL if kind == "interleaved" else 1  # layers per stage: one per chunk
    # per stage (s stages left, itself included): its options from each first block, with the
    # activations the schedule keeps in flight there
    # (interleaved counts in halves of a stage; the DP rounds them up to whole ones, which shares
    # the tables with 1F1B's at the cost of at most half a microbatch of activations more)
    table = {s: costs.choices(m, math.ceil(schedules.in_flight(kind, p, m, p - s)), submesh_list, s, least)
             for s in range(1, p + 1)}
    bounds = sorted({m * o.time + o.once for t in table.values() for row in t for _, _, o in row})
    best = None
    for bound in bounds:
        if bound >= (best[0] if best else limit):
            break  # T >= U: no larger bound can win

        @functools.lru_cache(maxsize=None)
        def f(s: int, a: int, d: int) -> tuple[float, tuple[StageChoice, ...]] | None:
            if s == 0:
                return (0.0, ()) if a == blocks and d == 0 else None
            result = None
            for b, devices, o in table[s][a]:
                if b > blocks - s + 1 or devices > d or m * o.time + o.once > bound:
                    continue
                rest = f(s - 1, b, d - devices)
                if rest is not None and (result is None or o.time + rest[0] < result[0]):
                    result = (o.time + rest[0], (o, *rest[1]))
            return result

        found = f(p, 0, total)
        if found is not None:
            stages = found[1]
            t = schedules.step_time(kind, [o.time for o in stages], m, [o.once for o in stages])
            if best is None or t < best[0]:
                best = (t, stages)
    if best is None:
        return None
    step, stages = best
    layers = tuple((costs.blocks[o.blocks[0]][0], costs.blocks[o.blocks[1] - 1][1]) for o in stages)
    return PipelinePlan(stages=stages, layers=layers, schedule=kind if p > 1 else "none", microbatches=m,
                        step_time=step)


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
                peak_memory=choice_.memory, activations=choice_.memory - state, parameter_state=state, fixed=fixed,
                mfu=flops / result.step_time / (choice_.devices * device.peak(dtype)))
    return Stage(index=j, layers=layers, mesh=LogicalMesh.build(costs.cluster, choice_.mesh_shape, first),
                 nodes=nodes, params=params, cost=cost, checkpoint=choice_.checkpoint,
                 microbatch_time=choice_.time * share)
