"""The sharding problem: units with priced strategies, and edges with priced placement changes.

Takes a captured graph, a logical mesh, the cluster and `ShardingOptions`; gives a
`ShardingProblem` for `passes.ilp.solve`:

    problem = build_problem(captured, mesh, cluster, ShardingOptions(precision="fp32"))
    solution = solve(problem)

Costs are per training step, per device, in seconds and bytes. The time of a plan is the sum of
its units' strategies (compute, collectives inside, optimizer) and of its edges: for a tensor
that leaves one unit in placement a and enters another in placement b, the forward reshard a → b
and the backward reshard of its gradient (`passes.reshard`). Units that identical layers share
are priced once and counted as often as they occur.

On a mesh of p > 1 devices each node's computation is priced as the slowest rank pays it, its
share (`strategies.local_time`) times 1 + s_p, s_p the profiled excess of the slowest of p ranks
over the same computation (`cost.profile.StraggleFit`): the ranks meet in collectives, so a step
lasts as long as the rank that was slowest since they last met.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from autopar.cluster import Cluster
from autopar.cost.comm import CommModel
from autopar.cost.compute import DTYPE_NAMES
from autopar.cost.memory import state_bytes_per_param
from autopar.cost.ops import op_times, shard_times
from autopar.graph import CapturedGraph
from autopar.vocab import R, LogicalMesh, Placements, shard_count
from autopar.passes.reshard import Resharder, moves
from autopar.passes.param_pricing import count_layer_mates, with_params
from autopar.passes.strategies import (LEVELS, NodeSharding, Strategy, all_placements, fixed_time, follower_sharding,
                               grads_of, kernel_split, leader_options, local_time, normalized, saved_memory,
                               shard_requests, shard_shapes)
from autopar.passes.rules import tensor_args
from autopar.passes.units import Roles, Unit, build_units, roles

# batch_mean_loss runs no collective: the step computes the whole batch's target count from the
# whole target every rank holds (runtime.lower), so it is an input, not an all-reduce.
_INTERNAL = ("vocab_cross_entropy", "sync_batch_norm")


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardingOptions:
    precision: str = "fp32"
    """"fp32", or "bf16"/"fp16" (mixed: 16-bit weights and gradients, fp32 master and state)."""
    optimizer: str = "adamw"
    memory_budget: float | None = None
    """Bytes per device a plan may use; default: the device's memory less `workspace`."""
    workspace: float = 0.1
    """Fraction of device memory kept free for temporaries and fragmentation."""
    levels: tuple[int, ...] = LEVELS
    """Parameter storage levels to consider (0 DDP, 1 ZeRO-1, 2 ZeRO-2, 3 FSDP)."""

    def __post_init__(self) -> None:
        if not 0 <= self.workspace < 1:
            raise ValueError(f"workspace: found {self.workspace}, required a fraction in [0, 1)")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget: found {self.memory_budget}, required > 0 bytes")
        if not self.levels or any(level not in LEVELS for level in self.levels):
            raise ValueError(f"levels: found {self.levels}, required a non-empty subset of {LEVELS}")


@dataclass(slots=True)
class EdgeTable:
    """Placement changes between two (canonical) units, priced by class of strategy."""

    src: int
    dst: int
    count: int
    rows: list[int]
    """Per strategy of `src`: its class."""
    cols: list[int]
    """Per strategy of `dst`: its class."""
    cost: list[list[float]]
    """Seconds, [row class][column class], for one occurrence."""
    occurrences: list[tuple[int, int]] = field(default_factory=list)
    """(source unit, target unit) of each occurrence: a pipeline stage counts the ones it holds."""


@dataclass(slots=True)
class ShardingProblem:
    captured: CapturedGraph
    mesh: LogicalMesh
    cluster: Cluster
    options: ShardingOptions
    units: list[Unit]
    strategies: dict[int, list[Strategy]]
    """Per canonical unit."""
    counts: dict[int, int]
    edges: list[EdgeTable]
    budget: float
    fixed_memory: float
    """Bytes every plan holds regardless of strategy (buffers)."""
    context: Context
    warnings: list[str] = field(default_factory=list)
    activation_weight: float = 1.0
    """How much of the activations count against the budget: 1 for a whole-batch step; a pipeline
    stage holds only the microbatches in flight (`passes.parts` solves with 0 for its leanest plans)."""

    @property
    def canonical(self) -> list[int]:
        return sorted(self.strategies)


