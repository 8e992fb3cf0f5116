"""`autopar.compile`: a model, a cluster and an optimizer in; a model that trains in parallel out.

    compiled = autopar.compile(model, autopar.Cluster.local(), example_inputs=(tokens,),
                               loss_fn=loss, target=targets,
                               optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-4))
    loss = compiled.step(tokens, target=targets)          # under torchrun, on every rank

Steps, top to bottom (the arguments are checked first, before any process group is joined):
1. join the torch.distributed world (from torchrun's environment when no group exists yet);
2. capture the training step, on every rank (deterministic);
3. plan on rank 0 (or take the given plan) and hand the JSON to every rank through the store;
4. check the plan fits this graph (fingerprint, op and parameter names, shapes) and this world, and,
   when the step draws random numbers (dropout), that every rank's generator agrees
   (`runtime.dropout.check_random`);
5. hold each parameter as the plan says, from rank 0's values;
6. lower this rank's program (`runtime.lower`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from autopar.assemble import fingerprint
from autopar.capture import capture
from autopar.cluster import Cluster
from autopar.cost.memory import normalize_precision
from autopar.graph import CapturedGraph
from autopar.plan import Plan
from autopar.passes.rules import tensor_args
from autopar.passes.strategies import NodeSharding, grads_of
from autopar.runtime.compiled import CompiledModel
from autopar.runtime.dropout import check_random, step_masks
from autopar.runtime.groups import ParamGroup, form_groups
from autopar.runtime.lower import lower
from autopar.runtime.params import make_holder
from autopar.runtime.world import DEFAULT_TIMEOUT, World, init_from_env

_KEYS = itertools.count()


def compile(model: nn.Module, cluster: Cluster | None = None, *, example_inputs: tuple, loss_fn: Callable | None = None,
            target: Any = None, optimizer: Callable | None = None, plan: Plan | None = None,
            strategy: str = "auto", precision: str = "fp32", memory_budget: float | None = None,
            time_limit: float = 60.0, timeout: float = DEFAULT_TIMEOUT, pipeline=False, quantize=None,
            quantize_budget: float | None = None):
    """A `CompiledModel` running `plan` (planned here when None) on the current torch.distributed world.

    `optimizer`: a factory taking this rank's parameter leaves. `timeout`: seconds a collective may
    wait before a missing rank is reported (`RankFailure`). `pipeline`: as `autopar.plan`'s (False,
    True, None or a `PipelineSpec`); a plan with stages gives a `runtime.pipeline.PipelineModel`.
    """
    _check_arguments(cluster, plan, strategy=strategy, precision=precision, memory_budget=memory_budget,
                     time_limit=time_limit, pipeline=pipeline)
    init_from_env(timeout)  # 1
    cluster = cluster or Cluster.local()
    precision = normalize_precision(plan.precision if plan is not None else precision)
    layers = {}
    if plan is not None and plan.quantized:
        from autopar.quant.modules import quantize_model

        model = quantize_model(model, plan.quantized)  # the graph the plan was made for
    elif quantize is not None:
        from autopar.quant.apply import layer_schemes
        from autopar.quant.modules import quantize_model

        layers = layer_schemes(model, quantize, budget=quantize_budget, loss_fn=loss_fn,
                               batches=[(example_inputs, target)] if loss_fn is not None else None)
        model = quantize_model(model, layers) if layers else model
    captured = capture(model, example_inputs, loss_fn=loss_fn, target=target, precision=precision)  # 2
    if plan is None:  # 3
        plan = _plan_on_rank_zero(captured, cluster, type(model).__name__, strategy=strategy, precision=precision,
                                  memory_budget=memory_budget, time_limit=time_limit, pipeline=pipeline)
        if quantize is not None and layers:
            plan = dataclasses.replace(plan, quantized=layers)
    _check(plan, captured)  # 4
    check_random(captured, pipelined=len(plan.stages) > 1 or plan.schedule.kind != "none")
    if len(plan.stages) > 1 or plan.schedule.kind != "none":
        if plan.precision == "fp16":
            raise ValueError("precision: found fp16 with pipeline stages, required bf16 or fp32 (dynamic loss "
                             "scaling runs on single-stage plans)")
        return _compile_pipeline(model, captured, plan, example_inputs, loss_fn, target, optimizer, timeout)
    stage = plan.stages[0]
    world = World.create(stage.mesh, timeout)
    state = {k: v for k, v in itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers())}
    holders = {}  # 5
    for name, param_plan in stage.params.items():
        full = _from_rank_zero(state[name], world)
        holders[name] = make_holder(name, param_plan, full, _raw_grad(captured, stage, name), state[name].requires_grad,
                                    world, bucketed=world.size > 1)
    groups = _groups(captured, stage, holders, world)
    buffers, buffer_placements = _buffers(captured, stage, _state_values(captured, state, world.device))
    program, layout = lower(captured, stage, world, holders)  # 6
    return CompiledModel(captured=captured, plan=plan, world=world, holders=holders, groups=groups, program=program,
                         layout=layout,
                         buffers=buffers, buffer_placements=buffer_placements, state_keys=list(model.state_dict()),
                         optimizer_factory=optimizer)


def _plan_on_rank_zero(captured: CapturedGraph, cluster: Cluster, name: str, **options) -> Plan:
    from autopar.planner import plan_graph

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return plan_graph(captured, cluster, model_name=name, **options)
    store = dist.distributed_c10d._get_default_store()
    key = f"autopar/plan/{next(_KEYS)}"
    if dist.get_rank() == 0:
        try:
            text = plan_graph(captured, cluster, model_name=name, **options).to_json()
        except Exception as e:  # noqa: BLE001 - every rank must learn why, not wait for a plan forever
            store.set(key, "error:" + f"{type(e).__name__}: {e}")
            raise
        store.set(key, text)
    text = store.get(key).decode()
    if text.startswith("error:"):
        raise ValueError(f"planning failed on rank 0: {text[6:]}")
    return Plan.from_json(text)


def _check_arguments(cluster, plan, **options) -> None:
    """Wrong types and values fail here, before any process group is joined or anything captured."""
    from autopar.planner import check_cluster, check_options

    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"plan: found {type(plan).__name__} {plan!r:.60}, required an autopar.Plan or None "
                        f"(read a plan file with autopar.Plan.load(path))")
    if cluster is not None:
        check_cluster(cluster)
    check_options(**options)


def _check(plan: Plan, captured: CapturedGraph) -> None:
    found = fingerprint(captured)
    if plan.fingerprint != found:
        raise ValueError(f"plan: made for a graph with fingerprint {plan.fingerprint}, found {found} for this model "
                         f"and inputs; required the same model, input shapes and loss as when planning")
    _check_names(plan, captured)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if plan.num_devices != world:
        raise ValueError(f"world size: found {world} process(es), required {plan.num_devices} (the plan's devices); "
                         f"launch with --nproc {plan.num_devices} or plan for {world} device(s)")


def _check_names(plan: Plan, captured: CapturedGraph) -> None:
    """Every op and parameter the plan places is this graph's, at this graph's shape: an edited plan
    (whose fingerprint still matches) fails here, by name."""
    for j, stage in enumerate(plan.stages):
        unknown = sorted(set(stage.nodes) - set(captured.nodes))
        if unknown:
            raise ValueError(f"plan.stages[{j}].nodes: found {unknown[:5]}, which this model's graph does not "
                             f"have; required the graph's own op names (plan again for this model)")
        for name, param in stage.params.items():
            info = captured.params.get(name)
            if info is None:
                raise ValueError(f"plan.stages[{j}].params: found {name!r}, required one of this model's "
                                 f"parameters ({len(captured.params)}, e.g. {sorted(captured.params)[:3]})")
            if tuple(param.shape) != tuple(info.meta.shape):
                raise ValueError(f"plan.stages[{j}].params[{name!r}].shape: found {tuple(param.shape)}, required "
                                 f"{tuple(info.meta.shape)}, the model's")


def _compile_pipeline(model: nn.Module, captured: CapturedGraph, plan: Plan, example_inputs: tuple, loss_fn, target,
                      optimizer, timeout: float):
    """A plan with stages: the step captured again at one microbatch (the programs' shapes), a world
    per stage mesh, and each of this rank's stages lowered with what it receives and sends."""
    from autopar.passes.split import check_pipeline
    from autopar.runtime.lower import Boundary
    from autopar.runtime.pipeline import Chunk, PipelineModel
    from autopar.runtime.stage_links import crossings
    from autopar.runtime.sync import GradientSync, bucketed

    m = plan.schedule.microbatches
    micro = capture(model, _first_microbatch(example_inputs, m), loss_fn=loss_fn,
                    target=None if target is None else _first_microbatch(target, m), precision=captured.precision)
    if list(micro.nodes) != list(captured.nodes):
        raise ValueError(f"pipeline: the step captured at one microbatch of {m} has other ops than the whole "
                         f"batch's; required a model whose graph does not depend on the batch size")
    check_pipeline(plan, captured, micro)
    worlds = World.stages([s.mesh for s in plan.stages], timeout)
    device = next(iter(worlds.values())).device
    state = {k: v for k, v in itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers())}
    whole = {name: _from_rank_zero(state[name], device) for name in captured.params}  # every rank, one order
    values = _state_values(captured, state, device)
    links = crossings(plan, captured)
    masks = step_masks(captured, micro, m) if device.type == "cpu" else None
    planned = frozenset(n for s in plan.stages for n in s.nodes)
    chunks = []
    for j, stage in enumerate(plan.stages):
        world = worlds.get(stage.mesh)
        if world is None:
            continue
        holders = {name: make_holder(name, param_plan, whole[name], _raw_grad(micro, stage, name),
                                     state[name].requires_grad, world, bucketed=world.size > 1)
                   for name, param_plan in stage.params.items()}
        groups = _groups(micro, stage, holders, world)
        buffers, placements = _buffers(micro, stage, values)
        boundary = Boundary(received=tuple(l.name for l in links if j in l.consumers),
                            sent=tuple(l.name for l in links if l.producer == j), planned=planned,
                            microbatched=m > 1, masks=masks)
        program, layout = lower(micro, stage, world, holders, boundary)
        order = [holders[n] for n in layout.params]
        sync = GradientSync([h for h in order if bucketed(h)], world) if world.size > 1 else None
        chunks.append(Chunk(index=j, stage=stage, world=world, holders=holders, groups=groups, program=program,
                            layout=layout, buffers=buffers, buffer_placements=placements, sync=sync))
    return PipelineModel(captured=captured, micro=micro, plan=plan, chunks=chunks, links=links,
                         state_keys=list(model.state_dict()), optimizer_factory=optimizer, masks=masks)



