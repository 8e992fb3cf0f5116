"""Measured op times (`cost.ops`): which clusters get them, how they are scaled and shared, and the
per-layer latency share of grouped (ZeRO/FSDP) parameters."""

import dataclasses

import pytest
import torch

import autopar
from autopar.capture import capture
from autopar.cost import ops, sampling, timers
from autopar.passes.rules import tensor_args
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


class FixedTimer:
    """A node timer that answers fixed times and samples nothing."""

    samplers = []
    setup = 0.0

    def __init__(self, forward, backward):
        self.times = (forward, backward)

    def seconds(self, grad_call):
        return self.times


class FixedReference:
    """`ops._Fixed` with fixed answers: matmul scale 2, memory scale 3."""

    samplers = []

    def __init__(self, profile, device, optimizer):
        pass

    def scales(self):
        return 2.0, 3.0

    def grad_call(self):
        return 0.0

    def update(self):
        return 1e-9, 1e-5

    def reshard(self):
        return 1e-6


def test_times_are_scaled_to_the_profiled_device(monkeypatch):
    """Nodes that compute scale by the matmul ratio, the others by the bandwidth ratio; one timing
    per distinct op and shapes."""
    calls = []
    monkeypatch.setattr(ops, "_Fixed", FixedReference)
    monkeypatch.setattr(ops, "node_timer", lambda node, grad, device, wanted, half=False: FixedTimer(6e-4, 1e-3) if half
                        else calls.append(node.name) or FixedTimer(1e-3, 2e-3))
    captured = mlp_graph()
    times = ops._measure(captured, make_profile(), "adamw", budget=60.0)
    assert times.nodes and set(times.nodes) == set(calls)
    for name, (forward, backward) in times.nodes.items():
        scale = 2.0 if captured.nodes[name].flops else 3.0
        assert (forward, backward) == pytest.approx((1e-3 * scale, 2e-3 * scale))
        if name in times.fixed:  # 2 · half − whole, scaled alike
            assert times.fixed[name] == pytest.approx((2e-4 * scale, 0.0))
    assert times.fixed and set(times.fixed) <= set(times.nodes)
    assert (times.update, times.per_tensor, times.reshard) == pytest.approx((3e-9, 3e-5, 3e-6))
    # every aten op the runtime runs is timed, views too (their dispatch, a reshape's copy)
    from autopar.passes.units import roles
    ran = {n.name for n in captured.program.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
           and n.name in captured.nodes and n.name not in roles(captured).ignored}
    assert set(times.nodes) == ran
    assert any(not (captured.nodes[n].flops or captured.nodes[n].bytes_moved) for n in times.nodes)


def test_nodes_and_references_are_sampled_in_turns(monkeypatch):
    """Every round samples every distinct node and the reference kernels once, so that a drift
    of the machine's speed lands on one sample of many timings, not on every sample of a few."""
    order = []

    class Recorded(sampling.Sampler):
        def sample(self):
            order.append(self.name)
            super().sample()

    def named(name):
        sampler = Recorded(lambda: None, torch.device("cpu"), least=0.0)
        sampler.name = name
        return sampler

    rounds = sampling.in_turns([named("a"), named("b"), named("c")], 4)
    assert rounds == 4 and order == ["a", "b", "c"] * 4
    order.clear()
    assert sampling.in_turns([named("a"), named("b")], 4, deadline=0.0) == 1 and order == ["a", "b"]

    seen = []
    monkeypatch.setattr(ops, "in_turns", lambda samplers, rounds, deadline, warm: seen.append((samplers, rounds)))
    monkeypatch.setattr(ops, "_Fixed", FixedReference)
    FixedReference.samplers = ["reference"]
    monkeypatch.setattr(ops, "node_timer", lambda node, grad, device, wanted, half=False: FixedTimer(1e-3, 0.0) if
                        seen.append(node.name) is None else None)
    try:
        ops._measure(mlp_graph(), make_profile(), "adamw", budget=60.0)
    finally:
        FixedReference.samplers = []
    (samplers, rounds), = [s for s in seen if isinstance(s, tuple)]
    assert rounds == timers.ROUNDS and samplers == ["reference"]  # the fake timers bring no samplers


