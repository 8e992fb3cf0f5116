"""`autopar.plan`: model, inputs and cluster in, a `Plan` out. No devices are touched.

    plan = autopar.plan(model, Cluster.preset("h100", nodes=8), example_inputs=(tokens,),
                        loss_fn=loss, target=targets)
    print(plan.summary())

Steps, top to bottom:
1. capture the training step (`autopar.capture`; a model on the meta device stays there);
2. for every candidate mesh (1-D, and 2-D with the inner axis inside a node), build the sharding
   problem and solve the named baselines that run on it: they are the comparisons in the summary
   and the warm start of the ILP;
3. solve the full ILP on each mesh, warm-started from that mesh's best baseline;
4. keep the fastest plan that fits, and assemble it with its costs and collectives.
With `strategy` a baseline's name, steps 2 and 3 solve only that baseline, on its mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from autopar.assemble import fingerprint, stage
from autopar.capture import capture
from autopar.cluster import Cluster
from autopar.cost.memory import OPTIMIZERS, normalize_precision
from autopar.errors import InfeasibleError
from autopar.graph import CapturedGraph
from autopar.plan import LEVELS, STRATEGIES, Comparison, Cost, MeshResult, Plan, Schedule, SearchReport
from autopar.units import fmt_bytes
from autopar.vocab import LogicalMesh, candidate_meshes
from autopar.passes import baselines
from autopar.passes.ilp import ShardingSolution, solve
from autopar.passes.sharding import ShardingOptions, ShardingProblem, build_problem
from autopar.passes.split import PipelineSpec, split

logger = logging.getLogger(__name__)

MAX_BLOCKS = 16
"""Layers are clustered into at most this many blocks before the stage DP (Alpa's layer clustering)."""
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero-bubble")


def plan(model: nn.Module, cluster: Cluster, *, example_inputs: tuple, loss_fn: Callable | None = None,
         target: Any = None, strategy: str = "auto", precision: str = "fp32", optimizer: str = "adamw",
         memory_budget: float | None = None, time_limit: float = 60.0,
         zero_levels: tuple[int, ...] = (0, 1, 2, 3), pipeline: bool | None | PipelineSpec = False,
         quantize: str | dict[str, str] | None = None, quantize_budget: float | None = None) -> Plan:
    """The fastest plan for one training step of `model` on `cluster` that fits in memory.

    `strategy`: "auto" searches everything; "dp", "zero1", "zero2", "fsdp", "tp", "dp+tp", "sp" give
    that hand-written family's best plan. `memory_budget`: bytes per device (default: 90% of the
    device). `time_limit`: seconds per ILP solve; the best plan found by then is returned, with a
    warning. `zero_levels`: the parameter storage levels the search may use (0 DDP, 1-2 ZeRO, 3
    FSDP); pass (0,) when the optimizer is not element-wise (Shampoo, LAMB), since sharding its state
    would change what it computes. `pipeline`: True also searches pipeline stages (`passes.interop`)
    and keeps them when faster; None searches them only when no single-stage plan fits; False
    (default) never. A `PipelineSpec` fixes the pipeline by hand, Megatron-style: `strategy`'s plan
    for one stage's devices, cut into that many stages of equal layer counts (`passes.split`).
    `quantize`: a scheme for the linear layers ("int8", "int4", "int4-g128", "int4-g32", "kmeans4",
    "w8a8", "llm.int8"), a dict layer → scheme, or "auto" with `quantize_budget` bytes for their
    weights (`autopar.quant.apply`); the plan holds the smaller weights. Raises `InfeasibleError`
    when nothing fits, with the memory needed and available.
    """
    from autopar.quant.apply import layer_schemes
    from autopar.quant.modules import quantize_model

    check_cluster(cluster)
    check_options(strategy=strategy, precision=precision, optimizer=optimizer, memory_budget=memory_budget,
                  time_limit=time_limit, zero_levels=zero_levels, pipeline=pipeline)
    layers = layer_schemes(model, quantize, budget=quantize_budget, loss_fn=loss_fn,
                           batches=[(example_inputs, target)] if loss_fn is not None else None)
    name = type(model).__name__
    if layers:
        model = quantize_model(model, layers)
    captured = capture(model, example_inputs, loss_fn=loss_fn, target=target, precision=normalize_precision(precision))
    found = plan_graph(captured, cluster, model_name=name, strategy=strategy, precision=precision,
                       optimizer=optimizer, memory_budget=memory_budget, time_limit=time_limit,
                       zero_levels=zero_levels, pipeline=pipeline)
    return dataclasses.replace(found, quantized=layers) if layers else found


def plan_graph(captured: CapturedGraph, cluster: Cluster, *, model_name: str = "model", strategy: str = "auto",
               precision: str = "fp32", optimizer: str = "adamw", memory_budget: float | None = None,
               time_limit: float = 60.0, meshes: list[LogicalMesh] | None = None,
               zero_levels: tuple[int, ...] = (0, 1, 2, 3), pipeline: bool | None | PipelineSpec = False) -> Plan:
    """`plan` for a graph already captured."""
    check_cluster(cluster)
    check_options(strategy=strategy, precision=precision, optimizer=optimizer, memory_budget=memory_budget,
                  time_limit=time_limit, zero_levels=zero_levels, pipeline=pipeline)
    if isinstance(pipeline, PipelineSpec):
        one = plan_graph(captured, stage_cluster(cluster, pipeline.stages), model_name=model_name, strategy=strategy,
                         precision=precision, optimizer=optimizer, memory_budget=memory_budget, time_limit=time_limit,
                         meshes=meshes, zero_levels=zero_levels)
        return split(one, captured, cluster, pipeline)
    if pipeline and strategy != "auto":
        raise ValueError(f"pipeline: found strategy {strategy!r} with pipeline stages, required strategy 'auto' "
                         f"(the named strategies are single-stage families)")
    if captured.precision not in ("fp32", normalize_precision(precision)):
        raise ValueError(f"precision: found {precision!r} for a graph captured with the {captured.precision} "
                         f"rewrite, required {captured.precision!r} (or a graph captured in fp32)")
    options = ShardingOptions(precision=normalize_precision(precision), optimizer=optimizer,
                              memory_budget=memory_budget, levels=tuple(zero_levels))
    start = time.perf_counter()
    names = baselines.BASELINES if strategy == "auto" else (strategy,)
    meshes = meshes or _meshes(cluster, names if strategy != "auto" else None)

    comparisons, tried, floors, warnings, built = [], [], [], [], {}
    best = _on_meshes(captured, cluster, options, meshes, names, strategy, time_limit,
                      comparisons=comparisons, tried=tried, floors=floors, warnings=warnings, built=built)
    if strategy == "auto" and (pipeline or (pipeline is None and best is None)):
        piped = _pipelined(captured, cluster, options, time_limit, model_name, problems=built)
        if piped is not None and (best is None or piped.cost.step_time < best[1].step_time):
            return dataclasses.replace(piped, baselines=tuple(comparisons), warnings=tuple(warnings) + piped.warnings,
                                       search=dataclasses.replace(piped.search, meshes=tuple(tried) + piped.search.meshes,
                                                                  seconds=time.perf_counter() - start))
    if best is None:
        raise _nothing_fits(strategy, cluster, floors, comparisons, memory_budget)
    problem, solution = best
    if solution.status != "optimal":
        bound = (f"within {solution.gap:.1%} of the best possible one" if solution.gap == solution.gap
                 else "the best found, not proven optimal")
        warnings.append(f"the solver stopped at the {time_limit:g} s time limit: the plan is {bound}")
    one, collectives = stage(problem, solution)
    report = SearchReport(solver=solution.solver, status=solution.status, gap=solution.gap,
                          variables=solution.variables, constraints=solution.constraints,
                          seconds=time.perf_counter() - start, meshes=tuple(tried))
    return Plan(model=model_name, fingerprint=fingerprint(captured), strategy=strategy, precision=options.precision,
                optimizer=optimizer, cluster=cluster, stages=(one,), schedule=Schedule(), cost=one.cost,
                collectives=tuple(sorted(collectives, key=lambda c: -c.time * c.count)), search=report,
                baselines=tuple(comparisons), warnings=tuple(warnings))


def _on_meshes(captured: CapturedGraph, cluster: Cluster, options: ShardingOptions, meshes: list[LogicalMesh],
               names: tuple[str, ...], strategy: str, time_limit: float, *, comparisons: list, tried: list,
               floors: list, warnings: list, built: dict) -> tuple[ShardingProblem, ShardingSolution] | None:
    """The fastest single-stage plan over `meshes`: per mesh the named baselines, then (strategy
    "auto") the ILP warm-started from the best of them. Appends what it meets to the lists given:
    the baselines' comparisons, each mesh's result, the infeasible floors, the problems' warnings,
    and each mesh shape's problem to `built`."""
    best: tuple[ShardingProblem, ShardingSolution] | None = None
    for mesh in meshes:
        problem = built[mesh.shape] = build_problem(captured, mesh, cluster, options)
        warnings += [w for w in problem.warnings if w not in warnings]
        found = _solve_baselines(problem, names, cluster, time_limit, comparisons)
        if strategy == "auto":
            warm = min(found, key=lambda s: s.step_time) if found else None
            try:
                found = [solve(problem, time_limit=time_limit, warm_start=warm.choice if warm else None)]
            except InfeasibleError as e:
                floors.append(e)
                found = []
        tried.append(MeshResult(shape=mesh.shape, step_time=min((s.step_time for s in found), default=None),
                                note="" if found else "nothing fits"))
        for solution in found:
            if best is None or solution.step_time < best[1].step_time:
                best = (problem, solution)
    return best


def check_cluster(cluster: object) -> None:
    """A `TypeError` unless `cluster` is a `Cluster` (a name or a path is not one)."""
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster: found {type(cluster).__name__} {cluster!r:.60}, required an autopar.Cluster "
                        f"(Cluster.preset(name), Cluster.load(path) or Cluster.local())")


