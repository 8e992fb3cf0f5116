"""What `autopar profile` measured on a cluster: the `Profile` a `Cluster` may carry, the α-β fit, and
the cluster figures calibrated from it.

Takes timings (from `autopar.runtime.profiler`, or a cluster file) and gives a frozen, validated
record the cost model reads: achieved matmul FLOP/s per dtype and shape, memory bandwidth, the
fixed time of one kernel, and for each collective, group size and scope ("intra": inside one node,
"inter": spanning nodes) the α and β of seed 002's model, time = α + n·β, fitted by least squares,
and the measured times the fit was made from (`CollectiveFit.time` follows them where measured). n is the byte count `CommModel` uses: all-gather's output, reduce-scatter's input, the tensor of
all-reduce and broadcast, the bytes each rank holds for all-to-all, the message for send/recv.

    >>> alpha, beta, residual = fit_alpha_beta([1e3, 1e6], [2e-5 + 1e3 * 1e-9, 2e-5 + 1e6 * 1e-9])
    >>> round(alpha, 12), round(beta, 15)
    (2e-05, 1e-09)
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

from autopar.cluster import BACKENDS, DTYPES, Cluster, Link, PeakFlops, _check_number, _make, _read_fields

PROFILED = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "send_recv")
"""The collectives the profiler times; the others (reduce, scatter, gather) keep the seed formulas."""
SCOPES = ("intra", "inter")


def fit_alpha_beta(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float, float]:
    """(α, β, residual) of time = α + n·β over messages of `sizes` bytes, by weighted least squares.

    Each point is weighted by 1/time, so that the residual minimized is relative and a 4 KiB message
    counts as much as a 64 MiB one (plain least squares would fit the large messages only and leave α
    to their noise). Solves the 2×2 normal equations; when the best line has α < 0 or β < 0 the
    coefficient is pinned at 0 and the other refitted. residual: root mean square relative error.
    Exact data gives its own α and β back.
    """
    if len(sizes) != len(times) or len(sizes) < 2:
        raise ValueError(f"fit: found {len(sizes)} sizes and {len(times)} times, required two or more of each")
    if any(t <= 0 or not math.isfinite(t) for t in times):
        raise ValueError(f"fit: found times {list(times)}, required finite and > 0")
    w = [1.0 / t ** 2 for t in times]
    sw = sum(w)
    sn = sum(wi * n for wi, n in zip(w, sizes))
    snn = sum(wi * n * n for wi, n in zip(w, sizes))
    st = sum(wi * t for wi, t in zip(w, times))
    snt = sum(wi * n * t for wi, n, t in zip(w, sizes, times))
    det = sw * snn - sn * sn
    alpha, beta = ((snn * st - sn * snt) / det, (sw * snt - sn * st) / det) if det > 0 else (-1.0, -1.0)
    if alpha < 0 or beta < 0:
        pinned_alpha = (0.0, snt / snn if snn else 0.0)  # through the origin
        pinned_beta = (st / sw, 0.0)  # constant
        alpha, beta = min((pinned_alpha, pinned_beta), key=lambda ab: _residual(sizes, times, *ab))
    return alpha, beta, _residual(sizes, times, alpha, beta)


def _residual(sizes: Sequence[float], times: Sequence[float], alpha: float, beta: float) -> float:
    return math.sqrt(sum(((alpha + n * beta - t) / t) ** 2 for n, t in zip(sizes, times)) / len(times))


@dataclass(frozen=True, kw_only=True, slots=True)
class MatmulRate:
    """One matmul shape's achieved rate: (m, k) @ (k, n) in `dtype`, 2mkn FLOPs over the median time."""

    dtype: str
    m: int
    k: int
    n: int
    rate: float
    """FLOP/s achieved, the kernel's fixed overhead included."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"MatmulRate.dtype: found {self.dtype!r}, required one of {', '.join(DTYPES)}")
        for field in ("m", "k", "n"):
            _check_number("MatmulRate", field, getattr(self, field), positive=True, integer=True)
        _check_number("MatmulRate", "rate", self.rate, positive=True)

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n


@dataclass(frozen=True, kw_only=True, slots=True)
class CollectiveFit:
    """One collective's time on groups of `group_size` devices: alpha + n·beta (seed 002), fitted
    over the measured message `sizes`, and the measured `times` themselves.

    Between the smallest and the largest measured size, `time` follows the measured points
    (linear between neighbours), not the line: a collective's time is not linear in its size. On
    gloo it is flat up to about a MiB and then climbs (2 ranks on 2 cores: all-reduce 2.4 ms at
    4 KiB, 2.4 at 256 KiB, 2.7 at 1 MiB, 6.0 at 4 MiB), so the line, weighted to fit every size
    alike, misses the middle sizes by 10–20% (its residual) and puts α where no size is. Beyond
    the largest size the last point climbs at β per byte; below the smallest, the smallest's time.
    Profiles written before the points were kept have none and give α + nβ everywhere."""

    kind: str
    group_size: int
    scope: str
    """"intra": the group lies inside one node; "inter": it spans nodes."""
    alpha: float
    """Seconds."""
    beta: float
    """Seconds per byte."""
    residual: float
    """Root mean square relative error of the fit over the measured sizes."""
    sizes: tuple[float, ...] = ()
    """The measured message sizes, bytes (n as `cost.comm` counts it), increasing."""
    times: tuple[float, ...] = ()
    """Seconds measured at each of `sizes`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", _floats("CollectiveFit.sizes", self.sizes))
        object.__setattr__(self, "times", _floats("CollectiveFit.times", self.times))
        if len(self.sizes) != len(self.times) or len(self.sizes) == 1:
            raise ValueError(f"CollectiveFit: found {len(self.sizes)} sizes and {len(self.times)} times, "
                             f"required as many of each, two or more (or none)")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])) or any(t <= 0 for t in self.times):
            raise ValueError(f"CollectiveFit: found sizes {list(self.sizes)} and times {list(self.times)}, "
                             f"required increasing sizes and times > 0")
        if self.kind not in PROFILED:
            raise ValueError(f"CollectiveFit.kind: found {self.kind!r}, required one of {', '.join(PROFILED)}")
        _check_number("CollectiveFit", "group_size", self.group_size, positive=True, integer=True)
        if self.group_size < 2 or (self.kind == "send_recv" and self.group_size != 2):
            raise ValueError(f"CollectiveFit.group_size: found {self.group_size} for {self.kind}, required "
                             f"{'2' if self.kind == 'send_recv' else '>= 2'}")
        if self.scope not in SCOPES:
            raise ValueError(f"CollectiveFit.scope: found {self.scope!r}, required one of {', '.join(SCOPES)}")
        for field in ("alpha", "beta", "residual"):
            _check_number("CollectiveFit", field, getattr(self, field), positive=False)

    def time(self, nbytes: float) -> float:
        """Seconds for a message of `nbytes` (see the class docstring)."""
        if not self.sizes:
            return self.alpha + nbytes * self.beta
        sizes, times = self.sizes, nondecreasing(self.times)
        if nbytes >= sizes[-1]:
            return times[-1] + (nbytes - sizes[-1]) * self.beta
        i = bisect.bisect_right(sizes, nbytes)
        if i == 0:
            return times[0]
        step = (nbytes - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
        return times[i - 1] + step * (times[i] - times[i - 1])


@functools.lru_cache(maxsize=1024)
def nondecreasing(times: tuple[float, ...]) -> tuple[float, ...]:
    """The non-decreasing sequence nearest `times` in least squares: adjacent values that fall are
    pooled into their mean until none does (pool adjacent violators; Ayer et al. 1955). A larger
    message never takes less time; where the measured times dip, the dip is noise (2 ranks: 2.4,
    2.0 and 1.9 ms at 4, 16 and 64 KiB), and their mean is the best estimate of all of them."""
    blocks: list[list[float]] = []  # [mean, count]
    for t in times:
        blocks.append([t, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]
    return tuple(m for m, c in blocks for _ in range(int(c)))


def _floats(owner: str, values: Any) -> tuple[float, ...]:
    """`values` (a JSON array or a tuple) as a tuple of finite floats."""
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{owner}: found {values!r}, required an array of finite numbers")
    return tuple(float(v) for v in values)


@dataclass(frozen=True, kw_only=True, slots=True)
class StraggleFit:
    """How much longer than its mean the slowest of `group_size` ranks takes over the same
    computation, all starting together:

        share = E_round[max_r t_r] / max_r E_round[t_r] − 1

    t_r one rank's time of one round. A step whose ranks meet in a collective lasts as long as its
    slowest rank; the rates the planner scales by are each the slowest rank's mean (max over ranks
    of per-rank means), which misses that the slowest rank differs from round to round."""

    group_size: int
    share: float

    def __post_init__(self) -> None:
        _check_number("StraggleFit", "group_size", self.group_size, positive=True, integer=True)
        if self.group_size < 2:
            raise ValueError(f"StraggleFit.group_size: found {self.group_size}, required >= 2")
        _check_number("StraggleFit", "share", self.share, positive=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class Profile:
    """Measured figures of one device and of the collectives between devices (max over ranks)."""

    backend: str
    """The torch.distributed backend the collectives were timed on."""
    matmul: tuple[MatmulRate, ...]
    """Achieved matmul rates, several shapes per dtype."""
    memory_bandwidth: float
    """Bytes/s read and written by a large element-wise add."""
    kernel_overhead: float
    """Seconds of one tiny element-wise kernel, run forward or backward through autograd: dispatch on a
    CPU rank, launch on a GPU."""
    collectives: tuple[CollectiveFit, ...]
    straggle: tuple[StraggleFit, ...] = ()
    """Per group size, the slowest rank's excess over the same computation (`StraggleFit`); none in
    files written before it was measured (no excess is priced then)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"Profile.backend: found {self.backend!r}, required one of {', '.join(BACKENDS)}")
        _check_tuple("Profile.matmul", self.matmul, MatmulRate)
        _check_tuple("Profile.collectives", self.collectives, CollectiveFit)
        _check_tuple("Profile.straggle", self.straggle, StraggleFit)
        _check_unique("Profile.straggle", [(s.group_size,) for s in self.straggle])
        if not any(r.dtype == "fp32" for r in self.matmul):
            raise ValueError("Profile.matmul: found no fp32 entry, required at least one (every device computes fp32)")
        _check_unique("Profile.matmul", [(r.dtype, r.m, r.k, r.n) for r in self.matmul])
        _check_unique("Profile.collectives", [(c.kind, c.group_size, c.scope) for c in self.collectives])
        _check_number("Profile", "memory_bandwidth", self.memory_bandwidth, positive=True)
        _check_number("Profile", "kernel_overhead", self.kernel_overhead, positive=False)

    def matmul_rate(self, dtype: str, flops: float) -> float | None:
        """Achieved FLOP/s of a matmul of `flops` FLOPs: linear in log-log between the measured shapes
        around it, the nearest one's outside them; None when `dtype` was not measured (tf32 falls back
        to fp32, as a CPU runs it on its fp32 units)."""
        points = sorted((r.flops, r.rate) for r in self.matmul if r.dtype == dtype)
        if not points and dtype == "tf32":
            return self.matmul_rate("fp32", flops)
        if not points:
            return None
        if flops <= points[0][0]:
            return points[0][1]
        for (f0, r0), (f1, r1) in zip(points, points[1:]):
            if flops <= f1:
                x = math.log(flops / f0) / math.log(f1 / f0) if f1 > f0 else 1.0
                return math.exp(math.log(r0) + x * math.log(r1 / r0))
        return points[-1][1]

    def large_matmul_rate(self, dtype: str) -> float | None:
        """The rate of the largest measured shape: what a large matmul reaches."""
        points = [r for r in self.matmul if r.dtype == dtype]
        return max(points, key=lambda r: r.flops).rate if points else None

    def collective(self, kind: str, group_size: int, scope: str) -> CollectiveFit | None:
        """The fit for exactly this group size, else the one of the nearest measured size (log scale)."""
        return _nearest([c for c in self.collectives if c.kind == kind and c.scope == scope], group_size)

    def straggle_share(self, group_size: int) -> float:
        """`StraggleFit.share` of `group_size` ranks: its own, else the nearest measured size's (log
        scale); 0 for one rank or when none was measured."""
        fit = _nearest(self.straggle, group_size) if group_size > 1 else None
        return fit.share if fit is not None else 0.0

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        """Field by field, as `Cluster.from_dict`: unknown, missing or wrong-typed fields raise."""
        fields = _read_fields("Cluster.profile", data, cls)
        for name, kind in (("matmul", MatmulRate), ("collectives", CollectiveFit), ("straggle", StraggleFit)):
            if name not in fields:
                continue  # optional (`straggle`); a missing required one was reported above
            items = fields[name]
            if not isinstance(items, list):
                raise ValueError(f"Cluster.profile.{name}: found {type(items).__name__}, required a JSON array")
            fields[name] = tuple(_make(f"Cluster.profile.{name}[{i}]", kind, item) for i, item in enumerate(items))
        return _make("Cluster.profile", cls, fields)


def _nearest(fits: Sequence, group_size: int):
    """The entry of `fits` (each with a `group_size`) for exactly `group_size`, else the nearest
    measured size's (log scale; the smaller on a tie); None when there is none."""
    if not fits:
        return None
    return min(fits, key=lambda f: (abs(math.log2(f.group_size / group_size)), f.group_size))


def _check_tuple(owner: str, items: Any, kind: type) -> None:
    if not isinstance(items, tuple) or not all(isinstance(x, kind) for x in items):
        found = type(items).__name__ if not isinstance(items, tuple) else "a tuple with other entries"
        raise ValueError(f"{owner}: found {found}, required a tuple of {kind.__name__}")


def _check_unique(owner: str, keys: list[tuple]) -> None:
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"{owner}: found repeated entries {repeated}, required one per key")


