"""Communication cost: the alpha-beta model of seed 002, for every collective, on a `Cluster`.

Takes a collective, a message size n in bytes and the devices of the group; gives the predicted
time and the algorithm behind it. A message costs α + nβ on a link (α latency, β = 1/bandwidth);
reducing n bytes costs nγ. With p ranks and ⌈log₂p⌉ written log p, seed 002 gives two families:

| collective      | minimum spanning tree (short messages)   | ring / long vector (large messages)   |
|-----------------|------------------------------------------|---------------------------------------|
| broadcast       | log p (α + nβ)                           | (log p + p − 1)α + 2(p−1)/p nβ        |
| reduce          | log p (α + nβ + nγ)                      | (p − 1 + log p)α + (p−1)/p n(2β + γ)  |
| scatter, gather | log p α + (p−1)/p nβ                     | the same                              |
| all-gather      | 2 log p α + log p nβ + (p−1)/p nβ        | (p−1)α + (p−1)/p nβ                   |
| reduce-scatter  | 2 log p α + log p n(β+γ) + (p−1)/p nβ    | (p−1)α + (p−1)/p n(β + γ)             |
| all-reduce      | 2 log p α + log p n(2β + γ)              | 2(p−1)α + (p−1)/p n(2β + γ)           |

(the long-vector broadcast is scatter + all-gather, reduce is reduce-scatter + gather, all-reduce
is reduce-scatter + all-gather). The cheaper family is chosen. n is always the size of the whole
vector: all-gather's output, reduce-scatter's input. Two additions, not in the seed: all-to-all
by pairwise exchange, (p−1)(α + (n/p)β) with n the bytes each rank holds; send/recv, α + nβ.

A group spanning k nodes with g devices on each runs hierarchically (NCCL does the same): e.g.
all-reduce = reduce-scatter inside each node (p = g) + all-reduce across nodes on n/g bytes
(p = k) + all-gather inside each node. The flat algorithm over the slower link is also costed,
and the cheaper of the two is used.

On a profiled cluster (`Cluster.profile`, from `autopar profile`) the measured fit replaces all of
this for the collectives it covers: time = α + nβ with the α and β least-squares fitted for that
collective, group size and scope (inside a node, or spanning nodes). A group size that was not
measured takes the fit of the nearest one, carried over by the ring algorithm's coefficients of
α and nβ at the two sizes (all-reduce 2(p−1) and 2(p−1)/p, and so on: `_RING_SCALE`). Collectives
the profile lacks keep the seed formulas above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from autopar.cluster import Cluster, Link

COLLECTIVES = ("broadcast", "reduce", "scatter", "gather", "all_gather", "reduce_scatter", "all_reduce",
               "all_to_all", "send_recv")
_SEED_COLLECTIVES = COLLECTIVES[:7]
# The ring algorithm's coefficients of (α, nβ) at group size p (seed 002; all-to-all pairwise).
_RING_SCALE = {
    "all_reduce": (lambda p: 2 * (p - 1), lambda p: 2 * (p - 1) / p),
    "all_gather": (lambda p: p - 1, lambda p: (p - 1) / p),
    "reduce_scatter": (lambda p: p - 1, lambda p: (p - 1) / p),
    "broadcast": (lambda p: _log(p) + p - 1, lambda p: 2 * (p - 1) / p),
    "all_to_all": (lambda p: p - 1, lambda p: (p - 1) / p),
    "send_recv": (lambda p: 1, lambda p: 1),
}


def _log(p: int) -> int:
    return math.ceil(math.log2(p)) if p > 1 else 0


def _check(kind: str, p: int, n: float) -> None:
    if kind not in COLLECTIVES:
        raise ValueError(f"collective: found {kind!r}, required one of {', '.join(COLLECTIVES)}")
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"group size p: found {p!r}, required an integer >= 1")
    if isinstance(n, (int, float)) and n < 0:  # symbols (sympy) pass through for the formula tests
        raise ValueError(f"message size n: found {n!r} bytes, required >= 0")


def mst_time(kind: str, p: int, n: float, *, alpha: float, beta: float, gamma: float = 0.0) -> float:
    """Seed 002, minimum-spanning-tree algorithms (latency-optimal, for short messages)."""
    _check(kind, p, n)
    if p == 1:
        return 0.0
    lg, frac = _log(p), (p - 1) / p
    return {
        "broadcast": lg * (alpha + n * beta),
        "reduce": lg * (alpha + n * beta + n * gamma),
        "scatter": lg * alpha + frac * n * beta,
        "gather": lg * alpha + frac * n * beta,
        "all_gather": 2 * lg * alpha + lg * n * beta + frac * n * beta,
        "reduce_scatter": 2 * lg * alpha + lg * n * (beta + gamma) + frac * n * beta,
        "all_reduce": 2 * lg * alpha + lg * n * (2 * beta + gamma),
    }[_seed_only(kind)]


def ring_time(kind: str, p: int, n: float, *, alpha: float, beta: float, gamma: float = 0.0) -> float:
    """Seed 002, ring / long-vector algorithms (bandwidth-optimal, for large messages)."""
    _check(kind, p, n)
    if p == 1:
        return 0.0
    lg, frac = _log(p), (p - 1) / p
    return {
        "broadcast": (lg + p - 1) * alpha + 2 * frac * n * beta,
        "reduce": (p - 1 + lg) * alpha + frac * n * (2 * beta + gamma),
        "scatter": lg * alpha + frac * n * beta,
        "gather": lg * alpha + frac * n * beta,
        "all_gather": (p - 1) * alpha + frac * n * beta,
        "reduce_scatter": (p - 1) * alpha + frac * n * (beta + gamma),
        "all_reduce": 2 * (p - 1) * alpha + frac * n * (2 * beta + gamma),
    }[_seed_only(kind)]


def _seed_only(kind: str) -> str:
    if kind not in _SEED_COLLECTIVES:
        raise ValueError(f"collective {kind!r} has no MST/ring form; required one of {', '.join(_SEED_COLLECTIVES)}")
    return kind


@dataclass(frozen=True, slots=True)
class CommCost:
    time: float
    """Seconds."""
    algorithm: str
    """"mst", "ring", "pairwise", "p2p", "hierarchical(intra, inter, intra)", "local", or
    "profiled" (the measured fit), "profiled(p=q)" (carried over from group size q)."""


def flat_cost(kind: str, p: int, n: float, link: Link, gamma: float) -> CommCost:
    """One level: the cheaper of the MST and ring algorithms over one kind of link."""
    _check(kind, p, n)
    if p == 1:
        return CommCost(0.0, "local")
    if kind == "all_to_all":
        return CommCost((p - 1) * (link.latency + n / p * link.beta), "pairwise")
    if kind == "send_recv":
        return CommCost(link.latency + n * link.beta, "p2p")
    mst = mst_time(kind, p, n, alpha=link.latency, beta=link.beta, gamma=gamma)
    ring = ring_time(kind, p, n, alpha=link.latency, beta=link.beta, gamma=gamma)
    return CommCost(mst, "mst") if mst <= ring else CommCost(ring, "ring")


class CommModel:
    """Collective times on a cluster. γ is the time to reduce one byte: reading two operands and
    writing one at the device's effective memory bandwidth, 3 / (bandwidth · efficiency). The
    cluster's profile, when it has one, comes first (see the module docstring)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.profile = cluster.profile
        device = cluster.device
        self.gamma = 3.0 / (device.memory_bandwidth * device.bandwidth_efficiency)

    def copy_time(self, nbytes: float) -> float:
        """Seconds of a local copy reading and writing `nbytes` in all: the bytes at the device's
        memory bandwidth (γ / 3 a byte), plus the profile's kernel overhead (none without one)."""
        if nbytes <= 0:
            return 0.0
        overhead = self.profile.kernel_overhead if self.profile is not None else 0.0
        return overhead + nbytes * self.gamma / 3.0

    def group_shape(self, devices: Sequence[int]) -> tuple[int, int]:
        """(nodes spanned k, devices per node g) of a group; g is the largest count on one node."""
        per_node: dict[int, int] = {}
        for d in devices:
            node = self.cluster.node_of(d)
            per_node[node] = per_node.get(node, 0) + 1
        if len(set(devices)) != len(devices):
            raise ValueError(f"group: found repeated devices in {list(devices)}, required distinct ones")
        return len(per_node), max(per_node.values(), default=0)

    def cost(self, kind: str, nbytes: float, devices: Sequence[int]) -> CommCost:
        """The predicted time of one collective over `devices` (global device indices)."""
        p = len(devices)
        _check(kind, max(p, 1), nbytes)
        if p <= 1:
            return CommCost(0.0, "local")
        k, g = self.group_shape(devices)
        intra, inter = self.cluster.intra_node, self.cluster.inter_node
        if kind == "send_recv" and p != 2:
            raise ValueError(f"send_recv: found a group of {p} devices, required 2 (sender, receiver)")
        measured = self._profiled(kind, p, nbytes, "intra" if k == 1 else "inter")
        if measured is not None:
            return measured
        if kind == "send_recv":
            return flat_cost(kind, 2, nbytes, self.cluster.link_between(devices[0], devices[1]), self.gamma)
        if k == 1:
            return flat_cost(kind, p, nbytes, intra, self.gamma)
        if g == 1:
            return flat_cost(kind, p, nbytes, inter, self.gamma)
        flat = flat_cost(kind, p, nbytes, inter, self.gamma)
        hier = self._hierarchical(kind, k, g, nbytes, intra, inter)
        return hier if hier.time <= flat.time else flat

    def time(self, kind: str, nbytes: float, devices: Sequence[int]) -> float:
        return self.cost(kind, nbytes, devices).time

    def _profiled(self, kind: str, p: int, n: float, scope: str) -> CommCost | None:
        """α + nβ from the profile's fit for (kind, p, scope), or the nearest group size's carried
        over to p by `_RING_SCALE`; None without a fit."""
        fit = self.profile.collective(kind, p, scope) if self.profile is not None else None
        if fit is None:
            return None
        if fit.group_size == p:
            return CommCost(fit.time(n), "profiled")
        a, b = _RING_SCALE[kind]
        q = fit.group_size
        return CommCost(fit.alpha * a(p) / a(q) + n * fit.beta * b(p) / b(q), f"profiled(p={q})")

    def _hierarchical(self, kind: str, k: int, g: int, n: float, intra: Link, inter: Link) -> CommCost:
        def c(kind_: str, p: int, size: float, link: Link) -> float:
            return flat_cost(kind_, p, size, link, self.gamma).time

        if kind == "all_to_all":
            # Each rank sends n/p to every other: g − 1 of them inside its node, the rest outside.
            p = k * g
            t = (g - 1) * (intra.latency + n / p * intra.beta) + (p - g) * (inter.latency + n / p * inter.beta)
            return CommCost(t, "pairwise(intra+inter)")
        steps = {
            "all_reduce": c("reduce_scatter", g, n, intra) + c("all_reduce", k, n / g, inter)
            + c("all_gather", g, n, intra),
            "all_gather": c("all_gather", k, n / g, inter) + c("all_gather", g, n, intra),
            "reduce_scatter": c("reduce_scatter", g, n, intra) + c("reduce_scatter", k, n / g, inter),
            "broadcast": c("broadcast", k, n, inter) + c("broadcast", g, n, intra),
            "reduce": c("reduce", g, n, intra) + c("reduce", k, n, inter),
            "scatter": c("scatter", k, n, inter) + c("scatter", g, n / k, intra),
            "gather": c("gather", g, n / k, intra) + c("gather", k, n, inter),
        }
        return CommCost(steps[kind], "hierarchical")
