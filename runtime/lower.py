"""Lowering: a captured graph and one stage of a plan become this rank's program.

Takes the `CapturedGraph`, the plan's `Stage`, the `World` and the parameter `Holder`s; gives a
`torch.fx.GraphModule` whose inputs are this rank's parameter leaves, buffers and input shards, and
in which every op runs on local shards. Between ops, a `Reshard` node changes placements where the
plan says so, forward and backward (`runtime.collectives`); ops with a special rule kind run as a
kernel module (`runtime.kernels`); shape arguments (view, reshape, expand) become local shapes.
Parameters enter through their holder's gather node (`runtime.params`), or their group's, one
node for the whole group where its first member is used (`runtime.groups`).

    program, layout = lower(captured, stage, world, holders)
    outputs = program(*leaves, *buffers, *inputs)     # local values; layout says their placements
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.distributed.tensor import Partial, Replicate
from torch.utils import _pytree as pytree

from autopar.graph import CapturedGraph
from autopar.plan import NodePlan, Stage
from autopar.passes.edges import bucketed_axes
from autopar.passes.reshard import moves
from autopar.passes.rules import tensor_args
from autopar.passes.strategies import NodeSharding, grads_of, normalized
from autopar.passes.units import deferrable, roles, upstream
from autopar.runtime import dropout, kernels
from autopar.runtime.collectives import Reshard, ReshardSpec
from autopar.runtime.groups import GroupGather
from autopar.runtime.params import Holder
from autopar.runtime.world import World
from autopar.vocab import Placements, shard_count

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
          aten.unflatten.int, aten.clone.default, aten.contiguous.default}
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
    counts: list[tuple[str, int]] = field(default_factory=list)
    """Extra inputs after the user's: for each mean loss over a split batch, the user input holding
    its targets and the ignore_index; the step passes the whole batch's count of targets."""
    received: list[str] = field(default_factory=list)
    """Pipeline stages: values earlier stages computed, whole, as the program's very first inputs."""
    values: dict[str, tuple[str, Placements]] = field(default_factory=dict)
    """Each original node: the lowered node holding its local value, and that value's placement
    (for inspection: `autopar.checks.first_difference`)."""


@dataclass(frozen=True)
class Boundary:
    """What a pipeline stage's program exchanges with the other stages."""

    received: tuple[str, ...]
    """Values computed by earlier stages: inputs, whole on every rank of this stage."""
    sent: tuple[str, ...]
    """Values later stages read: outputs, made whole (their gradients come back whole)."""
    planned: frozenset[str]
    """Every planned op of the whole plan: an op outside it is a constant, computed where needed."""
    microbatched: bool = False
    """The batch is cut into microbatches: a cross-entropy mean divides by the whole batch's count."""
    masks: dropout.Masks | None = None
    """The step's dropout masks, drawn ahead as one device draws them (`dropout.Masks`)."""


class _Program(nn.Module):
    """The root of the lowered GraphModule: holds its reshard, kernel and gather modules."""


def lower(captured: CapturedGraph, stage: Stage, world: World, holders: dict[str, Holder],
          boundary: Boundary | None = None) -> tuple[fx.GraphModule, Layout]:
    """`boundary`: for a stage of a pipeline, what it receives and sends; its program then runs
    only the stage's ops (and the constants they read)."""
    graph_roles = roles(captured)
    builder = _Builder(captured, stage, world, holders, graph_roles, boundary)
    return builder.build()


