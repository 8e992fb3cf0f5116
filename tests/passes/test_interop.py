"""The inter-op pass: schedule formulas against the seeds, layer clustering, and the stage DP
against brute force over every split, on tiny GPTs planned on the meta device."""

import itertools
import math

import pytest

import autopar
from autopar.passes import interop, schedules, stage_costs
from autopar.passes.sharding import ShardingOptions


def test_bubble_matches_the_seeds_example():
    # seed 004: GPipe (AFAB) with PP = 4, M = 4: idle / work = (PP - 1) / M = 3/4
    assert schedules.bubble_fraction("gpipe", 4, 4) == pytest.approx(0.75)
    assert schedules.bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 8)
    assert schedules.bubble_fraction("interleaved", 4, 4, virtual=2) == pytest.approx(3 / 8)
    # the zero-bubble order autopar runs: two thirds of 1F1B's bubble at 1F1B's memory
    assert schedules.bubble_fraction("zero-bubble", 4, 4) == pytest.approx(0.5)


def test_step_time_of_equal_stages_is_m_plus_p_minus_one_times_t():
    assert schedules.step_time("1f1b", [2.0] * 4, 4) == pytest.approx((4 + 4 - 1) * 2.0)
    # GPipe, t = (1, 3), backward 2/3 of each: stage 1 ends its last backward at 1/3 + 5·3 = 15.33,
    # stage 0 two thirds later at 16, then its optimizer 0.5: the slow stage paces both.
    assert schedules.step_time("gpipe", [1.0, 3.0], 5, once=[0.5, 0.25]) == pytest.approx(16.5)


def test_in_flight_microbatches():
    # seed 004: 1F1B stores p = 4 activations rather than m = 8; GPipe all m
    assert [schedules.in_flight("1f1b", 4, 8, i) for i in range(4)] == [4, 3, 2, 1]
    assert schedules.in_flight("gpipe", 4, 8, 0) == 8
    assert schedules.in_flight("1f1b", 4, 2, 0) == 2
    # Megatron-LM interleaved warm-up: (p - i - 1)·2 + (v - 1)·p forwards of a chunk, plus one
    assert schedules.in_flight("interleaved", 4, 8, 0, virtual=2) == pytest.approx((6 + 4 + 1) / 2)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="schedule: found 'pipedream'"):
        schedules.bubble_fraction("pipedream", 2, 2)
    with pytest.raises(ValueError, match="required at least 1"):
        schedules.step_time("1f1b", [1.0], 0)


def _captured(layers: int, batch: int = 16):
    entry = autopar.models.get("gpt-tiny")
    model = entry.build(device="meta", n_layers=layers)
    inputs, target = entry.example_batch(batch)
    return autopar.capture(model, inputs, loss_fn=entry.loss_fn, target=target)


@pytest.fixture(scope="module")
def four_layers():
    return _captured(4)


def test_layer_clustering_balances_flops(four_layers):
    assert interop.cluster_layers(four_layers, 8) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    two = interop.cluster_layers(four_layers, 2)
    assert len(two) == 2 and two[0][0] == 0 and two[-1][1] == 4 and two[0][1] == two[1][0]
    with pytest.raises(ValueError, match="max_blocks: found 0"):
        interop.cluster_layers(four_layers, 0)


def _costs(captured, budget, blocks=3):
    cluster = autopar.Cluster.preset("h100", nodes=2, gpus_per_node=2)
    options = ShardingOptions(memory_budget=budget)
    return stage_costs.StageCosts(captured, cluster, options, interop.cluster_layers(captured, blocks), 16, 10.0), cluster


