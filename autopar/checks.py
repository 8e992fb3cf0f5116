"""Checks the test suite runs on every rank of a `testing.RankPool` (`{"call": "autopar.checks:<name>"}`),
and the plans it runs cases on: random valid plans, squeezed and pipelined ones.

    with RankPool(4) as pool:
        failures = pool.run([{"call": "autopar.checks:check_transforms"}])[0]
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch

from autopar.testing import DEFAULTS, case_batch

def check_transforms() -> list[str]:
    """Every placement change of a (8, 4, 4) tensor on a 2×2 mesh against slicing by hand (outer
    axis first) and, for partial targets, the sum back; and its backward (`Reshard`): for the loss
    sum(W ⊙ value), the gradient reaching each rank's piece is W's piece, over n on each axis the
    piece is partial by average. The failures, empty when all hold."""
    import itertools

    from torch.distributed.tensor import Partial, Replicate, Shard

    from autopar.passes.strategies import normalized
    from autopar.runtime.collectives import Reshard, ReshardSpec, transform
    from autopar.runtime.world import World
    from autopar.vocab import P, P_AVG, R, S, LogicalMesh, fmt

    world = World.create(LogicalMesh(shape=(2, 2), devices=(0, 1, 2, 3)))
    whole = torch.arange(8 * 4 * 4, dtype=torch.float64).reshape(8, 4, 4)
    weight = torch.arange(8 * 4 * 4, dtype=torch.float64).reshape(8, 4, 4) % 7 - 3

    def grad_of(placements):
        """The gradient of sum(weight ⊙ value) with respect to this rank's piece of the value."""
        x = weight.clone()
        for a, p in enumerate(placements):
            if isinstance(p, Shard):
                x = x.chunk(2, p.dim)[world.coordinate[a]]
        return x / math.prod(2 for p in placements if isinstance(p, Partial) and p.reduce_op == "avg")

    def shard(placements):
        x = whole.clone()
        for a, p in enumerate(placements):
            if isinstance(p, Shard):
                x = x.chunk(2, p.dim)[world.coordinate[a]]
        for a, p in enumerate(placements):  # a partial: uneven pieces that still sum (or average) back
            if isinstance(p, Partial):
                first = world.coordinate[a] == 0
                x = x * ((0.25 if first else 0.75) if p.reduce_op == "sum" else (0.5 if first else 1.5))
        return x

    failures = []
    options = [R, P, P_AVG, S(0), S(1), S(2)]
    for src in itertools.product(options, repeat=2):
        for dst in itertools.product(options, repeat=2):
            got = transform(shard(src), src, dst, world)
            if any(isinstance(p, Partial) for p in dst):
                got, want = transform(got, dst, (Replicate(), Replicate()), world), whole
            else:
                want = shard(dst)
            if got.shape != want.shape or not torch.allclose(got, want):
                failures.append(f"{fmt(src)} -> {fmt(dst)}")
            x = shard(src).requires_grad_()
            spec = ReshardSpec(src=src, dst=dst, grad_in=normalized(dst), grad_out=normalized(src))
            Reshard(spec, world)(x).backward(grad_of(dst))
            if not torch.allclose(x.grad, grad_of(src)):
                failures.append(f"backward of {fmt(src)} -> {fmt(dst)}")
    world.close()
    return failures


