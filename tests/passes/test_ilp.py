"""The sharding ILP: it finds the brute-force optimum, respects memory, reports what it could not do."""

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
from autopar import Cluster, InfeasibleError
from autopar.passes.ilp import evaluate, minimum_memory, solve
from autopar.passes.sharding import ShardingOptions, build_problem
from autopar.vocab import LogicalMesh


class TwoLayers(nn.Module):
    def __init__(self, d=8, h=16):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.w2(F.relu(self.w1(x)))


def problem_for(model, x, y, mesh_shape, cluster, **options):
    captured = autopar.capture(model, (x,), loss_fn=F.mse_loss, target=y)
    return build_problem(captured, LogicalMesh.build(cluster, mesh_shape), cluster, ShardingOptions(**options))


def brute_force(problem):
    units = sorted(problem.strategies)
    sizes = [len(problem.strategies[u]) for u in units]
    assert math.prod(sizes) < 400_000, sizes
    best = math.inf
    for combo in itertools.product(*(range(n) for n in sizes)):
        choice = dict(zip(units, combo))
        t, memory = evaluate(problem, choice)
        if memory <= problem.budget:
            best = min(best, t)
    return best


@pytest.mark.parametrize("preset, mesh, batch, budget", [
    ("h100", (2,), 64, None),
    ("h100", (4,), 4, None),
    ("v100", (2,), 512, 2e5),     # memory binds: the replicated plan does not fit
])
def test_ilp_matches_brute_force(preset, mesh, batch, budget):
    torch.manual_seed(0)
    cluster = Cluster.preset(preset, gpus_per_node=4)
    x, y = torch.randn(batch, 8), torch.randn(batch, 8)
    problem = problem_for(TwoLayers(), x, y, mesh, cluster, memory_budget=budget)
    solution = solve(problem)
    assert solution.status == "optimal"
    assert solution.step_time == pytest.approx(brute_force(problem), rel=1e-9)
    assert solution.memory <= problem.budget


@pytest.mark.parametrize("preset, batch", [("cpu", 16), ("h100", 4096)])
def test_ilp_matches_brute_force_on_a_2d_mesh(preset, batch):
    cluster = Cluster.preset(preset, gpus_per_node=4)
    x, y = torch.randn(batch, 8), torch.randn(batch, 16)
    problem = problem_for(nn.Linear(8, 16), x, y, (2, 2), cluster)
    solution = solve(problem)
    assert solution.status == "optimal"
    assert solution.step_time == pytest.approx(brute_force(problem), rel=1e-9)
    assert solution.memory <= problem.budget


def test_infeasible_states_the_numbers():
    cluster = Cluster.preset("h100", gpus_per_node=2)
    problem = problem_for(TwoLayers(d=64, h=256), torch.randn(8, 64), torch.randn(8, 64), (2,), cluster,
                          memory_budget=1000.0)
    with pytest.raises(InfeasibleError) as info:
        solve(problem)
    e = info.value
    assert e.required_bytes == pytest.approx(minimum_memory(problem)) and e.available_bytes == 1000.0
    assert "needs at least" in str(e) and "1 kB" in str(e)


def test_time_limit_returns_the_incumbent():
    entry = autopar.models.get("gpt-tiny")
    inputs, target = entry.example_batch(8, device="meta")
    captured = autopar.capture(entry.build(device="meta"), inputs, loss_fn=entry.loss_fn, target=target)
    cluster = Cluster.preset("h100", gpus_per_node=4)
    problem = build_problem(captured, LogicalMesh.build(cluster, (2, 2)), cluster)
    start = {u: 0 for u in problem.strategies}  # everything replicated: a valid plan to start from
    for limit in (1e-6, 1e-2):  # stopped before reading the start, and after
        solution = solve(problem, time_limit=limit, warm_start=start)
        assert solution.status == "time limit" and solution.step_time <= evaluate(problem, start)[0]