def _first_microbatch(tree, m: int):
    def first(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.ndim == 0 or x.shape[0] % m:
            raise ValueError(f"inputs: found a tensor of shape {tuple(x.shape)}, required a batch dimension (dim 0) "
                             f"that the plan's {m} microbatches divide")
        return x[: x.shape[0] // m]

    from torch.utils import _pytree as pytree

    return pytree.tree_map(first, tree)


def _from_rank_zero(tensor: torch.Tensor, device: torch.device | World) -> torch.Tensor:
    """Rank 0's value, on every rank of the job (every rank must call, in one order)."""
    if tensor.device.type == "meta":
        raise ValueError("parameters: found tensors on the meta device, required materialized ones (build the "
                         "model on a real device; plan on meta with autopar.plan)")
    value = tensor.detach().to(device.device if isinstance(device, World) else device)
    dense = value.clone(memory_format=torch.contiguous_format)  # a collective sends dense rows
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(dense, src=0)
    # laid out as the model's own (a w8a8 weight is column-major: `quant.int8.int_matmul`)
    return dense if dense.stride() == value.stride() else torch.empty_like(value).copy_(dense)


def _state_values(captured: CapturedGraph, state: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """Buffers and lifted constants by placeholder, rank 0's values."""
    program = captured.program
    signature = program.graph_signature
    values = {placeholder: _from_rank_zero(state[fqn.removeprefix("model.")], device)
              for placeholder, fqn in signature.inputs_to_buffers.items()}
    for placeholder, name in signature.inputs_to_lifted_tensor_constants.items():
        values[placeholder] = _from_rank_zero(program.constants[name], device)
    return values


def _first_use(captured: CapturedGraph, stage, placeholder: str):
    """The first planned op reading the parameter (export's metadata asserts are not planned)."""
    for node in captured.program.graph.nodes:
        if node.op == "call_function" and node.name in stage.nodes:
            args = tensor_args(node)
            for j, arg in enumerate(args):
                if arg.name == placeholder:
                    return node, j
    raise KeyError(placeholder)


def _raw_grad(captured: CapturedGraph, stage, name: str):
    node, j = _first_use(captured, stage, captured.params[name].placeholder)
    plan = stage.nodes[node.name]
    return grads_of(NodeSharding(inputs=plan.inputs, outputs=plan.outputs))[j]


def _groups(captured: CapturedGraph, stage, holders: dict, world: World) -> list[ParamGroup]:
    """Sharded-storage parameters gathered and reduced together, one group per layer of first use
    (parameters used before the first layer form one group, those after the last another)."""
    order = {node.name: i for i, node in enumerate(captured.program.graph.nodes)}
    starts = [order[layer.nodes[0]] for layer in captured.layers]
    first = {name: _first_use(captured, stage, captured.params[name].placeholder)[0] for name in holders}
    layer_of = {}
    for name, node in first.items():
        index = captured.nodes[node.name].layer
        layer_of[name] = (captured.layers[index].name if index is not None else
                          "the model" if not starts else
                          "before the layers" if order[node.name] < starts[0] else "after the layers")
    ordered = sorted(holders.values(), key=lambda h: order[first[h.name].name])
    return form_groups(ordered, layer_of, world)


def _buffers(captured: CapturedGraph, stage, whole: dict[str, torch.Tensor]):
    """This stage's buffers (each its own copy) and the placements of those an op updates where split."""
    program = captured.program
    signature = program.graph_signature
    values, placements = {n: v.clone() for n, v in whole.items()}, {}
    for placeholder, fqn in signature.inputs_to_buffers.items():
        key = fqn.removeprefix("model.")
        for node in program.graph.nodes:  # a buffer an op updates where it is split (batch norm's stats)
            if node.name in stage.nodes and node.target is torch.ops.aten.batch_norm.default:
                for j, arg in enumerate(tensor_args(node)):
                    if arg.name == placeholder:
                        placements[key] = stage.nodes[node.name].inputs[j]
    return values, placements
