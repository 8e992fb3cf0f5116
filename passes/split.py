"""Pipeline stages from a one-stage plan: Megatron-style uniform pipelines, and the checks every
pipelined plan must pass before it runs.

Takes a one-stage `Plan` (any strategy, planned for the devices of one stage), the captured graph
and a `PipelineSpec`; gives the same plan cut into p·v chunks of consecutive layers, chunk j on
device group j mod p (v chunks per group for the interleaved schedule), each group a copy of the
one-stage mesh on its own devices. Ops outside the layers go with the layer before them (the
embedding with the first chunk, the head and loss with the last); the model's inputs go to every
chunk that reads them; a parameter goes to every chunk that reads it (a tied embedding is held by
the first and the last, its gradients summed across them).

    spec = PipelineSpec(stages=2, microbatches=4, schedule="1f1b")
    piped = split(one_stage_plan, captured, cluster, spec)

Costs, stated: each chunk's time is the one-stage plan's compute and communication scaled by the
chunk's share of the FLOPs and by 1/m per microbatch, plus receiving its input from the chunk
before and sending back the gradient (send_recv of its shard, per microbatch); the step follows
`passes.schedules`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from autopar.cluster import Cluster
from autopar.cost.comm import CommModel
from autopar.graph import CapturedGraph
from autopar.plan import Cost, Plan, Schedule, Stage
from autopar.vocab import LogicalMesh, shard_count
from autopar.passes import schedules
from autopar.passes.rules import tensor_args


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """A pipeline chosen by hand: `stages` device groups, `microbatches` per step, the schedule,
    and chunks per group (`virtual`, interleaved only)."""

    stages: int
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual: int = 1

    def __post_init__(self) -> None:
        for name in ("stages", "microbatches", "virtual"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"PipelineSpec.{name}: found {type(value).__name__} {value!r}, required an "
                                f"integer >= 1")
        if self.schedule == "interleaved" and self.virtual == 1:
            object.__setattr__(self, "virtual", schedules.VIRTUAL)
        schedules.check_spec(self.schedule, self.stages, self.microbatches, self.virtual)


def layer_ranges(layers: int, chunks: int) -> list[tuple[int, int]]:
    """`layers` consecutive layers cut into `chunks` ranges of equal size (the first ones one
    larger when they do not divide), as Megatron-LM assigns layers to stages."""
    if chunks == 1:
        return [(0, layers)]
    if not 1 <= chunks <= layers:
        raise ValueError(f"pipeline: found {layers} repeated layer(s) at capture for {chunks} chunk(s), required "
                         f"at least one layer per chunk (fewer stages, or a model with repeated blocks)")
    size, rest = divmod(layers, chunks)
    out, start = [], 0
    for j in range(chunks):
        end = start + size + (1 if j < rest else 0)
        out.append((start, end))
        start = end
    return out


def chunk_of(captured: CapturedGraph, ranges: list[tuple[int, int]]) -> dict[str, int]:
    """Each call_function node's chunk: its layer's; a node outside the layers goes with the last
    layer before it (chunk 0 when none), a tuple's item with the tuple."""
    by_layer = {layer: j for j, (a, b) in enumerate(ranges) for layer in range(a, b)}
    out, current = {}, 0
    for node in captured.program.graph.nodes:
        if node.op != "call_function":
            continue
        layer = captured.nodes[node.name].layer if node.name in captured.nodes else None
        if layer is not None:
            current = by_layer[layer]
        source = node.args[0] if node.args else None
        if node.target.__name__ == "getitem" and hasattr(source, "name") and source.name in out:
            out[node.name] = out[source.name]
        else:
            out[node.name] = current
    return out


