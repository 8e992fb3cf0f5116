"""Followers: ops whose placement is carried over from their one activation input.

Views (reshape, transpose, permute, split, unbind, …) and element-wise ops with a single
activation input add no choice to the sharding problem: their output placement is a function of
the input's. Takes the node and the input's placements (one per mesh axis); gives the placement
the input must be in (a sharding the op cannot keep is gathered first) and the outputs'.

Rules, per axis:
- Shard(d) moves with d through the shape change (`transpose(1, 2)` sends S(1) to S(2)); a
  reshape keeps it when d is the outermost dim of its group (`(B, T, C) → (B·T, C)` keeps S(0),
  not S(1)) and the new dim divides evenly. An op that cuts along d (slice, select, split, unbind)
  needs d whole.
- Partial survives only ops linear in the input (views, casts, scaling); before anything else
  (GELU, adding a constant) the partial sums are reduced first.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from autopar.vocab import R, Placements

aten = torch.ops.aten

_IDENTITY_LINEAR = {  # placements unchanged; linear, so Partial survives
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default, aten.to.dtype,
    aten._to_copy.default, aten.to.dtype_layout, aten.neg.default, aten.mul.Scalar, aten.div.Scalar,
    aten.lift_fresh_copy.default, aten.type_as.default,
}
_IDENTITY_NONLINEAR = {  # placements unchanged; Partial must be reduced first
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
    aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.abs.default,
    aten.reciprocal.default, aten.pow.Tensor_Scalar, aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar,
    aten.clamp.default, aten.erf.default, aten.sin.default, aten.cos.default, aten.square.default,
    aten.lt.Scalar, aten.gt.Scalar, aten.le.Scalar, aten.ge.Scalar, aten.eq.Scalar, aten.ne.Scalar,
    aten.logical_not.default, aten.masked_fill.Scalar, aten.zeros_like.default, aten.ones_like.default,
    aten.empty_like.default, aten.full_like.default, aten.dropout.default, aten.leaky_relu.default,
    aten.hardtanh.default, aten.softplus.default, aten.sign.default, aten.floor.default, aten.round.default,
    aten.bitwise_not.default,
}
# Binary ops whose other operand is a constant (buffer, literal tensor): the output follows the
# activation operand; Partial survives scaling by a constant (mul, div by it), not shifting.
_BINARY_SCALING = {aten.mul.Tensor, aten.div.Tensor}
_BINARY_OTHER = {
    aten.add.Tensor, aten.sub.Tensor, aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.gt.Tensor,
    aten.le.Tensor, aten.ge.Tensor, aten.maximum.default, aten.minimum.default, aten.pow.Tensor_Tensor,
    aten.where.self, aten.logical_and.default, aten.logical_or.default, aten.masked_fill.Tensor,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.add_.Tensor,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.unflatten.int}
_DIM_MAPS = {aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
             aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.split_with_sizes.default,
             aten.unbind.int, aten.chunk.default, aten.narrow.default}
FOLLOWERS = (_IDENTITY_LINEAR | _IDENTITY_NONLINEAR | _BINARY_SCALING | _BINARY_OTHER | _RESHAPES | _DIM_MAPS
             | {operator.getitem})
_JOINS = {aten.cat.default, aten.stack.default}
MULTI_FOLLOWERS = _BINARY_SCALING | _BINARY_OTHER | _JOINS
"""Ops with several activation inputs that follow when all of them come from one unit (RoPE's
rotated halves, a router's masks): the first input leads, the others are brought to match."""
_LINEAR = _IDENTITY_LINEAR | _BINARY_SCALING | _RESHAPES | _DIM_MAPS | {operator.getitem}


@dataclass(frozen=True, slots=True)
class Followed:
    """What a follower needs and gives, for one placement of its activation input."""

    needs: Placements
    """The placement the activation input must be in (the given one, or less sharded)."""
    outputs: tuple[Placements, ...]
    """One per tensor output."""


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _dim_map(node: fx.Node, source: fx.Node) -> dict[int, int | None]:
    """Input dim → output dim (None: the op cuts along it, so it must be whole)."""
    target, args = node.target, node.args
    rank = len(_shape(source))
    out_rank = len(_outputs(node)[0]) if _outputs(node) else 0
    same = {d: d for d in range(rank)}
    if target in (aten.transpose.int, aten.t.default):
        a, b = (0, 1) if target is aten.t.default else (_norm(args[1], rank), _norm(args[2], rank))
        same[a], same[b] = b, a
        return same
    if target is aten.permute.default:
        perm = [_norm(d, rank) for d in args[1]]
        return {d: perm.index(d) for d in range(rank)}
    if target is aten.unsqueeze.default:
        at = _norm(args[1], rank + 1)
        return {d: d + (d >= at) for d in range(rank)}
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        listed = range(rank) if target is aten.squeeze.default else _norm_all(args[1], rank)
        gone = {d for d in listed if _shape(source)[d] == 1}
        kept = [d for d in range(rank) if d not in gone]
        return {d: (kept.index(d) if d in kept else None) for d in range(rank)}
    if target in _JOINS:
        at = _norm(args[1] if len(args) > 1 else 0, out_rank)
        if target is aten.stack.default:
            return {d: d + (d >= at) for d in range(rank)}
        return {d: (None if d == at else d) for d in range(rank)}
    if target is aten.expand.default:
        return {d: d + out_rank - rank for d in range(rank)}
    if target in (aten.select.int, aten.unbind.int):
        cut = _norm(args[1], rank)
        return {d: (None if d == cut else d - (d > cut)) for d in range(rank)}
    if target in (aten.slice.Tensor, aten.narrow.default, aten.split.Tensor, aten.split_with_sizes.default,
                  aten.chunk.default):
        at = 1 if target in (aten.slice.Tensor, aten.narrow.default) else 2  # slice(x, dim, ...), split(x, n, dim)
        cut = _norm(args[at] if len(args) > at else node.kwargs.get("dim", 0), rank)
        if target is aten.slice.Tensor and _shape(source)[cut] == _outputs(node)[0][cut]:
            return same  # a full slice
        return {d: (None if d == cut else d) for d in range(rank)}
    return same


def _norm_all(dims, rank: int) -> list[int]:
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [_norm(d, rank) for d in dims]


def _reshape_map(in_shape: Sequence[int], out_shape: Sequence[int]) -> dict[int, int | None]:
    """For a reshape: input dim → the output dim that keeps its sharding, or None."""
    mapping: dict[int, int | None] = {d: None for d in range(len(in_shape))}
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        group_in, group_out = [i], [j]
        a, b = in_shape[i], out_shape[j]
        while a != b:
            if a < b:
                i += 1
                group_in.append(i)
                a *= in_shape[i]
            else:
                j += 1
                group_out.append(j)
                b *= out_shape[j]
        lead_in = next((d for d in group_in if in_shape[d] != 1), None)
        lead_out = next((d for d in group_out if out_shape[d] != 1), None)
        if lead_in is not None and lead_out is not None:
            mapping[lead_in] = lead_out
        i, j = i + 1, j + 1
    return mapping


def _outputs(node: fx.Node) -> list[tuple[int, ...]]:
    val = node.meta.get("val")
    vals = list(val) if isinstance(val, (list, tuple)) else [val]
    return [tuple(v.shape) for v in vals if isinstance(v, torch.Tensor)]


def follow(node: fx.Node, source: fx.Node, placements: Placements, mesh_shape: Sequence[int],
           source_output: int = 0, *, several: bool = False) -> Followed:
    """The follower `node`'s placements when its activation input `source` is in `placements`.
    `several`: the op has other activation inputs (then partial sums are reduced first)."""
    if node.target is operator.getitem:
        return Followed(needs=placements, outputs=(placements,))
    linear = not several and (node.target in _LINEAR or (node.target in _BINARY_SCALING and node.args[0] is source))
    in_shape = _shape(source) if source_output == 0 else tuple(_vals(source)[source_output].shape)
    outs = _outputs(node)
    if node.target in _RESHAPES:
        mapping = _reshape_map(in_shape, outs[0])
    elif node.target in _DIM_MAPS or node.target in _JOINS:
        mapping = _dim_map(node, source)
    else:  # element-wise: same dims, aligned from the right if broadcast
        shift = len(outs[0]) - len(in_shape) if outs else 0
        mapping = {d: d + shift for d in range(len(in_shape))}

    needs, out = [], []
    for p in placements:
        if isinstance(p, Partial) and not linear:
            needs.append(R)
            out.append(R)
        elif isinstance(p, Shard) and mapping.get(p.dim) is None:
            needs.append(R)
            out.append(R)
        else:
            needs.append(p)
            out.append(Shard(mapping[p.dim]) if isinstance(p, Shard) else p)
    # Evenness: a carried sharding whose new dim does not divide is gathered instead.
    for axis, p in enumerate(out):
        if isinstance(p, Shard) and outs:
            count = math.prod(mesh_shape[a] for a, q in enumerate(out) if q == p)
            if outs[0][p.dim] % count:
                needs[axis], out[axis] = R, R
    return Followed(needs=tuple(needs), outputs=tuple(tuple(out) for _ in outs) or (tuple(out),))


def _vals(node: fx.Node) -> list:
    val = node.meta.get("val")
    return list(val) if isinstance(val, (list, tuple)) else [val]


def broadcast_to(placements: Placements, out_shape: Sequence[int], in_shape: Sequence[int]) -> Placements:
    """The placement of an operand of shape `in_shape` broadcast against an output placed so:
    output dims the operand lacks (or has as size 1) are replicated for it."""
    shift = len(out_shape) - len(in_shape)
    result: list[Placement] = []
    for p in placements:
        if isinstance(p, Shard):
            d = p.dim - shift
            result.append(Shard(d) if d >= 0 and in_shape[d] != 1 else R)
        elif isinstance(p, Partial):
            result.append(R)
        else:
            result.append(Replicate())
    return tuple(result)
