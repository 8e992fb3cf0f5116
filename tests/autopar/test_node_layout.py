"""`Cluster.local()` reads nodes and devices per node from torchrun's environment, and says which
variable is wrong when they disagree."""

import re

import pytest
import torch.distributed as dist

from autopar import Cluster
from autopar.presets import node_layout


def torchrun_env(*, rank: int, local_rank: int, group_rank: int, world: int, per_node: int, nodes: int) -> dict:
    """What torchrun sets for one worker."""
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "GROUP_RANK": str(group_rank),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(per_node), "GROUP_WORLD_SIZE": str(nodes),
            "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world)}


def test_two_nodes_of_two():
    for rank in range(4):
        env = torchrun_env(rank=rank, local_rank=rank % 2, group_rank=rank // 2, world=4, per_node=2, nodes=2)
        assert node_layout(env, 4) == (2, 2)


def test_without_torchrun_variables_one_node_holds_the_world():
    assert node_layout({}, 4) == (1, 4)
    assert node_layout({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"}, 4) == (1, 4)


@pytest.mark.parametrize(("env", "world", "message"), [
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "3"}, 4, "LOCAL_WORLD_SIZE: found 3, required a divisor of WORLD_SIZE=4"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "0"}, 4, "LOCAL_WORLD_SIZE: found 0"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "two"}, 4, "LOCAL_WORLD_SIZE: found 'two', required an integer"),
    ({"WORLD_SIZE": "8"}, 4, "WORLD_SIZE: found 8, required 4"),
    # nodes of 2 and 4 processes, seen from the node of 2 (the node of 4 fails the divisor check)
    (torchrun_env(rank=0, local_rank=0, group_rank=0, world=6, per_node=2, nodes=2), 6,
     "GROUP_WORLD_SIZE × LOCAL_WORLD_SIZE: found 2 × 2 = 4, required WORLD_SIZE=6 (nodes of unequal sizes"),
    (torchrun_env(rank=1, local_rank=0, group_rank=1, world=4, per_node=2, nodes=2), 4,
     "RANK: found 1, required GROUP_RANK × LOCAL_WORLD_SIZE + LOCAL_RANK = 1 × 2 + 0 = 2"),
])
def test_inconsistent_variables_are_named(env, world, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        node_layout(env, world)


def test_local_cluster_spans_the_nodes_torchrun_reports(monkeypatch):
    env = torchrun_env(rank=2, local_rank=0, group_rank=1, world=4, per_node=2, nodes=2)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as if torchrun's world were joined
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    cluster = Cluster.local()
    assert (cluster.nodes, cluster.devices_per_node) == (2, 2)
    assert [cluster.node_of(d) for d in range(4)] == [0, 0, 1, 1]


def test_local_cluster_refuses_a_bad_launch_before_joining(monkeypatch):
    env = torchrun_env(rank=0, local_rank=0, group_rank=0, world=6, per_node=2, nodes=2)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="nodes of unequal sizes"):
        Cluster.local()  # raises before init_process_group, which would wait for 6 ranks
    assert not dist.is_initialized()
