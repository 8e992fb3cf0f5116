"""The vocabulary: placements per mesh axis, and logical meshes over a cluster's devices.

An **axis** is a mesh axis; a **dim** is a tensor dimension. A tensor's placement on an n-axis mesh
is a tuple of n torch placements, one per axis: `Shard(dim)`, `Replicate()` or `Partial(op)`, the
same types DTensor uses, so plans speak DTensor's language. Their short forms are the JSON form:

    S(0)  Shard(0)        R  Replicate()        P  Partial("sum")        P(avg)  Partial("avg")

    >>> mesh = LogicalMesh.build(Cluster.preset("h100", nodes=2), (2, 8))
    >>> mesh.group(1, of=9)        # the devices along axis 1 through device 9: its node
    (8, 9, 10, 11, 12, 13, 14, 15)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from autopar.cluster import Cluster

R = Replicate()
P = Partial("sum")
P_AVG = Partial("avg")
Placements = tuple[Placement, ...]
"""One placement per mesh axis."""


def S(dim: int) -> Shard:
    return Shard(dim)


def short(p: Placement) -> str:
    """The short form: "S(0)", "R", "P" or "P(avg)"."""
    if isinstance(p, Shard):
        return f"S({p.dim})"
    if isinstance(p, Replicate):
        return "R"
    if isinstance(p, Partial):
        return "P" if p.reduce_op == "sum" else f"P({p.reduce_op})"
    raise TypeError(f"placement: found {type(p).__name__}, required Shard, Replicate or Partial")


_SHORT = re.compile(r"^(?:S\((\d+)\)|R|P|P\((sum|avg)\))$")


def parse(text: str) -> Placement:
    """The inverse of `short`; ValueError naming the text otherwise."""
    m = _SHORT.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"placement: found {text!r}, required one of S(<dim>), R, P, P(avg)")
    if text == "R":
        return R
    if text.startswith("S"):
        return Shard(int(m.group(1)))
    return Partial(m.group(2) or "sum")


def fmt(placements: Sequence[Placement]) -> str:
    """(S(0), R) → "S(0),R"; the form used in summaries."""
    return ",".join(short(p) for p in placements)


def shard_count(placements: Sequence[Placement], mesh_shape: Sequence[int], dim: int | None = None) -> int:
    """How many pieces the tensor is cut into (along `dim` only, when given)."""
    count = 1
    for p, size in zip(placements, mesh_shape):
        if isinstance(p, Shard) and (dim is None or p.dim == dim):
            count *= size
    return count


def is_replicated(placements: Sequence[Placement]) -> bool:
    return all(isinstance(p, Replicate) for p in placements)


def grad_placement(p: Placement, split: bool) -> Placement:
    """The placement of the gradient w.r.t. an input placed `p` on an axis, as the op's backward
    produces it. A replicated input of a computation that is split on the axis (column-parallel
    linear, a batch-sharded layer's weight) gets a partial gradient; a partial input gets a
    replicated one (the gradient of a sum reaches every addend whole)."""
    if isinstance(p, Replicate):
        return P if split else R
    if isinstance(p, Partial):
        return R
    return p


def normalize_grad(p: Placement) -> Placement:
    """The placement an op expects its output's gradient in: P becomes R, the rest stays."""
    return R if isinstance(p, Partial) else p


@dataclass(frozen=True, kw_only=True, slots=True)
class LogicalMesh:
    """An n-d view of devices; `devices` lists global device indices in row-major order of
    `shape`. The last axis varies fastest, so it lands on the fastest links (inside a node)."""

    shape: tuple[int, ...]
    devices: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.shape or any(not isinstance(s, int) or s < 1 for s in self.shape):
            raise ValueError(f"LogicalMesh.shape: found {self.shape!r}, required positive integers")
        if len(self.devices) != math.prod(self.shape) or len(set(self.devices)) != len(self.devices):
            raise ValueError(f"LogicalMesh.devices: found {len(self.devices)} devices for shape {self.shape}, "
                             f"required {math.prod(self.shape)} distinct ones")

    @classmethod
    def build(cls, cluster: Cluster, shape: Sequence[int], first: int = 0) -> LogicalMesh:
        """Devices `first`, `first + 1`, … of `cluster` viewed as `shape`."""
        shape = tuple(shape)
        count = math.prod(shape)
        if first < 0 or first + count > cluster.num_devices:
            raise ValueError(f"mesh {shape}: found devices {first}..{first + count - 1}, required within the "
                             f"cluster's {cluster.num_devices}")
        return cls(shape=shape, devices=tuple(range(first, first + count)))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return len(self.devices)

    def coordinate(self, device: int) -> tuple[int, ...]:
        index = self.devices.index(device)
        coords = []
        for s in reversed(self.shape):
            coords.append(index % s)
            index //= s
        return tuple(reversed(coords))

    def group(self, axis: int, of: int | None = None) -> tuple[int, ...]:
        """The devices along `axis` that share the other coordinates of device `of` (default: the first)."""
        if not 0 <= axis < self.ndim:
            raise ValueError(f"axis: found {axis}, required 0 <= axis < {self.ndim}")
        coord = list(self.coordinate(self.devices[0] if of is None else of))
        members = []
        for i in range(self.shape[axis]):
            coord[axis] = i
            members.append(self.devices[self._index(coord)])
        return tuple(members)

    def groups(self, axis: int) -> list[tuple[int, ...]]:
        """Every group along `axis` (the process groups of that axis)."""
        seen, out = set(), []
        for d in self.devices:
            g = self.group(axis, of=d)
            if g not in seen:
                seen.add(g)
                out.append(g)
        return out

    def _index(self, coord: Sequence[int]) -> int:
        index = 0
        for c, s in zip(coord, self.shape):
            index = index * s + c
        return index

    def describe(self) -> str:
        return "×".join(map(str, self.shape)) + f" over devices {self.devices[0]}..{self.devices[-1]}"


def candidate_meshes(cluster: Cluster, devices: int | None = None, first: int = 0) -> list[LogicalMesh]:
    """The mesh shapes the planner tries on `devices` devices: 1-D, and 2-D (n/k, k) with the
    inner axis k inside a node (k divides the devices per node)."""
    n = cluster.num_devices if devices is None else devices
    shapes = [(n,)]
    per_node = min(cluster.devices_per_node, n)
    for k in range(2, per_node + 1):
        if per_node % k == 0 and n % k == 0 and n // k > 1:
            shapes.append((n // k, k))
    return [LogicalMesh.build(cluster, s, first) for s in shapes]