def test_a_sample_lasts_long_enough_and_the_mean_drops_the_outer_tenth():
    sampler = sampling.Sampler(lambda: sum(range(100)), torch.device("cpu"), least=0.002)
    assert sampler.calls > 1
    sampling.in_turns([sampler], 5)
    assert len(sampler.samples) == 5 and 0 < sampler.seconds() < 0.002
    sampler.samples = [1.0] * 8 + [100.0]
    assert sampler.seconds() == 1.0


def test_a_sampler_counts_its_calls_from_a_warm_call():
    """A first call that loads kernels (here: sleeps 50 ms once) neither sets how many calls a
    sample times nor lands in a sample; it is kept apart as `first`."""
    import time

    state = {"cold": True}

    def call():
        if state.pop("cold", False):
            time.sleep(0.05)
        return sum(range(100))

    sampler = sampling.Sampler(call, torch.device("cpu"), least=0.002)
    assert sampler.first >= 0.05 and sampler.calls > 10
    sampling.in_turns([sampler], 3)
    assert sampler.seconds() < 1e-3


def test_a_warm_round_is_dropped():
    """On a GPU the nodes' rounds start with one whose samples are dropped: the first plan of a
    process on an H100 read 46.4 ms against 33.9 for the next without it."""
    calls = []
    sampler = sampling.Sampler(lambda: calls.append(1), torch.device("cpu"), least=0.0)
    before = len(calls)
    assert sampling.in_turns([sampler], 3, warm=True) == 3
    assert len(sampler.samples) == 3 and len(calls) - before == 4 * sampler.calls


def test_one_grad_call_runs_several_small_nodes_and_pays_its_start_once():
    """A small op's backward sample runs the op k times (copies of its inputs, then the same
    inputs as new leaves) under one `torch.autograd.grad`, so g, the call's own start, is divided
    by k: backward = (both − g) / k − forward."""
    node = next(n for n in mlp_graph().program.graph.nodes if str(n.target) == "aten.relu.default")
    timer = timers.node_timer(node, True, torch.device("cpu"))
    assert timer.together == timers.COPIES  # a relu of 8 × 32 floats: far below a sample's time
    inputs, leaves = timers._aliased(((torch.ones(3, requires_grad=True),), {}))
    assert leaves[0] is inputs[0][0] and leaves[0].is_leaf and leaves[0].requires_grad
    forward, both = (sampling.Sampler(lambda: None, torch.device("cpu")) for _ in range(2))
    forward.samples, both.samples = [1e-6], [100e-6]
    assert timers.NodeTimer(forward, both, together=8).seconds(20e-6) == pytest.approx((1e-6, 9e-6))


def test_first_calls_do_not_count_against_the_timing_budget():
    """Preparing stops at budget / ROUNDS seconds of preparing, first calls (kernel loads) excused."""
    import time

    spent = ops._Budget(0.07)  # 10 ms of preparing
    time.sleep(0.02)
    assert not spent.left()
    spent.add(FixedTimer(0.0, 0.0), None)
    assert not spent.left()
    loaded = FixedTimer(0.0, 0.0)
    loaded.setup = 0.02
    spent.add(loaded)
    assert spent.left() and spent.deadline() >= spent.start + 0.07 + 0.02


def test_the_fixed_cost_of_a_grad_call_is_taken_out_of_each_backward():
    """A step runs one backward over every node: the engine's start, timed once, is not a node's."""
    cpu = torch.device("cpu")
    fixed = ops._Fixed(make_profile(), cpu, "adamw")
    sampling.in_turns(fixed.samplers, 3)
    assert 0 < fixed.grad_call() < 1e-3
    node = next(n for n in mlp_graph().program.graph.nodes if str(n.target) == "aten.linear.default")
    forward, whole = timers.time_node(node, True, cpu)
    assert forward > 0 and whole > 0
    assert timers.time_node(node, True, cpu, grad_call=1.0) == (pytest.approx(forward, rel=1.0), 0.0)  # clamped


