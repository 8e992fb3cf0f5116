"""Resharding: the steps that turn one placement of a tensor into another, and their time.

Takes a source and a target placement (one per mesh axis); `steps` gives the sequence of per-axis
steps, which the runtime executes (`runtime.collectives.transform`) and the cost model prices
(`Resharder`), so a plan's collectives are exactly what runs:

| per axis       | step             | collective over the axis's group | message n (seed 002)      |
|----------------|------------------|----------------------------------|---------------------------|
| S(i) → S(j)    | all_to_all       | all-to-all                       | the local size            |
| S(d) → R       | all_gather       | all-gather                       | the gathered size         |
| P → R          | all_reduce       | all-reduce                       | the local size            |
| P → S(d)       | reduce_scatter   | reduce-scatter                   | the local size before     |
| R → S(d)       | cut              | none (keep this rank's chunk)    |                           |
| R → P          | zero             | none (zeros but on the first rank) |                         |
| S(d) → P       | pad              | none (this rank's chunk in zeros; times the group size for P(avg)) |  |
| P ↔ P(avg)     | scale            | none (times or over the group size) |                        |

A collective's time is its α-β price (`cost.comm`) plus the copies the runtime makes around it
(`staging_bytes`) at the device's memory bandwidth.

A dim cut on several axes is cut outer axis first (DTensor's order). So gathers run innermost axis
first, cuts outermost first; an axis inside one that is gathered or cut anew is gathered too and
cut again; a reduce-scatter an outer cut must precede is an all-reduce and a cut. All-to-all is
used where neither dim is cut on another axis.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.cost.comm import CommModel
from autopar.vocab import LogicalMesh, Placements, shard_count

COMMUNICATING = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")


@dataclass(frozen=True, slots=True)
class Step:
    kind: str
    axis: int
    dim: int = -1
    """The tensor dim gathered, scattered, cut or padded; for all_to_all, the dim it cuts anew."""
    source_dim: int = -1
    """all_to_all only: the dim that is joined."""
    op: str = "sum"
    """all_reduce / reduce_scatter: the partial's reduction; scale: the target's."""


def _to_gather(cur: list, dst: Placements) -> set[int]:
    n = len(cur)
    found = {a for a in range(n) if isinstance(cur[a], Shard) and (
        (dst[a] != cur[a] and not _padded(cur, dst, a))
        or any(dst[b] == cur[a] and cur[b] != cur[a] for b in range(a)))}
    grew = True
    while grew:
        grew = False
        for a in range(n):
            if a not in found and isinstance(cur[a], Shard) and any(b in found and cur[b] == cur[a] for b in range(a)):
                found.add(a)
                grew = True
    return found


def _padded(cur: list, dst: Placements, a: int) -> bool:
    """S(d) → P by zero padding: only when no other axis cuts d (its pieces would interleave)."""
    return isinstance(dst[a], Partial) and not any(
        isinstance(p, Shard) and p.dim == cur[a].dim for b in range(len(cur)) if b != a for p in (cur[b], dst[b]))


def _alone(cur: list, dst: Placements, a: int) -> bool:
    dims = {cur[a].dim, dst[a].dim}
    return not any(isinstance(p, Shard) and p.dim in dims for b in range(len(cur)) if b != a
                   for p in (cur[b], dst[b]))


def moves(src: Placements, dst: Placements, grad_in: Placements | None, grad_out: Placements | None,
          mesh_shape: tuple[int, ...]) -> bool:
    """Whether a tensor taken from `src` to `dst` (its gradient, when one flows, from `grad_in` back
    to `grad_out`) changes on an axis of more than one device: where the runtime makes a placement
    change node (`runtime.lower`) and the cost model prices one. On an axis of one device every
    placement is the whole tensor."""
    return any(mesh_shape[a] > 1 and (src[a] != dst[a] or (grad_in is not None and grad_in[a] != grad_out[a]))
               for a in range(len(src)))


def steps(src: Placements, dst: Placements) -> list[Step]:
    """The per-axis steps from `src` to `dst` (see the module docstring)."""
    if src == dst:
        return []
    cur, n, out = list(src), len(src), []
    for a in range(n):  # 1. all-to-all where the two dims are cut on no other axis
        if isinstance(cur[a], Shard) and isinstance(dst[a], Shard) and cur[a] != dst[a] and _alone(cur, dst, a):
            out.append(Step("all_to_all", a, dim=dst[a].dim, source_dim=cur[a].dim))
            cur[a] = dst[a]
    gather = _to_gather(cur, dst)
    for a in reversed(range(n)):  # 2. gathers, innermost first
        if a in gather:
            out.append(Step("all_gather", a, dim=cur[a].dim))
            cur[a] = Replicate()
    for a in range(n):  # 3. reductions, outermost first
        if isinstance(cur[a], Partial) and not isinstance(dst[a], Partial):
            pending = any(dst[b] == dst[a] and cur[b] != dst[b] for b in range(a))
            if isinstance(dst[a], Shard) and not pending:
                out.append(Step("reduce_scatter", a, dim=dst[a].dim, op=cur[a].reduce_op))
                cur[a] = dst[a]
            else:
                out.append(Step("all_reduce", a, op=cur[a].reduce_op))
                cur[a] = Replicate()
    for a in range(n):  # 4. local changes, outermost first
        if cur[a] == dst[a]:
            continue
        if isinstance(dst[a], Shard):
            out.append(Step("cut", a, dim=dst[a].dim))
        elif isinstance(cur[a], Partial):
            out.append(Step("scale", a, op=dst[a].reduce_op))
        elif isinstance(cur[a], Shard):
            out.append(Step("pad", a, dim=cur[a].dim, op=dst[a].reduce_op))
        else:
            out.append(Step("zero", a, op=dst[a].reduce_op))
        cur[a] = dst[a]
    return out


@dataclass(frozen=True, slots=True)
class Collective:
    kind: str
    axis: int
    group_size: int
    bytes: float
    """n in seed 002's formulas (see the table above)."""
    time: float


