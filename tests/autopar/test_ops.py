"""Measured op times (`cost.ops`): which clusters get them, how they are scaled and shared, and the
per-layer latency share of grouped (ZeRO/FSDP) parameters."""

import pytest
import torch

import autopar
from autopar.capture import capture
from autopar.cost import ops
from autopar.passes.sharding import build_problem
from autopar.passes.strategies import NodeSharding, local_time
from autopar.vocab import LogicalMesh
from torch.distributed.tensor import Replicate, Shard

from autopar.cost.profile import MatmulRate, Profile


def make_profile(**change):
    base = dict(backend="gloo", memory_bandwidth=20e9, kernel_overhead=2e-6, collectives=(),
                matmul=(MatmulRate(dtype="fp32", m=512, k=512, n=512, rate=50e9),))
    return Profile(**{**base, **change})


def mlp_graph():
    entry = autopar.models.get("mlp-tiny")
    inputs, target = entry.example_batch(8, seed=0)
    return capture(entry.build(seed=0), inputs, loss_fn=entry.loss_fn, target=target)


def test_only_a_profile_of_a_device_this_machine_has_is_measured():
    assert not ops.measurable(None)
    assert ops.measurable(make_profile(backend="gloo"))
    assert ops.measurable(make_profile(backend="nccl")) == torch.cuda.is_available()
    assert ops.op_times(mlp_graph(), None, "adamw") is None


def test_times_are_scaled_to_the_profiled_device(monkeypatch):
    """Nodes that compute scale by the matmul ratio, the others by the bandwidth ratio; one timing
    per distinct op and shapes."""
    calls = []
    monkeypatch.setattr(ops, "_scales", lambda profile, device: (2.0, 3.0))
    monkeypatch.setattr(ops, "_time_node", lambda node, grad, device, grad_call, wanted: calls.append(node.name) or (1e-3, 2e-3))
    monkeypatch.setattr(ops, "_time_update", lambda optimizer, device, sizes: 1e-9 * sum(sizes) + 1e-5 * len(sizes))
    captured = mlp_graph()
    times = ops._measure(captured, make_profile(), "adamw", budget=60.0)
    assert times.nodes and set(times.nodes) == set(calls)
    for name, (forward, backward) in times.nodes.items():
        scale = 2.0 if captured.nodes[name].flops else 3.0
        assert (forward, backward) == pytest.approx((1e-3 * scale, 2e-3 * scale))
    assert times.update == pytest.approx(3e-9 + 1e-5 / ops._ELEMENTS * 3)
    assert times.per_tensor == pytest.approx(3 * (1e-5 - 1e-5 / ops._ELEMENTS * 64))
    # every aten op the runtime runs is timed, views too (their dispatch, a reshape's copy)
    from autopar.passes.units import roles
    ran = {n.name for n in captured.program.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
           and n.name in captured.nodes and n.name not in roles(captured).ignored}
    assert set(times.nodes) == ran
    assert any(not (captured.nodes[n].flops or captured.nodes[n].bytes_moved) for n in times.nodes)


def test_the_fixed_cost_of_a_grad_call_is_taken_out_of_each_backward():
    """A step runs one backward over every node: the engine's start, timed once, is not a node's."""
    cpu = torch.device("cpu")
    fixed = ops._grad_call(cpu)
    assert 0 < fixed < 1e-3
    node = next(n for n in mlp_graph().program.graph.nodes if str(n.target) == "aten.linear.default")
    forward, whole = ops._time_node(node, True, cpu)
    assert forward > 0 and whole > 0
    assert ops._time_node(node, True, cpu, grad_call=1.0) == (pytest.approx(forward, rel=1.0), 0.0)  # clamped