def random_plan(model: str, world: int, seed: int, batch: int = 8, dtype: str = "float32",
                device: str = "meta", precision: str = "fp32") -> str:
    """A random valid plan (JSON) for a zoo model on `world` local ranks: a random candidate mesh,
    a random strategy for every unit. What the runtime must run exactly like any planned one.
    `device`: where the model is captured ("cpu" for a model whose graph differs on meta);
    `precision`: the mixed-precision rewrite captured and planned for."""
    import random

    import autopar
    from autopar import models
    from autopar.assemble import fingerprint, stage
    from autopar.passes.ilp import ShardingSolution, evaluate
    from autopar.passes.sharding import ShardingOptions, build_problem
    from autopar.plan import Plan, Schedule, SearchReport
    from autopar.vocab import candidate_meshes

    rng = random.Random(seed)
    entry = models.get(model)
    case = {**DEFAULTS, "model": model, "batch": batch, "dtype": dtype}
    net = entry.build(device=device, dtype=getattr(torch, dtype))
    inputs, target = case_batch(entry, case, 0)
    graph = autopar.capture(net, tuple(x.to(device) for x in inputs), loss_fn=entry.loss_fn, target=target.to(device),
                            precision=precision)
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=world)
    mesh = rng.choice(candidate_meshes(cluster))
    problem = build_problem(graph, mesh, cluster, ShardingOptions(precision=precision))
    choice = {u: rng.randrange(len(s)) for u, s in problem.strategies.items()}
    step_time, memory = evaluate(problem, choice)
    solution = ShardingSolution(choice=choice, step_time=step_time, memory=memory, status="random", gap=0.0,
                                seconds=0.0, variables=0, constraints=0, solver="random")
    one, collectives = stage(problem, solution)
    plan = Plan(model=model, fingerprint=fingerprint(graph), strategy="auto", precision=precision, optimizer="adamw",
                cluster=cluster, stages=(one,), schedule=Schedule(), cost=one.cost, collectives=tuple(collectives),
                search=SearchReport(solver="random", status="random", gap=0.0, variables=0, constraints=0, seconds=0.0))
    return plan.to_json()


def first_difference(compiled, model: torch.nn.Module, inputs: tuple, target, rtol: float = 1e-6) -> str | None:
    """Run one forward on every rank and on one device (`model`, same weights); the first node (in
    graph order) whose value, gathered whole, differs, with its placements. Collective: call on
    every rank; rank 0 gets the report (None when every node agrees)."""
    import torch.fx as fx
    from torch.distributed.tensor import Replicate

    from autopar.runtime.collectives import transform
    from autopar.vocab import fmt

    program = compiled.captured.program
    flat = [x.to(compiled.world.device) for x in torch.utils._pytree.tree_leaves((inputs, target))]
    local_values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        """Runs a graph module and keeps every node's value in `values`."""

        def __init__(self, module, values: dict[str, torch.Tensor]) -> None:
            super().__init__(module)
            self.values = values

        def run_node(self, n):
            out = super().run_node(n)
            self.values[n.name] = out
            return out

    args = compiled.program_args(flat)
    with torch.no_grad():
        Recorder(compiled.program, local_values).run(*args)
        reference_values: dict[str, torch.Tensor] = {}

        state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
        sig = program.graph_signature
        order = []
        for spec in sig.input_specs:
            if spec.target is not None:
                order.append(state.get(spec.target.removeprefix("model."), program.constants.get(spec.target)))
        order += [x.cpu() for x in flat]
        Recorder(program.graph_module, reference_values).run(*order)
    report = None
    for node in program.graph.nodes:
        if node.op == "placeholder" or node.name not in compiled.layout.values or node.name not in reference_values:
            continue  # inputs are equal by construction (buffers may since have been updated in place)
        lowered, placed = compiled.layout.values[node.name]
        value = local_values.get(lowered)
        if not isinstance(value, torch.Tensor):
            continue
        whole = transform(value.detach(), placed, tuple(Replicate() for _ in placed), compiled.world).cpu()
        expected = reference_values[node.name]
        if report is None and (whole.shape != expected.shape or not torch.allclose(
                whole.double(), expected.double(), rtol=rtol, atol=rtol * (expected.abs().max().item() + 1e-30))):
            plan = compiled.plan.stages[0].nodes.get(node.name)
            detail = (f" inputs {[fmt(p) for p in plan.inputs]} outputs {[fmt(p) for p in plan.outputs]} kinds "
                      f"{plan.kinds}" if plan else "")
            report = (f"{node.format_node()}\n  placed {fmt(placed)}{detail}\n  max diff "
                      f"{(whole.double() - expected.double()).abs().max().item() if whole.shape == expected.shape else 'shape ' + str(tuple(whole.shape))}")
    return report


