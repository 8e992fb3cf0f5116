"""Shared fixtures of the bad-input tests (`test_bad_input`, `test_bad_files`): a tiny MLP and
plans for it on one and on two CPU devices."""

import pytest

import autopar
from autopar import Cluster


@pytest.fixture(scope="module")
def mlp():
    """mlp-tiny (16 -> 64 -> 16, 2.1k parameters), a batch of 4, and its loss."""
    entry = autopar.models.get("mlp-tiny")
    inputs, target = entry.example_batch(4)
    return entry, inputs, target


@pytest.fixture(scope="module")
def plan_mlp(mlp):
    """autopar.plan for the MLP on a cluster, with options."""
    def plan(cluster, **options):
        entry, inputs, target = mlp
        return autopar.plan(entry.build(seed=0), cluster, example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                            time_limit=10, **options)
    return plan


@pytest.fixture(scope="module")
def plan2(plan_mlp):
    """A data-parallel plan for 2 devices: it has collectives, and each weight a placement per axis."""
    return plan_mlp(Cluster.preset("cpu", gpus_per_node=2), strategy="dp")


@pytest.fixture(scope="module")
def plan1(plan_mlp):
    return plan_mlp(Cluster.preset("cpu", gpus_per_node=1))