def test_backward_is_timed_for_the_gradients_the_step_computes(monkeypatch):
    """The first linear reads the user's batch, which needs no gradient: its backward is timed
    as the weight's and bias's gradients only (one matmul, not two)."""
    wanted, asked, time_node = {}, [], ops._time_node

    def timed(node, requires_grad, device, grad_call, want):
        wanted[node.name] = want
        return 1e-3, 2e-3

    monkeypatch.setattr(ops, "_scales", lambda profile, device: (1.0, 1.0))
    monkeypatch.setattr(ops, "_time_node", timed)
    captured = mlp_graph()
    ops._measure(captured, make_profile(), "adamw", budget=60.0)
    graph = captured.program.graph
    first = next(n for n in graph.nodes if str(n.target) == "aten.linear.default")
    batch, weight = first.args[:2]
    assert batch.name in captured.program.graph_signature.user_inputs
    assert wanted[first.name] == {a.name for a in first.args[1:]}
    later = [n for n in graph.nodes if str(n.target) == "aten.linear.default"][1]
    assert later.args[0].name in wanted[later.name]  # an activation: its gradient flows back

    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda outputs, inputs, *a, **k: asked.append(
        [tuple(t.shape) for t in inputs]) or real(outputs, inputs, *a, **k))
    time_node(first, True, torch.device("cpu"), wanted=frozenset({weight.name}))
    assert asked and all(shapes == [tuple(weight.meta["val"].shape)] for shapes in asked)


def test_real_timings_of_a_small_graph():
    captured = mlp_graph()
    profile = make_profile()
    times = ops.op_times(captured, profile, "adamw")
    assert ops.op_times(captured, profile, "adamw") is times  # timed once
    linears = [n for n in times.nodes if captured.nodes[n].op == "aten.linear.default"]
    assert linears and all(times.nodes[n][0] > 0 and times.nodes[n][1] > 0 for n in linears)
    assert times.update is not None and 0 < times.update < 1e-6  # seconds per element of an AdamW step
    assert 0 < times.per_tensor < 1e-3  # and per parameter tensor: a dozen small kernels
    assert 0 < times.reshard < 1e-3  # a placement-change node: an autograd function run from Python
    assert all(f >= 0 and b >= 0 for f, b in times.nodes.values())


def test_a_measured_node_shares_its_time_but_not_the_fixed_overhead():
    captured = mlp_graph()
    info = next(i for i in captured.nodes.values() if i.op == "aten.linear.default")
    profile = make_profile(kernel_overhead=1e-5)
    whole = NodeSharding(inputs=(), outputs=((Replicate(),),))
    split = NodeSharding(inputs=(), outputs=((Shard(0),),))
    measured = (1e-3, 3e-3)
    assert local_time(info, whole, (1,), None, "fp32", profile, measured) == pytest.approx(4e-3)
    expected = 2 * 1e-5 + (1e-3 - 1e-5) / 4 + (3e-3 - 1e-5) / 4
    assert local_time(info, split, (4,), None, "fp32", profile, measured) == pytest.approx(expected)


def test_grouped_parameters_share_one_latency_per_layer():
    entry = autopar.models.get("gpt-tiny")
    inputs, target = entry.example_batch(4, device="meta")
    captured = capture(entry.build(device="meta"), inputs, loss_fn=entry.loss_fn, target=target)
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=2)
    problem = build_problem(captured, LogicalMesh(shape=(2,), devices=(0, 1)), cluster)
    mates = problem.context.layer_mates
    trainable = [p for p, name in problem.context.roles.params.items() if captured.params[name].requires_grad]
    assert set(mates) == set(trainable)
    groups = sum(1 / m for m in mates.values())
    layers = len(captured.layers)
    assert groups == pytest.approx(round(groups)) and layers + 1 <= round(groups) <= layers + 2
    per_layer = {m for p, m in mates.items() if captured.nodes[next(
        n for n in problem.context.fx_nodes if problem.context.fx_nodes[n].op == "call_function"
        and p in [a.name for a in problem.context.fx_nodes[n].all_input_nodes])].layer is not None}
    assert len(per_layer) == 1 and per_layer.pop() > 4  # every block holds the same parameters
