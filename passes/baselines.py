"""Named baselines: the plans users write by hand, as restrictions of the same search space.

Takes a problem and a baseline name; gives the mesh the baseline runs on and a predicate over
strategies. Solving the problem under the predicate gives the best plan *of that family* under the
same cost model, so `auto` (the unrestricted problem, warm-started from the best baseline) is never
predicted slower than any of them.

| name    | mesh                      | what is fixed                                                          |
|---------|---------------------------|------------------------------------------------------------------------|
| dp      | 1-D over all devices      | inputs split on the batch dim, parameters replicated, gradients all-reduced (DDP) |
| zero1   | 1-D                       | as dp, optimizer state sharded (reduce-scatter + all-gather)           |
| zero2   | 1-D                       | as zero1, gradients sharded too                                        |
| fsdp    | 1-D                       | as zero2, parameters sharded and all-gathered before use (ZeRO-3)      |
| tp      | 1-D                       | inputs replicated, every weight of 2+ dims sharded (Megatron)          |
| dp+tp   | 2-D (n/g, g), g in a node | dp on axis 0, tp on axis 1                                             |
| sp      | 1-D                       | tp, with layer/RMS norms on sequence-sharded activations (Megatron-SP) |
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.tensor import Replicate, Shard

from autopar.cluster import Cluster
from autopar.passes.rules import tensor_args
from autopar.passes.sharding import ShardingProblem
from autopar.passes.strategies import Strategy, split_axes

BASELINES = ("dp", "zero1", "zero2", "fsdp", "tp", "dp+tp", "sp")
_LEVEL = {"dp": 0, "zero1": 1, "zero2": 2, "fsdp": 3, "tp": 0, "dp+tp": 0, "sp": 0}
_NORMS = {torch.ops.aten.layer_norm.default, torch.ops.aten.rms_norm.default}


def mesh_shape(name: str, cluster: Cluster, devices: int | None = None) -> tuple[int, ...] | None:
    """The mesh a baseline runs on, or None when it does not apply (dp+tp on a single device group)."""
    n = cluster.num_devices if devices is None else devices
    if name != "dp+tp":
        return (n,)
    g = min(cluster.devices_per_node, n // 2)
    while g > 1 and (cluster.devices_per_node % g or n % g):
        g -= 1
    return (n // g, g) if g > 1 else None


def roles_of(name: str, ndim: int) -> tuple[str, ...]:
    """What each mesh axis is in a baseline: "dp" or "tp"."""
    if name == "dp+tp":
        return ("dp", "tp")
    return ("tp",) * ndim if name in ("tp", "sp") else ("dp",) * ndim


def predicate(name: str, problem: ShardingProblem, level: int | None = None) -> Callable[[int, Strategy], bool]:
    """Whether a strategy belongs to the baseline; `level` overrides its parameter storage level
    (dp+tp with ZeRO-1, as Megatron-LM's distributed optimizer)."""
    if name not in BASELINES:
        raise ValueError(f"strategy: found {name!r}, required 'auto' or one of {', '.join(BASELINES)}")
    ctx = problem.context
    axes = roles_of(name, problem.mesh.ndim)
    level = _LEVEL[name] if level is None else level
    uses: dict[int, list[tuple[int, int, int]]] = {}  # unit → (member, argument, parameter rank)
    for u in problem.strategies:
        unit = problem.units[u]
        for m, member in enumerate(unit.members):
            for j, arg in enumerate(tensor_args(ctx.fx_nodes[member])):
                if arg.name in ctx.roles.params:
                    uses.setdefault(u, []).append((m, j, arg.meta["val"].dim()))

    def allowed(u: int, s: Strategy) -> bool:
        unit = problem.units[u]
        if unit.kind == "input":
            batch = ctx.fx_nodes[unit.members[0]].meta["val"].dim() > 0
            return all(p == (Shard(0) if role == "dp" and batch else Replicate())
                       for p, role in zip(s.members[0].outputs[0], axes))
        for m, j, rank in uses.get(u, []):
            placed = s.members[m].inputs[j]
            split = split_axes(s.members[m])
            for a, (p, role) in enumerate(zip(placed, axes)):
                # Data parallel: weights whole, the work they do split; under DDP, work on parameters
                # alone (a position embedding) may stay whole, its gradient summed with the others,
                # while ZeRO and FSDP split it too, so that its parameter is sharded like every other.
                must_split = unit.kind == "leader" and (level > 0 or unit.members[m] in ctx.roles.data)
                if role == "dp" and (not isinstance(p, Replicate) or (must_split and not split[a])):
                    return False
                if role == "tp" and rank >= 2 and not isinstance(p, Shard):
                    return False
        if any(held.level != min(level, held.top) for held in s.params.values()):
            return False
        if name == "sp":
            for m, member in enumerate(unit.members):
                if ctx.fx_nodes[member].target in _NORMS and any(
                        role == "tp" and p != Shard(1) for p, role in zip(s.members[m].inputs[0], axes)):
                    return False
        return True

    return allowed
