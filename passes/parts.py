"""Stage parts for the inter-op pass: the intra-op ILP on a piece of the graph.

A part is the embedding side ("pre"), the head side ("post"), both together ("ends", for a stage
that holds the whole model), or one distinct layer signature ("layer:<signature>"); identical
layers share theirs. `Parts` solves a part's sharding problem, scoped to it by reweighting the
full problem's unit and edge counts, unconstrained and under a few memory budgets, and keeps every
distinct plan with its time and memory (`PartPlan`). The sides are solved with the layers' plans
held fixed, so the edges between them are priced against what the layers really do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autopar.errors import InfeasibleError
from autopar.graph import CapturedGraph
from autopar.vocab import shard_count
from autopar.passes.ilp import evaluate, minimum_memory, solve
from autopar.passes.rules import tensor_args
from autopar.passes.sharding import ShardingProblem
from autopar.passes.strategies import Strategy

LEANER = ((1.0, (0.3,)), (0.0, (0.5, 0.0)))
"""(activation weight, budgets): a part is solved again under these memory budgets, counting its
activations at this weight (0: its parameter state only, what matters to a pipeline stage that
keeps few of many microbatches). A budget is a fraction of the way from the least memory any plan
needs (0: the leanest plan) to the unconstrained plan's (1), so every budget has a plan."""


@dataclass(frozen=True, slots=True)
class PartPlan:
    """One intra-op plan of a part on a mesh: per-step sums over one instance of the part."""

    choice: tuple[tuple[int, int], ...]
    compute: float
    work: float
    """Compute and per-microbatch communication (activations, reshards), whole batch, seconds."""
    forward: float
    """The forward share of `work`'s compute: what checkpointing runs again."""
    once: float
    """Gradient synchronization and optimizer step, once per step."""
    activations: float
    """Bytes saved for backward, whole batch."""
    boundary: float
    """Bytes of the part's inputs from the previous layer: all a checkpointed layer keeps."""
    state: float
    batch_shards: int
    """How many ways the batch dimension of the part's input is split."""
    fixed: float = 0.0
    """The part of `compute` every microbatch pays whole (`strategies.Strategy.fixed`)."""
    buckets: tuple[tuple[int, float], ...] = ()
    """(mesh axis, latency) of each axis its strategies synchronize gradients on in buckets: a
    stage pays each axis's first bucket latency once, whatever its parts (`ilp.bucket_latency`)."""