class Resharder:
    """Collectives and time of placement changes on one mesh, cached."""

    def __init__(self, mesh: LogicalMesh, comm: CommModel) -> None:
        self.mesh = mesh
        self.comm = comm
        self._groups = [mesh.group(a) for a in range(mesh.ndim)]
        self._cache: dict[tuple, tuple[Collective, ...]] = {}
        self._times: dict[tuple, float] = {}

    def collectives(self, src: Placements, dst: Placements, nbytes: float) -> tuple[Collective, ...]:
        key = (src, dst, nbytes)
        found = self._cache.get(key)
        if found is not None:
            return found
        current, result = list(src), []
        for step in steps(src, dst):
            local = nbytes / shard_count(current, self.mesh.shape)
            size = self.mesh.shape[step.axis]
            if step.kind in COMMUNICATING:
                n = local * size if step.kind == "all_gather" else local
                group = self._groups[step.axis]
                staging = self.comm.copy_time(staging_bytes(step, local, size)) if size > 1 else 0.0
                result.append(Collective(step.kind, step.axis, len(group), n,
                                         self.comm.time(step.kind, n, group) + staging))
            current[step.axis] = _after(step, current[step.axis])
        self._cache[key] = tuple(result)
        return self._cache[key]

    def time(self, src: Placements, dst: Placements, nbytes: float) -> float:
        if src == dst:
            return 0.0
        key = (src, dst, nbytes)
        found = self._times.get(key)
        if found is None:
            found = self._times[key] = sum(c.time for c in self.collectives(src, dst, nbytes))
        return found


def staging_bytes(step: Step, local: float, size: int) -> float:
    """Bytes read and written by the copies `runtime.collectives` makes around one collective of a
    `local`-byte tensor on a group of `size`: an all-reduce clones its input (the caller's tensor
    stays intact), 2·local, and an average divides it, 2·local more; an all-gather or a
    reduce-scatter on a dim other than 0 moves it to the front, 2·local, and a reduce-scatter's
    average divides its output, 2·local / size; an all-to-all stacks the pieces it sends and joins
    the ones it receives, 4·local. In GPT's tensor-parallel step on 2 CPU ranks (BENCHMARKS.md, cost-
    model accuracy) these are 18 clones of 512 kB and two all-to-alls of 2.1 MB: 36 MB, 3 ms of a
    130 ms step at the profiled 11.6 GB/s, which the profile's α-β (timed on ready buffers) leaves out."""
    if step.kind == "all_reduce":
        return 2 * local * (2 if step.op == "avg" else 1)
    if step.kind in ("all_gather", "reduce_scatter"):
        moved = 2 * local if step.dim != 0 else 0.0
        return moved + (2 * local / size if step.kind == "reduce_scatter" and step.op == "avg" else 0.0)
    if step.kind == "all_to_all":
        return 4 * local
    return 0.0


def _after(step: Step, before):
    """The axis's placement after a step (only its sharding matters for the sizes that follow)."""
    if step.kind in ("all_to_all", "reduce_scatter", "cut"):
        return Shard(step.dim)
    if step.kind in ("all_gather", "all_reduce"):
        return Replicate()
    return Partial(step.op)
