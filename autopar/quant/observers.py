"""Activation range observers, seed 000 "Linear Quantization on Activations".

Weights are static, but activations change with every input, so their range (rmin, rmax) is
gathered before deployment, in one of three ways:

- `MinMaxObserver`: the extremes of everything seen.
- `MovingAverageObserver`: seed 000's moving average, smoothed across training steps,

      r̂(t) = α · r(t) + (1 − α) · r̂(t−1)        (α weights the newest batch; r̂(1) = r(1))

- `CalibrationObserver`: a few calibration batches run through the trained model; the range is
  chosen so that outliers do not waste it ("spending dynamic range on the outliers hurts the
  representation ability"), either by percentile (the (100 − p)-th and p-th percentiles, nearest
  rank) or by "mse": the clipping range that minimizes the expected squared error, clipping plus
  rounding, estimated from a histogram of the values. The percentile clips a few far outliers
  whatever their size; the squared error clips a heavy tail when enough values sit in it, but
  keeps a lone far outlier, whose clipping error would outweigh the rounding saved.

Observers are immutable: `observe` returns the updated observer. Each gives `range()` and
`qparams(bits, scheme)`, the (S, Z) of `linear_qparams`.

    >>> obs = MovingAverageObserver(alpha=0.1)
    >>> for x in batches:
    ...     obs = obs.observe(x)
    >>> scale, zero_point = obs.qparams(8, "asymmetric")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from autopar.quant.checks import check_bits, check_float_tensor, check_positive_int, check_scheme
from autopar.quant.linear import integer_range, linear_qparams

CALIBRATION_METHODS = ("percentile", "mse")


def _extremes(x: torch.Tensor) -> tuple[float, float]:
    check_float_tensor(x, "x")
    return float(x.min()), float(x.max())


def _require_observed(count: int) -> None:
    if count == 0:
        raise ValueError("observer: found 0 observed batches, required at least 1 before asking for a range")


class _RunningRange:
    """`range` and `qparams` of an observer that keeps rmin, rmax and count as it goes."""

    __slots__ = ()

    def range(self) -> tuple[float, float]:
        _require_observed(self.count)
        return self.rmin, self.rmax

    def qparams(self, bits: int, scheme: str = "asymmetric", *,
                scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_qparams(*self.range(), bits, scheme, scale_dtype=scale_dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class MinMaxObserver(_RunningRange):
    """The smallest and largest value of every batch observed."""

    rmin: float = math.inf
    rmax: float = -math.inf
    count: int = 0

    def observe(self, x: torch.Tensor) -> MinMaxObserver:
        lo, hi = _extremes(x)
        return replace(self, rmin=min(self.rmin, lo), rmax=max(self.rmax, hi), count=self.count + 1)



@dataclass(frozen=True, slots=True, kw_only=True)
class MovingAverageObserver(_RunningRange):
    """r̂(t) = α · r(t) + (1 − α) · r̂(t−1) for rmin and rmax each (seed 000)."""

    alpha: float = 0.01
    """Weight of the newest batch; small values smooth over many steps."""
    rmin: float | None = None
    rmax: float | None = None
    count: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise ValueError(f"alpha: found {self.alpha!r}, required a number in (0, 1]")

    def observe(self, x: torch.Tensor) -> MovingAverageObserver:
        lo, hi = _extremes(x)
        if self.count == 0:
            return replace(self, rmin=lo, rmax=hi, count=1)
        a = self.alpha
        return replace(self, rmin=a * lo + (1 - a) * self.rmin, rmax=a * hi + (1 - a) * self.rmax,
                       count=self.count + 1)



@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class CalibrationObserver:
    """The range from a set of calibration batches, by percentile or by squared error (see the module)."""

    method: str = "percentile"
    percentile: float = 99.99
    """For "percentile": the range is [P(100 − p), P(p)]."""
    bins: int = 2048
    """For "mse": histogram bins between the smallest and largest value."""
    samples: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"method: found {self.method!r}, required one of "
                             f"{', '.join(map(repr, CALIBRATION_METHODS))}")
        if not isinstance(self.percentile, (int, float)) or not 50 < self.percentile <= 100:
            raise ValueError(f"percentile: found {self.percentile!r}, required a number in (50, 100]")
        check_positive_int(self.bins, "bins")

    @property
    def count(self) -> int:
        return len(self.samples)

    def observe(self, x: torch.Tensor) -> CalibrationObserver:
        check_float_tensor(x, "x")
        return replace(self, samples=(*self.samples, x.detach().reshape(-1).to("cpu", torch.float32)))

    def range(self, bits: int = 8, scheme: str = "asymmetric") -> tuple[float, float]:
        """The calibrated range; `bits` and `scheme` matter to the "mse" method only."""
        _require_observed(self.count)
        values = torch.cat(self.samples)
        if self.method == "percentile":
            return _percentile_range(values, self.percentile)
        return _mse_range(values, self.bins, check_bits(bits), check_scheme(scheme))

    def qparams(self, bits: int, scheme: str = "asymmetric", *,
                scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_qparams(*self.range(bits, scheme), bits, scheme, scale_dtype=scale_dtype)


def _percentile_range(values: torch.Tensor, p: float) -> tuple[float, float]:
    """Nearest rank: P(p) is the ceil(p/100 · n)-th smallest value (rounded to 9 digits first,
    so 99.99 % of 10000 is rank 9999, not 10000)."""
    n = values.numel()
    high = min(n, max(1, math.ceil(round(p / 100 * n, 9))))
    low = min(n, max(1, math.ceil(round((100 - p) / 100 * n, 9))))
    return float(values.kthvalue(low).values), float(values.kthvalue(high).values)


def _mse_range(values: torch.Tensor, bins: int, bits: int, scheme: str) -> tuple[float, float]:
    """The clip range [lo, hi] minimizing, over the histogram's bin centers c with counts n,

        Σ_{lo ≤ c ≤ hi} n · S²/12  +  Σ_{c < lo} n (lo − c)²  +  Σ_{c > hi} n (c − hi)²

    (rounding noise of a uniform step S inside, clipping error outside). Candidates shrink each end
    geometrically from the extreme, by 2^(−1/16) a step, down to 1/256 of it."""
    rmin, rmax = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if rmin == rmax:
        return 0.0, 0.0
    counts = torch.histc(values, bins=bins, min=rmin, max=rmax).to(torch.float64)
    edges = torch.linspace(rmin, rmax, bins + 1, dtype=torch.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    shrink = 2.0 ** (-torch.arange(128, dtype=torch.float64) / 16)              # (K,)
    qmin, qmax = integer_range(bits)
    if scheme == "symmetric":
        a = max(-rmin, rmax) * shrink
        outside = (centers.abs()[None, :] - a[:, None]).clamp_min(0)            # (K, bins)
        clipped = (counts * (outside > 0)).sum(dim=1)
        error = (counts.sum() - clipped) * (a / qmax) ** 2 / 12 + (counts * outside ** 2).sum(dim=1)
        best = int(error.argmin())
        return -float(a[best]), float(a[best])
    lo, hi = rmin * shrink, rmax * shrink
    below = (lo[:, None] - centers[None, :]).clamp_min(0)                       # (K, bins)
    above = (centers[None, :] - hi[:, None]).clamp_min(0)
    n_below, n_above = (counts * (below > 0)).sum(dim=1), (counts * (above > 0)).sum(dim=1)
    step = (hi[None, :] - lo[:, None]) / (qmax - qmin)                           # (K lo, K hi)
    error = ((counts.sum() - n_below[:, None] - n_above[None, :]) * step ** 2 / 12
             + (counts * below ** 2).sum(dim=1)[:, None] + (counts * above ** 2).sum(dim=1)[None, :])
    i, j = divmod(int(error.argmin()), error.shape[1])
    return float(lo[i]), float(hi[j])
