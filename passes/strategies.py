"""Strategies of a unit on a mesh: every valid placement of its leader, carried through its
followers, with the parameters' storage level, and what each costs.

Takes a `Unit` and the problem's `Context`; gives its `Strategy`s. A strategy's costs, per step
and per device:
- compute: each member's forward and backward on its local shard (roofline, `autopar.cost`);
- comm: collectives inside the unit: a follower's forced gather, an op's own (vocabulary-parallel
  cross-entropy's three all-reduces, synchronized batch norm's statistics), the gradient
  synchronization of its parameters and the loss's final reduction;
- optimizer: the parameter update, memory-bound, on the elements this device updates;
- memory: activations saved for backward (local) plus the parameters' training state.

Parameters (seed 004; Rajbhandari et al. 2020), with d the data-parallel degree of a parameter (the
axes where the op splits the work but keeps the parameter whole, so its gradient is partial):
level 0 (DDP) all-reduces gradients; 1 and 2 (ZeRO-1/2) reduce-scatter them, update a 1/d shard
and all-gather the result (2 of 1 keeps only that shard of the gradient); 3 (FSDP) keeps a 1/d
shard of everything and all-gathers the weights before forward and again before backward: about
3× the traffic of level 0's 2×.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.cost.compute import kernel_time
from autopar.vocab import Placements, grad_placement, normalize_grad, shard_count
from autopar.passes.follow import broadcast_to, follow
from autopar.passes.reshard import Collective
from autopar.passes.rules import rules, tensor_args

LEVELS = (0, 1, 2, 3)


@dataclass(frozen=True, slots=True)
class NodeSharding:
    inputs: tuple[Placements, ...]
    """Per tensor argument (flattened order): the placement the op consumes it in."""
    outputs: tuple[Placements, ...]
    kinds: tuple[str, ...] = ()
    """Per axis, how the runtime runs the op there (`passes.rules.Rule.kind`); leaders only."""


@dataclass(frozen=True, slots=True)
class ParamSharding:
    use: Placements
    """As the op consumes it."""
    storage: Placements
    """As it is kept between steps (level 3: sharded on the data-parallel axes)."""
    grad: Placements
    """Where its gradient is reduced to and the optimizer updates (levels 1-3: sharded)."""
    level: int
    top: int = 0
    """The highest level this use allows (0 when no data-parallel axis, or no dim divides)."""


@dataclass(slots=True)
class Strategy:
    members: tuple[NodeSharding, ...]
    params: dict[tuple[int, int], ParamSharding]
    """(member position, tensor-argument position) → how the parameter there is held."""
    compute: float = 0.0
    comm: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    """Bytes saved for backward, per device."""
    state: float = 0.0
    """Bytes of parameter state (weights, gradients, optimizer), per device."""
    sync: float = 0.0
    """The part of `comm` that runs once per step whatever the microbatching: gradient reduction
    and the ZeRO parameter all-gather after the optimizer step."""
    fixed: float = 0.0
    """The part of `compute` that does not shrink when the batch is cut (`fixed_time`): what every
    microbatch of a pipeline pays whole."""
    gathers: float = 0.0
    """The part of `comm` that runs once per pass over the parameters: FSDP's all-gathers before
    forward and backward (once per microbatch in a pipeline)."""
    buckets: dict[int, float] = field(default_factory=dict)
    """Mesh axis → α of an all-reduce on it, for the axes whose gradients this unit's parameters
    send through the runtime's buckets (storage level 0, `runtime.sync`): a step pays that latency
    once per bucket, however many parameters share it (`passes.ilp.bucket_latency`)."""
    collectives: list[tuple[str, str, Collective]] = field(default_factory=list)
    """(node, "forward" | "backward" | "step", collective) run inside the unit other than
    placement changes of tensors (those are read off the plan): an op's own all-reduces and its
    parameters' synchronization."""

    @property
    def memory(self) -> float:
        return self.activations + self.state

    @property
    def time(self) -> float:
        return self.compute + self.comm + self.optimizer


def fits(placements: Placements, shape: tuple[int, ...], mesh_shape: tuple[int, ...], floating: bool) -> bool:
    """Every sharded dim divides evenly, and only floating tensors are partial."""
    for p in placements:
        if isinstance(p, Shard) and p.dim >= len(shape):
            return False
        if isinstance(p, Partial) and not floating:
            return False
    return all(shape[d] % shard_count(placements, mesh_shape, d) == 0
               for d in range(len(shape)) if shard_count(placements, mesh_shape, d) > 1)


def _val(node: fx.Node, index: int = 0) -> torch.Tensor:
    val = node.meta["val"]
    return val[index] if isinstance(val, (list, tuple)) else val


def _tensor_ok(t: torch.Tensor, p: Placements, mesh_shape) -> bool:
    return fits(p, tuple(t.shape), mesh_shape, t.dtype.is_floating_point)


def all_placements(t: torch.Tensor, mesh_shape: tuple[int, ...], partial: bool) -> list[Placements]:
    options = [Replicate()] + [Shard(d) for d in range(t.dim()) if t.shape[d] > 1]
    if partial and t.dtype.is_floating_point:
        options.append(Partial("sum"))
    return [p for p in itertools.product(options, repeat=len(mesh_shape)) if _tensor_ok(t, p, mesh_shape)]


