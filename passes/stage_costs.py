"""Stage costs for the inter-op pass (`passes.interop`): what a candidate stage, a range of layer
blocks on a submesh, takes per microbatch and holds, from the intra-op plans of its parts
(`passes.parts`) solved once per (part, logical mesh).

A stage's cost is the sum of its parts under the fastest combination of their plans that fits the
device with the activations the schedule keeps alive (k microbatches in flight), with or without
checkpointing at layer boundaries; per microbatch it takes f + (t − f) / m (f what a cut of the
batch does not shrink) plus receiving its input and sending back its gradient.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from autopar.cluster import Cluster
from autopar.cost.memory import state_bytes_per_param
from autopar.graph import CapturedGraph
from autopar.plan import Stage
from autopar.vocab import LogicalMesh, candidate_meshes
from autopar.passes.parts import Parts, PartPlan
from autopar.passes.sharding import ShardingOptions, ShardingProblem, build_problem
from autopar.passes.split import transfer_time


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
    latency: float = 0.0
    """The first gradient bucket's latency on each axis the stage synchronizes in buckets, paid once
    per step after its last backward (`ilp.bucket_latency`); added to the split's step time, not
    to `once`, which the stage DP's bound is made of."""


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
    latency: float = 0.0
    """Each bucketed axis's first bucket latency, over the stage's parts (`StageChoice.latency`)."""

    def per_microbatch(self, m: int) -> float:
        """A microbatch's share of `work`: f + (work − f) / m, f what a cut of the batch does not
        shrink (`strategies.fixed_time`)."""
        return self.fixed + (self.work - self.fixed) / m

    @property
    def busy(self) -> float:
        return self.work + self.once


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
                           memory=memory(figures), checkpoint=ckpt, plans=tuple(chosen.items()),
                           latency=figures.latency)

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
                                             plans=tuple(chosen.items()), latency=figures.latency)
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
        buckets: dict[int, float] = {}
        for part, n in self.part_counts(a, b).items():
            plan = chosen[part]
            buckets.update(plan.buckets)
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
                        fixed=fixed, latency=sum(buckets.values()))

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
