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
- Zero-bubble (after ZB-H1, Qi et al. 2023): each backward is split into its input-gradient half I,
  on the critical path, and its weight-gradient half W, which waits to fill what would be idle
  time. The order is made by list scheduling with F = I = W (the paper's assumption): a group that
  is free runs I when it can, else F while fewer than p - g microbatches wait for their W (1F1B's
  memory), else W. Simulated, that order takes (3m + 2(p - 1)) thirds of t with equal stages: the
  bubble is two thirds of 1F1B's, idle / work = 2(p - 1) / (3·m) (the paper's 1/3 needs more
  microbatches in flight than 1F1B keeps).

With unequal stages, each also running its gradient synchronization and optimizer step (o_i) once
after its last backward, autopar takes

    T = m·max t + c·(Σ t - max t) + max_i (o_i - b·Σ_{j<i} t_j)

the slowest stage paces every microbatch; the fill-and-drain ramp leaves c of the other stages'
time idle (c = 1 for GPipe and 1F1B, 1/v interleaved, 2/3 zero-bubble); stage i finishes its last
backward b·Σ_{j<i} t_j before stage 0 does (b = 2/3, backward = 2 × forward) and then runs o_i. With
equal stages and no o it is (m + c·(p - 1))·t, Alpa's eq. 2 for c = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero-bubble")
VIRTUAL = 2
"""Chunks per device of the interleaved schedule."""
BACKWARD_SHARE = 2.0 / 3.0
"""Backward / (forward + backward) of a stage: a matmul's backward is two matmuls of its forward's size."""


def _check(kind: str, stages: int, microbatches: int, virtual: int) -> None:
    if kind not in SCHEDULES:
        raise ValueError(f"schedule: found {kind!r}, required one of {', '.join(SCHEDULES)}")
    if stages < 1 or microbatches < 1 or virtual < 1:
        raise ValueError(f"schedule {kind}: found {stages} stages, {microbatches} microbatches, {virtual} chunks; "
                         f"required at least 1 of each")


def check_spec(kind: str, stages: int, microbatches: int, virtual: int = 1) -> None:
    """The values `actions` accepts, checked without building the orders (whose time grows with the
    microbatches): a ValueError naming what was found."""
    _check(kind, stages, microbatches, virtual)
    if kind != "interleaved" and virtual != 1:
        raise ValueError(f"schedule {kind}: found {virtual} chunks per device, required 1 (only interleaved has more)")


def ramp_factor(kind: str, virtual: int = VIRTUAL) -> float:
    """c in T = m·max t + c·(Σ t - max t): how much of the fill-and-drain ramp stays idle."""
    return {"gpipe": 1.0, "1f1b": 1.0, "interleaved": 1.0 / virtual, "zero-bubble": 2.0 / 3.0}[kind]


def bubble_fraction(kind: str, stages: int, microbatches: int, virtual: int = VIRTUAL) -> float:
    """Idle / work of equal stages: (p - 1)/m for GPipe and 1F1B, /v interleaved, × 2/3 zero-bubble."""
    _check(kind, stages, microbatches, virtual)
    return ramp_factor(kind, virtual) * (stages - 1) / microbatches


def step_time(kind: str, stage_times: Sequence[float], microbatches: int, once: Sequence[float] | None = None,
              virtual: int = VIRTUAL) -> float:
    """Seconds per step from per-microbatch stage times (forward + backward) and each stage's
    once-per-step work: m·max t + c·(Σ t - max t) + max_i (o_i - b·Σ_{j<i} t_j) (module docstring)."""
    p = len(stage_times)
    _check(kind, p, microbatches, virtual)
    once = once or [0.0] * p
    slowest = max(stage_times)
    tail = max(o - BACKWARD_SHARE * sum(stage_times[:i]) for i, o in enumerate(once))
    return microbatches * slowest + ramp_factor(kind, virtual) * (sum(stage_times) - slowest) + max(tail, 0.0)


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
    (p - g - 1)·2 + (v - 1)·p forwards. Zero-bubble: the list-scheduled order of the module
    docstring, each backward split into I and W."""
    check_spec(kind, stages, microbatches, virtual)
    p, m, v = stages, microbatches, virtual
    if kind == "zero-bubble":
        orders = _zero_bubble(p, m)
        check_order(orders, m)
        return orders
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


def _zero_bubble(p: int, m: int) -> list[list[tuple[str, int, int]]]:
    """List scheduling with unit-time F, I and W: whichever group can start earliest goes next,
    preferring I, then F (while fewer than p - g of its microbatches wait for their W), then W."""
    free, done = [0] * p, {}
    counts = [{"F": 0, "I": 0, "W": 0} for _ in range(p)]
    orders: list[list[tuple[str, int, int]]] = [[] for _ in range(p)]
    for _ in range(3 * p * m):
        best = None
        for g in range(p):
            n = counts[g]
            options = []
            if n["I"] < n["F"]:
                needs = [("F", g, n["I"])] + ([("I", g + 1, n["I"])] if g < p - 1 else [])
                options.append((needs, 0, "I", n["I"]))
            if n["F"] < m and n["F"] - n["W"] < p - g:
                options.append(([("F", g - 1, n["F"])] if g else [], 1, "F", n["F"]))
            if n["W"] < n["I"]:
                options.append(([], 2, "W", n["W"]))
            for needs, rank, action, k in options:
                if all(d in done for d in needs):
                    key = (max([free[g]] + [done[d] for d in needs]), rank, g)
                    if best is None or key < best[0]:
                        best = (key, action, k)
        (start, _, g), action, k = best
        free[g] = done[(action, g, k)] = start + 1
        counts[g][action] += 1
        orders[g].append((action, 0, k))
    return orders


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
