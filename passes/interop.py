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

import functools
import math
from dataclasses import dataclass

from autopar.cluster import Cluster
from autopar.cost.comm import CommModel
from autopar.assemble import placements
from autopar.graph import CapturedGraph
from autopar.plan import Cost, Stage
from autopar.vocab import LogicalMesh, candidate_meshes
from autopar.passes import schedules
from autopar.passes.parts import Parts, PartPlan
from autopar.passes.sharding import ShardingOptions, build_problem


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
    """(1, 2^k) inside a node, and 2^k whole nodes; each with its candidate logical meshes."""
    sizes = []
    k = 1
    while k < cluster.devices_per_node:
        sizes.append(k)
        k *= 2
    n = 1
    while n <= cluster.nodes:
        sizes.append(n * cluster.devices_per_node)
        n *= 2
    return [_Submesh(devices=d, meshes=tuple(candidate_meshes(cluster, d))) for d in sorted(set(sizes))]


class StageCosts:
    """Stage time, once-per-step time and memory of a block range on a submesh, memoized."""

    def __init__(self, captured: CapturedGraph, cluster: Cluster, options: ShardingOptions, blocks: list[tuple[int, int]],
                 batch: int, time_limit: float) -> None:
        self.captured, self.cluster, self.options, self.blocks = captured, cluster, options, blocks
        self.batch, self.time_limit = batch, time_limit
        self.budget = options.memory_budget or cluster.device.memory * (1 - options.workspace)
        self._parts: dict[tuple[int, ...], Parts] = {}
        self._memo: dict[tuple, StageChoice | None] = {}
        self.signature = {l.index: l.signature for l in captured.layers}

    def parts(self, shape: tuple[int, ...]) -> Parts:
        """The parts of the sharding problem on a mesh of this shape (built on first use)."""
        if shape not in self._parts:
            problem = build_problem(self.captured, LogicalMesh.build(self.cluster, shape), self.cluster, self.options)
            self._parts[shape] = Parts(problem, self.time_limit)
        return self._parts[shape]

    def part_counts(self, a: int, b: int) -> dict[str, int]:
        """How many instances of each part blocks [a, b) hold."""
        counts: dict[str, int] = {}
        whole = a == 0 and b == len(self.blocks)
        if a == 0 and not whole:
            counts["pre"] = 1
        for layer in range(self.blocks[a][0], self.blocks[b - 1][1]):
            key = f"layer:{self.signature[layer]}"
            counts[key] = counts.get(key, 0) + 1
        if whole:
            counts["ends"] = 1  # embedding and head planned together (a tied weight joins them)
        elif b == len(self.blocks):
            counts["post"] = 1
        return counts

    def stage(self, a: int, b: int, submesh: _Submesh, microbatches: int, in_flight: float) -> StageChoice | None:
        key = (a, b, submesh.devices, microbatches, in_flight)
        if key not in self._memo:
            options = [self._on_mesh(a, b, mesh, microbatches, in_flight, ckpt)
                       for mesh in submesh.meshes for ckpt in (False, True)]
            options = [o for o in options if o is not None]
            self._memo[key] = min(options, key=lambda o: (microbatches * o.time + o.once, o.memory), default=None)
        return self._memo[key]

    def _on_mesh(self, a: int, b: int, mesh: LogicalMesh, m: int, k: float, ckpt: bool) -> StageChoice | None:
        parts = self.parts(mesh.shape)
        first, last = self.blocks[a][0], self.blocks[b - 1][1]
        counts = self.part_counts(a, b)
        plans = {part: parts.plans(part) for part in counts}
        if any(not p for p in plans.values()):
            return None
        pick = {part: 0 for part in counts}
        units = parts.problem.units

        def inside(u: int) -> bool:
            where = parts.part_of[u]
            return (where == "pre" and a == 0) or (where == "post" and b == len(self.blocks)) or (
                units[u].layer is not None and first <= units[u].layer < last)

        cross = [(e, parts.part_of[s], parts.part_of[d]) for e, s, d in parts.cross if inside(s) and inside(d)]

        def edges() -> float:
            chosen = {part: dict(plans[part][pick[part]].choice) for part in counts}
            return sum(e.cost[e.rows[chosen[ps][e.src]]][e.cols[chosen[pd][e.dst]]] for e, ps, pd in cross)

        def evaluate() -> tuple[float, float, float]:
            time = once = state = kept = largest = 0.0
            for part, n in counts.items():
                plan = plans[part][pick[part]]
                layer = part.startswith("layer:")
                time += n * (plan.work + (plan.forward if ckpt and layer else 0.0))
                once += n * plan.once
                state += n * plan.state
                if ckpt and layer:
                    kept += n * plan.boundary * k
                    largest = max(largest, plan.activations)
                else:
                    kept += n * plan.activations * k
            return (time + edges()) / m, once, state + (kept + largest) / m

        time, once, memory = evaluate()
        while memory > self.budget:  # trade time for memory where it buys the most
            best, best_rate = None, -1.0
            for part in counts:
                if pick[part] + 1 < len(plans[part]):
                    pick[part] += 1
                    t2, o2, m2 = evaluate()
                    pick[part] -= 1
                    rate = (memory - m2) / max(m * t2 + o2 - m * time - once, 1e-12)
                    if memory > m2 and rate > best_rate:
                        best, best_rate = part, rate
            if best is None:
                return None
            pick[best] += 1
            time, once, memory = evaluate()
        shards = max(plans[p][pick[p]].batch_shards for p in counts)
        if (self.batch // m) % shards:
            return None
        time += self._transfer(a, b, mesh, plans, pick, counts, m)
        return StageChoice(blocks=(a, b), devices=mesh.size, mesh_shape=mesh.shape, time=time, once=once,
                           memory=memory, checkpoint=ckpt, plans=tuple((p, plans[p][pick[p]]) for p in counts))

    def _transfer(self, a: int, b: int, mesh: LogicalMesh, plans, pick, counts, m: int) -> float:
        """Receiving the previous stage's output and sending back its gradient, per microbatch: each
        device exchanges its own piece with its counterpart."""
        if a == 0:
            return 0.0
        first = next(p for p in counts if p.startswith("layer:"))
        nbytes = plans[first][pick[first]].boundary / m
        pair = (0, min(mesh.size, self.cluster.num_devices - 1))
        return 2 * CommModel(self.cluster).time("send_recv", nbytes, pair) if pair[1] else 0.0


def search(costs: StageCosts, submesh_list: list[_Submesh], *, schedules_: tuple[str, ...] = ("1f1b",),
           microbatches: list[int] | None = None, max_stages: int | None = None) -> PipelinePlan | None:
    """The fastest stage split: loops over schedule, microbatch count and number of stages p; for
    each, Alpa's DP over a bound U on each stage's busy time m·t + o, minimizing Σ t."""
    total, blocks = costs.cluster.num_devices, len(costs.blocks)
    counts = microbatches or schedules.microbatch_counts(costs.batch)
    best: PipelinePlan | None = None
    for kind in schedules_:
        for m in counts:
            for p in range(1, min(blocks, max_stages or blocks) + 1):
                if kind == "interleaved" and p == 1:
                    continue
                found = _dp(costs, submesh_list, kind, m, p, total)
                if found is not None and (best is None or found.step_time < best.step_time):
                    best = found
    return best


def _dp(costs: StageCosts, submesh_list: list[_Submesh], kind: str, m: int, p: int, total: int) -> PipelinePlan | None:
    blocks = len(costs.blocks)

    def option(a: int, b: int, sub: _Submesh, s: int) -> StageChoice | None:
        return costs.stage(a, b, sub, m, schedules.in_flight(kind, p, m, p - s))

    # every stage option that can appear, to enumerate the bound U over their busy times
    bounds = set()
    for s in range(1, p + 1):
        for a in range(blocks):
            for b in range(a + 1, blocks + 1):
                for sub in submesh_list:
                    o = option(a, b, sub, s)
                    if o is not None:
                        bounds.add(m * o.time + o.once)
    best = None
    ramp = schedules.ramp_factor(kind) * (p - 1) / p
    for bound in sorted(bounds):
        if best is not None and bound >= best[0]:
            break  # T >= U: no larger bound can win

        @functools.lru_cache(maxsize=None)
        def f(s: int, a: int, d: int) -> tuple[float, tuple[StageChoice, ...]] | None:
            if s == 0:
                return (0.0, ()) if a == blocks and d == 0 else None
            result = None
            for b in range(a + 1, blocks - s + 2):
                for sub in submesh_list:
                    if sub.devices > d:
                        continue
                    o = option(a, b, sub, s)
                    if o is None or m * o.time + o.once > bound:
                        continue
                    rest = f(s - 1, b, d - sub.devices)
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


def assemble(result: PipelinePlan, costs: StageCosts) -> tuple[Stage, ...]:
    """The plan's stages: each stage's nodes and parameters with the placements its parts chose,
    on its own devices (stages take consecutive device ranges, first stage first)."""
    out, first = [], 0
    last_index = len(result.stages) - 1
    device = costs.cluster.device
    dtype = "fp32" if costs.options.precision == "fp32" else costs.options.precision
    for i, (choice_, layers) in enumerate(zip(result.stages, result.layers)):
        parts = costs.parts(choice_.mesh_shape)
        choice: dict[int, int] = {}
        for _, plan in choice_.plans:
            choice.update(dict(plan.choice))
        units = []
        for u in parts.problem.units:
            where = parts.part_of[u.index]
            inside = (u.layer is not None and layers[0] <= u.layer < layers[1]) or (where == "pre" and i == 0) or (
                where == "post" and i == last_index) or (where == "input" and i in (0, last_index))
            if inside:
                choice.setdefault(u.canonical, 0)
                units.append(u)
        nodes, params = placements(parts.problem, choice, units)
        m = result.microbatches
        scale = costs.part_counts(*choice_.blocks)
        compute = sum(scale[p] * plan.compute for p, plan in choice_.plans)
        state = sum(scale[p] * plan.state for p, plan in choice_.plans)
        busy = m * choice_.time + choice_.once
        flops = sum(costs.captured.nodes[n].flops + costs.captured.nodes[n].backward_flops for n in nodes)
        cost = Cost(step_time=busy, compute=compute, communication=max(busy - compute - choice_.once, 0.0),
                    optimizer=sum(scale[p] * plan.once for p, plan in choice_.plans), peak_memory=choice_.memory,
                    activations=choice_.memory - state, parameter_state=state,
                    mfu=flops / result.step_time / (choice_.devices * device.peak(dtype)))
        out.append(Stage(index=i, layers=layers, mesh=LogicalMesh.build(costs.cluster, choice_.mesh_shape, first),
                         nodes=nodes, params=params, cost=cost, checkpoint=choice_.checkpoint,
                         microbatch_time=choice_.time))
        first += choice_.devices
    return tuple(out)