class _Builder:
    def __init__(self, captured, stage: Stage, world: World, holders, graph_roles, boundary: Boundary | None) -> None:
        self.captured, self.stage, self.world, self.holders, self.roles = captured, stage, world, holders, graph_roles
        self.boundary = boundary
        self.graph = fx.Graph()
        self.root = _Program()
        self.env: dict[str, tuple[fx.Node, tuple[Placements, ...]]] = {}
        self.cache: dict[tuple, fx.Node] = {}
        self.pending: dict[str, Holder] = {}
        self.placeholder_of: dict[int, str] = {}
        self.counts: list[tuple[str, int]] = []
        self.count = 0
        self.replicated = tuple(Replicate() for _ in stage.mesh.shape)

    def build(self) -> tuple[fx.GraphModule, Layout]:
        program = self.captured.program
        layout = Layout(params=[], buffers=[], inputs=[], outputs=[])
        param_of = {p.placeholder: p.name for p in self.captured.params.values()}
        for name in self.boundary.received if self.boundary else ():
            self.env[name] = (self.graph.placeholder(f"received_{name}"), (self.replicated,))
            layout.received.append(name)
        for node in program.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node, param_of, layout)
            elif node.op == "call_function" and node.name not in self.roles.ignored and self._runs(node):
                self._call(node)
        layout.counts = self.counts
        for name, (local, placements) in self.env.items():
            if placements and isinstance(local, fx.Node):
                layout.values[name] = (local.name, placements[0])
        values = []
        for name in filter(None, self.captured.outputs):
            if self.boundary is None or name in self.stage.nodes:
                local, placements = self.env[name]
                values.append(local)
                layout.outputs.append((name, placements[0]))
        nodes = {n.name: n for n in program.graph.nodes}
        for name in self.boundary.sent if self.boundary else ():
            grad = self.replicated if self.captured.nodes[name].requires_grad else None
            values.append(self._bring(nodes[name], self.replicated, grad))
            layout.outputs.append((name, self.replicated))
        self.graph.output(tuple(values))
        module = fx.GraphModule(self.root, self.graph, class_name="LoweredStep")
        return module, layout

    # -- inputs ---------------------------------------------------------------------------------

    def _runs(self, node: fx.Node) -> bool:
        """Whether this program computes the node: all of them, or in a pipeline stage its own ops
        and the constants (unplanned ops) whose inputs it has."""
        if self.boundary is None or node.name in self.stage.nodes:
            return True
        return node.name not in self.boundary.planned and node.name not in self.env and all(
            a.name in self.env for a in node.all_input_nodes)

    def _placeholder(self, node: fx.Node, param_of: dict[str, str], layout: Layout) -> None:
        if node.name in param_of:
            name = param_of[node.name]
            if not any(u.name in self.stage.nodes or self.boundary is None for u in node.users):
                return  # a tied parameter's second name, or a parameter no op (of this stage) reads
            holder = self.holders.get(name) or self.holders[_tied(self.captured, name, self.holders)]
            leaf = self.graph.placeholder(f"p_{len(layout.params)}")
            layout.params.append(holder.name)
            self.env[node.name] = (leaf, (holder.plan.use,))
            self.placeholder_of[id(holder)] = node.name
            self.pending[node.name] = holder  # gathered where it is first used (FSDP: not all up front)
        elif node.name in self.roles.inputs:
            placed = self.stage.nodes[node.name].outputs[0] if node.name in self.stage.nodes else self.replicated
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
        elif node.target is aten.dropout.default:
            order = dropout.memory_order(node.args[0].meta["val"])
            masks = self.boundary.masks if self.boundary else None
            value = self._module(dropout.Dropout(self.world, plan.outputs[0], order, masks, node.name), "dropout",
                                 *args, **kwargs)
        else:
            kernel = kernel_of(node, plan, self.world)
            if isinstance(kernel, (kernels.BatchMeanLoss, kernels.VocabCrossEntropy)):
                kwargs = {**kwargs, **self._count(node)}
            elif kernel is None and self.boundary and self.boundary.microbatched and (
                    node.target is aten.cross_entropy_loss.default):
                count = self._count(node)  # a microbatch's sum over the whole batch's count: the sums add up
                if count:
                    kernel, kwargs = kernels.BatchMeanLoss(self.world, ()), {**kwargs, **count}
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
        holder = self.pending.pop(arg.name, None)
        if holder is not None and holder.group is not None:
            self._gather_group(holder.group)
        elif holder is not None and holder.gather is not None:
            leaf, placements = self.env[arg.name]
            self.env[arg.name] = (self._module(holder.gather, "gather", leaf), placements)
        local, placements = self.env[arg.name]
        have = placements[0]
        info = self.captured.nodes.get(arg.name)
        flows = grad_in is not None and info is not None and info.requires_grad
        if arg.name in self.roles.params:  # a parameter: its gradient goes back to its gather node
            holder = self._holder_of(arg.name)
            grad_out = holder.raw
            flows = flows and holder.leaf.requires_grad
        else:
            grad_out = self._deferred(arg, normalized(have), grad_in) if flows else normalized(have)
        spec = ReshardSpec(src=have, dst=needed, grad_in=grad_in if flows else None,
                           grad_out=grad_out if flows else None, nbytes=info.output.nbytes if info and info.output
                           else 0.0, label=self.roles.params.get(arg.name, arg.name))
        if not moves(have, needed, spec.grad_in, spec.grad_out, self.world.mesh.shape):
            return local
        key = (arg.name, spec)
        if key not in self.cache:
            self.cache[key] = self._module(Reshard(spec, self.world), "reshard", local)
        return self.cache[key]

    def _holder_of(self, placeholder: str) -> Holder:
        name = self.roles.params[placeholder]
        return self.holders.get(name) or self.holders[_tied(self.captured, name, self.holders)]

    def _gather_group(self, group) -> None:
        """The first use of a grouped parameter gathers its whole group (one collective)."""
        placeholders = [self.placeholder_of[id(h)] for h in group.holders]
        node = self._module(GroupGather(group), "gather", *(self.env[n][0] for n in placeholders))
        for position, name in enumerate(placeholders):
            self.pending.pop(name, None)
            self.env[name] = (self.graph.call_function(operator.getitem, (node, position)), self.env[name][1])

    def _deferred(self, arg: fx.Node, grad_out: Placements, grad_in: Placements) -> Placements:
        """A tensor computed from parameters alone (a position embedding) whose gradient comes back
        partial: leave it partial, so it reaches the parameters partial and is reduced with their
        other gradients in buckets (`runtime.sync`), as DDP would, rather than on its own here.
        Only when every consumer gives it back partial on those axes and the parameters are DDP-level."""
        if arg.name in self.roles.data or arg.name not in self.stage.nodes:
            return grad_out
        axes = [a for a, (p, g) in enumerate(zip(grad_in, grad_out)) if isinstance(p, Partial) and isinstance(g, Replicate)]
        # the parameters must reach the step only through this computation (`passes.units.deferrable`):
        # a direct use elsewhere (the embedding of a head tied to its bf16 copy) has its gradient made
        # whole in backward already, and the bucketed all-reduce that deferring implies would count
        # it once per rank
        # and they must be DDP-level and used whole on those axes (`passes.edges.bucketed_axes`, as priced)
        holders = [self.holders.get(self.roles.params[p]) for p in deferrable(self.captured, self.roles, arg)]
        if not axes or not set(axes) <= bucketed_axes([h.plan if h is not None else None for h in holders]):
            return grad_out
        # partial sums pass through backward locally only where every value on the way is whole
        _, path = upstream(arg, self.roles)
        if any(n not in self.stage.nodes or not isinstance(self.stage.nodes[n].outputs[0][a], Replicate)
               for n in path for a in axes):
            return grad_out
        for user in arg.users:
            plan = self.stage.nodes.get(user.name)
            if plan is None:
                return grad_out
            grads = grads_of(NodeSharding(inputs=plan.inputs, outputs=plan.outputs))
            if any(a is arg and not all(isinstance(grads[j][x], Partial) for x in axes)
                   for j, a in enumerate(tensor_args(user))):
                return grad_out
        for h in holders:
            h.raw = tuple(Partial() if a in axes else p for a, p in enumerate(h.raw))
        return tuple(Partial() if a in axes else p for a, p in enumerate(grad_out))

    def _count(self, node: fx.Node) -> dict:
        """The whole batch's target count as an input, when the loss's targets are a user input seen
        through views only and unweighted: then the step computes it, with no communication."""
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        reduction = node.args[3] if len(node.args) > 3 else node.kwargs.get("reduction", 1)
        if weight is not None or reduction != 1:
            return {}
        source = node.args[1]
        while isinstance(source, fx.Node) and source.op == "call_function" and source.target in _VIEWS:
            source = source.args[0]
        if not (isinstance(source, fx.Node) and source.name in self.roles.inputs):
            return {}
        ignore = node.args[4] if len(node.args) > 4 else node.kwargs.get("ignore_index", -100)
        first = next(n for n in self.graph.nodes if n.op != "placeholder") if any(
            n.op != "placeholder" for n in self.graph.nodes) else None
        with self.graph.inserting_before(first):
            count = self.graph.placeholder(f"count_{len(self.counts)}")
        self.counts.append((source.name, ignore))
        return {"count": count}

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


def kernel_of(node: fx.Node, plan: NodePlan, world: World) -> nn.Module | None:
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
