"""`autopar.compile`: a model, a cluster and an optimizer in; a model that trains in parallel out.

    compiled = autopar.compile(model, autopar.Cluster.local(), example_inputs=(tokens,),
                               loss_fn=loss, target=targets,
                               optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-4))
    loss = compiled.step(tokens, target=targets)          # under torchrun, on every rank

Steps, top to bottom:
1. join the torch.distributed world (from torchrun's environment when no group exists yet);
2. capture the training step, on every rank (deterministic);
3. plan on rank 0 (or take the given plan) and hand the JSON to every rank through the store;
4. check the plan fits this graph and this world;
5. hold each parameter as the plan says, from rank 0's values;
6. lower this rank's program (`runtime.lower`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from autopar.assemble import fingerprint
from autopar.capture import capture
from autopar.cluster import Cluster
from autopar.graph import CapturedGraph
from autopar.plan import Plan
from autopar.passes.rules import tensor_args
from autopar.passes.strategies import NodeSharding, grads_of
from autopar.runtime.compiled import CompiledModel
from autopar.runtime.groups import ParamGroup, form_groups
from autopar.runtime.lower import lower
from autopar.runtime.params import make_holder
from autopar.runtime.world import DEFAULT_TIMEOUT, World, init_from_env

_KEYS = itertools.count()


def compile(model: nn.Module, cluster: Cluster | None = None, *, example_inputs: tuple, loss_fn: Callable | None = None,
            target: Any = None, optimizer: Callable | None = None, plan: Plan | None = None,
            strategy: str = "auto", precision: str = "fp32", memory_budget: float | None = None,
            time_limit: float = 60.0, timeout: float = DEFAULT_TIMEOUT) -> CompiledModel:
    """A `CompiledModel` running `plan` (planned here when None) on the current torch.distributed world.

    `optimizer`: a factory taking this rank's parameter leaves. `timeout`: seconds a collective may
    wait before a missing rank is reported (`RankFailure`).
    """
    init_from_env(timeout)  # 1
    cluster = cluster or Cluster.local()
    captured = capture(model, example_inputs, loss_fn=loss_fn, target=target)  # 2
    if plan is None:  # 3
        plan = _plan_on_rank_zero(captured, cluster, type(model).__name__, strategy=strategy, precision=precision,
                                  memory_budget=memory_budget, time_limit=time_limit,
                                  pipeline=False)  # the runtime runs one stage
    _check(plan, captured)  # 4
    if len(plan.stages) != 1:
        raise ValueError(f"plan: found {len(plan.stages)} pipeline stages, required 1 for this runtime")
    stage = plan.stages[0]
    world = World.create(stage.mesh, timeout)
    state = {k: v for k, v in itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers())}
    holders = {}  # 5
    for name, param_plan in stage.params.items():
        full = _from_rank_zero(state[name], world)
        holders[name] = make_holder(name, param_plan, full, _raw_grad(captured, stage, name), state[name].requires_grad,
                                    world, bucketed=world.size > 1)
    groups = _groups(captured, stage, holders, world)
    buffers, buffer_placements = _buffers(captured, stage, state, world)
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


def _check(plan: Plan, captured: CapturedGraph) -> None:
    found = fingerprint(captured)
    if plan.fingerprint != found:
        raise ValueError(f"plan: made for a graph with fingerprint {plan.fingerprint}, found {found} for this model "
                         f"and inputs; required the same model, input shapes and loss as when planning")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if plan.num_devices != world:
        raise ValueError(f"world size: found {world} process(es), required {plan.num_devices} (the plan's devices); "
                         f"launch with --nproc {plan.num_devices} or plan for {world} device(s)")


def _from_rank_zero(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if tensor.device.type == "meta":
        raise ValueError("parameters: found tensors on the meta device, required materialized ones (build the "
                         "model on a real device; plan on meta with autopar.plan)")
    value = tensor.detach().to(world.device).clone()
    if world.size > 1:
        dist.broadcast(value, src=0)
    return value


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


def _buffers(captured: CapturedGraph, stage, state: dict, world: World):
    program = captured.program
    signature = program.graph_signature
    values, placements = {}, {}
    for placeholder, fqn in signature.inputs_to_buffers.items():
        key = fqn.removeprefix("model.")
        values[placeholder] = _from_rank_zero(state[key], world)
        for node in program.graph.nodes:  # a buffer an op updates where it is split (batch norm's stats)
            if node.name in stage.nodes and node.target is torch.ops.aten.batch_norm.default:
                for j, arg in enumerate(tensor_args(node)):
                    if arg.name == placeholder:
                        placements[key] = stage.nodes[node.name].inputs[j]
    for placeholder, name in signature.inputs_to_lifted_tensor_constants.items():
        values[placeholder] = _from_rank_zero(program.constants[name], world)
    return values, placements
