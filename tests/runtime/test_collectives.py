"""Placement changes on real gloo ranks: every pair on a 2×2 mesh, and the steps the cost model prices."""

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.passes.reshard import steps
from autopar.vocab import P, R, S


def test_every_placement_change_on_a_2x2_mesh(pools):
    (failures,) = pools(4).run([{"call": "autopar.checks:check_transforms"}])
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


@pytest.mark.parametrize("model, strategy", [("gpt-tiny", "tp"), ("llama-tiny", "tp"), ("gpt-tiny", "dp")])
def test_the_plan_lists_the_reshards_a_step_runs(model, strategy, pools):
    # Attention's q, k and v (and Llama's gate and up) read one normalized tensor: the runtime runs
    # one reshard for all its readers, and sums their gradients before one all-reduce back. GPT's
    # data-parallel step runs none between ops: its head's share of the tied embedding's gradient
    # and its position embedding's gradient stay partial for the one bucketed all-reduce.
    (got,) = pools(2).run([{"call": "autopar.checks:collective_counts",
                            "kwargs": {"model": model, "strategy": strategy}}])
    assert "error" not in got, got.get("traceback")
    assert (got["planned"].get("all_reduce", 0) > 0) == (strategy == "tp")
    for kind in set(got["planned"]) | set(got["blocking"]):
        assert got["blocking"].get(kind, 0) == got["planned"].get(kind, 0), (kind, got)


@pytest.mark.parametrize("src, dst", [((P,), (R,)), ((Partial("avg"),), (R,)), ((S(0),), (R,)), ((S(1),), (R,)),
                                      ((P,), (S(0),)), ((P,), (S(1),)), ((Partial("avg"),), (S(1),)),
                                      ((S(0),), (S(1),))])
def test_the_copies_a_reshard_makes_are_the_ones_priced(monkeypatch, src, dst):
    """`runtime.collectives.transform` run on rank 0 of 2 with the collectives standing in: the
    bytes its local ops read and write are `passes.reshard.staging_bytes` of its steps, what the
    cost model adds to each collective's time."""
    import torch
    import torch.distributed as dist
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    from autopar.passes.reshard import staging_bytes
    from autopar.runtime.collectives import transform
    from autopar.runtime.world import World
    from autopar.vocab import LogicalMesh, shard_count

    for name in ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_to_all_single"):
        monkeypatch.setattr(dist, name, lambda *args, **kwargs: None)
    mesh = LogicalMesh(shape=(2,), devices=(0, 1))
    world = World(rank=0, size=2, device=torch.device("cpu"), mesh=mesh, coordinate=(0,), groups=[None])
    whole = (8, 16, 32)
    local = torch.randn([n // shard_count(src, mesh.shape, d) for d, n in enumerate(whole)])

    allocating = {torch.ops.aten.new_empty, torch.ops.aten.empty_like, torch.ops.aten.empty}

    class Traffic(TorchDispatchMode):
        """Bytes read and written by ops that write new memory (not views, not bare allocations)."""
        moved = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            read = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)}
            for t in pytree.tree_leaves(out):
                if (isinstance(t, torch.Tensor) and func.overloadpacket not in allocating
                        and t.untyped_storage().data_ptr() not in read):
                    Traffic.moved += 2 * t.nbytes  # written, and as many read
            return out

    with Traffic():
        transform(local, src, dst, world)
    (step,) = steps(src, dst)
    assert Traffic.moved == staging_bytes(step, local.nbytes, 2)


def test_a_collective_costs_its_copies_too():
    """An all-reduce's clone and an all-to-all's stack and join are in the reshard's time; an
    all-gather on dim 0 copies nothing."""
    from autopar.cluster import Cluster
    from autopar.cost.comm import CommModel
    from autopar.passes.reshard import Resharder
    from autopar.vocab import LogicalMesh

    comm = CommModel(Cluster.preset("cpu", gpus_per_node=2))
    resharder = Resharder(LogicalMesh(shape=(2,), devices=(0, 1)), comm)
    n = 2 ** 20
    assert resharder.time((P,), (R,), n) == pytest.approx(comm.time("all_reduce", n, [0, 1]) + comm.copy_time(2 * n))
    assert resharder.time((S(0),), (S(1),), n) == pytest.approx(
        comm.time("all_to_all", n / 2, [0, 1]) + comm.copy_time(4 * n / 2))
    assert resharder.time((S(0),), (R,), n) == pytest.approx(comm.time("all_gather", n, [0, 1]))  # dim 0: no copy
    # At the device's effective memory bandwidth: reading and writing 2n bytes (no profile: no kernel overhead).
    device = comm.cluster.device
    assert comm.copy_time(2 * n) == pytest.approx(2 * n / (device.memory_bandwidth * device.bandwidth_efficiency))