def leader_options(node: fx.Node, mesh_shape: tuple[int, ...]) -> list[NodeSharding]:
    """Products of the op's one-axis rules whose tensors all divide evenly."""
    args = tensor_args(node)
    vals = node.meta["val"]
    outs = [v for v in (vals if isinstance(vals, (list, tuple)) else [vals]) if isinstance(v, torch.Tensor)]
    seen, found = set(), []
    for combo in itertools.product(rules(node), repeat=len(mesh_shape)):
        ins = tuple(tuple(r.ins[i] for r in combo) for i in range(len(args)))
        outputs = tuple(tuple(r.outs[k] for r in combo) for k in range(len(outs)))
        key = (ins, outputs, tuple(r.kind for r in combo))
        if key in seen:
            continue
        seen.add(key)
        if all(_tensor_ok(a.meta["val"], p, mesh_shape) for a, p in zip(args, ins)) and all(
                _tensor_ok(o, p, mesh_shape) for o, p in zip(outs, outputs)):
            found.append(NodeSharding(inputs=ins, outputs=outputs, kinds=key[2]))
    return found


def shard_shapes(node: fx.Node, sharding: NodeSharding, mesh_shape) -> tuple[tuple[int, ...], ...] | None:
    """Each tensor argument's local shape as the op consumes it under `sharding`; None when an
    argument is not one tensor."""
    values = [a.meta["val"] for a in tensor_args(node)]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return None
    return tuple(tuple(n // shard_count(placed, mesh_shape, d) for d, n in enumerate(v.shape))
                 for v, placed in zip(values, sharding.inputs))


def shard_requests(captured, fx_nodes: dict, timed: set[str], mesh_shape) -> dict[str, set]:
    """What to time on its shards (`cost.ops.shard_times`) among the `timed` nodes: every split of
    every node that does FLOPs, as its one-axis rules combine on the mesh, and every split whose
    rule kinds make the runtime run a kernel of its own (`kernel_split`)."""
    out: dict[str, set] = {}
    for name, info in captured.nodes.items():
        if name not in timed:
            continue
        node = fx_nodes[name]
        whole = tuple(tuple(getattr(a.meta["val"], "shape", ())) for a in tensor_args(node))
        found = set()
        for sharding in leader_options(node, mesh_shape):
            shapes, kernel = shard_shapes(node, sharding, mesh_shape), kernel_split(sharding, mesh_shape)
            if shapes is not None and (kernel is not None or (info.flops and shapes != whole)):
                found.add((shapes, kernel))
        if found:
            out[name] = found
    return out


def kernel_split(sharding: NodeSharding, mesh_shape) -> NodeSharding | None:
    """`sharding` when one of its rule kinds, on an axis of more than one device, makes the
    runtime run a kernel instead of the op (`runtime.lower.kernel_of`), else None."""
    special = any(kind != "local" and size > 1 for kind, size in zip(sharding.kinds, mesh_shape))
    return sharding if special else None


def split_axes(sharding: NodeSharding) -> tuple[bool, ...]:
    """Per axis: whether the op's work is divided there (some tensor is not replicated)."""
    placements = sharding.inputs + sharding.outputs
    n = len(placements[0]) if placements else 0
    return tuple(any(not isinstance(p[a], Replicate) for p in placements) for a in range(n))


def follower_sharding(node: fx.Node, source: fx.Node, current: Placements, mesh_shape,
                      source_output: int, activations=()) -> NodeSharding:
    """`activations`: the node's activation inputs (several, for an op joining one unit's tensors)."""
    several = len([a for a in tensor_args(node) if a.name in activations]) > 1
    followed = follow(node, source, current, mesh_shape, source_output=source_output, several=several)
    out_shape = tuple(_val(node).shape) if isinstance(_val(node), torch.Tensor) else ()
    joins = node.target in (torch.ops.aten.cat.default, torch.ops.aten.stack.default)
    inputs = []
    for a in tensor_args(node):
        if a is source or (joins and a.name in activations):
            inputs.append(followed.needs)
        else:  # another operand, broadcast against the output
            inputs.append(broadcast_to(followed.outputs[0], out_shape, tuple(a.meta["val"].shape)))
    return NodeSharding(inputs=tuple(inputs), outputs=followed.outputs)


def grads_of(sharding: NodeSharding) -> tuple[Placements, ...]:
    """The placement of each input's gradient as this op's backward produces it."""
    split = split_axes(sharding)
    return tuple(tuple(grad_placement(p, s) for p, s in zip(pl, split)) for pl in sharding.inputs)


def normalized(placements: Placements) -> Placements:
    return tuple(normalize_grad(p) for p in placements)


def parts(sharding: NodeSharding, mesh_shape) -> int:
    """Into how many pieces the op's work is divided: the mesh axes on which some tensor of the op
    is cut. A partial value is whole-sized on every device, so an op on partial sums alone (a
    residual add of two, P + P → P) does all its work on each, though its result is divided by
    value (which `split_axes` counts, for the gradients)."""
    placements = sharding.inputs + sharding.outputs
    count = 1
    for axis, size in enumerate(mesh_shape):
        if any(isinstance(p[axis], Shard) for p in placements):
            count *= size
    return count


def saved_memory(node_info, sharding: NodeSharding, mesh_shape) -> float:
    """Bytes kept for backward on one device: the output's share, and the op's own tensors divided
    as its work is."""
    out_parts = shard_count(sharding.outputs[0], mesh_shape) if sharding.outputs else 1
    internal = node_info.internal_saved
    return (node_info.saved_bytes - internal) / out_parts + internal / parts(sharding, mesh_shape)


def local_time(node_info, sharding: NodeSharding, mesh_shape, device, dtype: str, profile=None,
               measured: tuple[float, float] | None = None, fixed: tuple[float, float] | None = None,
               local: tuple[float, float] | None = None) -> float:
    """Forward + backward of one node on its shard: the work divided where the op splits it
    (`cost.compute.kernel_time`: the roofline, or the cluster's profile when it has one). `measured`:
    the node's whole (forward, backward) seconds timed on the device (`cost.ops`); its share is then
    o + (t − o) / parts, o what does not shrink with the split: `fixed`, the node's own (timed again
    on half its batch, `cost.ops.OpTimes.fixed`: dispatch, autograd, a smaller matmul's lower
    rate), or else the profile's kernel overhead; every part pays it whole. A view's
    measured time is its dispatch (and, from non-contiguous memory, a reshape's copy); unmeasured,
    it is free. `local`: the op's (forward, backward) seconds timed on this sharding's shards
    (`cost.ops.shard_times`), which is its share outright."""
    if local is not None:
        return local[0] + (local[1] if node_info.requires_grad else 0.0)
    if measured is None and node_info.flops == 0 and node_info.bytes_moved == 0:
        return 0.0
    parts_ = parts(sharding, mesh_shape)
    if measured is not None:
        own = _own_fixed(profile, fixed)
        share = [f + max(t - f, 0.0) / parts_ if t > 0 else 0.0 for t, f in zip(measured, own)]
        return share[0] + (share[1] if node_info.requires_grad else 0.0)
    forward = kernel_time(node_info.flops / parts_, node_info.bytes_moved / parts_, device, dtype, profile)
    if not node_info.requires_grad:
        return forward
    backward = kernel_time(node_info.backward_flops / parts_, 2 * node_info.bytes_moved / parts_, device, dtype,
                           profile)
    return forward + backward


def fixed_time(node_info, share: float, profile=None, measured: tuple[float, float] | None = None,
               fixed: tuple[float, float] | None = None) -> float:
    """Of a node's `share` (`local_time`), the seconds a cut of its batch does not shrink: its own
    fixed part (`cost.ops.OpTimes.fixed`, from the node timed on half its batch) or else the
    profile's kernel overhead, forward and backward; none for a node priced from FLOPs and bytes.
    A pipeline's microbatch is such a cut in time: m microbatches of a stage take
    f + (t − f) / m each, not t / m (the half-batch fit of `local_time`, applied to microbatches)."""
    if measured is None:
        return 0.0
    own = _own_fixed(profile, fixed)
    return min(own[0] + (own[1] if node_info.requires_grad else 0.0), share)


def _own_fixed(profile, fixed: tuple[float, float] | None) -> tuple[float, float]:
    """A measured node's (forward, backward) fixed part: its own, or else the profile's kernel
    overhead each way."""
    if fixed is not None:
        return fixed
    o = profile.kernel_overhead if profile is not None else 0.0
    return o, o


def param_options(use: Placements, split: tuple[bool, ...], shape: tuple[int, ...],
                  mesh_shape: tuple[int, ...], levels) -> list[ParamSharding]:
    """How a parameter consumed in `use` can be held, one option per storage level."""
    dp = [a for a, (p, s) in enumerate(zip(use, split)) if s and isinstance(p, Replicate)]
    plain = ParamSharding(use=use, storage=use, grad=use, level=0)
    if not dp:
        return [plain]
    degree = 1
    for a in dp:
        degree *= mesh_shape[a]
    dim = next((d for d in range(len(shape))
                if shape[d] % (shard_count(use, mesh_shape, d) * degree) == 0), None)
    if dim is None:
        return [plain]
    sharded = tuple(Shard(dim) if a in dp else p for a, p in enumerate(use))
    options = [ParamSharding(use=use, storage=use, grad=use, level=0, top=3)] if 0 in levels else []
    for level in (1, 2, 3):
        if level in levels:
            options.append(ParamSharding(use=use, storage=sharded if level == 3 else use, grad=sharded,
                                         level=level, top=3))
    return options or [plain]


def partial_on(placements: Placements, axes_split: tuple[bool, ...]) -> Placements:
    """The gradient of a parameter used replicated where the op is split: partial there."""
    return tuple(Partial("sum") if s and isinstance(p, Replicate) else p for p, s in zip(placements, axes_split))
