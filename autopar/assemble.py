"""From a solved sharding problem to a `Stage` of the Plan: placements, costs and collectives.

Takes a `ShardingProblem` and its `ShardingSolution`; gives the stage's per-node and per-parameter
placements (every instance of a shared unit gets its canonical unit's strategy), its `Cost`, and
the list of collectives the plan runs: every placement change on every tensor (read off the
placements, forward and backward), plus the ones strategies run inside (an op's own all-reduces,
parameter synchronization), each with bytes, predicted time and how often it runs per step.
"""

from __future__ import annotations

import hashlib

from autopar.cost.memory import optimizer_workspace
from autopar.graph import CapturedGraph
from autopar.plan import CollectiveRecord, Cost, NodePlan, ParamPlan, Stage
from autopar.vocab import R, shard_count
from autopar.passes.edges import bucketed_axes, gradient_target
from autopar.passes.ilp import ShardingSolution, bucket_latency
from autopar.passes.rules import tensor_args
from autopar.passes.sharding import ShardingProblem
from autopar.passes.strategies import NodeSharding, grads_of, param_options, split_axes
from autopar.passes.units import deferrable


def fingerprint(captured: CapturedGraph) -> str:
    """Ops, shapes and dtypes of every node, hashed: a plan only runs on the graph it was made for."""
    parts = [(n.name, n.op, tuple((m.shape, str(m.dtype)) for m in n.outputs)) for n in captured.nodes.values()]
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def placements(problem: ShardingProblem, choice: dict[int, int],
               units=None) -> tuple[dict[str, NodePlan], dict[str, ParamPlan]]:
    """Per node and parameter of `units` (default: all), the placements `choice` gives them."""
    ctx = problem.context
    nodes, params = {}, {}
    for unit in problem.units if units is None else units:
        strategy = problem.strategies[unit.canonical][choice[unit.canonical]]
        for m, name in enumerate(unit.members):
            info = ctx.captured.nodes[name]
            sharding = strategy.members[m]
            nodes[name] = NodePlan(op=info.op, module=info.module_path, layer=info.layer, inputs=sharding.inputs,
                                   outputs=sharding.outputs, kinds=sharding.kinds,
                                   args=tuple(a.name for a in tensor_args(ctx.fx_nodes[name])))
        for (m, j), held in strategy.params.items():
            arg = tensor_args(ctx.fx_nodes[unit.members[m]])[j]
            params[ctx.roles.params[arg.name]] = ParamPlan(
                shape=tuple(arg.meta["val"].shape), use=held.use, storage=held.storage, grad=held.grad,
                level=held.level)
    return nodes, params


def borrowed(problem: ShardingProblem, choice: dict[int, int], units, nodes, held) -> dict[str, ParamPlan]:
    """Parameters that `nodes` (of `units`) read and `held` lacks, because their owner is elsewhere
    (a tied weight whose first user is in another pipeline stage): each held as its reader uses it,
    storage level 0."""
    ctx = problem.context
    out: dict[str, ParamPlan] = {}
    for unit in units:
        strategy = problem.strategies[unit.canonical][choice[unit.canonical]]
        for m, name in enumerate(unit.members):
            if name not in nodes:
                continue
            sharding = strategy.members[m]
            for j, arg in enumerate(tensor_args(ctx.fx_nodes[name])):
                param = ctx.roles.params.get(arg.name)
                if param is None or param in held or param in out:
                    continue
                shape = tuple(arg.meta["val"].shape)
                (plain,) = param_options(sharding.inputs[j], split_axes(sharding), shape, problem.mesh.shape, (0,))
                out[param] = ParamPlan(shape=shape, use=plain.use, storage=plain.storage, grad=plain.grad, level=0)
    return out


def stage(problem: ShardingProblem, solution: ShardingSolution, *, index: int = 0,
          layers: tuple[int, int] | None = None) -> tuple[Stage, list[CollectiveRecord]]:
    ctx = problem.context
    nodes, params = placements(problem, solution.choice)
    totals = {"compute": 0.0, "comm": 0.0, "optimizer": 0.0, "activations": 0.0, "state": 0.0, "fixed": 0.0}
    for unit in problem.units:
        strategy = problem.strategies[unit.canonical][solution.choice[unit.canonical]]
        for key in totals:
            totals[key] += getattr(strategy, key)
    edge_time = sum(e.count * e.cost[e.rows[solution.choice[e.src]]][e.cols[solution.choice[e.dst]]]
                    for e in problem.edges)
    buckets = bucket_latency(problem, solution.choice)  # the runtime's gradient buckets start
    records = _collectives(problem, solution, nodes, params)
    devices = problem.mesh.size
    dtype = "fp32" if problem.options.precision == "fp32" else problem.options.precision
    model_flops = ctx.captured.flops + ctx.captured.backward_flops
    step_time = solution.step_time
    workspace = backward_workspace(ctx.captured, nodes, problem.mesh.shape)
    stepping = solution.memory - totals["activations"] + step_workspace(problem, params)
    cost = Cost(step_time=step_time, compute=totals["compute"], communication=totals["comm"] + edge_time + buckets,
                optimizer=totals["optimizer"], peak_memory=max(solution.memory + workspace, stepping),
                activations=totals["activations"] + workspace,
                parameter_state=totals["state"], fixed=totals["fixed"],
                mfu=model_flops / step_time / (devices * problem.cluster.device.peak(dtype)) if step_time else 0.0)
    span = layers or (0, len(ctx.captured.layers))
    return Stage(index=index, layers=span, mesh=problem.mesh, nodes=nodes, params=params, cost=cost), records


