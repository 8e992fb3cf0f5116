"""The Megatron-LM grid (`passes.grid`): which configurations it enumerates, and that `auto`, which
may choose everything the grid fixes, is never predicted slower than the grid's best."""

import pytest

import autopar
from autopar.passes.grid import grid
from autopar.passes.sharding import ShardingOptions
from autopar.planner import plan_graph


@pytest.fixture(scope="module")
def four_layers():
    entry = autopar.models.get("gpt-tiny")
    model = entry.build(device="meta", n_layers=4)
    inputs, target = entry.example_batch(16)
    return autopar.capture(model, inputs, loss_fn=entry.loss_fn, target=target)


def test_grid_enumerates_every_megatron_configuration(four_layers):
    cluster = autopar.Cluster.preset("h100", nodes=2, gpus_per_node=2)
    points = grid(four_layers, cluster, ShardingOptions(), batch=16)
    found = {(q.dp, q.tp, q.pp) for q in points}
    # tp inside a node (1 or 2); pp divides the rest and the 4 layers; a stage is part of a node or whole nodes
    assert found == {(4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)}
    assert {q.zero for q in points if q.pp == 1 and q.dp > 1} == {0, 1, 2, 3}
    assert {q.zero for q in points if q.pp > 1} <= {0, 1, 2} and {q.zero for q in points if q.dp == 1} == {0}
    assert all(16 // q.microbatches % q.dp == 0 for q in points)  # whole samples on each data-parallel rank
    assert {q.checkpoint for q in points} == {False, True}
    assert points == sorted(points, key=lambda q: (q.step_time, q.memory))


def test_auto_is_never_slower_than_the_grid(four_layers):
    for cluster in (autopar.Cluster.preset("h100", nodes=1, gpus_per_node=4),
                    autopar.Cluster.preset("h100", nodes=2, gpus_per_node=2)):
        best = grid(four_layers, cluster, ShardingOptions(), batch=16)[0]
        auto = plan_graph(four_layers, cluster, pipeline=True)
        assert auto.cost.step_time <= best.step_time * (1 + 1e-9), (cluster.describe(), best.describe())


def test_grid_respects_the_memory_budget(four_layers):
    cluster = autopar.Cluster.preset("h100", nodes=1, gpus_per_node=4)
    everything = grid(four_layers, cluster, ShardingOptions(), batch=16)
    budget = sorted(q.memory for q in everything)[len(everything) // 2]
    fitting = grid(four_layers, cluster, ShardingOptions(memory_budget=budget), batch=16)
    assert fitting and len(fitting) < len(everything) and all(q.memory <= budget for q in fitting)
