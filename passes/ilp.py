"""The ILP: pick one strategy per unit so that predicted step time is minimal and memory holds.

Takes a `ShardingProblem`; gives a `ShardingSolution` (or raises `InfeasibleError` with the
numbers). With x[u, s] ∈ {0, 1} choosing strategy s of (canonical) unit u, and c(u) the number of
units sharing u's variables:

    minimize   Σ c(u)·time(u, s)·x[u, s]  +  Σ_edges c(e)·cost_e(i, j)·y[e, i, j]
    subject to Σ_s x[u, s] = 1                                            (one strategy per unit)
               Σ_j y[e, i, j] = Σ_{s in row class i} x[src, s]             (edge variables are the
               Σ_i y[e, i, j] = Σ_{s in column class j} x[dst, s]          product, linearized)
               fixed + Σ c(u)·memory(u, s)·x[u, s] ≤ budget                 (per-device memory)

plus α_a·b[a] for each mesh axis a whose gradients some strategy sends through the runtime's
buckets (`Strategy.buckets`), b[a] ∈ {0, 1} with Σ_{s bucketing on a} x[u, s] ≤ (units)·b[a]: a step
starts at least one bucket all-reduce on that axis, however many parameters share it; each
parameter's price carries its bytes' share of the further buckets (`bucket_latency`).

with y ≥ 0 continuous: for binary x the two transport constraints force y to the product.
Edges whose table is a sum of a row and a column term need no y; strategies another one of the
same unit dominates (the same placements on every edge, no more time and no more memory) are
dropped before the solver sees them, and so are strategies that alone would overspend the memory
left after every other unit's least. Built as plain arrays and solved by HiGHS (PuLP's CBC if
HiGHS fails), with a time limit, one thread and a fixed seed, so the same problem gives the same
plan. Presolve is off: the programs are small, and on them it costs more than it saves.
"""

from __future__ import annotations

import itertools
import logging
import math
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
    t += bucket_latency(problem, choice)
    memory = problem.fixed_memory + sum(problem.counts[u] * _memory(problem, problem.strategies[u][s])
                                        for u, s in choice.items())
    for e in problem.edges:
        t += e.count * e.cost[e.rows[choice[e.src]]][e.cols[choice[e.dst]]]
    return t, memory


def bucket_latency(problem: ShardingProblem, choice: dict[int, int]) -> float:
    """Seconds of the first gradient bucket's latency, α of an all-reduce, on each mesh axis some
    chosen strategy synchronizes in buckets (`runtime.sync`; the rest of the buckets are priced
    with the parameters, α · bytes / `BUCKET_BYTES` each). A step pays it whatever the model's size:
    on 4 gloo ranks of a 2-core machine α is about 7 ms, a tenth of a small model's step. The
    pipeline search's stage figures pay it once per stage (`passes.parts.PartPlan.buckets`)."""
    axes: dict[int, float] = {}
    for u, s in choice.items():
        axes.update(problem.strategies[u][s].buckets)
    return sum(axes.values())


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
    least = {u: min((_memory(problem, s) for s in strategies if allowed is None or allowed(u, s)), default=0.0)
             for u, strategies in problem.strategies.items()}
    slack = problem.budget - minimum_memory(problem, allowed)  # what the units may spend above their least
    result = {}
    for u, strategies in problem.strategies.items():
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(strategies):
            if allowed is not None and not allowed(u, s):
                continue
            if problem.counts[u] * (_memory(problem, s) - least[u]) > slack * (1 + 1e-9):
                continue  # over budget whatever the other units pick
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
    better_or_equal = b.time <= a.time and mb <= ma and b.buckets.keys() <= a.buckets.keys()
    strictly = b.time < a.time or mb < ma or (_complexity(b), jb) < (_complexity(a), ia)
    return better_or_equal and strictly


def _memory(problem: ShardingProblem, s: Strategy) -> float:
    """What a strategy counts against the budget: its state and, weighted, its activations."""
    return s.state + problem.activation_weight * s.activations


