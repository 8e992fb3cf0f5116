"""Pipeline schedules: how long a step takes and how many microbatches each stage keeps alive.

For p stages, m microbatches and per-microbatch stage times t_0 … t_{p-1} (forward plus backward):

- GPipe (all forward, then all backward; Huang et al. 2019) and 1F1B (PipeDream-Flush, Narayanan
  et al. 2021) take T = Σ t_i + (m - 1)·max t_i (Alpa, Zheng et al. 2022, eq. 2). With equal
  stages T = (m + p - 1)·t, so idle / work = (p - 1) / m: the seeds' example p = 4, m = 4 gives 3/4
  (seed 004, "Idle / Work Ratio = PP-1/M"). GPipe keeps the activations of all m microbatches;
  1F1B starts each backward as early as possible, so stage i keeps at most p - i (seed 004: "store
  p = 4 activations rather than m = 8").
- Interleaved 1F1B (Megatron-LM, Narayanan et al. 2021): each device runs v chunks of 1/v of its
  layers, so the ramp shrinks v-fold, idle / work = (p - 1) / (v·m); device i runs
  (p - i - 1)·2 + (v - 1)·p warm-up forwards of a chunk (Megatron-LM's schedule), holding one more
  than that, each 1/v of the stage's activations.
- Zero-bubble ZB-H1 (Qi et al. 2023): the weight-gradient half of backward fills the ramp; the
  bubble is about a third of 1F1B's at 1F1B's memory, idle / work ≈ (p - 1) / (3·m).

With unequal stages, each also running its gradient synchronization and optimizer step (o_i) once
after its last backward, autopar takes T = max_i (m·t_i + o_i) + c·(p - 1)/p·Σ t_i: the busiest
stage's own work plus the fill-and-drain ramp, c = 1 for GPipe and 1F1B, 1/v interleaved and 1/3
zero-bubble. With equal stages and no o it is (m + c·(p - 1))·t, Alpa's eq. 2 for c = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero-bubble")
VIRTUAL = 2
"""Chunks per device of the interleaved schedule."""


def _check(kind: str, stages: int, microbatches: int, virtual: int) -> None:
    if kind not in SCHEDULES:
        raise ValueError(f"schedule: found {kind!r}, required one of {', '.join(SCHEDULES)}")
    if stages < 1 or microbatches < 1 or virtual < 1:
        raise ValueError(f"schedule {kind}: found {stages} stages, {microbatches} microbatches, {virtual} chunks; "
                         f"required at least 1 of each")


def ramp_factor(kind: str, virtual: int = VIRTUAL) -> float:
    """c in T = m·max t + c·(Σ t - max t): how much of the fill-and-drain ramp stays idle."""
    return {"gpipe": 1.0, "1f1b": 1.0, "interleaved": 1.0 / virtual, "zero-bubble": 1.0 / 3.0}[kind]


def bubble_fraction(kind: str, stages: int, microbatches: int, virtual: int = VIRTUAL) -> float:
    """Idle / work of equal stages: (p - 1)/m for GPipe and 1F1B, /v interleaved, /3 zero-bubble."""
    _check(kind, stages, microbatches, virtual)
    return ramp_factor(kind, virtual) * (stages - 1) / microbatches


def step_time(kind: str, stage_times: Sequence[float], microbatches: int, once: Sequence[float] | None = None,
              virtual: int = VIRTUAL) -> float:
    """Seconds per step from per-microbatch stage times (forward + backward) and each stage's
    once-per-step work: max_i (m·t_i + o_i) + c·(p - 1)/p·Σ t_i."""
    p = len(stage_times)
    _check(kind, p, microbatches, virtual)
    once = once or [0.0] * p
    busiest = max(microbatches * t + o for t, o in zip(stage_times, once))
    return busiest + ramp_factor(kind, virtual) * (p - 1) / p * sum(stage_times)


def in_flight(kind: str, stages: int, microbatches: int, stage: int, virtual: int = VIRTUAL) -> float:
    """Microbatches whose activations stage `stage` (0 first) holds at its peak, in units of one
    microbatch through the whole stage."""
    _check(kind, stages, microbatches, virtual)
    if not 0 <= stage < stages:
        raise ValueError(f"stage: found {stage}, required 0 <= stage < {stages}")
    if kind == "gpipe":
        return float(microbatches)
    if kind == "interleaved":
        chunks = (stages - stage - 1) * 2 + (virtual - 1) * stages + 1
        return min(chunks, microbatches * virtual) / virtual
    return float(min(microbatches, stages - stage))


def microbatch_counts(batch: int, limit: int = 64) -> list[int]:
    """The microbatch counts the planner tries: the divisors of the batch up to `limit`."""
    if batch < 1:
        raise ValueError(f"batch: found {batch}, required >= 1")
    return [m for m in range(1, min(batch, limit) + 1) if batch % m == 0]