def split(plan: Plan, captured: CapturedGraph, cluster: Cluster, spec: PipelineSpec) -> Plan:
    """`plan` (one stage) as a pipeline of `spec.stages` groups on `cluster`."""
    if len(plan.stages) != 1:
        raise ValueError(f"pipeline: found a plan with {len(plan.stages)} stages, required a one-stage plan to cut")
    one = plan.stages[0]
    p, v, m = spec.stages, spec.virtual, spec.microbatches
    check_batch(captured, m)
    if p * one.mesh.size > cluster.num_devices:
        raise ValueError(f"pipeline: {p} stages of {one.mesh.size} device(s) need {p * one.mesh.size}, found "
                         f"{cluster.num_devices} in {cluster.describe()}")
    ranges = layer_ranges(len(captured.layers), p * v)
    chunks = chunk_of(captured, ranges)
    members, used = _chunk_members(captured, one, chunks, len(ranges))
    flops = [sum(captured.nodes[n].flops + captured.nodes[n].backward_flops for n in nodes) for nodes in members]
    total = sum(flops) or 1.0
    stages = [_chunk_stage(captured, cluster, spec, one, chunks, j, ranges[j], members[j], used[j], flops[j] / total)
              for j in range(len(ranges))]
    group_time = [sum(s.microbatch_time for s in stages[g::p]) for g in range(p)]
    group_once = [sum(s.cost.optimizer for s in stages[g::p]) for g in range(p)]
    kind = spec.schedule if p > 1 or v > 1 or m > 1 else "none"  # one stage, m > 1: gradient accumulation
    step = schedules.step_time(spec.schedule, group_time, m, group_once, v)
    schedule = Schedule(kind=kind, microbatches=m, virtual=v,
                        bubble=schedules.bubble_fraction(spec.schedule, p, m, v) if kind != "none" else 0.0)
    busiest = max(range(p), key=lambda g: m * group_time[g] + group_once[g])
    mine = stages[busiest::p]
    cost = dataclasses.replace(plan.cost, step_time=step, compute=sum(s.cost.compute for s in mine),
                               communication=sum(s.cost.communication for s in mine),
                               optimizer=sum(s.cost.optimizer for s in mine), peak_memory=max(s.cost.peak_memory for s in stages),
                               activations=max(s.cost.activations for s in stages),
                               parameter_state=max(s.cost.parameter_state for s in stages),
                               mfu=plan.cost.mfu * plan.cost.step_time / step / p)
    warning = (f"pipeline of {p} stages × {'×'.join(map(str, one.mesh.shape))} device(s) by hand: chunk costs are the one-stage "
               f"plan's scaled by each chunk's share of the FLOPs, and per microbatch f + (t - f)/{m}, f what a cut "
               f"of the batch does not shrink")
    return dataclasses.replace(plan, cluster=cluster, stages=tuple(stages), schedule=schedule, cost=cost,
                               collectives=(), warnings=plan.warnings + (warning,))


def _chunk_members(captured: CapturedGraph, one: Stage, chunks: dict[str, int], n: int) -> tuple[list[dict], list[set]]:
    """Per chunk: its nodes' plans (the inputs it reads included), and the names its nodes read."""
    graph = {node.name: node for node in captured.program.graph.nodes}
    members: list[dict] = [{} for _ in range(n)]
    used: list[set[str]] = [set() for _ in range(n)]
    for name, node_plan in one.nodes.items():
        if name in captured.inputs:
            continue
        j = chunks[name]
        members[j][name] = node_plan
        for arg in tensor_args(graph[name]):
            used[j].add(arg.name)
    for name in captured.inputs:
        for j in range(n):
            if name in used[j] and name in one.nodes:
                members[j][name] = one.nodes[name]
    return members, used


def _chunk_stage(captured: CapturedGraph, cluster: Cluster, spec: PipelineSpec, one: Stage, chunks: dict[str, int],
                 j: int, layers: tuple[int, int], nodes: dict, reads: set[str], share: float) -> Stage:
    """Chunk `j` as a stage: its parameters, its device group's mesh, and the one-stage plan's
    costs scaled by its `share` of the FLOPs, with its transfers and per-microbatch fixed part."""
    p, v, m = spec.stages, spec.virtual, spec.microbatches
    param_of = {info.placeholder: name for name, info in captured.params.items()}
    params = {}
    for placeholder in reads:
        name = param_of.get(placeholder)
        if name is None:
            continue
        key = name if name in one.params else next(t for t in captured.params[name].tied if t in one.params)
        params[key] = one.params[key]
    mesh = LogicalMesh(shape=one.mesh.shape, devices=tuple(d + (j % p) * one.mesh.size for d in one.mesh.devices))
    state = one.cost.parameter_state * (sum(math.prod(q.shape) for q in params.values()) /
                                        max(sum(math.prod(q.shape) for q in one.params.values()), 1))
    kept = schedules.in_flight(spec.schedule, p, m, j % p, v) if p > 1 else 1.0
    received = received_bytes(captured, one, chunks, j)
    transfers = m * transfer_time(cluster, one.mesh.size, received / m) if received else 0.0
    fixed = one.cost.fixed * share  # each microbatch pays it whole: f + (t − f) / m of t each
    compute = one.cost.compute * share + fixed * (m - 1)
    busy = compute + one.cost.communication * share + transfers
    cost = dataclasses.replace(one.cost, step_time=busy + one.cost.optimizer * share, compute=compute, fixed=fixed,
                               communication=one.cost.communication * share + transfers,
                               optimizer=one.cost.optimizer * share,
                               activations=one.cost.activations * share * kept / m,
                               parameter_state=state, peak_memory=state + one.cost.activations * share * kept / m)
    return Stage(index=j, layers=layers, mesh=mesh, nodes=nodes, params=params, cost=cost, microbatch_time=busy / m)


