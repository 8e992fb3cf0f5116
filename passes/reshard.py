"""Resharding: the collectives that turn one placement of a tensor into another, and their time.

Takes a source and a target placement (one per mesh axis), the tensor's bytes and the mesh; gives
the list of collectives, axis by axis, each timed by the cost model:

| from → to      | collective over the axis's group           | message n (seed 002's convention) |
|----------------|--------------------------------------------|------------------------------------|
| S(i) → R       | all-gather                                 | the gathered size                  |
| P → R          | all-reduce                                 | the local size                     |
| P → S(i)       | reduce-scatter                             | the local size before              |
| S(i) → S(j)    | all-to-all                                 | the local size                     |
| R → S(i), R → P| none (a local slice; a zero on all but one rank) |                              |
| S(i) → P       | all-gather, then the local R → P           | the gathered size                  |

Reductions run first, gathers last, so each collective moves as little as it can.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.tensor import Replicate, Shard

from autopar.cost.comm import CommModel
from autopar.vocab import LogicalMesh, Placements, shard_count


@dataclass(frozen=True, slots=True)
class Collective:
    kind: str
    axis: int
    group_size: int
    bytes: float
    """n in seed 002's formulas (see the table above)."""
    time: float


def _step(src, dst, local: float, size: int) -> tuple[str, float] | None:
    """The collective for one axis and its n; None when the change is local (from R)."""
    if src == dst or isinstance(src, Replicate):
        return None
    if isinstance(src, Shard):
        return ("all_to_all", local) if isinstance(dst, Shard) else ("all_gather", local * size)
    # A partial sum: reduce it (P(sum) ↔ P(avg) too: reduce, then re-split locally).
    return ("reduce_scatter", local) if isinstance(dst, Shard) else ("all_reduce", local)


def _order(src: Placements, dst: Placements) -> list[int]:
    """Axes to change: reductions and all-to-alls first, gathers last."""
    changes = [a for a in range(len(src)) if src[a] != dst[a] and not isinstance(src[a], Replicate)]
    return sorted(changes, key=lambda a: (isinstance(src[a], Shard) and not isinstance(dst[a], Shard), a))


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
        current = list(src)
        steps = []
        for axis in _order(src, dst):
            local = nbytes / shard_count(current, self.mesh.shape)
            step = _step(current[axis], dst[axis], local, self.mesh.shape[axis])
            if step is not None:
                kind, n = step
                group = self._groups[axis]
                steps.append(Collective(kind, axis, len(group), n, self.comm.time(kind, n, group)))
            current[axis] = dst[axis]
        result = tuple(steps)
        self._cache[key] = result
        return result

    def time(self, src: Placements, dst: Placements, nbytes: float) -> float:
        if src == dst:
            return 0.0
        key = (src, dst, nbytes)
        found = self._times.get(key)
        if found is None:
            found = self._times[key] = sum(c.time for c in self.collectives(src, dst, nbytes))
        return found
