"""Per-node costs of an exported graph, measured by running each ATen op once on meta tensors.

Takes a `torch.fx.Graph` whose nodes carry FakeTensor `val` metadata (as `torch.export` leaves
them) and the set of graph inputs that require grad; gives a `NodeCost` per node: forward and
backward FLOPs, bytes moved, the bytes autograd keeps for backward, and which node a view aliases.

How: every op runs on meta tensors (shapes, strides, dtypes and requires_grad as in the graph; no
memory, no data) under `torch.utils.flop_counter.FlopCounterMode`, with
`torch.autograd.graph.saved_tensors_hooks` seeing each tensor autograd keeps; then its backward
runs on meta and is counted the same way. The numbers therefore come from PyTorch's own
decompositions and derivative formulas, not a hand-written table. Results are cached per op
signature, so 96 identical transformer layers cost one run each op.

One exception: scaled_dot_product_attention falls back to its math kernel on meta, which keeps
the S×S score matrix. GPUs run a fused flash kernel instead, which keeps q, k, v, the output and
a log-sum-exp row per query, and recomputes the scores in backward: 2.5× the forward FLOPs
(Dao, FlashAttention-2, 2023). That kernel is what is modelled here.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)

aten = torch.ops.aten
_FLASH_ATTENTION = {aten.scaled_dot_product_attention.default}
# Ops that read only the rows they gather, not their whole first input.
_GATHERS = {aten.embedding.default, aten.index_select.default, aten.gather.default, aten.index.Tensor}


@dataclass(frozen=True, slots=True)
class OpCost:
    """What one op does, independent of where it sits in the graph."""

    flops: int
    backward_flops: int
    bytes_moved: int
    saved_inputs: tuple[int, ...]
    """Positions (among the op's tensor arguments) of inputs its backward keeps."""
    saved_outputs: tuple[int, ...]
    internal_saved_bytes: int
    """Bytes of tensors kept for backward that are neither inputs nor outputs (mean, rstd, masks)."""
    output_aliases: tuple[int | None, ...]
    """Per output: position of the tensor argument whose storage it views, or None."""
    output_requires_grad: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class NodeCost:
    flops: int = 0
    backward_flops: int = 0
    bytes_moved: int = 0
    saved_bytes: int = 0
    internal_saved: int = 0
    alias_of: str | None = None
    requires_grad: bool = False


def _vals(node: fx.Node) -> list:
    val = node.meta.get("val")
    return list(val) if isinstance(val, (list, tuple)) else [val]


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _as_meta(value, requires_grad: bool) -> torch.Tensor:
    t = torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype, device="meta")
    return t.requires_grad_(requires_grad and (value.dtype.is_floating_point or value.dtype.is_complex))


def _signature(node: fx.Node, leaves: list, treespec, grads: list[bool]) -> tuple:
    sig = []
    for leaf, rg in zip(leaves, grads):
        if isinstance(leaf, fx.Node):
            v = leaf.meta["val"]
            sig.append(("T", tuple(v.shape), tuple(v.stride()), v.dtype, rg, leaf.name))
        else:
            sig.append(("V", repr(leaf)))
    # Tensor identity matters (mul(x, x) differs from mul(x, y)); the names are replaced by
    # first-occurrence indices so that identical layers share one entry.
    order: dict[str, int] = {}
    canonical = tuple(s[:5] + (order.setdefault(s[5], len(order)),) if s[0] == "T" else s for s in sig)
    return (str(node.target), str(treespec), canonical)


def _meta_args(leaves: list, treespec, grads: list[bool]) -> tuple[tuple, dict, list[torch.Tensor]]:
    """The op's args and kwargs with every tensor as a fresh meta tensor (one per graph value)."""
    metas: dict[str, torch.Tensor] = {}
    real = []
    for leaf, rg in zip(leaves, grads):
        if isinstance(leaf, fx.Node):
            if leaf.name not in metas:
                metas[leaf.name] = _as_meta(leaf.meta["val"], rg)
            real.append(metas[leaf.name])
        else:
            real.append(torch.device("meta") if isinstance(leaf, torch.device) else leaf)
    args, kwargs = pytree.tree_unflatten(real, treespec)
    return args, kwargs, list(metas.values())


def _backward_flops(outs: list[torch.Tensor], ins: list[torch.Tensor]) -> int:
    wants_grad = [t for t in outs if t.requires_grad]
    needs_grad = [t for t in ins if t.requires_grad]
    if not (wants_grad and needs_grad):
        return 0
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(wants_grad, needs_grad, [torch.empty_like(t) for t in wants_grad], allow_unused=True)
    return counter.get_total_flops()


def _bytes_moved(target, ins: list[torch.Tensor], outs: list[torch.Tensor], aliases: tuple) -> int:
    if all(a is not None for a in aliases):
        return 0  # a view: no kernel runs
    out_bytes = sum(t.nbytes for t in outs)
    if target in _GATHERS:  # the table is read only where gathered: about the output's size
        return sum(t.nbytes for t in ins[1:]) + 2 * out_bytes
    return sum(t.nbytes for t in ins) + out_bytes