# -- calibration: the figures of code that reads only DeviceSpec and Link --------------------------

def link_from(profile: Profile, scope: str, fallback: Link) -> Link:
    """The Link whose seed ring all-reduce, 2(p−1)α + 2(p−1)/p·nβ (ignoring γ), gives the measured
    all-reduce of the largest group in `scope`; from send/recv (α + nβ itself) when no all-reduce
    was measured; `fallback` when neither was, or a fit has no bandwidth term."""
    reduce = [c for c in profile.collectives if c.kind == "all_reduce" and c.scope == scope]
    if reduce:
        c = max(reduce, key=lambda c: c.group_size)
        p = c.group_size
        alpha, beta = c.alpha / (2 * (p - 1)), c.beta * p / (2 * (p - 1))
    else:
        c = profile.collective("send_recv", 2, scope)
        if c is None:
            return fallback
        alpha, beta = c.alpha, c.beta
    return Link(bandwidth=1.0 / beta if beta > 0 else fallback.bandwidth, latency=alpha)


def calibrated(cluster: Cluster, profile: Profile, *, memory: int | None = None) -> Cluster:
    """`cluster` with `profile` attached and its figures replaced by the measured ones.

    Peak FLOP/s of each measured dtype := its large-matmul rate, with matmul_efficiency 1 (so MFU
    against a profiled cluster is relative to what the machine reaches, not to a datasheet); tf32 on
    a device without a TF32 measurement but with a tf32 figure := the fp32 rate; the formats not
    measured (fp8, int8) keep their effective rate, peak × the old efficiency. Memory bandwidth :=
    measured, with bandwidth_efficiency 1. Links from `link_from`. `memory`: device memory in bytes,
    when measured.
    """
    device, base = cluster.device, cluster.device.peak_flops
    measured = {d: profile.large_matmul_rate(d) for d in DTYPES}
    if measured["tf32"] is None and base.tf32 > 0:
        measured["tf32"] = measured["fp32"]
    peaks = PeakFlops(**{d: measured[d] if measured[d] is not None else getattr(base, d) * device.matmul_efficiency
                         for d in DTYPES})
    device = dataclasses.replace(device, peak_flops=peaks, matmul_efficiency=1.0, bandwidth_efficiency=1.0,
                                 memory_bandwidth=profile.memory_bandwidth, memory=memory or device.memory)
    return dataclasses.replace(cluster, device=device, profile=profile,
                               intra_node=link_from(profile, "intra", cluster.intra_node),
                               inter_node=link_from(profile, "inter", cluster.inter_node))
