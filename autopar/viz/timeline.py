"""The pipeline timeline of a plan: what each device group does when, simulated from the schedule.

Takes a `Plan`; gives a `Timeline` (one row per device group, boxes with start and end in
seconds) and draws it as SVG. Each group runs its actions in the order `passes.schedules.actions`
gives; an action starts when its group is free and what it needs has finished: a forward needs the
previous chunk's forward of the same microbatch, a backward (or its input-gradient half I) its own
forward and the next chunk's backward, a weight-gradient half W its I. After its last action each
group runs its gradient synchronization and optimizer step (`Stage.cost.optimizer` of its chunks).

Durations come from the plan: chunk j's forward plus backward per microbatch is
`Stage.microbatch_time` (transfers between stages included). The plan predicts only that total,
so the timeline assumes backward = 2 × forward (a matmul's backward runs two matmuls of the
forward's size; Narayanan et al. 2021) and, for zero-bubble, I = W = backward / 2 (Qi et al. 2023).
A one-stage plan is one row: forward and backward (`Cost.compute` split 1:2), its communication
(resharding and gradient synchronization, drawn as not overlapped) and the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.plan import Plan
from autopar.passes import schedules

FORWARD_SHARE = 1 / 3
"""Forward / (forward + backward): backward = 2 × forward."""


@dataclass(frozen=True, slots=True)
class Box:
    row: int
    kind: str
    """"F", "B", "I", "W" (`passes.schedules.ACTIONS`); a one-stage plan's "comm" (its communication)
    and "opt" (optimizer); a pipeline group's "step" (gradient synchronization and optimizer)."""
    chunk: int
    """The plan's stage (model chunk) it runs; -1 for the step."""
    microbatch: int
    """-1 for work done once per step."""
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Timeline:
    rows: tuple[str, ...]
    boxes: tuple[Box, ...]
    span: float
    """Seconds from the first start to the last end: the simulated step."""
    predicted: float
    """The plan's own step time (`Cost.step_time`, from `passes.schedules.step_time`)."""
    assumptions: tuple[str, ...]

    def idle(self, row: int) -> list[tuple[float, float]]:
        """The row's gaps (start, end) between 0 and `span`: the pipeline's bubbles."""
        gaps, t = [], 0.0
        for b in sorted((b for b in self.boxes if b.row == row), key=lambda b: b.start):
            if b.start > t * (1 + 1e-12) + 1e-15:
                gaps.append((t, b.start))
            t = max(t, b.end)
        if self.span > t * (1 + 1e-12) + 1e-15:
            gaps.append((t, self.span))
        return gaps


def simulate(plan: Plan) -> Timeline:
    sched = plan.schedule
    if sched.kind == "none" or len(plan.stages) == 1:
        return _one_row(plan)
    v = sched.virtual
    p = len(plan.stages) // v
    if p * v != len(plan.stages):
        raise ValueError(f"plan: found {len(plan.stages)} stages with {v} chunks per device group, required a "
                         f"multiple of {v}")
    m = sched.microbatches
    per = [s.microbatch_time or (s.cost.compute + s.cost.communication) / m for s in plan.stages]
    split = "I" if sched.kind == "zero-bubble" else "B"
    duration = {"F": [t * FORWARD_SHARE for t in per], "B": [t * (1 - FORWARD_SHARE) for t in per],
                "I": [t * (1 - FORWARD_SHARE) / 2 for t in per], "W": [t * (1 - FORWARD_SHARE) / 2 for t in per]}
    orders = schedules.actions(sched.kind, p, m, v)
    boxes = _run(orders, duration, split)
    free = [0.0] * p
    for b in boxes:
        free[b.row] = max(free[b.row], b.end)
    for g in range(p):
        once = sum(s.cost.optimizer for s in plan.stages[g::p])
        if once > 0:
            boxes.append(Box(row=g, kind="step", chunk=-1, microbatch=-1, start=free[g], end=free[g] + once))
    assumptions = ["backward = 2 × forward: each chunk's predicted time per microbatch split 1:2",
                   "transfers between stages are inside each stage's time per microbatch"]
    if split == "I":
        assumptions.append("zero-bubble: the input-gradient (I) and weight-gradient (W) halves of a backward "
                           "take equal time")
    if any(not s.microbatch_time for s in plan.stages):
        assumptions.append("stages without a time per microbatch: (compute + communication) / microbatches")
    rows = tuple(f"group {g}" + (f" (stages {', '.join(str(j) for j in range(g, p * v, p))})" if v > 1
                                 else f" (stage {g})") for g in range(p))
    return Timeline(rows=rows, boxes=tuple(boxes), span=max(b.end for b in boxes), predicted=plan.cost.step_time,
                    assumptions=tuple(assumptions))


def _run(orders: list[list[tuple[str, int, int]]], duration: dict[str, list[float]], split: str) -> list[Box]:
    """List scheduling of the groups' fixed orders; `split` is the action that ends a chunk's
    backward for the chunk before it ("B", or "I" for zero-bubble)."""
    p = len(orders)
    last = max(c for order in orders for _, c, _ in order) * p + p - 1
    done: dict[tuple[str, int, int], float] = {}  # (action, chunk, microbatch) → end
    free, position, boxes = [0.0] * p, [0] * p, []
    remaining = sum(len(o) for o in orders)
    while remaining:
        moved = False
        for g in range(p):
            while position[g] < len(orders[g]):
                action, c, k = orders[g][position[g]]
                chunk = c * p + g
                if action == "F":
                    needs = [("F", chunk - 1, k)] if chunk else []
                elif action == "W":
                    needs = [("I", chunk, k)]
                else:
                    needs = [("F", chunk, k)] + ([(split, chunk + 1, k)] if chunk < last else [])
                if any(n not in done for n in needs):
                    break
                start = max([free[g]] + [done[n] for n in needs])
                free[g] = done[(action, chunk, k)] = start + duration[action][chunk]
                boxes.append(Box(row=g, kind=action, chunk=chunk, microbatch=k, start=start, end=free[g]))
                position[g] += 1
                remaining -= 1
                moved = True
        if not moved:
            raise AssertionError(f"pipeline orders deadlock at {position}")  # `schedules.actions` checks them
    return boxes


def _one_row(plan: Plan) -> Timeline:
    """Forward and backward (per microbatch when the plan accumulates gradients), communication,
    optimizer step."""
    stage, cost = plan.stages[0], plan.cost
    m = max(plan.schedule.microbatches, 1)
    boxes, t = [], 0.0
    if m > 1 and stage.microbatch_time:
        per, comm = [stage.microbatch_time] * m, 0.0  # communication is inside the time per microbatch
    else:
        per, comm = [cost.compute], cost.communication
    for k, total in enumerate(per):
        for kind, share in (("F", FORWARD_SHARE), ("B", 1 - FORWARD_SHARE)):
            boxes.append(Box(row=0, kind=kind, chunk=0, microbatch=k, start=t, end=t + total * share))
            t += total * share
    for kind, seconds in (("comm", comm), ("opt", cost.optimizer)):
        if seconds > 0:
            boxes.append(Box(row=0, kind=kind, chunk=-1, microbatch=-1, start=t, end=t + seconds))
            t += seconds
    assumptions = ("backward = 2 × forward: the predicted compute split 1:2",
                   "communication drawn after the backward, as if not overlapped with compute")
    return Timeline(rows=(f"stage 0 ({plan.num_devices} devices)",), boxes=tuple(boxes), span=t,
                    predicted=cost.step_time, assumptions=assumptions)