def squeezed_plan(model: str, world: int, dtype: str = "float32") -> str:
    """The `auto` plan (JSON) for a zoo model on `world` local ranks when each rank may hold only part
    of what the all-replicated plan needs (half, or as little as fits): tiny models then get sharded
    plans too, instead of the replicated one their size makes cheapest."""
    import autopar
    from autopar import models
    from autopar.errors import InfeasibleError
    from autopar.planner import plan_graph

    entry = models.get(model)
    case = {**DEFAULTS, "model": model, "dtype": dtype}
    net = entry.build(device="meta", dtype=getattr(torch, dtype))
    inputs, target = case_batch(entry, case, 0)
    graph = autopar.capture(net, tuple(x.to("meta") for x in inputs), loss_fn=entry.loss_fn, target=target.to("meta"))
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=world)
    replicated = plan_graph(graph, cluster, model_name=model).cost.peak_memory
    for fraction in (0.5, 0.7, 0.85, 1.0):
        try:
            return plan_graph(graph, cluster, model_name=model, memory_budget=replicated * fraction).to_json()
        except InfeasibleError:
            continue
    raise AssertionError(f"{model} on {world} ranks: no plan within its replicated memory")


def check_runtime(strategy: str, dump: str, plan: str | None = None) -> dict[str, Any]:
    """State dict, forward-only call and dump of a compiled gpt-tiny (4 layers), on every rank: what
    differs from the single-device model (empty lists when nothing does) and the dump's path."""
    import autopar
    from autopar import models

    entry = models.get("gpt-tiny")
    model = entry.build(seed=0, n_layers=4)
    inputs, target = entry.example_batch(8)
    compiled = autopar.compile(model, autopar.Cluster.local(), example_inputs=inputs, loss_fn=entry.loss_fn,
                               target=target, optimizer=lambda ps: torch.optim.AdamW(ps), strategy=strategy,
                               plan=autopar.Plan.from_json(plan) if plan else None)
    try:
        expected = model.state_dict()
        state = compiled.state_dict()
        differs = [k for k in expected if k not in state or not torch.equal(state[k], expected[k])]
        extra = sorted(set(state) - set(expected))
        output = compiled(*inputs)
        forward = [] if torch.allclose(output, model(*inputs), rtol=1e-5, atol=1e-6) else ["output"]
        changed = {k: v + 1.0 if v.is_floating_point() else v for k, v in expected.items()}
        compiled.load_state_dict(changed)
        reloaded = compiled.state_dict()
        loads = [k for k in changed if not torch.allclose(reloaded[k], changed[k])]
        path = compiled.dump(dump)
        return {"state": differs, "extra": extra, "forward": forward, "load": loads, "dump": str(path)}
    finally:
        compiled.close()


def collective_counts(model: str, strategy: str, batch: int = 8) -> dict[str, Any]:
    """One training step of `model` (the zoo's, its defaults) under `strategy` on every rank: the
    collectives the step ran (`runtime.tally.Tally`, blocking and asynchronous) and the ones its
    plan lists on tensors between ops (`Plan.collectives` with a source, times per step)."""
    import autopar
    from autopar import models
    from autopar.runtime.tally import Tally

    entry = models.get(model)
    net = entry.build(seed=0)
    inputs, target = entry.example_batch(batch)
    compiled = autopar.compile(net, autopar.Cluster.local(), example_inputs=inputs, loss_fn=entry.loss_fn,
                               target=target, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), strategy=strategy)
    try:
        compiled.step(*inputs, target=target)  # first step: buffers and groups set up, not counted
        with Tally() as tally:
            compiled.step(*inputs, target=target)
        planned: dict[str, int] = {}
        for record in compiled.plan.collectives:
            if record.source and record.phase != "step":
                planned[record.kind] = planned.get(record.kind, 0) + record.count
        return {"blocking": dict(tally.blocking), "asynchronous": dict(tally.asynchronous), "planned": planned}
    finally:
        compiled.close()


