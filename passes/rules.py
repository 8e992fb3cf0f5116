"""Sharding rules for the ops that offer a choice: one mesh axis at a time.

Takes a graph node; gives its `Rule`s: for one mesh axis, the placement each tensor argument must
have and the placement of each output. Strategies on an n-axis mesh are products of these (one
rule per axis), kept when every sharded dim divides evenly (`passes.sharding`).

| op                                   | rules (besides all-replicated)                                                        |
|--------------------------------------|---------------------------------------------------------------------------------------|
| linear, mm, bmm, matmul, addmm, einsum | any index: shard it where it occurs; an output index gives S, a contracted one P (Megatron's column and row parallel, batch and expert parallel) |
| conv2d                               | batch S(0); out-channels (weight S(0)) → S(1); in-channels (x S(1), weight S(1)) → P |
| embedding                            | indices S(i) → S(i); vocabulary (table S(0)) → P; embedding dim (table S(1)) → S(last) |
| layer_norm, rms_norm                 | any dim but the normalized ones                                                       |
| batch_norm                           | channels S(1); batch S(0) with statistics all-reduced (synchronized BN)               |
| scaled_dot_product_attention         | batch S(0), heads S(1) on q, k, v                                                      |
| softmax, log_softmax, argmax, cumsum | any dim but the one reduced over                                                      |
| sum, mean                            | kept dims S → S; reduced dims S → P (sum) or P(avg) (mean)                           |
| cross_entropy, mse_loss              | batch (and spatial) dims → P; cross-entropy's class dim S(1) (vocabulary parallel)   |
| cat, stack, element-wise with two activations | any output dim (operands broadcast); P where the op is linear               |
| index_select, gather, scatter(_add), x[idx] | dims the op does not index; index_select and x[idx] also by splitting the index (MoE token routing) |

An op with no rule gets the all-replicated rule only, and the plan lists it as a warning.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.distributed.tensor import Shard
from torch.distributed.tensor.placement_types import Placement
from torch.utils import _pytree as pytree

from autopar.vocab import P, P_AVG, R

aten = torch.ops.aten


@dataclass(frozen=True, slots=True)
class Rule:
    """One way to place an op along one mesh axis."""

    ins: tuple[Placement, ...]
    """One per tensor argument, in flattened argument order."""
    outs: tuple[Placement, ...]
    """One per tensor output."""
    kind: str = "local"
    """How the runtime runs it on local shards: "local" (the op as it is), or a variant:
    "partial_bias" (bias added on one rank only), "vocab_embedding" (ids outside the shard
    masked), "vocab_cross_entropy" (max, sum-exp and target logit all-reduced),
    "batch_mean_loss" (a mean over a sharded batch: local sum / global count),
    "sync_batch_norm" (batch statistics all-reduced)."""


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's tensor arguments in flattened (args, kwargs) order, repeats kept (cached on the node)."""
    cached = node.meta.get("autopar_tensor_args")
    if cached is None:
        leaves, _ = pytree.tree_flatten((node.args, node.kwargs))
        cached = [x for x in leaves if isinstance(x, fx.Node) and _is_tensor(x.meta.get("val"))]
        node.meta["autopar_tensor_args"] = cached
    return cached


