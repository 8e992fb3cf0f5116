"""Lowering: a captured graph and one stage of a plan become this rank's program.

Takes the `CapturedGraph`, the plan's `Stage`, the `World` and the parameter `Holder`s; gives a
`torch.fx.GraphModule` whose inputs are this rank's parameter leaves, buffers and input shards, and
in which every op runs on local shards. Between ops, a `Reshard` node changes placements where the
plan says so, forward and backward (`runtime.collectives`); ops with a special rule kind run as a
kernel module (`runtime.kernels`); shape arguments (view, reshape, expand) become local shapes.
Parameters enter through their holder's gather node (`runtime.params`).

    program, layout = lower(captured, stage, world, holders)
    outputs = program(*leaves, *buffers, *inputs)     # local values; layout says their placements
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.distributed.tensor import Replicate
from torch.utils import _pytree as pytree

from autopar.graph import CapturedGraph
from autopar.plan import NodePlan, Stage
from autopar.passes.rules import tensor_args
from autopar.passes.strategies import NodeSharding, grads_of, normalized
from autopar.passes.units import roles
from autopar.runtime import kernels
from autopar.runtime.collectives import Reshard, ReshardSpec
from autopar.runtime.params import Holder
from autopar.runtime.world import World
from autopar.vocab import Placements, shard_count

aten = torch.ops.aten
_LOCAL_SHAPE = {aten.view.default: 1, aten.reshape.default: 1, aten._unsafe_view.default: 1, aten.expand.default: 1}


@dataclass
class Layout:
    """Where the lowered program's inputs come from and what its outputs are."""

    params: list[str]
    """Parameter names, in the order of the program's first inputs (their holders' leaves)."""
    buffers: list[str]
    """Placeholder names of buffers and constants, next (whole on every rank)."""
    inputs: list[tuple[str, Placements]]
    """User-input placeholders and the placement of the local shard each takes, last."""
    outputs: list[tuple[str, Placements]]
    """The program's outputs (the loss first when there is one) and their placements."""
    values: dict[str, tuple[str, Placements]] = field(default_factory=dict)
    """Each original node: the lowered node holding its local value, and that value's placement
    (for inspection: `autopar.testing.first_difference`)."""


class _Program(nn.Module):
    """The root of the lowered GraphModule: holds its reshard, kernel and gather modules."""


def lower(captured: CapturedGraph, stage: Stage, world: World, holders: dict[str, Holder]) -> tuple[
        fx.GraphModule, Layout]:
    graph_roles = roles(captured)
    builder = _Builder(captured, stage, world, holders, graph_roles)
    return builder.build()