class Parts:
    """The parts of one sharding problem (embedding side, head side, one per layer signature) and
    their plans, solved on first use."""

    def __init__(self, problem: ShardingProblem, time_limit: float) -> None:
        self.problem, self.time_limit = problem, time_limit
        units, captured = problem.units, problem.captured
        first_layer_unit = min((u.index for u in units if u.layer is not None), default=len(units))
        self.part_of: dict[int, str] = {}
        signature_of = {l.index: l.signature for l in captured.layers}
        self.representative: dict[str, int] = {}
        for u in units:
            if u.kind == "input":
                self.part_of[u.index] = "input"
            elif u.layer is not None:
                sig = signature_of[u.layer]
                self.representative.setdefault(sig, u.layer)
                self.part_of[u.index] = f"layer:{sig}"
            else:
                self.part_of[u.index] = "pre" if u.index < first_layer_unit else "post"
        self._plans: dict[tuple, list[PartPlan]] = {}
        self.layer_parts = [p for p in dict.fromkeys(self.part_of.values()) if p.startswith("layer:")]
        self._whole: dict[int, int] | None = None
        # edges between layers of different signatures: a stage pays for the ones whose both ends it holds
        self.cross = [(e, s, d) for e in problem.edges for s, d in e.occurrences  # the sides count their own
                      if self.part_of[s].startswith("layer:") and self.part_of[d].startswith("layer:")
                      and self.part_of[s] != self.part_of[d]]

    def in_part(self, part: str, unit: int) -> bool:
        """Units counted in one instance of `part` (a layer part: its representative layer; "ends":
        both sides together, for a stage that holds the whole model)."""
        u = self.problem.units[unit]
        if part.startswith("layer:"):
            return u.layer == self.representative[part.removeprefix("layer:")]
        if part == "ends":
            return self.part_of[unit] in ("pre", "post")
        return self.part_of[unit] == part

    def plans(self, part: str, layers: tuple[int, ...] | None = None) -> list[PartPlan]:
        """A part's plans, fastest first. A side ("pre", "post", "ends") is solved with each layer
        part held at its plan `layers[i]` (default: every layer's fastest); layer plans that agree
        where they meet the side share its solution."""
        if part.startswith("layer:"):
            layers = None
        elif layers is None:
            layers = tuple(0 for _ in self.layer_parts)
        key = (part, layers)
        if key not in self._plans:
            scoped = self._scoped(part)
            fixed = self._fixed(part, scoped, layers) if layers is not None else {}
            shared = (part, tuple(sorted(fixed.items())))
            if shared not in self._plans:
                self._plans[shared] = self._solve(part, scoped, fixed)
            self._plans[key] = self._plans[shared]
        return self._plans[key]

    def restricted(self, part: str, allowed) -> PartPlan | None:
        """The part's fastest plan among the strategies `allowed` admits (a named baseline's family,
        `passes.baselines.predicate`), or None when it has none."""
        key = ("restricted", part, allowed)
        if key not in self._plans:
            scoped = self._scoped(part)
            scoped.budget, scoped.activation_weight = 1e18, 1.0
            try:
                found = solve(scoped, time_limit=self.time_limit, allowed=allowed)
                self._plans[key] = self._measure(part, scoped, found.choice)
            except InfeasibleError:
                self._plans[key] = None
        return self._plans[key]

    def whole(self) -> dict[int, int] | None:
        """The whole-graph ILP's choice (identical layers planned alike, no ZeRO-3): what each layer
        does when planned together with the embedding and the head, one of each layer's plans."""
        if self._whole is None:
            try:
                self._whole = dict(solve(self.problem, time_limit=self.time_limit,
                                         allowed=lambda u, s: all(h.level < 3 for h in s.params.values())).choice)
            except InfeasibleError:
                self._whole = {}
        return self._whole or None

    def _scoped(self, part: str) -> ShardingProblem:
        """The sharding problem of one instance of the part (memoized; `_solve` sets its budget)."""
        if ("scoped", part) not in self._plans:
            self._plans[("scoped", part)] = self._build_scoped(part)
        return self._plans[("scoped", part)]

    def _build_scoped(self, part: str) -> ShardingProblem:
        problem = self.problem
        counts = {c: 0 for c in problem.strategies}
        for u in problem.units:
            if self.in_part(part, u.index) or u.kind == "input":
                counts[u.canonical] = counts[u.canonical] + (0 if u.kind == "input" else 1)
        edges = []
        side = not part.startswith("layer:")  # embedding or head side: also its edges to the layers and
        for e in problem.edges:               # to the other side, whose plans are then held fixed
            n = sum(1 for s, d in e.occurrences if
                    (self.in_part(part, d) and (self.in_part(part, s) or problem.units[s].kind == "input"
                                                or self.part_of[s] == part or side))
                    or (side and self.in_part(part, s) and self.part_of[d].startswith("layer:")))
            if n:
                edges.append(dataclasses.replace(e, count=n))
        keep = {c for c, n in counts.items() if n} | {x for e in edges for x in (e.src, e.dst)}
        return dataclasses.replace(problem, counts={c: counts[c] for c in keep},
                                   strategies={c: problem.strategies[c] for c in keep}, edges=edges, fixed_memory=0.0)

    def _fixed(self, part: str, scoped: ShardingProblem, layers: tuple[int, ...]) -> dict[int, int]:
        """The choices a side's problem holds fixed: the layers' (and, for the head, the embedding
        side's) at the units it touches but does not own."""
        held = [self.plans(l)[min(i, len(self.plans(l)) - 1)] if self.plans(l) else None
                for l, i in zip(self.layer_parts, layers)]
        if part == "post" and self.plans("pre", layers):
            held.append(self.plans("pre", layers)[0])
        fixed: dict[int, int] = {}
        for plan in held:
            for c, i in plan.choice if plan else ():
                if c in scoped.strategies and scoped.counts.get(c, 0) == 0:
                    fixed[c] = i
        return fixed

    def _solve(self, part: str, scoped: ShardingProblem, fixed: dict[int, int]) -> list[PartPlan]:
        allowed = lambda u, s: (all(h.level < 3 for h in s.params.values()) and  # noqa: E731
                                (u not in fixed or scoped.strategies[u][fixed[u]] is s))
        scoped.budget, scoped.activation_weight = 1e18, 1.0  # unconstrained: the stage, not the part, must fit
        found = []
        try:
            first = solve(scoped, time_limit=self.time_limit, allowed=allowed)
        except InfeasibleError:
            return []
        found.append(first.choice)
        # leaner plans: in all the memory, then (a stage keeps a few microbatches of many) in state only
        for weight, fractions in LEANER:
            scoped.activation_weight = weight
            top, least = evaluate(scoped, first.choice)[1], minimum_memory(scoped, allowed)
            for fraction in fractions:
                scoped.budget = least + fraction * (top - least) + 1e-9 * top
                if scoped.budget >= top:
                    break  # the fastest plan is already the leanest
                try:
                    found.append(solve(scoped, time_limit=self.time_limit, allowed=allowed,
                                       warm_start=first.choice).choice)
                except InfeasibleError:
                    break
        whole = self.whole() if part.startswith("layer:") else None
        if whole is not None:  # the layer as the whole-graph plan has it
            found.append({c: whole[c] for c in scoped.strategies})
        plans = {}
        for choice in found:
            plan = self._measure(part, scoped, choice)
            plans[plan.choice] = plan
        return sorted(plans.values(), key=lambda p: p.work + p.once)

    def _measure(self, part: str, scoped: ShardingProblem, choice: dict[int, int]) -> PartPlan:
        compute = work = forward = once = activations = state = boundary = fixed = 0.0
        captured = self.problem.captured
        buckets: dict[int, float] = {}
        for c, n in scoped.counts.items():
            s: Strategy = scoped.strategies[c][choice[c]]
            buckets.update(s.buckets)
            share = _forward_share(captured, self.problem.units[c].members)
            compute += n * s.compute
            fixed += n * s.fixed
            work += n * (s.compute + s.comm - s.sync)  # FSDP gathers (pp = 1 only) are per microbatch
            forward += n * s.compute * share
            once += n * (s.sync + s.optimizer)
            activations += n * s.activations
            state += n * s.state
        for e in scoped.edges:
            work += e.count * e.cost[e.rows[choice[e.src]]][e.cols[choice[e.dst]]]
        shards = 1
        for u in self.problem.units:
            if u.kind == "input" and u.canonical in choice:
                placed = scoped.strategies[u.canonical][choice[u.canonical]].members[0].outputs[0]
                shards = max(shards, _batch_shards(placed, self.problem.mesh.shape))
        if part.startswith("layer:"):
            boundary = self._boundary_bytes(part, scoped, choice)
        return PartPlan(choice=tuple(sorted(choice.items())), compute=compute, work=work, forward=forward, once=once,
                        activations=activations, boundary=boundary, state=state, batch_shards=shards, fixed=fixed,
                        buckets=tuple(sorted(buckets.items())))

    def _boundary_bytes(self, part: str, scoped: ShardingProblem, choice: dict[int, int]) -> float:
        """Per device: the activations entering the layer from outside it, as the layer takes them
        (all that a checkpointed layer keeps for backward)."""
        problem, total, seen = self.problem, 0.0, set()
        layer = self.representative[part.removeprefix("layer:")]
        for u in problem.units:
            if u.layer != layer:
                continue
            strategy = scoped.strategies[u.canonical][choice[u.canonical]]
            for m, name in enumerate(u.members):
                for j, arg in enumerate(tensor_args(problem.context.fx_nodes[name])):
                    if arg.name in seen or arg.name not in problem.context.roles.activations:
                        continue
                    if problem.units[problem.context.unit_of[arg.name]].layer == layer:
                        continue
                    seen.add(arg.name)
                    placed = strategy.members[m].inputs[j]
                    total += problem.context.nbytes(arg.name) / shard_count(placed, problem.mesh.shape)
        return total


def _forward_share(captured: CapturedGraph, members: list[str]) -> float:
    fwd = sum(captured.nodes[n].flops for n in members)
    bwd = sum(captured.nodes[n].backward_flops for n in members)
    return fwd / (fwd + bwd) if fwd + bwd else 0.0


def _batch_shards(placements, mesh_shape: tuple[int, ...]) -> int:
    n = 1
    for p, size in zip(placements, mesh_shape):
        if getattr(p, "dim", None) == 0:
            n *= size
    return n