def check_memory(strategy: str) -> dict[str, int]:
    """Element counts this rank holds after one step of gpt-tiny under `strategy`: the parameter
    leaves, the optimizer's state, and ZeRO's whole copies; what the plan claims for each; and the
    model's total."""
    import autopar
    from autopar import models
    from autopar.vocab import shard_count

    entry = models.get("gpt-tiny")
    model = entry.build(seed=0)
    inputs, target = entry.example_batch(8)
    compiled = autopar.compile(model, autopar.Cluster.local(), example_inputs=inputs, loss_fn=entry.loss_fn,
                               target=target, optimizer=lambda ps: torch.optim.AdamW(ps), strategy=strategy)
    holders, mesh = list(compiled.holders.values()), compiled.world.mesh.shape
    try:
        compiled.step(*inputs, target=target)
        state = compiled.optimizer.state.values()
        return {"leaves": sum(p.numel() for p in compiled.parameters()),
                "optimizer": sum(t.numel() for s in state for t in s.values() if torch.is_tensor(t) and t.dim()),
                "copies": sum(h.cache.numel() for h in compiled.holders.values() if h.cache is not None),
                "model": sum(p.numel() for p in model.parameters()),
                "claimed": {"leaves": sum(math.prod(h.plan.shape) // shard_count(h.leaf_placement, mesh)
                                          for h in holders),
                            "optimizer": 2 * sum(math.prod(h.plan.shape) // shard_count(h.leaf_placement, mesh)
                                                 for h in holders),
                            "copies": sum(math.prod(h.plan.shape) // shard_count(h.plan.use, mesh)
                                          for h in holders if h.plan.level in (1, 2))}}
    finally:
        compiled.close()


def pipeline_plan(model: str, world: int, pipeline: dict[str, Any], strategy: str = "auto", dtype: str = "float32",
                  batch: int = 8, overrides: dict | None = None) -> str:
    """A pipelined plan (JSON) for a zoo model on `world` local ranks: `strategy`'s one-stage plan
    for world / stages devices, cut into `pipeline` (`passes.split.PipelineSpec`'s fields)."""
    import autopar
    from autopar.passes.split import PipelineSpec, split

    spec = PipelineSpec(**pipeline)
    graph, one = _one_stage(model, world // spec.stages, strategy, dtype, batch, json.dumps(overrides or {}))
    return split(one, graph, autopar.Cluster.preset("cpu", gpus_per_node=world), spec).to_json()


def searched_pipeline_plan(model: str, world: int, schedule: str, dtype: str = "float32", batch: int = 8,
                           overrides: dict | None = None, memory_budget: float | None = None) -> str:
    """The inter-op pass's own pipelined plan (JSON) for a zoo model on `world` local ranks, the
    schedule fixed: stages, submeshes, microbatches and intra-stage plans as its DP chose them."""
    import dataclasses

    import autopar
    from autopar.passes.sharding import ShardingOptions
    from autopar.planner import _pipelined

    graph, _ = _one_stage(model, 1, "auto", dtype, batch, json.dumps(overrides or {}))
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=world)
    options = dataclasses.replace(ShardingOptions(), memory_budget=memory_budget)
    plan = _pipelined(graph, cluster, options, 60.0, model, kinds=(schedule,))
    if plan is None:
        raise AssertionError(f"{model} on {world} ranks: the inter-op pass found no {schedule} pipeline")
    return plan.to_json()


@functools.lru_cache(maxsize=32)
def _one_stage(model: str, devices: int, strategy: str, dtype: str, batch: int, overrides: str):
    import autopar
    from autopar import models
    from autopar.planner import plan_graph

    entry = models.get(model)
    case = {**DEFAULTS, "model": model, "dtype": dtype, "batch": batch, "overrides": json.loads(overrides)}
    net = entry.build(device="meta", dtype=getattr(torch, dtype), **case["overrides"])
    inputs, target = case_batch(entry, case, 0)
    graph = autopar.capture(net, tuple(x.to("meta") for x in inputs), loss_fn=entry.loss_fn, target=target.to("meta"))
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=devices)
    return graph, plan_graph(graph, cluster, model_name=model, strategy=strategy)