class _Builder:
    def __init__(self, captured, stage: Stage, world: World, holders, graph_roles) -> None:
        self.captured, self.stage, self.world, self.holders, self.roles = captured, stage, world, holders, graph_roles
        self.graph = fx.Graph()
        self.root = _Program()
        self.env: dict[str, tuple[fx.Node, tuple[Placements, ...]]] = {}
        self.cache: dict[tuple, fx.Node] = {}
        self.count = 0
        self.replicated = tuple(Replicate() for _ in stage.mesh.shape)

    def build(self) -> tuple[fx.GraphModule, Layout]:
        program = self.captured.program
        layout = Layout(params=[], buffers=[], inputs=[], outputs=[])
        param_of = {p.placeholder: p.name for p in self.captured.params.values()}
        for node in program.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node, param_of, layout)
            elif node.op == "call_function" and node.name not in self.roles.ignored:
                self._call(node)
        for name, (local, placements) in self.env.items():
            if placements and isinstance(local, fx.Node):
                layout.values[name] = (local.name, placements[0])
        values = []
        for name in filter(None, self.captured.outputs):
            local, placements = self.env[name]
            values.append(local)
            layout.outputs.append((name, placements[0]))
        self.graph.output(tuple(values))
        module = fx.GraphModule(self.root, self.graph, class_name="LoweredStep")
        return module, layout

    # -- inputs ---------------------------------------------------------------------------------

    def _placeholder(self, node: fx.Node, param_of: dict[str, str], layout: Layout) -> None:
        if node.name in param_of:
            name = param_of[node.name]
            if not node.users:
                return  # a tied parameter's second name, or a parameter no op reads
            holder = self.holders.get(name) or self.holders[_tied(self.captured, name, self.holders)]
            leaf = self.graph.placeholder(f"p_{len(layout.params)}")
            layout.params.append(holder.name)
            value = self._module(holder.gather, "gather", leaf) if holder.gather is not None else leaf
            self.env[node.name] = (value, (holder.plan.use,))
        elif node.name in self.roles.inputs:
            placed = self.stage.nodes[node.name].outputs[0]
            layout.inputs.append((node.name, placed))
            self.env[node.name] = (self.graph.placeholder(node.name), (placed,))
        else:
            layout.buffers.append(node.name)
            self.env[node.name] = (self.graph.placeholder(node.name), (self.replicated,))

    # -- ops ------------------------------------------------------------------------------------

    def _call(self, node: fx.Node) -> None:
        plan = self.stage.nodes.get(node.name)
        if plan is None:  # a constant (arange, a slice of a buffer): computed whole on every rank
            args, kwargs = self._args(node, None)
            value = self.graph.call_function(node.target, args, kwargs)
            self.env[node.name] = (value, tuple(self.replicated for _ in _outputs(node)))
            return
        args, kwargs = self._args(node, plan)
        if node.target is operator.getitem:
            source, index = node.args
            value = self.graph.call_function(operator.getitem, (self.env[source.name][0], index))
        elif node.target in _LOCAL_SHAPE or node.target is aten.unflatten.int:
            shape = _local_shape(node, plan, self.stage.mesh.shape)
            target = aten.expand.default if node.target is aten.expand.default else aten.reshape.default
            value = self.graph.call_function(target, (args[0], shape))
        else:
            kernel = _kernel(node, plan, self.world)
            value = (self._module(kernel, node.target.__name__.split(".")[0], *args, **kwargs) if kernel is not None
                     else self.graph.call_function(node.target, args, kwargs))
        self.env[node.name] = (value, plan.outputs)

    def _args(self, node: fx.Node, plan: NodePlan | None) -> tuple[tuple, dict]:
        """The node's arguments with each tensor brought to the placement the plan wants for it."""
        tensors = tensor_args(node)
        grads = grads_of(NodeSharding(inputs=plan.inputs, outputs=plan.outputs)) if plan is not None else None
        position = iter(range(len(tensors)))
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        out = []
        for leaf in leaves:
            if isinstance(leaf, fx.Node) and leaf in tensors and node.target is not operator.getitem:
                j = next(position)
                out.append(self._bring(leaf, plan.inputs[j] if plan else self.replicated,
                                       grads[j] if plan else None))
            elif isinstance(leaf, fx.Node):
                out.append(self.env[leaf.name][0])
            elif isinstance(leaf, torch.device):
                out.append(self.world.device)
            else:
                out.append(leaf)
        return pytree.tree_unflatten(out, spec)

    def _bring(self, arg: fx.Node, needed: Placements, grad_in: Placements | None) -> fx.Node:
        local, placements = self.env[arg.name]
        have = placements[0]
        info = self.captured.nodes.get(arg.name)
        flows = grad_in is not None and info is not None and info.requires_grad
        if arg.name in self.roles.params:  # a parameter: its gradient goes back to its gather node
            holder = self.holders.get(self.roles.params[arg.name]) or self.holders[
                _tied(self.captured, self.roles.params[arg.name], self.holders)]
            grad_out = holder.raw
            flows = flows and holder.leaf.requires_grad
        else:
            grad_out = normalized(have)
        spec = ReshardSpec(src=have, dst=needed, grad_in=grad_in if flows else None,
                           grad_out=grad_out if flows else None, nbytes=info.output.nbytes if info and info.output
                           else 0.0, label=self.roles.params.get(arg.name, arg.name))
        if have == needed and (not flows or grad_in == grad_out):
            return local
        key = (arg.name, spec)
        if key not in self.cache:
            self.cache[key] = self._module(Reshard(spec, self.world), "reshard", local)
        return self.cache[key]

    def _module(self, module: nn.Module, stem: str, *args, **kwargs) -> fx.Node:
        name = f"{stem}_{self.count}"
        self.count += 1
        self.root.add_module(name, module)
        return self.graph.call_module(name, args, kwargs)


def _outputs(node: fx.Node) -> list:
    val = node.meta.get("val")
    return list(val) if isinstance(val, (list, tuple)) else [val]


def _tied(captured: CapturedGraph, name: str, holders) -> str:
    info = captured.params[name]
    return next(t for t in info.tied if t in holders)


def _local_shape(node: fx.Node, plan: NodePlan, mesh_shape) -> list[int]:
    shape = list(node.meta["val"].shape)
    out = plan.outputs[0]
    return [size // shard_count(out, mesh_shape, d) for d, size in enumerate(shape)]


def _kernel(node: fx.Node, plan: NodePlan, world: World) -> nn.Module | None:
    """The kernel for a rule kind other than "local", or None (the op runs as it is)."""
    axes = {}
    for a, kind in enumerate(plan.kinds):
        if world.size > 1 and world.axis_size(a) > 1:
            axes.setdefault(kind, []).append(a)
    if "vocab_cross_entropy" in axes:
        return kernels.VocabCrossEntropy(world, tuple(axes["vocab_cross_entropy"]),
                                         tuple(axes.get("batch_mean_loss", ())))
    if "batch_mean_loss" in axes:
        return kernels.BatchMeanLoss(world, tuple(axes["batch_mean_loss"]))
    if "vocab_embedding" in axes:
        return kernels.VocabEmbedding(world, tuple(axes["vocab_embedding"]))
    if "sync_batch_norm" in axes:
        return kernels.SyncBatchNorm(world, tuple(axes["sync_batch_norm"]))
    if "partial_bias" in axes:
        return kernels.PartialBias(node.target, world, tuple(axes["partial_bias"]))
    return None