@dataclass(slots=True)
class Context:
    captured: CapturedGraph
    roles: Roles
    mesh: LogicalMesh
    resharder: Resharder
    device: object
    profile: object
    """The cluster's `Profile`, or None."""
    options: ShardingOptions
    ops: object
    """`cost.ops.OpTimes` measured on this machine for a profiled cluster, or None."""
    fx_nodes: dict
    shards: dict = field(default_factory=dict)
    """(node, its tensor arguments' shard shapes) → (forward, backward) seconds of the op on those
    shards (`cost.ops.shard_times`): the matmul-like nodes, on every split their rules allow."""
    straggle: float = 0.0
    """The slowest rank's excess over the same computation on this mesh (`cost.profile.StraggleFit`)."""
    unit_of: dict[str, int] = field(default_factory=dict)
    owner: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """Parameter placeholder → (unit, member position, argument position) of its first use."""
    layer_mates: dict[str, int] = field(default_factory=dict)
    """Parameter placeholder → trainable parameters first used in its layer (itself included): a
    sharded one is gathered and reduced with them in one flat collective (`runtime.groups`)."""
    layer_numel: dict[str, int] = field(default_factory=dict)
    """Parameter placeholder → elements of those parameters together: the flat collective's size."""
    deferrable: dict[str, set[str]] = field(default_factory=dict)
    """Parameter-only tensor → its parameters, when its gradient may stay partial for their buckets
    (`passes.units.deferrable`); filled as edges ask."""
    trainable_numel: int = 0
    """Elements of every trainable parameter: the gradient buckets' (`runtime.sync`) size, up to
    `runtime.sync.BUCKET_BYTES` each."""

    def reshard_node(self, src, dst, grad_in, grad_out) -> float:
        """What the runtime's placement-change node itself costs (`cost.ops.OpTimes.reshard`), where
        it makes one (`passes.reshard.moves`)."""
        if self.ops is None or not moves(src, dst, grad_in, grad_out, self.mesh.shape):
            return 0.0
        return self.ops.reshard

    def nbytes(self, name: str) -> float:
        return self.captured.nodes[name].output.nbytes

    def param_bytes(self) -> tuple[float, float, float]:
        """Bytes per element of (weights, gradients, master + optimizer state)."""
        s = state_bytes_per_param(self.options.precision, self.options.optimizer)
        return s.weights, s.gradients, s.master + s.optimizer


def build_problem(captured: CapturedGraph, mesh: LogicalMesh, cluster: Cluster,
                  options: ShardingOptions = ShardingOptions()) -> ShardingProblem:
    """The sharding problem of `captured` on `mesh`; see the module docstring."""
    graph_roles = roles(captured)
    units, unit_of = build_units(captured, graph_roles)
    ctx = Context(captured=captured, roles=graph_roles, mesh=mesh, resharder=Resharder(mesh, CommModel(cluster)),
                  device=cluster.device, profile=cluster.profile, options=options,
                  ops=op_times(captured, cluster.profile, options.optimizer),
                  fx_nodes={n.name: n for n in captured.program.graph.nodes}, unit_of=unit_of,
                  straggle=cluster.profile.straggle_share(mesh.size) if cluster.profile is not None else 0.0)
    if ctx.ops is not None:
        wanted = shard_requests(captured, ctx.fx_nodes, set(ctx.ops.nodes), mesh.shape)
        ctx.shards = shard_times(captured, cluster.profile, wanted, mesh.shape)
    _find_owners(ctx, units)
    count_layer_mates(ctx)
    counts: dict[int, int] = {}
    for unit in units:
        counts[unit.canonical] = counts.get(unit.canonical, 0) + 1
    strategies = {u.index: _strategies(ctx, u) for u in units if u.canonical == u.index}
    warnings = [f"no sharding rule for {ctx.fx_nodes[u.members[0]].target} at {u.members[0]} "
                f"({captured.nodes[u.members[0]].module_path or 'top level'}): it runs replicated"
                for u in units if u.kind == "fallback"]
    from autopar.passes.edges import build_edges

    edges = build_edges(ctx, units, unit_of, strategies)
    budget = options.memory_budget or cluster.device.memory * (1 - options.workspace)
    fixed = sum(captured.nodes[n].output.nbytes for n in graph_roles.state
                if captured.nodes[n].op == "placeholder" and captured.nodes[n].output is not None)
    return ShardingProblem(captured=captured, mesh=mesh, cluster=cluster, options=options, units=units,
                           strategies=strategies, counts=counts, edges=edges, budget=budget, fixed_memory=fixed,
                           context=ctx, warnings=warnings)


def _find_owners(ctx: Context, units: list[Unit]) -> None:
    for unit in units:
        for m, name in enumerate(unit.members):
            for j, arg in enumerate(tensor_args(ctx.fx_nodes[name])):
                if arg.name in ctx.roles.params and arg.name not in ctx.owner:
                    ctx.owner[arg.name] = (unit.index, m, j)


def _first_options(ctx: Context, unit: Unit) -> list[NodeSharding]:
    """The leader's shardings. A boundary follower has one per placement it can carry; the edge
    into it pays for bringing its input there."""
    node = ctx.fx_nodes[unit.members[0]]
    shape = ctx.mesh.shape
    if unit.kind == "input":
        return [NodeSharding(inputs=(), outputs=(p,)) for p in all_placements(node.meta["val"], shape, partial=False)]
    if unit.kind in ("boundary", "param_view"):
        source_name, index = unit.sources[unit.members[0]]
        source = ctx.fx_nodes[source_name]
        value = source.meta["val"][index] if isinstance(source.meta["val"], (list, tuple)) else source.meta["val"]
        partial = unit.kind == "boundary"
        options = [follower_sharding(node, source, p, shape, index) for p in all_placements(value, shape, partial)]
        return list(dict.fromkeys(options))
    return leader_options(node, shape)