def random_problem(rng, units=5, strategies=4, budget_fraction=0.6):
    """A synthetic problem: random times and memories, dense non-separable edge tables."""
    from types import SimpleNamespace

    from autopar.passes.sharding import EdgeTable, ShardingProblem
    from autopar.passes.strategies import Strategy

    alpha = {0: rng.uniform(0, 1e-3), 1: rng.uniform(0, 1e-3)}  # each axis's bucket latency
    table = {u: [Strategy(members=(), params={}, compute=rng.uniform(0, 1e-3), activations=rng.uniform(0, 1e9),
                          buckets={a: alpha[a] for a in alpha if rng.random() < 0.3})
                 for _ in range(strategies)] for u in range(units)}
    edges = []
    for src in range(units):
        for dst in range(src + 1, units):
            if rng.random() < 0.6:
                rows = [rng.randrange(3) for _ in range(strategies)]
                cols = [rng.randrange(3) for _ in range(strategies)]
                cost = [[rng.uniform(0, 2e-3) for _ in range(3)] for _ in range(3)]
                edges.append(EdgeTable(src=src, dst=dst, count=rng.randint(1, 3), rows=rows, cols=cols, cost=cost))
    counts = {u: rng.randint(1, 4) for u in table}
    most = sum(counts[u] * max(s.memory for s in table[u]) for u in table)
    least = sum(counts[u] * min(s.memory for s in table[u]) for u in table)
    fake_units = [SimpleNamespace(members=[f"n{u}"]) for u in range(units)]
    mesh = SimpleNamespace(shape=(2,))
    cluster = SimpleNamespace(device=SimpleNamespace(memory=most, name="fake"))
    return ShardingProblem(captured=None, mesh=mesh, cluster=cluster, options=ShardingOptions(), units=fake_units,
                           strategies=table, counts=counts, edges=edges,
                           budget=least + budget_fraction * (most - least), fixed_memory=0.0, context=None)


@pytest.mark.parametrize("seed", range(12))
def test_random_problems_match_brute_force(seed):
    import random

    problem = random_problem(random.Random(seed))
    solution = solve(problem)
    assert solution.step_time == pytest.approx(brute_force(problem), rel=1e-9)
    assert solution.objective == pytest.approx(solution.step_time, rel=1e-6)


def test_gradient_buckets_pay_their_latency_once():
    """A data-parallel plan's parameters share the runtime's gradient bucket (`runtime.sync`): the
    step pays one all-reduce latency for it, not one per parameter, and not none."""
    import dataclasses

    from autopar.cluster import Link
    from autopar.cost.comm import CommModel
    from autopar.passes.baselines import predicate
    from autopar.passes.ilp import bucket_latency

    base = Cluster.preset("cpu", gpus_per_node=2)
    cluster = dataclasses.replace(base, intra_node=Link(bandwidth=base.intra_node.bandwidth, latency=3e-3))
    problem = problem_for(TwoLayers(), torch.randn(64, 8), torch.randn(64, 8), (2,), cluster)
    dp = solve(problem, allowed=predicate("dp", problem)).choice
    alpha = CommModel(cluster).time("all_reduce", 0.0, LogicalMesh.build(cluster, (2,)).group(0))
    bucketed = [u for u, i in dp.items() if problem.strategies[u][i].buckets]
    assert len(bucketed) == 2  # both linears' weights
    assert bucket_latency(problem, dp) == pytest.approx(alpha)
    units = sum(problem.counts[u] * problem.strategies[u][i].time for u, i in dp.items())
    edges = sum(e.count * e.cost[e.rows[dp[e.src]]][e.cols[dp[e.dst]]] for e in problem.edges)
    assert evaluate(problem, dp)[0] == pytest.approx(units + edges + alpha)
    solution = solve(problem)
    assert solution.step_time == pytest.approx(brute_force(problem), rel=1e-9)
    assert solution.objective == pytest.approx(solution.step_time, rel=1e-6)