def test_backward_is_timed_for_the_gradients_the_step_computes(monkeypatch):
    """The first linear reads the user's batch, which needs no gradient: its backward is timed
    as the weight's and bias's gradients only (one matmul, not two)."""
    wanted, asked, time_node = {}, [], timers.time_node

    def timed(node, requires_grad, device, want, half=False):
        wanted[node.name] = want
        return FixedTimer(1e-3, 2e-3)

    monkeypatch.setattr(ops, "_Fixed", FixedReference)
    monkeypatch.setattr(ops, "node_timer", timed)
    captured = mlp_graph()
    ops._measure(captured, make_profile(), "adamw", budget=60.0)
    graph = captured.program.graph
    first = next(n for n in graph.nodes if str(n.target) == "aten.linear.default")
    batch, weight = first.args[:2]
    assert batch.name in captured.program.graph_signature.user_inputs
    assert wanted[first.name] == {a.name for a in first.args[1:]}
    later = [n for n in graph.nodes if str(n.target) == "aten.linear.default"][1]
    assert later.args[0].name in wanted[later.name]  # an activation: its gradient flows back

    monkeypatch.undo()
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda outputs, inputs, *a, **k: asked.append(
        [tuple(t.shape) for t in inputs]) or real(outputs, inputs, *a, **k))
    time_node(first, True, torch.device("cpu"), wanted=frozenset({weight.name}))
    # each call differentiates the weight of every run it holds (`timers.node_timer`'s k), never the batch
    assert asked and all(shapes and set(shapes) == {tuple(weight.meta["val"].shape)} for shapes in asked)


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


def test_a_node_timed_on_half_its_batch_gives_what_a_split_does_not_shrink():
    """A small matmul runs below a large one's rate and every call pays its dispatch: the time a
    node keeps whatever its split is 2 · t(half its leading dim) − t(whole), between 0 and t."""
    captured = mlp_graph()
    times = ops.op_times(captured, make_profile(), "adamw")
    linears = [n for n in times.nodes if captured.nodes[n].op == "aten.linear.default"]
    assert linears and set(linears) <= set(times.fixed)
    for name, fixed in times.fixed.items():
        assert all(0.0 <= f <= t for f, t in zip(fixed, times.nodes[name]))
    loss = next(n for n in captured.program.graph.nodes if str(n.target) == "aten.mse_loss.default")
    assert timers.leading(loss) is None  # a scalar output: nothing to halve
    assert timers.node_timer(loss, True, torch.device("cpu"), half=True) is None


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
    own = (4e-4, 1e-3)  # the node's own fixed part, timed on half its batch
    expected = 4e-4 + (1e-3 - 4e-4) / 4 + 1e-3 + (3e-3 - 1e-3) / 4
    assert local_time(info, split, (4,), None, "fp32", profile, measured, own) == pytest.approx(expected)


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