def backward_workspace(captured: CapturedGraph, nodes: dict[str, NodePlan], mesh_shape) -> float:
    """Bytes per device that one backward op holds beyond the saved activations: the gradient of its
    output and the gradients it makes for its inputs, local shards, the largest over the ops.

    A training step peaks in backward, where every saved activation is still alive when the first
    ops (the loss, the LM head: the largest tensors of a language model) hold their gradients, so

        peak = training state + saved activations + max over ops (grad of output + grads of inputs)

    (measured so on local ranks with `runtime.memory.LiveMemory`: `autopar bench accuracy`), unless
    the optimizer's step holds more (`step_workspace`: a model whose activations are small). The
    sharding ILP leaves both terms to its workspace margin (`ShardingOptions.workspace`)."""
    most = 0.0
    for name, plan in nodes.items():
        info = captured.nodes.get(name)
        if info is None or not info.requires_grad or info.output is None or not plan.outputs:
            continue
        held = info.output.nbytes / shard_count(plan.outputs[0], mesh_shape)
        for j, arg in enumerate(plan.args):
            producer = captured.nodes.get(arg)
            if producer is not None and producer.requires_grad and producer.output is not None and j < len(plan.inputs):
                held += producer.output.nbytes / shard_count(plan.inputs[j], mesh_shape)
        most = max(most, held)
    return most


def step_workspace(problem: ShardingProblem, params: dict[str, ParamPlan]) -> float:
    """The optimizer step's temporaries on one device (`cost.memory.optimizer_workspace`): the
    leaves are the parameters' stored shards, those that train."""
    captured, shape = problem.captured, problem.mesh.shape
    leaves = (captured.params[name].meta.numel / shard_count(plan.storage, shape) for name, plan in params.items()
              if captured.params[name].requires_grad)
    return optimizer_workspace(leaves, problem.options.optimizer, problem.cluster.backend)


def _collectives(problem: ShardingProblem, solution: ShardingSolution, nodes: dict[str, NodePlan],
                 params: dict[str, ParamPlan]) -> list[CollectiveRecord]:
    ctx = problem.context
    canonical = {}
    for unit in problem.units:
        for name, canon in zip(unit.members, problem.units[unit.canonical].members):
            canonical[name] = canon
    found: dict[tuple, list] = {}

    def add(name: str, phase: str, collectives, arg: int = -1, source: str = "") -> None:
        for c in collectives:  # keyed by the canonical node and argument: one record per edge of the drawn graph
            if source in nodes:  # its readers share one reshard (runtime.lower): one record, on the first reader's edge
                key = (canonical.get(source, source), phase, c.kind, c.axis, c.group_size, c.bytes, c.time)
                found.setdefault(key, [name, source, set()])[2].add(source)
            else:
                key = (canonical.get(name, name), arg, phase, c.kind, c.axis, c.group_size, c.bytes, c.time)
                found.setdefault(key, [name, source, set()])[2].add(name)

    w_bytes, g_bytes, _ = ctx.param_bytes()
    for name, plan in nodes.items():
        grads = grads_of(NodeSharding(inputs=plan.inputs, outputs=plan.outputs, kinds=plan.kinds))
        for j, arg in enumerate(tensor_args(ctx.fx_nodes[name])):
            if arg.name in nodes:  # an activation: its producer's placement → this op's
                produced, nbytes = nodes[arg.name].outputs[0], ctx.nbytes(arg.name)
                add(name, "forward", ctx.resharder.collectives(produced, plan.inputs[j], nbytes), j, arg.name)
                if ctx.captured.nodes[arg.name].requires_grad:
                    held = [params.get(ctx.roles.params[p]) for p in deferrable(ctx.captured, ctx.roles, arg)]
                    back = gradient_target(produced, grads[j], bucketed_axes(held))
                    add(name, "backward", ctx.resharder.collectives(grads[j], back, nbytes), j, arg.name)
            elif arg.name in ctx.roles.params and ctx.owner[arg.name][0] != _unit_of(problem, name):
                # a tied parameter used away from its owner: from its first use's placement, and its
                # gradient back to the first use's gradient (`passes.edges`)
                held = params[ctx.roles.params[arg.name]]
                numel = ctx.captured.params[ctx.roles.params[arg.name]].meta.numel
                unit, member, position = ctx.owner[arg.name]
                first = nodes[problem.units[unit].members[member]]
                raw = grads_of(NodeSharding(inputs=first.inputs, outputs=first.outputs, kinds=first.kinds))[position]
                add(name, "forward", ctx.resharder.collectives(held.use, plan.inputs[j], numel * w_bytes), j,
                    arg.name)
                add(name, "backward", ctx.resharder.collectives(grads[j], raw, numel * g_bytes), j, arg.name)
    for out in ctx.captured.reduced_outputs:
        if out in nodes and ctx.captured.nodes[out].output is not None:
            placed = nodes[out].outputs[0]
            add(out, "forward", ctx.resharder.collectives(placed, tuple(R for _ in placed), ctx.nbytes(out)))
    for unit in problem.units:
        strategy = problem.strategies[unit.canonical][solution.choice[unit.canonical]]
        position = {n: i for i, n in enumerate(problem.units[unit.canonical].members)}
        for canon_name, phase, c in strategy.collectives:
            add(unit.members[position[canon_name]], phase, [c])
    return [CollectiveRecord(node=name, module=ctx.captured.nodes[name].module_path, phase=phase, kind=kind,
                             axis=axis, group_size=size, bytes=nbytes, time=t, count=len(count), source=source)
            for (*_, phase, kind, axis, size, nbytes, t), (name, source, count) in found.items()]


def _unit_of(problem: ShardingProblem, name: str) -> int:
    return problem.context.unit_of[name]