def _measure(node: fx.Node, leaves: list, treespec, grads: list[bool]) -> OpCost:
    """Runs `node`'s op on meta tensors, forward and backward, and records what happens."""
    args, kwargs, ins = _meta_args(leaves, treespec, grads)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = node.target(*args, **kwargs)
    outs = [o for o in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(o, torch.Tensor)]

    in_ids = {_storage_id(t): i for i, t in enumerate(ins)}
    out_ids = {_storage_id(t): i for i, t in enumerate(outs)}
    aliases = tuple(in_ids.get(_storage_id(t)) for t in outs)
    saved_inputs, saved_outputs, internal = set(), set(), {}
    for t in saved:
        sid = _storage_id(t)
        if sid in in_ids:
            saved_inputs.add(in_ids[sid])
        elif sid in out_ids:
            saved_outputs.add(out_ids[sid])
        else:
            internal[sid] = max(internal.get(sid, 0), t.untyped_storage().nbytes())

    cost = OpCost(flops=counter.get_total_flops(), backward_flops=_backward_flops(outs, ins),
                  bytes_moved=_bytes_moved(node.target, ins, outs, aliases),
                  saved_inputs=tuple(sorted(saved_inputs)), saved_outputs=tuple(sorted(saved_outputs)),
                  internal_saved_bytes=sum(internal.values()), output_aliases=aliases,
                  output_requires_grad=tuple(t.requires_grad for t in outs))
    return _as_flash_attention(cost, ins, outs) if node.target in _FLASH_ATTENTION else cost


def _as_flash_attention(cost: OpCost, tensor_args: list[torch.Tensor], outs: list[torch.Tensor]) -> OpCost:
    q = tensor_args[0]
    lse_bytes = q.numel() // q.shape[-1] * 4  # one fp32 log-sum-exp per (batch, head, query)
    grads = outs[0].requires_grad
    return OpCost(flops=cost.flops, backward_flops=int(2.5 * cost.flops) if grads else 0,
                  bytes_moved=cost.bytes_moved,
                  saved_inputs=(0, 1, 2) if grads else (), saved_outputs=(0,) if grads else (),
                  internal_saved_bytes=lse_bytes if grads else 0,
                  output_aliases=cost.output_aliases, output_requires_grad=cost.output_requires_grad)


def analyze(graph: fx.Graph, grad_inputs: set[str], param_inputs: set[str]) -> dict[str, NodeCost]:
    """Costs per node. `grad_inputs`: placeholders that require grad; `param_inputs`: those that are
    parameters or buffers (kept by the model anyway, so never counted as saved activations)."""
    cache: dict[tuple, OpCost] = {}
    requires_grad: dict[tuple[str, int], bool] = {}
    root: dict[tuple[str, int], tuple[str, int]] = {}
    saved_roots: set[tuple[str, int]] = set()
    internal: dict[str, int] = {}
    results: dict[str, OpCost] = {}

    for node in graph.nodes:
        if node.op == "placeholder":
            requires_grad[(node.name, 0)] = node.name in grad_inputs
            root[(node.name, 0)] = (node.name, 0)
            continue
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            src, index = node.args
            key = (src.name, index)
            root[(node.name, 0)] = root.get(key, key)
            requires_grad[(node.name, 0)] = requires_grad.get(key, False)
            continue
        leaves, treespec = pytree.tree_flatten((node.args, node.kwargs))
        grads = [requires_grad.get(_ref(leaf), False) if isinstance(leaf, fx.Node) else False for leaf in leaves]
        key = _signature(node, leaves, treespec, grads)
        try:
            cost = cache.get(key) or cache.setdefault(key, _measure(node, leaves, treespec, grads))
        except Exception as e:  # noqa: BLE001 - re-raised with the node, as torch.fx passes do
            raise RuntimeError(f"autopar could not measure {node.target} on meta tensors: {e}; "
                               f"node={node.format_node()}") from e
        results[node.name] = cost

        tensor_inputs = list(dict.fromkeys(_ref(leaf) for leaf in leaves if isinstance(leaf, fx.Node)))
        for i, rg in enumerate(cost.output_requires_grad):
            requires_grad[(node.name, i)] = rg
        for i, alias in enumerate(cost.output_aliases):
            root[(node.name, i)] = root[tensor_inputs[alias]] if alias is not None else (node.name, i)
        for i in cost.saved_inputs:
            saved_roots.add(root[tensor_inputs[i]])
        for i in cost.saved_outputs:
            saved_roots.add(root[(node.name, i)])
        internal[node.name] = cost.internal_saved_bytes

    saved_by_node = _saved_by_node(graph, saved_roots, param_inputs)

    out: dict[str, NodeCost] = {}
    for node in graph.nodes:
        cost = results.get(node.name)
        alias = root.get((node.name, 0))
        out[node.name] = NodeCost(
            flops=cost.flops if cost else 0,
            backward_flops=cost.backward_flops if cost else 0,
            bytes_moved=cost.bytes_moved if cost else 0,
            saved_bytes=saved_by_node.get(node.name, 0) + internal.get(node.name, 0),
            internal_saved=internal.get(node.name, 0),
            alias_of=alias[0] if alias and alias[0] != node.name else None,
            requires_grad=requires_grad.get((node.name, 0), False),
        )
    return out


def _saved_by_node(graph: fx.Graph, saved_roots: set[tuple[str, int]], param_inputs: set[str]) -> dict[str, int]:
    """Bytes of each node's outputs that some backward keeps (parameters and buffers excluded)."""
    by_name = {node.name: node for node in graph.nodes}
    saved: dict[str, int] = {}
    for name, index in saved_roots:
        if name not in param_inputs:
            value = _vals(by_name[name])[index]
            saved[name] = saved.get(name, 0) + value.numel() * value.dtype.itemsize
    return saved


def _ref(node: fx.Node) -> tuple[str, int]:
    return (node.name, 0)