def _brute_force(costs, subs, kind, m, p):
    """The least step time over every split into p stages and every assignment of submeshes, each
    stage holding the activations the DP gives it (interleaved: its in-flight count rounded up to
    whole microbatches, and at least one layer per chunk)."""
    total, blocks = costs.cluster.num_devices, len(costs.blocks)
    least = schedules.VIRTUAL if kind == "interleaved" else 1
    best = None
    for cuts in itertools.combinations(range(1, blocks), p - 1):
        bounds = list(zip((0, *cuts), (*cuts, blocks)))
        if any(costs.blocks[b - 1][1] - costs.blocks[a][0] < least for a, b in bounds):
            continue
        for meshes in itertools.product(subs, repeat=p):
            if sum(s.devices for s in meshes) != total:
                continue
            stages = [costs.stage(a, b, sub, m, math.ceil(schedules.in_flight(kind, p, m, i)))
                      for i, ((a, b), sub) in enumerate(zip(bounds, meshes))]
            if any(s is None for s in stages):
                continue
            t = schedules.step_time(kind, [s.time for s in stages], m, [s.once for s in stages])
            best = t if best is None else min(best, t)
    return best


@pytest.mark.parametrize("budget", [None, 7e5])
def test_dp_matches_brute_force_over_all_splits(four_layers, budget):
    costs, cluster = _costs(four_layers, budget)
    subs = stage_costs.submeshes(cluster)
    for kind, m in [("1f1b", 2), ("gpipe", 4), ("interleaved", 4), ("zero-bubble", 4)]:
        for p in (1, 2, 3):
            if kind == "interleaved" and p == 1:
                continue  # the search runs one stage as no schedule
            found = interop._dp(costs, subs, kind, m, p, cluster.num_devices)
            expected = _brute_force(costs, subs, kind, m, p)
            if expected is None:
                assert found is None
            else:
                assert found is not None and found.step_time == pytest.approx(expected, rel=1e-12)
                assert len(found.stages) == p and sum(s.devices for s in found.stages) == cluster.num_devices


def test_dp_keeps_a_split_whose_larger_sum_of_times_pays_off_in_the_tail():
    """Interleaved: T = (m − c)·max t + c·Σ t + tail with c = 1/2, while a later stage's
    once-per-step work o counts as o − b·Σ t before it with b = 2/3 > c. A first stage 0.3 s slower
    per microbatch then buys 0.2 s of tail for 0.15 s of c·Σ t: the split with the larger Σ t and
    the same tail so far wins, which keeping only splits better on both Σ t and tail drops."""
    from types import SimpleNamespace

    def choice(a, b, time, once):
        return stage_costs.StageChoice(blocks=(a, b), devices=2, mesh_shape=(2,), time=time, once=once, memory=0.0,
                                       checkpoint=False, plans=())

    first = [(1, 2, choice(0, 1, 1.0, 0.0)), (1, 2, choice(0, 1, 1.3, 0.0))]
    last = [(2, 2, choice(1, 2, 2.0, 10.0))]
    tables = {2: [first, []], 1: [[], last]}
    costs = SimpleNamespace(blocks=[(0, 2), (2, 4)], cluster=SimpleNamespace(num_devices=4),
                            choices=lambda m, k, subs, left, least: tables[left])
    m = 8
    splits = [schedules.step_time("interleaved", [o.time, 2.0], m, [0.0, 10.0]) for _, _, o in first]
    assert splits[1] < splits[0]  # 2m − 1 + 1.65 + (10 − 2/3·1.3) against 2m − 1 + 1.5 + (10 − 2/3·1.0)
    found = interop._dp(costs, [], "interleaved", m, 2, 4)
    assert found.step_time == pytest.approx(min(splits), rel=1e-12)
    assert found.stages[0].time == 1.3


def test_no_stages_when_the_model_fits(four_layers):
    costs, cluster = _costs(four_layers, None)
    found = interop.search(costs, stage_costs.submeshes(cluster), schedules_=("gpipe", "1f1b"))
    assert len(found.stages) == 1 and found.schedule == "none" and found.layers == ((0, 4),)


def test_more_stages_when_memory_binds(four_layers):
    roomy, cluster = _costs(four_layers, None, blocks=4)
    one = interop.search(roomy, stage_costs.submeshes(cluster))
    # a budget below what one stage needs even with microbatching and checkpointing
    tight, _ = _costs(four_layers, 5e5, blocks=4)
    many = interop.search(tight, stage_costs.submeshes(cluster))
    assert len(one.stages) == 1
    assert many is not None and len(many.stages) > 1
    assert all(s.memory <= 5e5 for s in many.stages)
    assert many.step_time > one.step_time
    assert sum(b - a for a, b in many.layers) == 4
