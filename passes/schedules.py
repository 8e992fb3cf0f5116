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


def microbatch_counts(batch: int, limit: int | None = None) -> list[int]:
    """The microbatch counts the planner tries: the divisors of the batch (up to `limit`), down to
    microbatches of one sample (Megatron-LM trains GPT-3 175B so)."""
    if batch < 1:
        raise ValueError(f"batch: found {batch}, required >= 1")
    return [m for m in range(1, min(batch, limit or batch) + 1) if batch % m == 0]



# -- the order each device runs its work in ----------------------------------------------------------

ACTIONS = ("F", "B", "I", "W")
"""Forward; backward; the input-gradient and weight-gradient halves of a backward (zero-bubble)."""


def actions(kind: str, stages: int, microbatches: int, virtual: int = 1) -> list[list[tuple[str, int, int]]]:
    """Per device group g (0 first), its work in order: (action, chunk, microbatch), where chunk
    c·p + g is the model chunk g runs as its c-th (interleaved: v chunks per group; otherwise v = 1).

    GPipe: every forward, then every backward. 1F1B: group g runs min(p - g - 1, m) warm-up
    forwards, then alternates one forward and one backward, then drains (PipeDream-Flush).
    Interleaved 1F1B (Megatron-LM): microbatches go through the chunks in rounds of p, warm-up
    (p - g - 1)·2 + (v - 1)·p forwards. Zero-bubble (ZB-H1, Qi et al. 2023): 1F1B's order with each
    backward split into its input-gradient half I, on the critical path, and its weight-gradient
    half W, deferred by p - g - 1 microbatches so that it fills the drain."""
    _check(kind, stages, microbatches, virtual)
    if kind != "interleaved" and virtual != 1:
        raise ValueError(f"schedule {kind}: found {virtual} chunks per device, required 1 (only interleaved has more)")
    p, m, v = stages, microbatches, virtual
    for extra in range(m * v + 1):  # interleaved rounds that do not divide m may need a longer warm-up
        orders = [_group_order(kind, p, m, v, g, extra) for g in range(p)]
        try:
            check_order(orders, m, v)
            return orders
        except ValueError:
            if extra == m * v:
                raise
    raise AssertionError("unreachable")


def _group_order(kind: str, p: int, m: int, v: int, g: int, extra: int) -> list[tuple[str, int, int]]:
    if kind == "gpipe":
        return ([("F", c, k) for c in range(v) for k in range(m)] +
                [("B", c, k) for c in reversed(range(v)) for k in range(m)])
    forwards = [(c, k) for start in range(0, m, p) for c in range(v) for k in range(start, min(start + p, m))]
    backwards = [(c, k) for start in range(0, m, p) for c in reversed(range(v)) for k in range(start, min(start + p, m))]
    warm = min((p - g - 1) * 2 + (v - 1) * p + extra if kind == "interleaved" else p - g - 1, m * v)
    order = [("F", *f) for f in forwards[:warm]]
    for i, f in enumerate(forwards[warm:]):
        order += [("F", *f), ("B", *backwards[i])]
    order += [("B", *b) for b in backwards[len(forwards) - warm:]]
    return _split_backward(order, p - g - 1) if kind == "zero-bubble" else order


def _split_backward(order: list[tuple[str, int, int]], defer: int) -> list[tuple[str, int, int]]:
    """Each B becomes I at once and W after `defer` more I's (all W's at the end, in order)."""
    out, waiting = [], []
    for action, c, k in order:
        if action != "B":
            out.append((action, c, k))
            continue
        out.append(("I", c, k))
        waiting.append(("W", c, k))
        if len(waiting) > defer:
            out.append(waiting.pop(0))
    return out + waiting


def check_order(orders: list[list[tuple[str, int, int]]], microbatches: int, virtual: int = 1) -> None:
    """Runs the orders with blocking receives and non-blocking sends (as the runtime does): raises
    `ValueError` naming the stuck groups when they would deadlock, or when work is missing."""
    p, m, v = len(orders), microbatches, virtual
    last = p * v - 1
    done: set[tuple[str, int, int]] = set()  # (kind, model chunk, microbatch)
    position = [0] * p

    def ready(g: int, action: str, c: int, k: int) -> bool:
        chunk = c * p + g
        if action == "F":
            return chunk == 0 or ("F", chunk - 1, k) in done
        if action == "W":
            return ("I", chunk, k) in done
        after = ("F", chunk, k) in done
        return after and (chunk == last or ("B", chunk + 1, k) in done or ("I", chunk + 1, k) in done)

    while any(position[g] < len(orders[g]) for g in range(p)):
        moved = False
        for g in range(p):
            while position[g] < len(orders[g]) and ready(g, *orders[g][position[g]]):
                action, c, k = orders[g][position[g]]
                done.add((action, c * p + g, k))
                position[g] += 1
                moved = True
        if not moved:
            stuck = {g: orders[g][position[g]] for g in range(p) if position[g] < len(orders[g])}
            raise ValueError(f"pipeline order deadlocks: groups wait at {stuck}")
    for chunk in range(p * v):
        for k in range(m):
            if ("F", chunk, k) not in done or not (("B", chunk, k) in done or ("W", chunk, k) in done):
                raise ValueError(f"pipeline order: chunk {chunk} misses microbatch {k}")