def solve(problem: ShardingProblem, *, time_limit: float = 60.0, warm_start: dict[int, int] | None = None,
          allowed: Callable[[int, Strategy], bool] | None = None) -> ShardingSolution:
    """The cheapest assignment that fits; `allowed` restricts the strategies (the named baselines)."""
    start = time.perf_counter()
    floor = minimum_memory(problem, allowed)
    if floor == float("inf"):
        unit = next(u for u, strategies in problem.strategies.items()
                    if not any(allowed is None or allowed(u, s) for s in strategies))
        raise InfeasibleError(f"no allowed strategy for {problem.units[unit].members[0]}")
    if floor > problem.budget:
        raise InfeasibleError(
            f"the model needs at least {fmt_bytes(floor)} per device under any plan on a "
            f"{'×'.join(map(str, problem.mesh.shape))} mesh; each device has {fmt_bytes(problem.budget)} "
            f"usable ({fmt_bytes(problem.cluster.device.memory)} {problem.cluster.device.name})",
            required_bytes=floor, available_bytes=problem.budget)
    candidates = _candidates(problem, allowed)

    model = _Model()
    x = {u: {s: model.column(integer=True) for s in c} for u, c in candidates.items()}
    memory = []
    for u, choices in x.items():
        model.row([(var, 1.0) for var in choices.values()], 1.0, 1.0)  # one strategy per unit
        for s, var in choices.items():
            st = problem.strategies[u][s]
            model.cost[var] += problem.counts[u] * st.time * _US + _TIE * _complexity(st)
            memory.append((var, problem.counts[u] * _memory(problem, st) * _GB))
    for e in problem.edges:
        _add_edge(model, e, x)
    model.row(memory, -math.inf, (problem.budget - problem.fixed_memory) * _GB)
    buckets = _add_buckets(problem, model, x)
    warm = None
    if warm_start:
        warm = [0.0] * len(model.cost)
        for u, choices in x.items():
            if warm_start.get(u) in choices:
                warm[choices[warm_start[u]]] = 1.0
                for axis in problem.strategies[u][warm_start[u]].buckets:
                    warm[buckets[axis]] = 1.0

    values, status, gap, solver = _run(model, time_limit, warm)
    picked = {u: [s for s, var in choices.items() if values is not None and values[var] > 0.5]
              for u, choices in x.items()}
    if all(len(p) == 1 for p in picked.values()):
        choice = {u: p[0] for u, p in picked.items()}
    elif warm_start and all(warm_start.get(u) in choices for u, choices in x.items()):
        choice, status, gap = {u: warm_start[u] for u in x}, "time limit", float("nan")  # stopped before any
    else:  # stopped before any plan: the least-memory one fits (checked above)
        choice = {u: min(c, key=lambda s: (_memory(problem, problem.strategies[u][s]), problem.strategies[u][s].time))
                  for u, c in candidates.items()}
        status, gap = "time limit", float("nan")
    step_time, mem = evaluate(problem, choice)
    objective = sum(c * v for c, v in zip(model.cost, values)) / _US if values is not None else float("nan")
    return ShardingSolution(choice=choice, step_time=step_time, memory=mem, status=status, gap=gap,
                            seconds=time.perf_counter() - start, variables=len(model.cost),
                            constraints=len(model.rows), solver=solver, objective=objective)


