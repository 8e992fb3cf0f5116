"""The report of `autopar bench accuracy` (`autopar.bench_accuracy`): per plan the predicted and
measured step time and peak memory, and over all plans the median and worst absolute relative
error and Kendall's τ between the predicted and the measured ranking of step times,

    τ = (concordant pairs − discordant pairs) / (n(n−1)/2)        (Kendall 1938)

over all plans and, stricter, over the pairs of plans of the same model and world size only (the
choice the planner actually faces: which plan for this model on these devices); where the
machine's speed was measured during the rounds (`bench_accuracy.Speed`), also the error at the
profile's speed,

    error at the profile's speed = |predicted − s · measured| / (s · measured),

s the median over rounds of the reference matmul's rate against the profile's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class AccuracyCase:
    label: str
    model: str
    world: int
    batch: int
    strategy: str = "auto"
    pipeline: dict[str, Any] | None = None
    """`passes.split.PipelineSpec`'s fields, for a pipelined plan."""
    overrides: dict[str, int] = field(default_factory=dict)
    precision: str = "fp32"



@dataclass(frozen=True, slots=True)
class AccuracyRow:
    case: AccuracyCase
    plan: str
    predicted_time: float
    measured_time: float
    predicted_memory: float
    """Bytes, the rank with the largest measured peak."""
    measured_memory: float
    rounds: tuple[float, ...] = ()
    """Seconds per step of each timed round (`measured_time` is their median)."""
    flops: float = 0.0
    """Model FLOPs of one step (forward and backward, all devices)."""
    datasheet_peak: float = 0.0
    """FLOP/s of one GPU in the plan's precision, from the datasheet preset of the GPU found (0 on CPUs,
    whose preset is no datasheet figure: no MFU is reported for them)."""
    speeds: tuple[float, ...] = ()
    """The machine's speed against the profile's after each round (`bench_accuracy.Speed`); none
    without a profile."""

    @property
    def speed(self) -> float | None:
        """s, the median of `speeds`; None when not measured."""
        return statistics.median(self.speeds) if self.speeds else None

    @property
    def speed_error(self) -> float | None:
        """The time error at the profile's speed, |predicted − s · measured| / (s · measured)."""
        if self.speed is None:
            return None
        at_profile = self.speed * self.measured_time
        return abs(self.predicted_time - at_profile) / at_profile

    @property
    def mfu(self) -> float:
        """Model FLOPs utilization, measured: FLOPs per step / (step time × devices × datasheet peak)."""
        return self.flops / (self.measured_time * self.case.world * self.datasheet_peak) if self.datasheet_peak else 0.0

    @property
    def time_error(self) -> float:
        return abs(self.predicted_time - self.measured_time) / self.measured_time

    @property
    def fastest_error(self) -> float:
        """The time error against the fastest round: the step with the least of what else the
        machine was doing (the cost model prices each node at the mean of its samples,
        `cost.sampling`)."""
        fastest = min(self.rounds) if self.rounds else self.measured_time
        return abs(self.predicted_time - fastest) / fastest

    @property
    def memory_error(self) -> float:
        return abs(self.predicted_memory - self.measured_memory) / self.measured_memory


def kendall_tau(xs: list[float], ys: list[float], groups: list | None = None) -> float:
    """Kendall's τ-a of two rankings: (concordant − discordant) / pairs, over the pairs in the same
    group when `groups` is given (pairs tied in either ranking count as neither)."""
    if len(xs) != len(ys):
        raise ValueError(f"kendall_tau: found {len(xs)} and {len(ys)} values, required as many of each")
    score = pairs = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            if groups is not None and groups[i] != groups[j]:
                continue
            pairs += 1
            sign = (xs[i] - xs[j]) * (ys[i] - ys[j])
            score += (sign > 0) - (sign < 0)
    if pairs == 0:
        raise ValueError("kendall_tau: found no pairs to compare, required at least two plans in one group")
    return score / pairs


def accuracy_summary(rows: list[AccuracyRow]) -> dict[str, float]:
    predicted = [r.predicted_time for r in rows]
    measured = [r.measured_time for r in rows]
    groups = [(r.case.model, r.case.world) for r in rows]
    return {"time_median": statistics.median(r.time_error for r in rows),
            "time_worst": max(r.time_error for r in rows),
            "fastest_median": statistics.median(r.fastest_error for r in rows),
            "fastest_worst": max(r.fastest_error for r in rows),
            "memory_median": statistics.median(r.memory_error for r in rows),
            "memory_worst": max(r.memory_error for r in rows),
            "tau": kendall_tau(predicted, measured),
            "tau_within": kendall_tau(predicted, measured, groups)} | _at_speed(rows)


def _at_speed(rows: list[AccuracyRow]) -> dict[str, float]:
    """The errors at the profile's speed, when every row has its machine speed."""
    if not rows or any(r.speed is None for r in rows):
        return {}
    errors = [r.speed_error for r in rows]
    return {"speed_median": statistics.median(errors), "speed_worst": max(errors)}


def accuracy_table(rows: list[AccuracyRow]) -> str:
    from autopar.units import fmt_bytes, fmt_seconds, markdown_table

    header = ["model", "ranks", "batch", "plan", "predicted step", "measured step", "rounds", "error", "vs fastest",
              "predicted memory", "measured memory", "error"]
    mfu = all(r.datasheet_peak and r.flops for r in rows)
    s = accuracy_summary(rows)
    speed = "speed_median" in s
    spread = lambda r: f"{fmt_seconds(min(r.rounds))}–{fmt_seconds(max(r.rounds))}" if r.rounds else ""  # noqa: E731
    table = [[r.case.label, str(r.case.world), str(r.case.batch), r.plan, fmt_seconds(r.predicted_time),
              fmt_seconds(r.measured_time), spread(r), f"{r.time_error:.1%}", f"{r.fastest_error:.1%}"]
             + ([f"×{r.speed:.2f}", f"{r.speed_error:.1%}"] if speed else [])
             + [fmt_bytes(r.predicted_memory), fmt_bytes(r.measured_memory), f"{r.memory_error:.1%}"]
             + ([f"{r.mfu:.1%}"] if mfu else [])
             for r in rows]
    if speed:
        header[9:9] = ["machine speed", "error at the profile's speed"]
    lines = [markdown_table(header + (["measured MFU"] if mfu else []), table)]
    lines += ["", "| | median error | worst error | goal |", "|---|---|---|---|",
              f"| step time | {s['time_median']:.1%} | {s['time_worst']:.1%} | median ≤ 10% |",
              f"| step time, against the fastest round | {s['fastest_median']:.1%} | {s['fastest_worst']:.1%} | |",
              *([f"| step time, at the profile's speed | {s['speed_median']:.1%} | {s['speed_worst']:.1%} | |"]
                if speed else []),
              f"| peak memory | {s['memory_median']:.1%} | {s['memory_worst']:.1%} | median ≤ 5% |",
              "", f"Kendall τ of the step-time ranking: {s['tau']:.2f} over all {len(rows)} plans, "
              f"{s['tau_within']:.2f} over pairs of the same model and world size (goal ≥ 0.8)."]
    return "\n".join(lines)
