"""Units: the decision variables of the sharding problem, and which of them identical layers share.

Takes a `CapturedGraph`; gives its nodes' roles and its units. Every activation node (one that
depends on the user's inputs) belongs to exactly one unit: a *leader* (an op with a choice, or a
user input) and the *followers* whose placement is a function of the leader's: views and
element-wise ops with one activation input (`passes.follow`). Parameters, buffers and constants
(`arange`, slices of a RoPE table) are not units: parameters are chosen with the unit that
consumes them, the others are replicated and cut locally for free.

A follower whose input comes from another layer starts a unit of its own, so that no unit spans
two layers; then the k-th unit of every layer with the same signature corresponds to the k-th
unit of the first such layer, member by member, and they share one set of variables.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind

from autopar.graph import CapturedGraph
from autopar.passes.follow import FOLLOWERS, MULTI_FOLLOWERS
from autopar.passes.rules import has_rule, tensor_args

aten = torch.ops.aten
_IGNORED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}


@dataclass(slots=True)
class Unit:
    index: int
    kind: str
    """"input" (a user input), "leader" (an op with rules), "boundary" (a follower starting a
    unit because its input is in another layer), "param_view" (a view or cast of a parameter,
    placed as the parameter is) or "fallback" (an op with no rule)."""
    members: list[str]
    """Node names, the leader first, then followers in graph order."""
    layer: int | None
    canonical: int = -1
    """The unit whose variables this one uses (itself unless an identical layer came first)."""
    sources: dict[str, tuple[str, int]] = field(default_factory=dict)
    """For each follower: the member it follows and which output of it."""


@dataclass(slots=True)
class Roles:
    params: dict[str, str]
    """Placeholder → parameter name."""
    state: set[str]
    """Buffers and constant tensors (placeholders), and call_function nodes computed from them."""
    activations: set[str]
    inputs: list[str]
    """User-input placeholders."""
    ignored: set[str]
    data: set[str] = field(default_factory=set)
    """Activations that depend on the user's inputs (not only on parameters and constants)."""


def roles(captured: CapturedGraph) -> Roles:
    program = captured.program
    params = {p.placeholder: p.name for p in captured.params.values()}
    state, inputs, activations, ignored = set(), [], set(), set()
    trainable = {p.placeholder for p in captured.params.values() if p.requires_grad}
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(spec.arg.name)
        elif spec.kind != InputKind.PARAMETER:
            state.add(spec.arg.name)
    activations.update(inputs)
    data = set(inputs)
    # An op that reads a trainable parameter is an activation too (a position embedding of
    # arange: no user input, but a gradient to compute and to synchronize).
    seeds = set(inputs) | trainable
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _IGNORED or node.meta.get("val") is None:
            ignored.add(node.name)
        elif any(a.name in activations or a.name in seeds for a in node.all_input_nodes):
            activations.add(node.name)
            if any(a.name in data for a in node.all_input_nodes):
                data.add(node.name)
        else:
            state.add(node.name)
    return Roles(params=params, state=state, activations=activations, inputs=inputs, ignored=ignored, data=data)


def upstream(node: fx.Node, roles_: Roles) -> tuple[set[str], set[str]]:
    """The parameter placeholders a parameter-only computation reads, and the nodes on the way
    (the node itself included)."""
    found, stack, seen = set(), [node], set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        for a in n.all_input_nodes:
            if a.name in roles_.params:
                found.add(a.name)
            elif a.name in roles_.activations and a.name not in roles_.data:
                stack.append(a)
    return found, seen


def deferrable(captured: CapturedGraph, roles_: Roles, node: fx.Node) -> set[str]:
    """The parameter placeholders of a parameter-only computation (a position embedding of arange, a
    weight's bf16 copy) through which alone those parameters reach the step; empty when `node`
    reads the user's data or its parameters are also used elsewhere. Such a tensor's gradient may
    stay partial back to its parameters, to be reduced with their other gradients in buckets
    (`runtime.lower`, as DDP does) instead of on its own."""
    if node.name not in roles_.activations or node.name in roles_.data:
        return set()
    params, path = upstream(node, roles_)
    names = {roles_.params[p] for p in params}
    names |= {t for n in names for t in captured.params[n].tied if t in captured.params}
    graph = captured.program.graph
    every = [x for n in names for x in graph.find_nodes(op="placeholder", target=captured.params[n].placeholder)]
    if not params or any(u.name not in path for n in every for u in n.users):
        return set()
    return params


def activation_args(node: fx.Node, roles_: Roles) -> list[fx.Node]:
    return [a for a in tensor_args(node) if a.name in roles_.activations]


def build_units(captured: CapturedGraph, roles_: Roles) -> tuple[list[Unit], dict[str, int]]:
    """The units in graph order, and each activation node's unit index."""
    units: list[Unit] = []
    unit_of: dict[str, int] = {}
    layer = {name: info.layer for name, info in captured.nodes.items()}

    def start(name: str, kind: str) -> None:
        unit_of[name] = len(units)
        units.append(Unit(index=len(units), kind=kind, members=[name], layer=layer.get(name)))

    for node in captured.program.graph.nodes:
        if node.name not in roles_.activations or node.name in roles_.ignored:
            continue
        if node.op == "placeholder":
            start(node.name, "input")
            continue
        acts = activation_args(node, roles_)
        together = len(acts) > 1 and node.target in MULTI_FOLLOWERS and len({unit_of[a.name] for a in acts}) == 1
        if (node.target in FOLLOWERS and len(acts) == 1) or together:
            source = acts[0]
            home = units[unit_of[source.name]]
            index = node.args[1] if node.target is operator.getitem else 0
            if home.layer == layer.get(node.name) or home.kind == "input":
                home.members.append(node.name)
                home.sources[node.name] = (source.name, index)
                unit_of[node.name] = home.index
            else:
                start(node.name, "boundary")
                units[-1].sources[node.name] = (source.name, index)
            continue
        params = [a for a in tensor_args(node) if a.name in roles_.params]
        if not acts and node.target in FOLLOWERS and len(params) == 1:
            start(node.name, "param_view")
            units[-1].sources[node.name] = (params[0].name, 0)
            continue
        start(node.name, "leader" if has_rule(node.target) else "fallback")
    _share_layers(captured, units)
    return units, unit_of


def _share_layers(captured: CapturedGraph, units: list[Unit]) -> None:
    nodes = captured.nodes
    by_layer: dict[int, list[Unit]] = {}
    for unit in units:
        unit.canonical = unit.index
        if unit.layer is not None:
            by_layer.setdefault(unit.layer, []).append(unit)
    first_of: dict[str, int] = {}
    for layer in captured.layers:
        first = first_of.setdefault(layer.signature, layer.index)
        if first == layer.index:
            continue
        mine, theirs = by_layer.get(layer.index, []), by_layer.get(first, [])
        if len(mine) != len(theirs):
            continue
        if all(_same_shape(nodes, u, c) for u, c in zip(mine, theirs)):
            for u, c in zip(mine, theirs):
                u.canonical = c.index


def _same_shape(nodes, unit: Unit, other: Unit) -> bool:
    return unit.kind == other.kind and len(unit.members) == len(other.members) and all(
        nodes[a].op == nodes[b].op and nodes[a].outputs == nodes[b].outputs
        for a, b in zip(unit.members, other.members))