def check_options(*, strategy: str = "auto", precision: str = "fp32", optimizer: str = "adamw",
                  memory_budget: float | None = None, time_limit: float = 60.0,
                  zero_levels: tuple[int, ...] = LEVELS, pipeline: bool | None | PipelineSpec = False) -> None:
    """The options of `plan` and `compile`, checked before anything is captured: a `TypeError` for a
    wrong type, a `ValueError` for a wrong value, each naming the option, what was found and what
    was required. `time_limit` and `memory_budget` may be infinite (no limit)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: found {strategy!r}, required one of {', '.join(STRATEGIES)}")
    normalize_precision(precision)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: found {optimizer!r}, required one of {', '.join(OPTIMIZERS)}")
    if memory_budget is not None:
        _positive("memory_budget", memory_budget, "bytes")
    _positive("time_limit", time_limit, "seconds")
    if not isinstance(zero_levels, (tuple, list)) or not zero_levels or any(
            isinstance(level, bool) or level not in LEVELS for level in zero_levels):
        raise ValueError(f"zero_levels: found {zero_levels!r}, required a non-empty subset of {LEVELS}")
    if pipeline is not None and not isinstance(pipeline, (bool, PipelineSpec)):
        raise TypeError(f"pipeline: found {type(pipeline).__name__} {pipeline!r}, required True, False, None or an "
                        f"autopar.PipelineSpec")


def _positive(name: str, value: object, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: found {type(value).__name__} {value!r}, required a number of {unit} > 0")
    if not value > 0:  # NaN too
        raise ValueError(f"{name}: found {value!r}, required > 0 {unit}")


def _pipelined(captured: CapturedGraph, cluster: Cluster, options: ShardingOptions, time_limit: float,
               model_name: str, kinds: tuple[str, ...] = PIPELINE_SCHEDULES, problems=None) -> Plan | None:
    """The best plan with pipeline stages (`passes.interop`), or None when no split fits. `problems`:
    the single-stage search's sharding problems by mesh shape, reused for stages on all devices."""
    from autopar.passes import interop, schedules
    from autopar.passes.split import batch_statistics
    from autopar.passes.stage_costs import StageCosts, submeshes

    if len(captured.layers) < 2:
        return None
    start = time.perf_counter()
    batch = captured.nodes[captured.inputs[0]].output.shape[0]
    options = dataclasses.replace(options, levels=tuple(l for l in options.levels if l < 3) or (0,))
    costs = StageCosts(captured, cluster, options, interop.cluster_layers(captured, MAX_BLOCKS), batch, time_limit,
                       problems)
    counts = [1] if batch_statistics(captured) else None  # batch norm: the batch's statistics, one microbatch
    found = interop.search(costs, submeshes(cluster), schedules_=kinds, microbatches=counts)
    if found is None:
        return None
    kind, m = found.schedule, found.microbatches
    virtual = schedules.VIRTUAL if kind == "interleaved" else 1
    stages = interop.assemble(found, costs, virtual)
    p = len(stages) // virtual
    schedule = Schedule(kind=kind, microbatches=m, virtual=virtual,
                        bubble=schedules.bubble_fraction(kind, p, m, virtual) if p > 1 else 0.0)
    slowest = max(stages, key=lambda s: s.cost.step_time)
    dtype = "fp32" if options.precision == "fp32" else options.precision
    model_flops = captured.flops + captured.backward_flops
    cost = Cost(step_time=found.step_time, compute=slowest.cost.compute, communication=slowest.cost.communication,
                optimizer=slowest.cost.optimizer, peak_memory=max(s.cost.peak_memory for s in stages),
                activations=max(s.cost.activations for s in stages),
                parameter_state=max(s.cost.parameter_state for s in stages), fixed=slowest.cost.fixed,
                mfu=model_flops / found.step_time / (cluster.num_devices * cluster.device.peak(dtype)))
    report = SearchReport(solver="HiGHS", status="optimal", gap=0.0, variables=0, constraints=0,
                          seconds=time.perf_counter() - start,
                          meshes=(MeshResult(shape=slowest.mesh.shape, step_time=found.step_time,
                                             note=f"{p} pipeline stages, the slowest on this mesh"),))
    warnings = (f"pipelined plan: stage costs scale the whole-batch graph by 1/{m} per microbatch; "
                f"ZeRO-3 is left out of pipelined stages",) if p > 1 else ()
    return Plan(model=model_name, fingerprint=fingerprint(captured), strategy="auto", precision=options.precision,
                optimizer=options.optimizer, cluster=cluster, stages=stages, schedule=schedule, cost=cost,
                collectives=(), search=report, baselines=(), warnings=warnings)


