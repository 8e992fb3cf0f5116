"""The cluster profiler: the α-β fit, the Profile record and its JSON, the cost model reading it,
and `autopar profile --quick` end to end on 2 spawned gloo ranks."""

import dataclasses
import json
import math
import os

import pytest
import torch

import autopar
from autopar import Cluster
from autopar.cli import main
from autopar.cost.comm import CommModel, flat_cost
from autopar.cost.compute import ComputeModel, roofline_time
from autopar.cost import sampling
from autopar.cost.profile import (PROFILED, CollectiveFit, MatmulRate, Profile, StraggleFit, calibrated,
                                  fit_alpha_beta, nondecreasing)
from autopar.errors import AutoparError
from autopar.graph import NodeInfo, TensorMeta
from autopar.runtime import profile_collectives, profile_straggle, profiler

SIZES = [4096 * 4 ** i for i in range(8)]


def test_fit_recovers_alpha_and_beta_of_exact_data():
    for alpha, beta in [(170e-6, 1e-9), (2e-6, 1 / 450e9), (0.0, 3e-10), (5e-5, 0.0)]:
        found_alpha, found_beta, residual = fit_alpha_beta(SIZES, [alpha + n * beta for n in SIZES])
        assert found_alpha == pytest.approx(alpha, rel=1e-9, abs=1e-15)
        assert found_beta == pytest.approx(beta, rel=1e-9, abs=1e-21)
        assert residual == pytest.approx(0.0, abs=1e-9)


def test_fit_pins_a_negative_coefficient_at_zero_and_rejects_bad_input():
    alpha, beta, residual = fit_alpha_beta([1e3, 1e6, 1e7], [3e-4, 2e-4, 1e-4])  # time falling with size: noise
    assert beta == 0.0 and 1e-4 <= alpha <= 3e-4 and residual > 0
    with pytest.raises(ValueError, match="required two or more"):
        fit_alpha_beta([1e3], [1e-4])
    with pytest.raises(ValueError, match="required finite and > 0"):
        fit_alpha_beta([1e3, 1e4], [1e-4, 0.0])


def fits(scope="intra", p=2, alpha=100e-6, beta=1e-9):
    return tuple(CollectiveFit(kind=k, group_size=p, scope=scope, alpha=alpha * (i + 1), beta=beta * (i + 1),
                               residual=0.01) for i, k in enumerate(PROFILED) if k != "send_recv" or p == 2)


def make_profile(**change):
    base = dict(backend="gloo", memory_bandwidth=20e9, kernel_overhead=2e-6, collectives=fits(),
                matmul=(MatmulRate(dtype="fp32", m=64, k=64, n=64, rate=20e9),
                        MatmulRate(dtype="fp32", m=1024, k=1024, n=1024, rate=80e9),
                        MatmulRate(dtype="bf16", m=1024, k=1024, n=1024, rate=160e9)))
    return Profile(**{**base, **change})


def profiled_cluster(nodes=1, per_node=2, **change):
    return calibrated(Cluster.preset("cpu", nodes=nodes, gpus_per_node=per_node), make_profile(**change),
                      memory=4 << 30)


def test_profile_round_trips_through_cluster_json(tmp_path):
    cluster = profiled_cluster(collectives=fits() + fits("inter", 4))
    path = tmp_path / "cluster.json"
    cluster.save(path)
    assert Cluster.load(path) == cluster
    assert json.loads(path.read_text())["profile"]["collectives"][0]["kind"] == "all_reduce"
    # Clusters without a profile write no "profile" key, and files without one still load.
    plain = Cluster.preset("cpu")
    assert "profile" not in plain.to_dict()
    assert Cluster.from_json(plain.to_json()) == plain and Cluster.from_json(plain.to_json()).profile is None


def test_straggle_share_by_group_size_and_files_without_it():
    profile = make_profile(straggle=(StraggleFit(group_size=2, share=0.05), StraggleFit(group_size=8, share=0.2)))
    assert profile.straggle_share(1) == 0.0  # one rank waits for no one
    assert profile.straggle_share(2) == 0.05 and profile.straggle_share(8) == 0.2
    assert profile.straggle_share(16) == 0.2 and profile.straggle_share(3) == 0.05  # the nearest size, log scale
    assert make_profile().straggle_share(4) == 0.0  # none measured: none priced
    data = json.loads(profiled_cluster(straggle=profile.straggle).to_json())
    assert Cluster.from_dict(data).profile.straggle == profile.straggle
    del data["profile"]["straggle"]  # a file written before the field existed
    assert Cluster.from_dict(data).profile.straggle == ()