def _strategies(ctx: Context, unit: Unit) -> list[Strategy]:
    out = []
    for first in _first_options(ctx, unit):
        members = [first]
        strategy = Strategy(members=(), params={})
        position = {unit.members[0]: 0}
        for name in unit.members[1:]:
            source_name, index = unit.sources[name]
            current = members[position[source_name]].outputs[index]
            sharding = follower_sharding(ctx.fx_nodes[name], ctx.fx_nodes[source_name], current, ctx.mesh.shape,
                                         index, ctx.roles.activations)
            position[name] = len(members)
            members.append(sharding)
            for j, arg in enumerate(tensor_args(ctx.fx_nodes[name])):
                if arg.name in position and (arg.name != source_name or j == _first(ctx, name, source_name)):
                    produced = current if arg.name == source_name else members[position[arg.name]].outputs[0]
                    _forced(ctx, strategy, name, arg.name, j, produced, sharding.inputs[j], sharding)
        strategy.members = tuple(members)
        _price_members(ctx, unit, strategy)
        out.extend(with_params(ctx, unit, strategy))
    return out


def _first(ctx: Context, name: str, source: str) -> int:
    return [a.name for a in tensor_args(ctx.fx_nodes[name])].index(source)


def _forced(ctx: Context, strategy: Strategy, name: str, source: str, arg: int, current: Placements,
            needs: Placements, sharding: NodeSharding) -> None:
    """A follower that cannot keep an input's placement gathers (or reduces) it first."""
    if current == needs:
        return
    nbytes = ctx.nbytes(source)
    strategy.comm += ctx.resharder.time(current, needs, nbytes)
    flows = ctx.captured.nodes[source].requires_grad
    if flows:
        strategy.comm += ctx.resharder.time(grads_of(sharding)[arg], normalized(current), nbytes)
    strategy.comm += ctx.reshard_node(current, needs, grads_of(sharding)[arg] if flows else None, normalized(current))


def _price_members(ctx: Context, unit: Unit, strategy: Strategy) -> None:
    shape = ctx.mesh.shape
    for name, sharding in zip(unit.members, strategy.members):
        info = ctx.captured.nodes[name]
        dtype = DTYPE_NAMES.get(info.output.dtype, "fp32") if info.output is not None else "fp32"
        if dtype not in ("fp32", "bf16", "fp16"):
            dtype = "fp32"
        measured = ctx.ops.nodes.get(name) if ctx.ops is not None else None
        fixed = ctx.ops.fixed.get(name) if ctx.ops is not None else None
        local = ctx.shards.get((name, shard_shapes(ctx.fx_nodes[name], sharding, shape),
                                kernel_split(sharding, shape))) if ctx.shards else None
        share = local_time(info, sharding, shape, ctx.device, dtype, ctx.profile, measured, fixed,
                           local) * (1 + ctx.straggle)
        strategy.compute += share
        strategy.fixed += fixed_time(info, share, ctx.profile, measured, fixed)
        strategy.activations += saved_memory(info, sharding, shape)
        for axis, kind in enumerate(sharding.kinds):
            if kind in _INTERNAL:
                _internal(ctx, strategy, name, sharding, axis, kind)
    # The loss a step returns is reduced while backward runs (runtime.compiled): free. Outputs of a
    # graph without a loss are made whole at the end of the step.
    for name in () if ctx.captured.has_loss else ctx.captured.reduced_outputs:
        if name in unit.members and ctx.captured.nodes[name].output is not None:
            placed = strategy.members[unit.members.index(name)].outputs[0]
            strategy.comm += ctx.resharder.time(placed, tuple(R for _ in shape), ctx.nbytes(name))


def _internal(ctx: Context, strategy: Strategy, name: str, sharding: NodeSharding, axis: int, kind: str) -> None:
    """Collectives an op runs inside itself along `axis` (see `passes.rules.Rule.kind`)."""
    args = tensor_args(ctx.fx_nodes[name])
    group = ctx.mesh.group(axis)
    local = [a.meta["val"].numel() / shard_count(p, ctx.mesh.shape) for a, p in zip(args, sharding.inputs)]
    if kind == "vocab_cross_entropy":  # max, sum of exponentials, target logit: one fp32 per row
        steps = [("forward", 4 * local[1])] * 3
    elif kind == "sync_batch_norm":  # per-channel sum and sum of squares, then their gradients
        channels = args[0].meta["val"].shape[1] / shard_count(sharding.inputs[0], ctx.mesh.shape, 1)
        steps = [("forward", 4 * (2 * channels + 1)), ("backward", 4 * 2 * channels)]
    from autopar.passes.reshard import Collective

    comm = ctx.resharder.comm
    for phase, nbytes in steps:
        c = Collective("all_reduce", axis, len(group), nbytes, comm.time("all_reduce", nbytes, group))
        strategy.comm += c.time
        strategy.collectives.append((name, phase, c))