def test_a_matmul_is_timed_on_the_shards_each_split_gives_it():
    """Every split a linear's rules allow on the mesh is timed on the shard shapes one device
    runs (a row-parallel linear on half its inner dim, not half its batch), once per distinct
    shapes, and the planner takes that as the split's share outright."""
    captured = mlp_graph()
    profile = make_profile()
    problem = build_problem(captured, LogicalMesh(shape=(2,), devices=(0, 1)),
                            dataclasses.replace(autopar.Cluster.preset("cpu", gpus_per_node=2), profile=profile))
    ctx = problem.context
    linear = next(n for n, i in captured.nodes.items() if i.op == "aten.linear.default")
    x, w, *b = (tuple(a.meta["val"].shape) for a in tensor_args(ctx.fx_nodes[linear]))
    row = ((x[0], x[1] // 2), (w[0], w[1] // 2), *b)  # the inner dim split: a partial sum
    column = (x, (w[0] // 2, w[1]), *((n // 2,) for n, in b))
    batch = ((x[0] // 2, x[1]), w, *b)
    timed = {shapes for name, shapes, _ in ctx.shards if name == linear}
    assert {row, column, batch} <= timed and (x, w, *b) not in timed
    assert all(f > 0 and bw > 0 for f, bw in ctx.shards.values())
    before = len(ops._SHARDS)
    kernel = next(split for name, shapes, split in ctx.shards if name == linear and shapes == row)
    again = ops.shard_times(captured, profile, {linear: {(row, kernel)}}, (2,))
    assert len(ops._SHARDS) == before  # timed once
    assert again[(linear, row, kernel)] == ctx.shards[(linear, row, kernel)]
    info = captured.nodes[linear]
    split = NodeSharding(inputs=(), outputs=((Shard(0),),))
    assert local_time(info, split, (2,), None, "fp32", profile, (1.0, 1.0), None, (2e-4, 5e-4)) == pytest.approx(7e-4)


def test_a_shard_keeps_the_order_its_dims_lie_in_memory():
    transposed = torch.empty(6, 4).t()  # shape (4, 6), strides (1, 4)
    assert timers.strides_in_order(transposed.stride(), (4, 3)) == (1, 4)
    assert timers.strides_in_order((12, 4, 1), (2, 3, 2)) == (6, 2, 1)
    value = torch.empty(8, 4, device="meta").t()
    assert timers.real(value, torch.device("cpu"), shape=(2, 8)).stride() == (1, 2)


def test_the_fixed_part_is_what_every_microbatch_pays_whole():
    from autopar.passes.strategies import fixed_time

    captured = mlp_graph()
    info = next(i for i in captured.nodes.values() if i.op == "aten.linear.default" and i.requires_grad)
    profile = make_profile(kernel_overhead=1e-5)
    assert fixed_time(info, 1.0, profile, None, None) == 0.0  # priced from FLOPs and bytes: no measure of it
    assert fixed_time(info, 1.0, profile, (1e-3, 2e-3), None) == pytest.approx(2e-5)  # the profile's overhead, twice
    assert fixed_time(info, 1.0, profile, (1e-3, 2e-3), (3e-4, 5e-4)) == pytest.approx(8e-4)
    assert fixed_time(info, 6e-4, profile, (1e-3, 2e-3), (3e-4, 5e-4)) == pytest.approx(6e-4)  # never above the share


def test_a_split_that_runs_a_kernel_of_the_runtime_is_timed_as_that_kernel():
    """A vocabulary-parallel cross-entropy (max, exponentials, masks, its own backward) is not the
    op's share: the planner times the runtime's kernel on the shards, its collectives left out
    (they are priced apart), as rank 0 runs it."""
    entry = autopar.models.get("gpt-tiny")
    inputs, target = entry.example_batch(4, seed=0)
    captured = capture(entry.build(seed=0, n_layers=1), inputs, loss_fn=entry.loss_fn, target=target)
    problem = build_problem(captured, LogicalMesh(shape=(2,), devices=(0, 1)),
                            dataclasses.replace(autopar.Cluster.preset("cpu", gpus_per_node=2), profile=make_profile()))
    kernels = {(name, split.kinds) for name, _, split in problem.context.shards if split is not None}
    loss = next(n for n, i in captured.nodes.items() if i.op == "aten.cross_entropy_loss.default")
    assert (loss, ("vocab_cross_entropy",)) in kernels
    assert any(kinds == ("partial_bias",) for _, kinds in kernels)  # a row-parallel linear's bias on one rank
    assert all(f > 0 for (_, _, split), (f, b) in problem.context.shards.items() if split is not None)


def test_a_partial_value_does_not_divide_the_work_of_an_op_on_it():
    """P + P → P (a residual stream kept as partial sums) adds whole tensors on every device."""
    from torch.distributed.tensor import Partial

    from autopar.passes.strategies import parts

    assert parts(NodeSharding(inputs=((Partial(),), (Partial(),)), outputs=((Partial(),),)), (2,)) == 1
    assert parts(NodeSharding(inputs=((Shard(1),), (Shard(0),)), outputs=((Partial(),),)), (2,)) == 2
    assert parts(NodeSharding(inputs=((Shard(0), Partial()),), outputs=((Shard(0), Partial()),)), (2, 4)) == 2