def test_straggle_is_the_slowest_rank_per_round_over_the_slowest_mean():
    # Ranks that take turns being slow: each round's slowest takes 2, each rank's mean is 1.5.
    turns = [[1.0, 2.0] * 10, [2.0, 1.0] * 10]
    (fit,) = profile_straggle.shares(turns, per_node=2)
    assert fit.group_size == 2 and fit.share == pytest.approx(2 / 1.5 - 1)
    # A rank slow every round is already in the rates (each the slowest rank's mean): no excess.
    (steady,) = profile_straggle.shares([[1.0] * 20, [2.0] * 20], per_node=2)
    assert steady.share == 0.0
    # Four ranks: groups of 2 (ranks 0-1, 2-3) and of 4, each its own share.
    four = profile_straggle.shares([[1.0] * 20, [1.0] * 20, [1.0, 3.0] * 10, [3.0, 1.0] * 10], per_node=4)
    assert [(f.group_size, round(f.share, 6)) for f in four] == [(2, round((0 + 0.5) / 2, 6)), (4, 0.5)]


def test_a_collective_follows_its_measured_points():
    """Between the measured sizes the time follows the points, made non-decreasing (a dip is noise,
    pooled with its neighbours); beyond the largest it climbs at β; below the smallest it is the
    smallest's; without points it is the line. The points survive the cluster file."""
    ms = 1e-3
    fit = CollectiveFit(kind="all_reduce", group_size=2, scope="intra", alpha=1.5 * ms, beta=1e-9, residual=0.1,
                        sizes=(4096, 65536, 1 << 20, 16 << 20), times=(2 * ms, 1.8 * ms, 2.5 * ms, 20 * ms))
    assert [fit.time(n) for n in (0, 4096, 65536)] == pytest.approx([1.9 * ms] * 3)
    assert fit.time(((1 << 20) + (16 << 20)) / 2) == pytest.approx((2.5 + 20) / 2 * ms)
    assert fit.time(32 << 20) == pytest.approx(20 * ms + (16 << 20) * 1e-9)
    line = dataclasses.replace(fit, sizes=(), times=())
    assert line.time(1 << 20) == pytest.approx(1.5 * ms + (1 << 20) * 1e-9)
    assert nondecreasing((3.0, 1.0, 2.0)) == pytest.approx((2.0, 2.0, 2.0))
    assert nondecreasing((1.0, 3.0, 2.0, 4.0)) == pytest.approx((1.0, 2.5, 2.5, 4.0))
    cluster = profiled_cluster(collectives=(fit,))
    assert Cluster.from_json(cluster.to_json()).profile.collectives == (fit,)


def test_calibration_sets_device_and_links_from_the_measurement():
    cluster = profiled_cluster()
    d = cluster.device
    assert d.peak("fp32") == 80e9 and d.peak("tf32") == 80e9 and d.peak("bf16") == 160e9
    cpu = Cluster.preset("cpu").device
    assert d.peak("int8") == cpu.peak("int8") * cpu.matmul_efficiency  # not measured: its effective rate kept
    assert d.matmul_efficiency == 1.0 and d.memory_bandwidth == 20e9 and d.memory == 4 << 30
    # Seed ring all-reduce on p = 2: 2(p−1)α + 2(p−1)/p·nβ, so the link is α/2 and β.
    assert cluster.intra_node.latency == pytest.approx(100e-6 / 2) and cluster.intra_node.beta == pytest.approx(1e-9)
    assert cluster.inter_node == Cluster.preset("cpu").inter_node  # no inter-node fit: kept