class _Model:
    """A mixed-integer program as plain lists: minimize cost·v over columns v ≥ 0 (binary where
    integer), rows lo ≤ Σ a·v ≤ hi."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.integer: list[bool] = []
        self.rows: list[tuple[list[tuple[int, float]], float, float]] = []

    def column(self, integer: bool = False) -> int:
        self.cost.append(0.0)
        self.integer.append(integer)
        return len(self.cost) - 1

    def row(self, terms: list[tuple[int, float]], lo: float, hi: float) -> None:
        self.rows.append((terms, lo, hi))


def _add_buckets(problem: ShardingProblem, model: _Model, x) -> dict[int, int]:
    """One binary column per mesh axis some candidate synchronizes in buckets, costing its α, set
    whenever a strategy bucketing on it is chosen (see the module docstring); axis → column."""
    users: dict[int, list[int]] = {}
    latency: dict[int, float] = {}
    for u, choices in x.items():
        for s, var in choices.items():
            for axis, alpha in problem.strategies[u][s].buckets.items():
                users.setdefault(axis, []).append(var)
                latency[axis] = alpha
    columns = {}
    for axis, variables in users.items():
        columns[axis] = b = model.column(integer=True)
        model.cost[b] += latency[axis] * _US
        model.row([(var, 1.0) for var in variables] + [(b, -float(len(x)))], -math.inf, 0.0)
    return columns


def _add_edge(model: _Model, e, x) -> None:
    live_rows = sorted({e.rows[s] for s in x[e.src]})
    live_cols = sorted({e.cols[s] for s in x[e.dst]})
    cost = {(i, j): e.count * e.cost[i][j] * _US for i in live_rows for j in live_cols}
    if e.src == e.dst:  # a unit feeding itself across shared layers: only the diagonal exists
        for s, var in x[e.src].items():
            model.cost[var] += cost[(e.rows[s], e.cols[s])]
        return
    i0, j0 = live_rows[0], live_cols[0]
    separable = all(abs(cost[(i, j)] - cost[(i, j0)] - cost[(i0, j)] + cost[(i0, j0)]) < 1e-12
                    for i in live_rows for j in live_cols)
    if separable:  # cost(i, j) = a(i) + b(j): no product needed
        for s, var in x[e.src].items():
            model.cost[var] += cost[(e.rows[s], j0)]
        for s, var in x[e.dst].items():
            model.cost[var] += cost[(i0, e.cols[s])] - cost[(i0, j0)]
        return
    y = {}
    for key in cost:
        y[key] = model.column()
        model.cost[y[key]] += cost[key]
    for i in live_rows:
        model.row([(y[(i, j)], 1.0) for j in live_cols]
                  + [(var, -1.0) for s, var in x[e.src].items() if e.rows[s] == i], 0.0, 0.0)
    for j in live_cols:
        model.row([(y[(i, j)], 1.0) for i in live_rows]
                  + [(var, -1.0) for s, var in x[e.dst].items() if e.cols[s] == j], 0.0, 0.0)


def _run(model: _Model, time_limit: float, warm: list[float] | None
         ) -> tuple[list[float] | None, str, float, str]:
    """Column values (None when the solver stopped before any), status, gap and solver name."""
    try:
        values, limit, gap = _highs(model, time_limit, warm)
        name = "HiGHS"
    except InfeasibleError:
        raise
    except Exception as e:  # noqa: BLE001 - HiGHS failing is exactly when CBC is the fallback
        logger.warning("HiGHS failed (%s); solving with CBC", e)
        values, limit, gap = _cbc(model, time_limit, warm)
        name = "CBC"
    return values, ("time limit" if limit else "optimal"), (gap if gap == gap and gap < 1e30 else float("nan")), name


_INFEASIBLE = ("the sharding ILP is infeasible although each unit has a strategy that fits; the memory budget "
               "is too tight for any combination")


def _highs(model: _Model, time_limit: float, warm: list[float] | None) -> tuple[list[float] | None, bool, float]:
    """HiGHS on the column-wise matrix: one thread, a fixed seed, an exact gap."""
    import highspy

    n = len(model.cost)
    columns: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for r, (terms, _, _) in enumerate(model.rows):
        for var, a in terms:
            columns[var].append((r, a))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, len(model.rows)
    lp.col_cost_ = model.cost
    lp.col_lower_ = [0.0] * n
    lp.col_upper_ = [1.0 if i else highspy.kHighsInf for i in model.integer]
    lp.row_lower_ = [lo if lo > -math.inf else -highspy.kHighsInf for _, lo, _ in model.rows]
    lp.row_upper_ = [hi if hi < math.inf else highspy.kHighsInf for _, _, hi in model.rows]
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = [0] + list(itertools.accumulate(len(c) for c in columns))
    lp.a_matrix_.index_ = [r for c in columns for r, _ in c]
    lp.a_matrix_.value_ = [a for c in columns for _, a in c]
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                       for i in model.integer]
    h = highspy.Highs()
    for option, value in (("output_flag", False), ("threads", 1), ("random_seed", 0), ("mip_abs_gap", 0.0),
                          ("mip_rel_gap", 1e-6), ("presolve", "off"), ("time_limit", float(time_limit))):
        h.setOptionValue(option, value)
    h.passModel(lp)
    if warm is not None:
        solution = highspy.HighsSolution()
        solution.col_value = warm
        solution.value_valid = True
        h.setSolution(solution)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        raise InfeasibleError(_INFEASIBLE)
    limit = status == highspy.HighsModelStatus.kTimeLimit
    if status not in (highspy.HighsModelStatus.kOptimal, highspy.HighsModelStatus.kTimeLimit):
        raise RuntimeError(f"HiGHS ended with {h.modelStatusToString(status)}")
    info = h.getInfo()
    found = info.primal_solution_status == 2  # a feasible point exists
    return (list(h.getSolution().col_value) if found else None), limit, float(info.mip_gap)


def _cbc(model: _Model, time_limit: float, warm: list[float] | None) -> tuple[list[float] | None, bool, float]:
    """The same program through PuLP's bundled CBC."""
    lp = pulp.LpProblem("sharding", pulp.LpMinimize)
    v = [lp.add_variable(f"v{i}", lowBound=0, upBound=1 if integer else None,
                         cat=pulp.LpBinary if integer else pulp.LpContinuous) for i, integer in enumerate(model.integer)]
    lp += pulp.LpAffineExpression([(v[i], c) for i, c in enumerate(model.cost) if c])
    for r, (terms, lo, hi) in enumerate(model.rows):
        expression = pulp.LpAffineExpression([(v[var], a) for var, a in terms])
        if lo == hi:
            lp += expression == lo, f"r{r}"
        else:
            lp += expression <= hi, f"r{r}"
    if warm is not None:
        for var, value in zip(v, warm):
            var.setInitialValue(value)
    with warnings.catch_warnings():  # PuLP 3 bundles CBC behind a name PuLP 4 will rename
        warnings.simplefilter("ignore", DeprecationWarning)
        lp.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, warmStart=warm is not None, threads=1))
    if lp.status == pulp.LpStatusInfeasible:
        raise InfeasibleError(_INFEASIBLE)
    values = [var.value() or 0.0 for var in v]
    return values, lp.status != pulp.LpStatusOptimal, 0.0