def stage_cluster(cluster: Cluster, stages: int) -> Cluster:
    """The devices of one of `stages` equal stages: a part of a node, or whole nodes."""
    n = cluster.num_devices
    if stages < 1 or n % stages:
        raise ValueError(f"pipeline: found {stages} stages for {n} devices, required a divisor of {n}")
    per = n // stages
    if per <= cluster.devices_per_node:
        if cluster.devices_per_node % per:
            raise ValueError(f"pipeline: stages of {per} devices, required a divisor of the {cluster.devices_per_node} "
                             f"devices per node or whole nodes")
        return dataclasses.replace(cluster, nodes=1, devices_per_node=per)
    if per % cluster.devices_per_node:
        raise ValueError(f"pipeline: stages of {per} devices, required whole nodes of {cluster.devices_per_node}")
    return dataclasses.replace(cluster, nodes=per // cluster.devices_per_node)


def _meshes(cluster: Cluster, names) -> list[LogicalMesh]:
    if names is None:
        return candidate_meshes(cluster)
    shape = baselines.mesh_shape(names[0], cluster)
    if shape is None:
        raise ValueError(f"strategy {names[0]!r} needs devices in two dims (data-parallel groups of "
                         f"tensor-parallel groups inside a node); found {cluster.num_devices} device(s), "
                         f"{cluster.devices_per_node} per node")
    return [LogicalMesh.build(cluster, shape)]


def _solve_baselines(problem: ShardingProblem, names, cluster: Cluster, time_limit: float,
                     comparisons: list[Comparison]) -> list[ShardingSolution]:
    found = []
    for name in names:
        if baselines.mesh_shape(name, cluster, problem.mesh.size) != problem.mesh.shape:
            continue
        try:
            solution = solve(problem, time_limit=time_limit, allowed=baselines.predicate(name, problem))
        except InfeasibleError as e:
            comparisons.append(Comparison(strategy=name, mesh=problem.mesh.shape, step_time=None, peak_memory=None,
                                          note=str(e)))
            continue
        comparisons.append(Comparison(strategy=name, mesh=problem.mesh.shape, step_time=solution.step_time,
                                      peak_memory=solution.memory))
        found.append(solution)
    return found


def _nothing_fits(strategy: str, cluster: Cluster, floors: list[InfeasibleError],
                  comparisons: list[Comparison], memory_budget: float | None = None) -> InfeasibleError:
    needed = min((e.required_bytes for e in floors if e.required_bytes), default=None)
    if needed is None:
        notes = "; ".join(f"{c.strategy}: {c.note}" for c in comparisons if c.note)
        return InfeasibleError(f"no {strategy} plan fits on {cluster.describe()}: {notes}")
    have = (f"a memory budget of {fmt_bytes(memory_budget)} each" if memory_budget is not None else
            f"{fmt_bytes(cluster.device.memory)} each (less the workspace margin)")
    return InfeasibleError(
        f"no plan fits: the model needs at least {fmt_bytes(needed)} per device under the best mesh and plan, "
        f"and {cluster.num_devices} × {cluster.device.name} have {have}; required: more devices, a larger "
        f"memory budget, or pipeline stages",
        required_bytes=needed, available_bytes=memory_budget if memory_budget is not None else cluster.device.memory)