def profile_dict():
    return json.loads(profiled_cluster().to_json())["profile"]


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(extra=1), r"Cluster.profile: found unknown field\(s\) \['extra'\]"),
    (lambda p: p.pop("kernel_overhead"), r"Cluster.profile: missing field\(s\) \['kernel_overhead'\]"),
    (lambda p: p.update(memory_bandwidth="fast"), r"Profile.memory_bandwidth: found 'fast' \(str\), required a number"),
    (lambda p: p.update(kernel_overhead=-1.0), r"Profile.kernel_overhead: found -1.0, required >= 0"),
    (lambda p: p.update(backend="mpi"), r"Profile.backend: found 'mpi', required one of nccl, gloo"),
    (lambda p: p.update(matmul={}), r"Cluster.profile.matmul: found dict, required a JSON array"),
    (lambda p: p["matmul"][0].update(dtype="fp64"), r"MatmulRate.dtype: found 'fp64', required one of"),
    (lambda p: p["matmul"][0].update(m=6.5), r"MatmulRate.m: found 6.5 \(float\), required an integer"),
    (lambda p: p["matmul"][0].pop("rate"), r"Cluster.profile.matmul\[0\]: missing field\(s\) \['rate'\]"),
    (lambda p: p.update(matmul=[m for m in p["matmul"] if m["dtype"] != "fp32"]), "found no fp32 entry"),
    (lambda p: p["collectives"][0].update(kind="allreduce"), r"CollectiveFit.kind: found 'allreduce', required one"),
    (lambda p: p["collectives"][0].update(scope="rack"), r"CollectiveFit.scope: found 'rack', required one of intra"),
    (lambda p: p["collectives"][0].update(alpha=None), r"CollectiveFit.alpha: found None \(NoneType\), required a"),
    (lambda p: p["collectives"][-1].update(group_size=4), r"group_size: found 4 for send_recv, required 2"),
    (lambda p: p["collectives"].append(p["collectives"][0]), r"Profile.collectives: found repeated entries"),
    (lambda p: p["collectives"][0].update(sizes=[1e3, 1e4], times=[1e-3]), r"found 2 sizes and 1 times, required"),
    (lambda p: p["collectives"][0].update(sizes=[1e4, 1e3], times=[1e-3, 2e-3]), r"required increasing sizes"),
    (lambda p: p["collectives"][0].update(sizes=[1e3, 1e4], times=[1e-3, 0]), r"required increasing sizes and times > 0"),
    (lambda p: p["collectives"][0].update(sizes="1e3", times=[]), r"CollectiveFit.sizes: found '1e3', required an array"),
    (lambda p: p.update(straggle=[{"group_size": 1, "share": 0.1}]), r"StraggleFit.group_size: found 1, required >= 2"),
    (lambda p: p.update(straggle=[{"group_size": 2, "share": -0.1}]), r"StraggleFit.share: found -0.1, required >= 0"),
    (lambda p: p.update(straggle=[{"group_size": 2, "share": 0.1}] * 2), r"Profile.straggle: found repeated entries"),
])
def test_malformed_profile_fields_raise(edit, message):
    data = json.loads(profiled_cluster().to_json())
    edit(data["profile"])
    with pytest.raises(ValueError, match=message):
        Cluster.from_dict(data)


def test_comm_model_uses_the_fit_and_falls_back_to_the_seed():
    cluster = profiled_cluster(nodes=2, per_node=4, collectives=fits(p=2) + fits("intra", 4, alpha=1e-3))
    model = CommModel(cluster)
    for fit in cluster.profile.collectives:
        group = list(range(fit.group_size))
        cost = model.cost(fit.kind, 1e6, group)
        assert cost.time == pytest.approx(fit.alpha + 1e6 * fit.beta) and cost.algorithm == "profiled"
    # Not profiled (reduce): seed 002's formulas on the calibrated link.
    assert model.cost("reduce", 1e6, [0, 1]) == flat_cost("reduce", 2, 1e6, cluster.intra_node, model.gamma)
    # A group size that was not measured (3): the nearest fit (p=4), carried over by the ring coefficients.
    ar4 = cluster.profile.collective("all_reduce", 4, "intra")
    cost = model.cost("all_reduce", 1e6, [0, 1, 2])
    assert cost.algorithm == "profiled(p=4)"
    assert cost.time == pytest.approx(ar4.alpha * 4 / 6 + 1e6 * ar4.beta * (4 / 3) / (6 / 4))
    # A group spanning nodes, with no inter-node fit: the seed's hierarchical/flat formulas.
    assert not model.cost("all_reduce", 1e6, [0, 4]).algorithm.startswith("profiled")
    # Without a profile nothing changes.
    plain = Cluster.preset("cpu", gpus_per_node=2)
    assert CommModel(plain).cost("all_reduce", 1e6, [0, 1]) == flat_cost("all_reduce", 2, 1e6, plain.intra_node,
                                                                         CommModel(plain).gamma)


