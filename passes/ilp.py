"""The ILP: pick one strategy per unit so that predicted step time is minimal and memory holds.

Takes a `ShardingProblem`; gives a `ShardingSolution` (or raises `InfeasibleError` with the
numbers). With x[u, s] ∈ {0, 1} choosing strategy s of (canonical) unit u, and c(u) the number of
units sharing u's variables:

    minimize   Σ c(u)·time(u, s)·x[u, s]  +  Σ_edges c(e)·cost_e(i, j)·y[e, i, j]
    subject to Σ_s x[u, s] = 1                                            (one strategy per unit)
               Σ_j y[e, i, j] = Σ_{s in row class i} x[src, s]             (edge variables are the
               Σ_i y[e, i, j] = Σ_{s in column class j} x[dst, s]          product, linearized)
               fixed + Σ c(u)·memory(u, s)·x[u, s] ≤ budget                 (per-device memory)

with y ≥ 0 continuous: for binary x the two transport constraints force y to the product.
Edges whose table is a sum of a row and a column term need no y; strategies another one of the
same unit dominates (the same placements on every edge, no more time and no more memory) are
dropped before the solver sees them. Built with PuLP, solved by HiGHS (CBC if HiGHS fails), with
a time limit, one thread and a fixed seed, so the same problem gives the same plan.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import pulp

from autopar.errors import InfeasibleError
from autopar.units import fmt_bytes
from autopar.passes.sharding import ShardingProblem
from autopar.passes.strategies import Strategy

logger = logging.getLogger(__name__)
_US = 1e6  # objective in microseconds: HiGHS's absolute gap tolerance must not swallow a tiny model
_GB = 1e-9
_TIE = 1e-6  # µs per unit of plan complexity, so that exact ties go to the simpler plan


@dataclass(frozen=True, slots=True)
class ShardingSolution:
    choice: dict[int, int]
    """Canonical unit → index of its chosen strategy."""
    step_time: float
    """Predicted seconds per step of the chosen strategies (exact, not the solver's estimate)."""
    memory: float
    """Predicted bytes on each device."""
    status: str
    """"optimal", or "time limit" when the solver stopped early with a feasible plan."""
    gap: float
    """Relative gap between the plan and the solver's bound (0 when proven optimal)."""
    seconds: float
    variables: int
    constraints: int
    solver: str
    objective: float = float("nan")
    """The solver's own objective in seconds (tie-breaking terms included); equals `step_time` up to
    those terms when the formulation is right."""


def evaluate(problem: ShardingProblem, choice: dict[int, int]) -> tuple[float, float]:
    """(step time, memory per device) of an assignment, from the problem's tables."""
    t = sum(problem.counts[u] * problem.strategies[u][s].time for u, s in choice.items())
    memory = problem.fixed_memory + sum(problem.counts[u] * _memory(problem, problem.strategies[u][s])
                                        for u, s in choice.items())
    for e in problem.edges:
        t += e.count * e.cost[e.rows[choice[e.src]]][e.cols[choice[e.dst]]]
    return t, memory


def minimum_memory(problem: ShardingProblem, allowed: Callable[[int, Strategy], bool] | None = None) -> float:
    """The least memory per device any plan needs (memory has no edge terms: a sum of minima)."""
    return problem.fixed_memory + sum(
        problem.counts[u] * min((_memory(problem, s) for s in strategies if allowed is None or allowed(u, s)),
                                default=float("inf"))
        for u, strategies in problem.strategies.items())


def _complexity(s: Strategy) -> float:
    sharded = sum(1 for m in s.members for p in m.outputs for x in p if x.__class__.__name__ != "Replicate")
    return sharded + sum(held.level for held in s.params.values())


def _candidates(problem: ShardingProblem, allowed) -> dict[int, list[int]]:
    """Per unit, the allowed strategies no other allowed one dominates."""
    touching: dict[int, list[tuple]] = {u: [] for u in problem.strategies}
    for k, e in enumerate(problem.edges):
        touching[e.src].append((k, "row"))
        if e.dst != e.src:
            touching[e.dst].append((k, "col"))
    result = {}
    for u, strategies in problem.strategies.items():
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(strategies):
            if allowed is not None and not allowed(u, s):
                continue
            key = tuple(problem.edges[k].rows[i] if side == "row" else problem.edges[k].cols[i]
                        for k, side in touching[u]) + tuple(
                problem.edges[k].cols[i] for k, side in touching[u] if problem.edges[k].dst == u == problem.edges[k].src)
            groups.setdefault(key, []).append(i)
        kept = []
        for members in groups.values():
            for i in members:
                a = strategies[i]
                if not any(_dominates(problem, strategies[j], a, j, i) for j in members if j != i):
                    kept.append(i)
        result[u] = sorted(kept)
    return result


def _dominates(problem: ShardingProblem, b: Strategy, a: Strategy, jb: int, ia: int) -> bool:
    mb, ma = _memory(problem, b), _memory(problem, a)
    better_or_equal = b.time <= a.time and mb <= ma
    strictly = b.time < a.time or mb < ma or (_complexity(b), jb) < (_complexity(a), ia)
    return better_or_equal and strictly


def _memory(problem: ShardingProblem, s: Strategy) -> float:
    """What a strategy counts against the budget: its state and, weighted, its activations."""
    return s.state + problem.activation_weight * s.activations


def solve(problem: ShardingProblem, *, time_limit: float = 60.0, warm_start: dict[int, int] | None = None,
          allowed: Callable[[int, Strategy], bool] | None = None) -> ShardingSolution:
    """The cheapest assignment that fits; `allowed` restricts the strategies (the named baselines)."""
    start = time.perf_counter()
    candidates = _candidates(problem, allowed)
    empty = [u for u, c in candidates.items() if not c]
    if empty:
        raise InfeasibleError(f"no allowed strategy for {problem.units[empty[0]].members[0]}")
    floor = minimum_memory(problem, allowed)
    if floor > problem.budget:
        raise InfeasibleError(
            f"the model needs at least {fmt_bytes(floor)} per device under any plan on a "
            f"{'×'.join(map(str, problem.mesh.shape))} mesh; each device has {fmt_bytes(problem.budget)} "
            f"usable ({fmt_bytes(problem.cluster.device.memory)} {problem.cluster.device.name})",
            required_bytes=floor, available_bytes=problem.budget)

    lp = pulp.LpProblem("sharding", pulp.LpMinimize)
    x = {u: {s: lp.add_variable(f"x_{u}_{s}", cat=pulp.LpBinary) for s in c} for u, c in candidates.items()}
    objective, memory = [], []
    for u, choices in x.items():
        lp += pulp.lpSum(choices.values()) == 1, f"one_{u}"
        for s, var in choices.items():
            st = problem.strategies[u][s]
            objective.append((problem.counts[u] * st.time * _US + _TIE * _complexity(st), var))
            memory.append((problem.counts[u] * _memory(problem, st) * _GB, var))
    for k, e in enumerate(problem.edges):
        _add_edge(lp, k, e, x, objective)
    lp += _affine(objective)
    lp += _affine(memory) <= (problem.budget - problem.fixed_memory) * _GB, "memory"
    if warm_start:
        for u, choices in x.items():
            for s, var in choices.items():
                var.setInitialValue(1 if warm_start.get(u) == s else 0)

    status, gap, solver = _run(lp, time_limit, bool(warm_start))
    picked = {u: [s for s, var in choices.items() if (var.value() or 0) > 0.5] for u, choices in x.items()}
    if all(len(p) == 1 for p in picked.values()):
        choice = {u: p[0] for u, p in picked.items()}
    elif warm_start and all(warm_start.get(u) in choices for u, choices in x.items()):
        choice, status, gap = {u: warm_start[u] for u in x}, "time limit", float("nan")  # stopped before any
    else:  # stopped before any plan: the least-memory one fits (checked above)
        choice = {u: min(c, key=lambda s: (_memory(problem, problem.strategies[u][s]), problem.strategies[u][s].time))
                  for u, c in candidates.items()}
        status, gap = "time limit", float("nan")
    step_time, mem = evaluate(problem, choice)
    return ShardingSolution(choice=choice, step_time=step_time, memory=mem, status=status, gap=gap,
                            seconds=time.perf_counter() - start, variables=lp.numVariables(),
                            constraints=lp.numConstraints(), solver=solver,
                            objective=(pulp.value(lp.objective) or 0.0) / _US)


def _affine(terms: list[tuple[float, pulp.LpVariable]]) -> pulp.LpAffineExpression:
    coefficients: dict = {}
    for c, var in terms:
        coefficients[var] = coefficients.get(var, 0.0) + c
    return pulp.LpAffineExpression(list(coefficients.items()))


def _add_edge(lp, k: int, e, x, objective: list) -> None:
    live_rows = sorted({e.rows[s] for s in x[e.src]})
    live_cols = sorted({e.cols[s] for s in x[e.dst]})
    cost = {(i, j): e.count * e.cost[i][j] * _US for i in live_rows for j in live_cols}
    if e.src == e.dst:  # a unit feeding itself across shared layers: only the diagonal exists
        for s, var in x[e.src].items():
            objective.append((cost[(e.rows[s], e.cols[s])], var))
        return
    i0, j0 = live_rows[0], live_cols[0]
    separable = all(abs(cost[(i, j)] - cost[(i, j0)] - cost[(i0, j)] + cost[(i0, j0)]) < 1e-12
                    for i in live_rows for j in live_cols)
    if separable:  # cost(i, j) = a(i) + b(j): no product needed
        for s, var in x[e.src].items():
            objective.append((cost[(e.rows[s], j0)], var))
        for s, var in x[e.dst].items():
            objective.append((cost[(i0, e.cols[s])] - cost[(i0, j0)], var))
        return
    y = {(i, j): lp.add_variable(f"y_{k}_{i}_{j}", lowBound=0) for i in live_rows for j in live_cols}
    for i in live_rows:
        lp += (pulp.lpSum(y[(i, j)] for j in live_cols)
               == pulp.lpSum(var for s, var in x[e.src].items() if e.rows[s] == i)), f"row_{k}_{i}"
    for j in live_cols:
        lp += (pulp.lpSum(y[(i, j)] for i in live_rows)
               == pulp.lpSum(var for s, var in x[e.dst].items() if e.cols[s] == j)), f"col_{k}_{j}"
    objective.extend((cost[key], var) for key, var in y.items())


class _HiGHS(pulp.HiGHS):
    """PuLP's HiGHS interface, with the starting solution handed to HiGHS before it runs."""

    def callSolver(self, lp):
        if self.optionsDict.pop("_warm", False):
            import highspy

            solution = highspy.HighsSolution()
            solution.col_value = [v.varValue if v.varValue is not None else 0.0 for v in lp.variables()]
            solution.value_valid = True
            lp.solverModel.setSolution(solution)
        lp.solverModel.run()


def _run(lp, time_limit: float, warm: bool) -> tuple[str, float, str]:
    try:
        options = {"random_seed": 0, "mip_abs_gap": 0.0}
        if warm:
            options["_warm"] = True
        solver = _HiGHS(msg=False, timeLimit=time_limit, threads=1, gapRel=1e-6, **options)
        lp.solve(solver)
        model = lp.solverModel
        gap = float(model.getInfo().mip_gap)
        limit = model.getModelStatus().name == "kTimeLimit" if hasattr(model.getModelStatus(), "name") else False
        name = "HiGHS"
    except Exception as e:  # noqa: BLE001 - HiGHS failing is exactly when CBC is the fallback
        logger.warning("HiGHS failed (%s); solving with CBC", e)
        with warnings.catch_warnings():  # PuLP 3 bundles CBC behind a name PuLP 4 will rename
            warnings.simplefilter("ignore", DeprecationWarning)
            lp.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, warmStart=warm, threads=1))
        gap, limit, name = 0.0, lp.status != pulp.LpStatusOptimal, "CBC"
    if lp.status == pulp.LpStatusInfeasible:
        raise InfeasibleError("the sharding ILP is infeasible although each unit has a strategy "
                              "that fits; the memory budget is too tight for any combination")
    return ("time limit" if limit else "optimal"), (gap if gap == gap and gap < 1e30 else float("nan")), name
