"""Layers: the repeated blocks of a captured graph (transformer layers, residual blocks).

Takes the exported graph and the per-node records (with the module path the user wrote) and
gives the layers in execution order plus a node → layer map. A block is an integer-indexed child
of a container (`nn.ModuleList`, `nn.Sequential`): a node at `layers.3.attn.qkv` belongs to
`layers.3`. Directly nested indices are followed to the innermost (`stages.1.0.conv1` belongs
to `stages.1.0`, a residual block inside a stage), while an index *inside* a block (`layers.3.mlp.0`,
`layers.3.experts.5`) does not start a new block. Two layers are structurally identical when their
ops, output shapes and dtypes, internal wiring and parameter shapes match; their `signature`
is then equal, which lets the planner solve one and reuse the answer.
"""

from __future__ import annotations

import hashlib

import torch.fx as fx

from autopar.graph import Layer, NodeInfo


def block_of(module_path: str) -> str | None:
    """`layers.3.attn.qkv` → `layers.3`; `stages.1.0.conv1` → `stages.1.0`; `head` → None."""
    parts = module_path.split(".") if module_path else []
    first = next((i for i, p in enumerate(parts) if p.isdigit() and i > 0), None)
    if first is None:
        return None
    last = first
    while last + 1 < len(parts) and parts[last + 1].isdigit():
        last += 1
    return ".".join(parts[: last + 1])


def find_layers(graph: fx.Graph, nodes: dict[str, NodeInfo],
                param_placeholders: set[str]) -> tuple[tuple[Layer, ...], dict[str, int]]:
    """The layers in order of first execution and, for each node inside one, its layer index."""
    members: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        block = block_of(nodes[node.name].module_path)
        if block is not None:
            members.setdefault(block, []).append(node.name)

    by_name = {n.name: n for n in graph.nodes}
    layers = []
    layer_of: dict[str, int] = {}
    for index, (block, names) in enumerate(members.items()):
        for name in names:
            layer_of[name] = index
        params = tuple(dict.fromkeys(p for name in names for p in nodes[name].params))
        layers.append(Layer(index=index, name=block, nodes=tuple(names),
                            signature=_signature(names, nodes, by_name, param_placeholders),
                            flops=sum(nodes[n].flops for n in names), params=params))
    return tuple(layers), layer_of


def _signature(names: list[str], nodes: dict[str, NodeInfo], by_name: dict[str, fx.Node],
               param_placeholders: set[str]) -> str:
    local = {name: i for i, name in enumerate(names)}
    external: dict[str, int] = {}
    parts = []
    for name in names:
        info = nodes[name]
        wiring = []
        for producer in info.inputs:
            if producer in local:
                wiring.append(("local", local[producer]))
            elif producer in param_placeholders:
                meta = nodes[producer].output
                wiring.append(("param", meta.shape, str(meta.dtype)))
            else:
                wiring.append(("external", external.setdefault(producer, len(external))))
        # Literal arguments (view shapes, eps, dims) count too; node arguments are the wiring above.
        literals = fx.node.map_arg((by_name[name].args, by_name[name].kwargs), lambda _: None)
        parts.append((info.op, tuple((m.shape, str(m.dtype)) for m in info.outputs), tuple(wiring),
                      repr(literals)))
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]