def node(flops, moved, dtype=torch.float32):
    return NodeInfo(name="n", op="aten.mm.default", outputs=(TensorMeta((64, 64), dtype),), inputs=(),
                    module_path="", module_type="", flops=flops, backward_flops=2 * flops, bytes_moved=moved,
                    requires_grad=True)


def test_compute_model_without_profile_is_the_roofline():
    device = Cluster.preset("cpu").device
    for flops, moved in [(1e9, 1e3), (1e3, 1e9), (0, 0)]:
        assert ComputeModel(device).node_time(node(flops, moved)) == roofline_time(flops, moved, device, "fp32")


def test_compute_model_with_profile_measured_rates_bandwidth_and_overhead():
    cluster = profiled_cluster()
    model = ComputeModel(cluster.device, profile=cluster.profile)
    big = 2 * 1024 ** 3
    assert model.node_time(node(big, 1e3)) == pytest.approx(big / 80e9)  # a measured shape: its measured time
    assert model.node_time(node(big, 1e3, torch.bfloat16)) == pytest.approx(big / 160e9)
    # Between two measured shapes: the rate linear in log-log.
    mid = math.sqrt(big * 2 * 64 ** 3)
    assert model.node_time(node(mid, 1e3)) == pytest.approx(mid / math.sqrt(20e9 * 80e9))
    # Element-wise: the overhead plus the bytes at the measured bandwidth, in backward too.
    assert model.node_time(node(0, 1e8)) == pytest.approx(2e-6 + 1e8 / 20e9)
    assert model.node_time(node(0, 1e8), backward=True) == pytest.approx(2e-6 + 2e8 / 20e9)
    assert model.node_time(node(0, 0)) == 0.0


def test_group_sizes_and_groups():
    assert profile_collectives.group_sizes(2, 2) == [(2, "intra")]
    assert profile_collectives.group_sizes(6, 6) == [(2, "intra"), (4, "intra"), (6, "intra")]
    assert profile_collectives.group_sizes(8, 4) == [(2, "intra"), (4, "intra"), (2, "inter"), (4, "inter"), (8, "inter")]
    assert profile_collectives.groups(2, 8, 4, "intra") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert profile_collectives.groups(2, 8, 4, "inter") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert profile_collectives.groups(4, 8, 4, "inter") == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_a_collective_is_timed_after_computation_and_the_computation_subtracted(monkeypatch):
    """`in_step_seconds` runs (chunk, collective) pairs and chunks alone, and returns the difference:
    with a 5 ms chunk, a stand-in collective taking 2 ms measures 2 ms, one taking nothing about
    nothing. On a clock that only the chunk and the collective advance, so that what else the
    machine does cannot move it."""
    now, agreed = _fake_clock(monkeypatch)
    taken, nothing = profile_collectives.in_step_seconds([_spend(now, 0.002), _spend(now, 0.0)], torch.device("cpu"),
                                                         None, repeats=5, sample=0.05)
    assert taken == pytest.approx(0.002)  # not the pair's 7 ms
    assert nothing < 1e-6
    assert agreed == [8, 10]  # the pairs per repeat: ceil(50 ms / 7 ms), ceil(50 ms / 5 ms), agreed over the group


def test_collectives_take_turns_so_a_burst_slows_one_repeat_of_each(monkeypatch):
    """Every call is timed once per round (a call with a third of the repeats every third round),
    so a burst of load lasting a few repeats lands on one repeat of many calls, and each call's
    trimmed mean drops it. Timed one call after the other, the same burst would take two of a's
    repeats, and the trimming drops one."""
    now, _ = _fake_clock(monkeypatch)
    order = []

    def call(name, seconds):
        def run():
            order.append(name)
            now[0] += seconds * (5 if 14 <= len(order) < 17 else 1)  # a burst: the 8th to 10th timed calls 5x slower
        return run

    rounds = profile_collectives.in_step_seconds([call("a", 0.001), call("b", 0.002), call("c", 0.004)],
                                                 torch.device("cpu"), None, repeats=[9, 9, 3], sample=0.0)
    assert rounds == pytest.approx([0.001, 0.002, 0.004])
    timed = order[6:]  # after two warm-up calls each
    assert timed[:3] == ["a", "b", "c"] and timed.count("a") == 9 and timed.count("c") == 3
    assert [i for i, name in enumerate(timed) if name == "c"] == [2, 9, 16]  # rounds 1, 4 and 7 of 9