def _is_tensor(val) -> bool:
    """A tensor, or the list of tensors a multi-output op gives (what `getitem` picks from)."""
    if isinstance(val, (list, tuple)):
        return bool(val) and all(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def _rank(n: fx.Node) -> int:
    return n.meta["val"].dim()


def _replicated(node: fx.Node, n_out: int) -> Rule:
    return Rule(ins=tuple(R for _ in tensor_args(node)), outs=tuple(R for _ in range(n_out)))


def _einsum_rules(operands: list[str], output: str, *, bias: int | None = None) -> list[Rule]:
    """Rules of a multilinear contraction `operands -> output` (einsum letters).
    `bias`: position of an extra operand added to the output (linear's bias: indexed like the
    output's last letter)."""
    rules = []
    letters = dict.fromkeys("".join(operands))
    for letter in letters:
        if any(op.count(letter) > 1 for op in operands):
            continue  # a diagonal: not shardable this way
        ins = [Shard(op.index(letter)) if letter in op else R for op in operands]
        if letter in output:
            out, kind = Shard(output.index(letter)), "local"
            if bias is not None:
                ins.insert(bias, Shard(0) if letter == output[-1] else R)
        else:
            out, kind = P, "local"
            if bias is not None:
                ins.insert(bias, R)
                kind = "partial_bias"
        rules.append(Rule(ins=tuple(ins), outs=(out,), kind=kind))
    return rules


def _letters(rank: int, skip: str = "") -> str:
    return "".join(c for c in string.ascii_lowercase if c not in skip)[:rank]


def _linear(node):
    x, w = node.args[0], node.args[1]
    bias = len(tensor_args(node)) == 3
    batch = _letters(_rank(x) - 1, skip="nk")
    return _einsum_rules([batch + "k", "nk"], batch + "n", bias=2 if bias else None)


def _addmm(node):
    return [Rule(ins=(r.ins[2],) + r.ins[:2], outs=r.outs, kind=r.kind)
            for r in _einsum_rules(["mk", "kn"], "mn", bias=2)]


def _matmul(node):
    a, b = tensor_args(node)[:2]
    ra, rb = _rank(a), _rank(b)
    if ra < 2 or rb < 2:
        return []
    batch = _letters(max(ra, rb) - 2, skip="mkn")
    return _einsum_rules([batch[len(batch) - (ra - 2):] + "mk", batch[len(batch) - (rb - 2):] + "kn"],
                         batch + "mn")


def _einsum(node):
    equation = node.args[0].replace(" ", "")
    if "..." in equation or "->" not in equation:
        return []
    inputs, output = equation.split("->")
    return _einsum_rules(inputs.split(","), output)


def _conv(node):
    args = tensor_args(node)
    groups = node.args[6] if len(node.args) > 6 else 1
    bias = len(args) == 3
    rules = [Rule(ins=(Shard(0), R) + ((R,) if bias else ()), outs=(Shard(0),))]
    if groups == 1:
        rules.append(Rule(ins=(R, Shard(0)) + ((Shard(0),) if bias else ()), outs=(Shard(1),)))
        rules.append(Rule(ins=(Shard(1), Shard(1)) + ((R,) if bias else ()), outs=(P,),
                          kind="partial_bias" if bias else "local"))
    return rules


def _embedding(node):
    weight, ids = node.args[0], node.args[1]
    padding_idx = node.args[2] if len(node.args) > 2 else -1
    rules = [Rule(ins=(R, Shard(i)), outs=(Shard(i),)) for i in range(_rank(ids))]
    rules.append(Rule(ins=(Shard(1), R), outs=(Shard(_rank(ids)),)))
    if padding_idx in (-1, None):
        rules.append(Rule(ins=(Shard(0), R), outs=(P,), kind="vocab_embedding"))
    return rules


def _normalization(node):
    x = node.args[0]
    k = len(node.args[1])
    extra = len(tensor_args(node)) - 1
    return [Rule(ins=(Shard(d),) + (R,) * extra, outs=(Shard(d),)) for d in range(_rank(x) - k)]


def _batch_norm(node):
    args = tensor_args(node)
    params = len(args) - 1
    training = node.args[5] if len(node.args) > 5 else True
    rules = [Rule(ins=(Shard(1),) + (Shard(0),) * params, outs=(Shard(1),))]
    rules.append(Rule(ins=(Shard(0),) + (R,) * params, outs=(Shard(0),),
                      kind="sync_batch_norm" if training else "local"))
    return rules


def _attention(node):
    args = tensor_args(node)
    rules = []
    for d in (0, 1):
        mask = ()
        if len(args) == 4:  # attn_mask, broadcast against (B, H, L, S)
            m = args[3].meta["val"]
            lead = 4 - m.dim()
            mask = (Shard(d - lead) if d >= lead and m.shape[d - lead] != 1 else R,)
        rules.append(Rule(ins=(Shard(d),) * 3 + mask, outs=(Shard(d),)))
    return rules


def _over_dim(node, dim_arg: int = 1, keep_partial: bool = False):
    """Ops along one dim (softmax, argmax, cumsum): any other dim may be sharded."""
    x = node.args[0]
    rank = _rank(x)
    dim = node.args[dim_arg] if len(node.args) > dim_arg else None
    if dim is None:
        return []
    dim %= max(rank, 1)
    keepdim = node.target is aten.argmax.default and len(node.args) > 2 and node.args[2]
    removes = node.target is aten.argmax.default and not keepdim
    rules = [Rule(ins=(Shard(d),), outs=(Shard(d - (removes and d > dim)),)) for d in range(rank) if d != dim]
    if keep_partial:
        rules.append(Rule(ins=(P,), outs=(P,)))
    return rules


def _reduction(node):
    x = node.args[0]
    rank = _rank(x)
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else list(range(rank))
    dims = {d % rank for d in ([dims] if isinstance(dims, int) else dims)} if rank else set()
    keepdim = len(node.args) > 2 and bool(node.args[2])
    mean = node.target in (aten.mean.dim, aten.mean.default)
    rules = [Rule(ins=(P,), outs=(P,))]
    for d in range(rank):
        if d in dims:
            rules.append(Rule(ins=(Shard(d),), outs=(P_AVG if mean else P,)))
        else:
            rules.append(Rule(ins=(Shard(d),), outs=(Shard(d if keepdim else d - sum(r < d for r in dims)),)))
    return rules


def _loss_reduction(node, position: int) -> int:
    return node.args[position] if len(node.args) > position else 1  # 0 none, 1 mean, 2 sum


def _cross_entropy(node):
    args = tensor_args(node)
    logits, target = args[0], args[1]
    reduction = _loss_reduction(node, 3)
    smoothing = node.args[5] if len(node.args) > 5 else 0.0
    rules = []
    for d in [0] + list(range(2, _rank(logits))):
        out = Shard(d if d == 0 else d - 1) if reduction == 0 else P
        rules.append(Rule(ins=(Shard(d), Shard(d if d == 0 else d - 1)) + (R,) * (len(args) - 2), outs=(out,),
                          kind="batch_mean_loss" if reduction == 1 else "local"))
    if len(args) == 2 and smoothing == 0.0 and _rank(logits) >= 2:
        rules.append(Rule(ins=(Shard(1), R), outs=(R,), kind="vocab_cross_entropy"))
    return rules


def _mse(node):
    reduction = _loss_reduction(node, 2)
    out_of = {0: Shard, 1: lambda d: P_AVG, 2: lambda d: P}[reduction]
    return [Rule(ins=(Shard(d), Shard(d)), outs=(out_of(d),)) for d in range(_rank(node.args[0]))]


def _concat(node):
    tensors = node.args[0]
    rank = _rank(tensors[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % (rank + (node.target is aten.stack.default))
    rules = [Rule(ins=(P,) * len(tensors), outs=(P,))]
    for d in range(rank):
        if node.target is aten.cat.default and d == dim:
            continue
        out = d + (node.target is aten.stack.default and d >= dim)
        rules.append(Rule(ins=(Shard(d),) * len(tensors), outs=(Shard(out),)))
    return rules


def _index_select(node):
    """index_select(x, dim, index): any other dim of x; or the picked rows, by sharding the index."""
    x, dim = node.args[0], node.args[1] % _rank(node.args[0])
    rules = [Rule(ins=(Shard(d), R), outs=(Shard(d),)) for d in range(_rank(x)) if d != dim]
    rules.append(Rule(ins=(R, Shard(0)), outs=(Shard(dim),)))
    return rules


def _gather(node):
    """gather(x, dim, index): x and index (same rank) split alike on any dim but `dim`."""
    rank = _rank(node.args[0])
    dim = node.args[1] % rank
    return [Rule(ins=(Shard(d), Shard(d)), outs=(Shard(d),)) for d in range(rank) if d != dim]


def _scatter(node):
    """scatter(_add)(x, dim, index, src): all three split alike on any dim but `dim`; a scatter-add
    of partial sources into a partial x stays partial."""
    rank = _rank(node.args[0])
    dim = node.args[1] % rank
    n = len(tensor_args(node))
    rules = [Rule(ins=(Shard(d),) * n, outs=(Shard(d),)) for d in range(rank) if d != dim]
    if node.target in (aten.scatter_add.default, aten.index_add.default) and n == 3:
        rules.append(Rule(ins=(P, R, P), outs=(P,)))
    return rules


def _index(node):
    """x[idx] with one index tensor on dim 0 (token selection): the index split gives the rows split,
    or x split on a trailing dim."""
    x, indices = node.args[0], node.args[1]
    if len(indices) != 1 or indices[0] is None:
        return []
    idx_rank = _rank(indices[0])
    rules = [Rule(ins=(R, Shard(i)), outs=(Shard(i),)) for i in range(idx_rank)]
    rules += [Rule(ins=(Shard(d), R), outs=(Shard(d - 1 + idx_rank),)) for d in range(1, _rank(x))]
    return rules


_PARTIAL_OK = {aten.add.Tensor: "all", aten.sub.Tensor: "all", aten.where.self: "values",
               aten.mul.Tensor: "one", aten.div.Tensor: "first"}


def _elementwise(node):
    """Element-wise ops over several activations: any output dim, the operands broadcast to it."""
    args = tensor_args(node)
    outs = node.meta["val"]
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    out_rank = outs[0].dim()
    rules = []
    for d in range(out_rank):
        ins = []
        for a in args:
            shape = tuple(a.meta["val"].shape)
            k = d - (out_rank - len(shape))
            ins.append(Shard(k) if k >= 0 and shape[k] != 1 else R)
        rules.append(Rule(ins=tuple(ins), outs=tuple(Shard(d) for _ in outs)))
    mode = _PARTIAL_OK.get(node.target)
    n = len(args)
    if mode == "all":
        rules.append(Rule(ins=(P,) * n, outs=(P,)))
    elif mode == "values" and n == 3:
        rules.append(Rule(ins=(R, P, P), outs=(P,)))
    elif mode in ("one", "first") and n == 2:
        rules.append(Rule(ins=(P, R), outs=(P,)))
        if mode == "one":
            rules.append(Rule(ins=(R, P), outs=(P,)))
    return rules


_RULES = {
    aten.linear.default: _linear, aten.mm.default: _matmul, aten.bmm.default: _matmul,
    aten.matmul.default: _matmul, aten.addmm.default: _addmm, aten.einsum.default: _einsum,
    aten.conv2d.default: _conv, aten.embedding.default: _embedding,
    aten.layer_norm.default: _normalization, aten.rms_norm.default: _normalization,
    aten.batch_norm.default: _batch_norm, aten.scaled_dot_product_attention.default: _attention,
    aten.softmax.int: _over_dim, aten.log_softmax.int: _over_dim, aten._softmax.default: _over_dim,
    aten._log_softmax.default: _over_dim, aten.argmax.default: _over_dim,
    aten.cumsum.default: lambda n: _over_dim(n, keep_partial=True),
    aten.sum.dim_IntList: _reduction, aten.mean.dim: _reduction, aten.sum.default: _reduction,
    aten.mean.default: _reduction,
    aten.cross_entropy_loss.default: _cross_entropy, aten.mse_loss.default: _mse,
    aten.max_pool2d.default: lambda n: [Rule(ins=(Shard(d),), outs=(Shard(d),)) for d in (0, 1)],
    aten.avg_pool2d.default: lambda n: [Rule(ins=(Shard(d),), outs=(Shard(d),)) for d in (0, 1)],
    aten.adaptive_avg_pool2d.default: lambda n: [Rule(ins=(Shard(d),), outs=(Shard(d),)) for d in (0, 1)],
    aten.cat.default: _concat, aten.stack.default: _concat,
    aten.index_select.default: _index_select, aten.gather.default: _gather, aten.index.Tensor: _index,
    aten.scatter.src: _scatter, aten.scatter_add.default: _scatter, aten.index_add.default: _scatter,
    aten.broadcast_tensors.default: _elementwise,
}
ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self,
               aten.maximum.default, aten.minimum.default, aten.pow.Tensor_Tensor, aten.eq.Tensor,
               aten.ne.Tensor, aten.lt.Tensor, aten.gt.Tensor, aten.le.Tensor, aten.ge.Tensor,
               aten.logical_and.default, aten.logical_or.default, aten.masked_fill.Tensor, aten.add_.Tensor}


def has_rule(target) -> bool:
    return target in _RULES or target in ELEMENTWISE


def rules(node: fx.Node) -> list[Rule]:
    """Every rule of `node` along one axis, the all-replicated one first."""
    outs = node.meta.get("val")
    n_out = len([o for o in (outs if isinstance(outs, (list, tuple)) else [outs]) if isinstance(o, torch.Tensor)])
    found = [_replicated(node, n_out)]
    make = _RULES.get(node.target) or (_elementwise if node.target in ELEMENTWISE else None)
    if make is not None:
        n_args = len(tensor_args(node))
        found += [r for r in make(node) if len(r.ins) == n_args and len(r.outs) == n_out]
    return found