def received_bytes(captured: CapturedGraph, one: Stage, chunks: dict[str, int], j: int) -> float:
    """Bytes per device of one step's activations that chunk `j` reads from earlier chunks (each
    device's shard): what the runtime sends it forward, and its gradient back."""
    graph = {n.name: n for n in captured.program.graph.nodes}
    total = 0.0
    for name in {a.name for n, c in chunks.items() if c == j for a in tensor_args(graph[n])}:
        info = captured.nodes.get(name)
        if chunks.get(name, j) < j and info is not None and info.output is not None and name in one.nodes:
            total += info.output.nbytes / shard_count(one.nodes[name].outputs[0], one.mesh.shape)
    return total


def transfer_time(cluster: Cluster, devices: int, nbytes: float) -> float:
    """Receiving a microbatch's `nbytes` from the previous stage and sending back its gradient, for a
    stage of `devices` devices: each device exchanges its own piece with its counterpart, device d
    of one stage with d of the next (the hand-cut pipelines here and the inter-op search alike)."""
    pair = (0, min(devices, cluster.num_devices - 1))
    return 2 * CommModel(cluster).time("send_recv", nbytes, pair) if pair[1] else 0.0


def check_batch(captured: CapturedGraph, microbatches: int) -> None:
    """Every input (and the target) has a batch dimension, dim 0, that `microbatches` divides, as
    `compile` cuts it; checked when planning, before any schedule of that many microbatches is built."""
    for name in captured.inputs:
        out = captured.nodes[name].output
        if out is not None and (not out.shape or out.shape[0] % microbatches):
            raise ValueError(f"pipeline: found {microbatches} microbatches for input {name} of shape {out.shape}, "
                             f"required a number that divides its batch dimension (dim 0)")


def check_pipeline(plan: Plan, captured: CapturedGraph, micro: CapturedGraph) -> None:
    """A pipelined plan runs only when every planned op is in exactly one stage, chunks sharing a
    device group share its mesh, and each sharded dimension divides at the microbatch's size
    (`micro`, the step captured at one microbatch). Raises `ValueError` naming what was found."""
    p = len(plan.stages) // plan.schedule.virtual
    if p * plan.schedule.virtual != len(plan.stages):
        raise ValueError(f"plan: found {len(plan.stages)} stages with {plan.schedule.virtual} chunks per device "
                         f"group, required a multiple of {plan.schedule.virtual}")
    for j, stage in enumerate(plan.stages):
        if stage.mesh != plan.stages[j % p].mesh:
            raise ValueError(f"plan: stage {j} runs on {stage.mesh.describe()}, required the mesh of stage {j % p} "
                             f"({plan.stages[j % p].mesh.describe()}), the same device group")
    owner: dict[str, int] = {}
    for j, stage in enumerate(plan.stages):
        for name in stage.nodes:
            if name in captured.inputs:
                continue
            if name in owner:
                raise ValueError(f"plan: op {name} is in stages {owner[name]} and {j}, required in one")
            owner[name] = j
    if plan.schedule.microbatches > 1 and (norms := batch_statistics(captured)):
        raise ValueError(f"plan: found {plan.schedule.microbatches} microbatches and batch norm in training "
                         f"({', '.join(norms[:3])}), required 1 microbatch: its statistics would be each "
                         f"microbatch's, not the batch's")
    for name, node in micro.nodes.items():
        j = owner.get(name)
        if j is None:
            continue
        mesh = plan.stages[j].mesh.shape
        for out, placed in zip(node.outputs, plan.stages[j].nodes[name].outputs):
            for d, size in enumerate(out.shape):
                if size % shard_count(placed, mesh, d):
                    raise ValueError(f"plan: op {name} splits dim {d} into {shard_count(placed, mesh, d)} pieces, "
                                     f"found size {size} at one microbatch of {plan.schedule.microbatches}; required "
                                     f"a multiple (fewer microbatches, or a plan that splits the batch less)")


def batch_statistics(captured: CapturedGraph) -> list[str]:
    """Batch norms in training (the op captured is aten.batch_norm): they normalize by the batch's own
    statistics, which microbatches would change."""
    import torch

    out = []
    for node in captured.program.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.batch_norm.default and (
                node.args[5] if len(node.args) > 5 else True):
            out.append(captured.nodes[node.name].module_path or node.name)
    return out