def test_parameters_sharing_a_flat_collective_pay_together_what_it_costs():
    """FSDP gathers a layer's parameters in one flat message (`runtime.groups`) and data-parallel
    reduces gradients in buckets (`runtime.sync`): with a collective whose time is not a line (a
    profile's measured points), the members' prices add up to the flat message's time, T(layer),
    and to T(bucket) with the bucket's latency paid once, not to a sum of T(each)."""
    import dataclasses

    from autopar.capture import capture
    from autopar.cost.comm import CommModel
    from autopar.cost.profile import calibrated
    from autopar.passes.baselines import predicate
    from autopar.passes.ilp import bucket_latency
    from autopar.runtime.sync import BUCKET_BYTES
    from tests.autopar.test_profile import fits, make_profile

    ms = 1e-3
    curve = dict(sizes=(4096, 65536, 1 << 20, 16 << 20), times=(1 * ms, 4 * ms, 5 * ms, 20 * ms))
    collectives = tuple(dataclasses.replace(f, **curve) if f.kind in ("all_gather", "all_reduce") else f
                        for f in fits())
    profile = make_profile(collectives=collectives, backend="nccl")  # no op timing on this machine: steady
    cluster = calibrated(Cluster.preset("cpu", gpus_per_node=2), profile, memory=4 << 30)
    entry = autopar.models.get("gpt-tiny")
    inputs, target = entry.example_batch(4, device="meta")
    captured = capture(entry.build(device="meta"), inputs, loss_fn=entry.loss_fn, target=target)
    mesh = LogicalMesh(shape=(2,), devices=(0, 1))
    problem = build_problem(captured, mesh, cluster)
    ctx, comm, group = problem.context, CommModel(cluster), mesh.group(0)

    def paid(choice, kind, phase):
        return sum(problem.counts[u] * sum(c.time for _, ph, c in problem.strategies[u][i].collectives
                                           if c.kind == kind and ph == phase) for u, i in choice.items())

    fsdp = solve(problem, allowed=predicate("fsdp", problem)).choice
    layers = {(ctx.layer_numel[p], ctx.layer_mates[p]) for p in ctx.layer_mates}
    whole = sum(comm.time("all_gather", ctx.layer_numel[p] * 4, group) / ctx.layer_mates[p] for p in ctx.layer_mates)
    alone = sum(comm.time("all_gather", ctx.captured.params[ctx.roles.params[p]].meta.numel * 4, group)
                for p in ctx.layer_mates)
    assert len(layers) >= 2 and paid(fsdp, "all_gather", "forward") == pytest.approx(whole, rel=1e-9)
    assert alone > 1.5 * whole
    problem = problem_for(TwoLayers(d=64, h=256), torch.randn(64, 64), torch.randn(64, 64), (2,), cluster)
    dp = solve(problem, allowed=predicate("dp", problem)).choice
    latency, bucket = comm.time("all_reduce", 0.0, group), problem.context.trainable_numel * 4
    assert bucket == 2 * 64 * 256 * 4 and bucket_latency(problem, dp) == pytest.approx(latency)
    assert paid(dp, "all_reduce", "backward") + latency == pytest.approx(
        comm.time("all_reduce", bucket, group) + latency * bucket / BUCKET_BYTES, rel=1e-9)


def test_computation_on_several_ranks_is_priced_as_the_slowest_rank_pays_it():
    """Each node's share times 1 + s_p (`cost.profile.StraggleFit`) on a mesh of p > 1; none on one
    device. An NCCL profile on this CPU machine prices from FLOPs and bytes: no timing noise."""
    from tests.autopar.test_profile import make_profile
    from autopar.cost.profile import StraggleFit, calibrated

    x, y = torch.randn(8, 8), torch.randn(8, 8)
    straggle = (StraggleFit(group_size=2, share=0.25),)

    def cluster(**change):
        return calibrated(Cluster.preset("h100", nodes=1, gpus_per_node=2), make_profile(backend="nccl", **change))

    for shape, expected in (((2,), 1.25), ((1,), 1.0)):
        plain = problem_for(TwoLayers(), x, y, shape, cluster())
        slow = problem_for(TwoLayers(), x, y, shape, cluster(straggle=straggle))
        pairs = [(a.compute, b.compute) for u in plain.strategies
                 for a, b in zip(plain.strategies[u], slow.strategies[u], strict=True)]
        assert pairs and all(b == pytest.approx(a * expected) for a, b in pairs if a > 0)
        assert slow.context.straggle == expected - 1
