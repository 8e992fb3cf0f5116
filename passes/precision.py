"""Mixed precision as a graph rewrite: matmuls in 16 bits, the sensitive ops in fp32.

Takes the captured (ATen) program and a precision; rewrites it in place, before costs are
measured, so the planner and the runtime see the same graph:

- ops in `LOW` (linear, matmul, convolution, attention) take their floating inputs cast to bf16
  or fp16 and produce bf16/fp16;
- ops in `FP32` (softmax, log-softmax, norms, reductions, exponentials, losses) take their
  floating inputs cast to fp32;
- every other op runs in the dtype its inputs give it (PyTorch's type promotion: a bf16 branch
  added to the fp32 residual stream gives fp32).

The lists follow PyTorch's CUDA autocast (torch.amp, "CUDA Ops that can autocast to float16" and
"CUDA Ops that can autocast to float32"), restricted to the ops a captured graph holds. The weights
stay fp32 parameters (the master copy the optimizer updates); the graph casts them to 16 bits where
a matmul reads them, and autograd casts their gradients back. A cast is inserted once per (value,
dtype) and shared by every op that reads it. The rewrite walks the graph once, in order, and runs
every node whose inputs changed again on fake tensors, so the dtypes it sees (and the shapes, dtypes
and byte counts that costs see later) are those of the new graph.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

LOW = frozenset({
    aten.linear, aten.matmul, aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.addbmm, aten.einsum,
    aten.convolution, aten._convolution, aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d,
    aten.conv_transpose2d, aten.conv_transpose3d, aten.prelu, aten.scaled_dot_product_attention,
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_flash_attention,
})
"""Op packets that run in 16 bits (CUDA autocast's lower-precision list)."""

FP32 = frozenset({
    aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.layer_norm, aten.native_layer_norm,
    aten.group_norm, aten.native_group_norm, aten.rms_norm, aten.batch_norm, aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training, aten.cross_entropy_loss, aten.nll_loss, aten.nll_loss2d,
    aten.nll_loss_nd, aten.mse_loss, aten.l1_loss, aten.smooth_l1_loss, aten.huber_loss, aten.kl_div,
    aten.binary_cross_entropy_with_logits, aten.sum, aten.prod, aten.cumsum, aten.cumprod, aten.norm,
    aten.linalg_vector_norm, aten.logsumexp, aten.exp, aten.expm1, aten.log, aten.log1p, aten.log2, aten.log10,
    aten.pow, aten.reciprocal, aten.rsqrt, aten.softplus, aten.cosine_similarity, aten.dist, aten.cdist,
})
"""Op packets kept in fp32 (CUDA autocast's float32 list)."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def low_precision(program: torch.export.ExportedProgram, precision: str) -> int:
    """Rewrites `program` for `precision` ("bf16" or "fp16"; "fp32" leaves it alone); returns the
    number of casts inserted."""
    if precision == "fp32":
        return 0
    if precision not in DTYPES:
        raise ValueError(f"precision: found {precision!r}, required one of fp32, {', '.join(DTYPES)}")
    low = DTYPES[precision]
    graph = program.graph
    casts: dict[tuple[str, torch.dtype], torch.fx.Node] = {}
    changed: set[str] = set()  # nodes whose value (dtype) differs from the traced one
    inserted: set[str] = set()
    mode = next(v.fake_mode for n in graph.nodes if n.op == "placeholder"
                for v in [n.meta.get("val")] if _has_fake_mode(v))
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        target = low if packet in LOW else torch.float32 if packet in FP32 else None
        if target is not None:
            node.args = _map_tensors(node.args, lambda arg: _cast(graph, casts, arg, node, target))
            node.kwargs = _map_tensors(node.kwargs, lambda arg: _cast(graph, casts, arg, node, target))
            inserted = {c.name for c in casts.values()}
        if any(a.name in changed or a.name in inserted for a in node.all_input_nodes):
            before = node.meta.get("val")
            node.meta["val"] = _run_fake(node, mode)
            if _dtypes(node.meta["val"]) != _dtypes(before):
                changed.add(node.name)
    program.graph_module.recompile()
    return len(casts)


def _run_fake(node: torch.fx.Node, mode):
    """The node's value again, from its inputs' (fake) values."""
    value = lambda a: a.meta["val"] if isinstance(a, torch.fx.Node) else a  # noqa: E731
    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    with mode:
        return node.target(*args, **kwargs)


def _dtypes(value) -> tuple:
    return tuple(getattr(v, "dtype", None) for v in torch.utils._pytree.tree_leaves(value))


def _map_tensors(value, fn):
    if isinstance(value, torch.fx.Node):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _cast(graph: torch.fx.Graph, casts: dict, arg: torch.fx.Node, user: torch.fx.Node,
          dtype: torch.dtype) -> torch.fx.Node:
    """`arg` in `dtype`: itself when it is not a floating tensor of another dtype, else a cast
    inserted right after it (shared by every later reader)."""
    val = arg.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.is_floating_point() or val.dtype == dtype:
        return arg
    key = (arg.name, dtype)
    if key not in casts:
        anchor = arg if arg.op != "placeholder" else _last_placeholder(graph)
        with graph.inserting_after(anchor):
            cast = graph.call_function(aten._to_copy.default, (arg,), {"dtype": dtype})
        cast.meta["val"] = val.to(dtype) if not _has_fake_mode(val) else _fake_cast(val, dtype)
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k in user.meta:
                cast.meta[k] = user.meta[k]
        casts[key] = cast
    return casts[key]


def _last_placeholder(graph: torch.fx.Graph) -> torch.fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def _has_fake_mode(val: torch.Tensor) -> bool:
    return getattr(val, "fake_mode", None) is not None


def _fake_cast(val: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with val.fake_mode:
        return val.to(dtype)
