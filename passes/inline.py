"""Inline the grad-mode and autocast wrappers that torch.export puts around parts of a model.

Takes an exported program; gives the same program with every `wrap_with_set_grad_enabled` and
every disabled `wrap_with_autocast` replaced by the ATen ops of its body, so that every node the
planner sees is an ATen op with a shape. A Hugging Face Llama's rotary embedding runs under
`@torch.no_grad()`, which export records as

    wrap_with_set_grad_enabled(False, submod, position_ids, inv_freq) -> (cos, sin)

The body runs in the enclosing graph instead, and each output `getitem` becomes a `detach` (the
body ran without grad) or an `alias` (it ran with grad, as the training step does anyway), so
the node keeps its name, its shape and its place in the graph signature. A disabled autocast
region in an fp32 step is the identity on dtypes, so its body is inlined as it is; an enabled one
changes dtypes inside and is left for the planner to report.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten
_SET_GRAD = torch.ops.higher_order.wrap_with_set_grad_enabled
_AUTOCAST = torch.ops.higher_order.wrap_with_autocast


def inline_wrappers(program: torch.export.ExportedProgram) -> int:
    """Inline every wrapper of `program` in place (nested ones too); the number inlined."""
    count = 0
    while True:
        found = [n for n in program.graph.nodes if _inlinable(n)]
        if not found:
            break
        for node in found:
            _inline(node, program.graph_module)
            count += 1
    if count:
        program.graph.eliminate_dead_code()
        program.graph_module.delete_all_unused_submodules()
        program.graph_module.recompile()
    return count


def _inlinable(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is _SET_GRAD:
        return True
    return node.target is _AUTOCAST and node.args[2] is False  # (device, dtype, enabled, cache, body, ...)


def _body_and_inputs(node: fx.Node) -> tuple[str, tuple, bool]:
    """The body's attribute name, the values it is called with, and whether grad is on inside."""
    if node.target is _SET_GRAD:
        return node.args[1].target, node.args[2:], bool(node.args[0])
    return node.args[4].target, node.args[5:], True


def _inline(node: fx.Node, module: fx.GraphModule) -> None:
    """Copy the body's ops before `node`; its output getitems become detach (grad off) or alias."""
    name, inputs, grad = _body_and_inputs(node)
    body: fx.GraphModule = getattr(module, name)
    graph = node.graph
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise AssertionError(f"wrapper {node.format_node()}: {len(placeholders)} body inputs, {len(inputs)} given")
    env.update(zip(placeholders, inputs))
    outputs: list = []
    with graph.inserting_before(node):
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                result = fx.node.map_arg(inner.args[0], lambda a: env[a])
                outputs = [result] if isinstance(result, fx.Node) else list(result)
                continue
            if inner.op == "get_attr":  # a nested wrapper's body: give it a name in the outer module
                attr = _fresh_name(module, inner.target)
                module.add_submodule(attr, getattr(body, inner.target))
                env[inner] = graph.get_attr(attr)
                continue
            copied = graph.node_copy(inner, lambda a: env[a])
            for key in ("nn_module_stack", "stack_trace"):
                if key not in copied.meta and key in node.meta:
                    copied.meta[key] = node.meta[key]
            env[inner] = copied
    for user in list(node.users):
        if user.target is not operator.getitem:
            raise AssertionError(f"wrapper {node.format_node()}: used by {user.format_node()}, expected getitem")
        user.target = aten.alias.default if grad else aten.detach.default
        user.args = (outputs[user.args[1]],)
    graph.erase_node(node)


def _fresh_name(module: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name
