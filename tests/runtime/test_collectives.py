"""Placement changes on real gloo ranks: every pair on a 2×2 mesh, and the steps the cost model prices."""

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.passes.reshard import steps
from autopar.vocab import P, R, S


def test_every_placement_change_on_a_2x2_mesh(pools):
    (failures,) = pools(4).run([{"call": "autopar.testing:check_transforms"}])
    assert failures == []


def test_nested_shards_gather_inner_first_and_cut_outer_first():
    # (S(0), S(0)) → (R, S(0)): the inner piece sits inside the outer one, so both are gathered,
    # then the inner axis cuts anew.
    assert [(s.kind, s.axis) for s in steps((S(0), S(0)), (R, S(0)))] == [
        ("all_gather", 1), ("all_gather", 0), ("cut", 1)]
    # A reduce-scatter that an outer cut of the same dim must precede becomes all-reduce and cut.
    assert [(s.kind, s.axis) for s in steps((R, P), (S(0), S(0)))] == [("all_reduce", 1), ("cut", 0), ("cut", 1)]


def test_simple_changes_are_one_collective():
    assert [s.kind for s in steps((S(0),), (S(1),))] == ["all_to_all"]
    assert [s.kind for s in steps((P,), (S(1),))] == ["reduce_scatter"]
    assert [s.kind for s in steps((S(2),), (Partial(),))] == ["pad"]
    assert [s.kind for s in steps((Replicate(),), (Shard(0),))] == ["cut"]
    assert steps((S(0), R), (S(0), R)) == []


@pytest.mark.parametrize("model, strategy", [("gpt-tiny", "tp"), ("llama-tiny", "tp")])
def test_the_plan_lists_the_reshards_a_step_runs(model, strategy, pools):
    # Attention's q, k and v (and Llama's gate and up) read one normalized tensor: the runtime runs
    # one reshard for all its readers, and sums their gradients before one all-reduce back.
    (got,) = pools(2).run([{"call": "autopar.testing:collective_counts",
                            "kwargs": {"model": model, "strategy": strategy}}])
    assert "error" not in got, got.get("traceback")
    assert got["planned"].get("all_reduce", 0) > 0
    for kind, count in got["planned"].items():
        assert got["blocking"].get(kind, 0) == count, (kind, got)