def test_a_collective_is_timed_by_its_trimmed_mean():
    """A step pays the mean of its collectives, tail included; only the outer tenth is dropped."""
    slow_tail = [1.0] * 12 + [3.0, 3.0, 9.0]
    assert sampling.trimmed_mean(slow_tail) == pytest.approx((10 * 1.0 + 3.0) / 11)  # 2 dropped each side
    assert sampling.trimmed_mean([1.0, 2.0, 30.0]) == 2.0
    assert sampling.trimmed_mean([1.0, 3.0]) == 2.0


def _fake_clock(monkeypatch):
    """A clock only `_spend`'s calls and the 5 ms chunk advance; the group's barrier and agreement
    stand in (the agreed counts are recorded)."""
    import types

    now, agreed = [0.0], []
    from autopar.runtime import timing

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(profile_collectives, "_chunk", lambda device: _spend(now, 0.005))
    monkeypatch.setattr(profile_collectives.dist, "barrier", lambda group=None: None)
    monkeypatch.setattr(profile_collectives.dist, "all_reduce", lambda t, op=None, group=None: agreed.append(int(t)))
    return now, agreed


def _spend(now, seconds):
    def call():
        now[0] += seconds
    return call


def test_profile_command_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["profile", "--help"])
    assert info.value.code == 0 and "--quick" in capsys.readouterr().out


def test_spawned_ranks_that_run_too_long_are_stopped(tmp_path):
    with pytest.raises(AutoparError, match="still running after 0.5 s"):
        profiler.spawn(2, tmp_path / "c.json", quick=True, timeout=0.5, device="cpu")
    assert not (tmp_path / "c.json").exists()


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    """`autopar profile --quick --nproc 2`, run once for the tests below."""
    path = tmp_path_factory.mktemp("profile") / "cluster.json"
    code = main(["profile", "--out", str(path), "--nproc", "2", "--quick", "--timeout", "240", "--device", "cpu"])
    return code, path


def test_quick_profile_on_two_gloo_ranks(quick_profile):
    code, path = quick_profile
    assert code == 0
    cluster = Cluster.load(path)
    profile = cluster.profile
    assert cluster.num_devices == 2 and cluster.backend == "gloo" and profile.backend == "gloo"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert cluster.device.memory == ram // 2
    numbers = [profile.memory_bandwidth, profile.kernel_overhead] + [r.rate for r in profile.matmul] + [
        x for c in profile.collectives for x in (c.alpha, c.beta, c.residual)]
    assert all(math.isfinite(x) and x >= 0 for x in numbers)
    assert profile.memory_bandwidth > 0 and profile.kernel_overhead > 0 and all(r.rate > 0 for r in profile.matmul)
    assert {c.kind for c in profile.collectives if c.group_size == 2 and c.scope == "intra"} == set(PROFILED)
    assert all(c.alpha + (1 << 20) * c.beta > 0 for c in profile.collectives)
    assert {r.dtype for r in profile.matmul} >= {"fp32"}
    assert [s.group_size for s in profile.straggle] == [2] and math.isfinite(profile.straggle[0].share)
    assert all(len(c.sizes) == len(c.times) >= 2 and min(c.times) > 0 for c in profile.collectives)


def test_plan_on_the_profiled_cluster(quick_profile):
    cluster = Cluster.load(quick_profile[1])
    entry = autopar.models.get("gpt-tiny")
    inputs, target = entry.example_batch(8, device="meta")
    model = entry.build(device="meta")
    plans = {strategy: autopar.plan(model, cluster, example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                                    strategy=strategy) for strategy in ("dp", "auto")}
    for plan in plans.values():
        assert 0 < plan.cost.step_time < math.inf and plan.num_devices == 2
    assert plans["auto"].cost.step_time <= plans["dp"].cost.step_time * (1 + 1e-9)
