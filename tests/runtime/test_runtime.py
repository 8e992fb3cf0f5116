"""What a compiled model offers besides training steps, and how it fails."""

import re
import time

import pytest
import torch

import autopar
from autopar.checks import random_plan, squeezed_plan
from autopar.testing import RankPool
from autopar.vocab import fmt


@pytest.mark.parametrize("strategy, world", [("tp", 2), ("fsdp", 4), ("dp+tp", 4)])
def test_state_dict_forward_and_dump(strategy, world, pools, tmp_path):
    (got,) = pools(world).run([{"call": "autopar.checks:check_runtime",
                                "kwargs": {"strategy": strategy, "dump": str(tmp_path)}}])
    assert "error" not in got, got.get("traceback")
    assert got["state"] == [] and got["extra"] == []    # whole tensors, the model's own keys
    assert got["forward"] == [] and got["load"] == []   # forward-only output; load_state_dict
    for rank in range(world):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert f"rank {rank} of {world}" in text
        assert re.search(r"(all_gather|all_reduce|reduce_scatter|all_to_all)\(axis \d, ranks \[[\d, ]+\], \S+ \S?B\)",
                         text), text[:2000]


def test_world_size_must_match_the_plan(pools):
    case = {"model": "mlp-tiny", "plan": squeezed_plan("mlp-tiny", 4)}
    (got,) = pools(2).run([case])
    assert "world size: found 2 process(es), required 4" in got["error"]


def test_a_plan_for_another_graph_is_refused(pools):
    case = {"model": "mlp-tiny", "batch": 4, "plan": squeezed_plan("mlp-tiny", 2)}  # planned for batch 8
    (got,) = pools(2).run([case])
    assert "plan: made for a graph with fingerprint" in got["error"]


def test_inputs_must_have_the_traced_shapes():
    entry = autopar.models.get("mlp-tiny")
    model = entry.build()
    inputs, target = entry.example_batch(8)
    compiled = autopar.compile(model, example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                               optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(ValueError, match=r"input 0: found \(4, 16\) torch.float32, required \(8, 16\)"):
        compiled.step(torch.randn(4, 16), target=target)
    with pytest.raises(ValueError, match="found no target"):
        compiled.step(*inputs)
    assert compiled.step(*inputs, target=target).shape == ()


def test_one_device_runs_no_placement_changes():
    """On one device every placement is the whole tensor: a plan's choices on a mesh of one (a
    batch split into one part) lower to no `Reshard` node between ops, each of which costs an
    autograd function run from Python both ways; nor does a parameter kept whole, whose gradient
    a split of one leaves partial over that one device (GPT's one-device step: 62.6 ms without
    those 63 nodes, 69.8 with them)."""
    from autopar.runtime.collectives import Reshard

    entry = autopar.models.get("llama-tiny")
    inputs, target = entry.example_batch(8)
    plan = autopar.Plan.from_json(random_plan("llama-tiny", 1, seed=0))
    assert any(fmt(p) != "R" for node in plan.stages[0].nodes.values() for p in node.outputs)  # splits of one
    compiled = autopar.compile(entry.build(seed=0), example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                               optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), plan=plan)
    params = set(compiled.captured.params)  # a sharded parameter's own gather is its storage level's
    assert not [m for m in compiled.program.modules() if isinstance(m, Reshard) and m.spec.label not in params]
    whole = {name for name, h in compiled.holders.items() if h.plan.level == 0}
    assert whole and not [m for m in compiled.program.modules() if isinstance(m, Reshard) and m.spec.label in whole]
    assert torch.isfinite(compiled.step(*inputs, target=target))


def test_a_rank_that_dies_is_named_and_nothing_hangs():
    start = time.monotonic()
    with RankPool(3, timeout=20) as pool:
        (got,) = pool.run([{"model": "mlp-tiny", "strategy": "dp", "batch": 6, "crash": {"rank": 1, "step": 2}}],
                          timeout=60)
    assert time.monotonic() - start < 90
    assert "rank 1 exited (code 17)" in got["errors"]
    survivors = [e for e in got["errors"] if e.startswith("RankFailure")]
    assert survivors and all("rank(s) 1 stopped" in e for e in survivors), got["errors"]


@pytest.mark.parametrize("strategy, leaves, optimizer, copies", [
    ("dp", 1, 2, 0),            # DDP: everything whole (Adam keeps two moments per element)
    ("zero1", 1 / 4, 2 / 4, 1),  # ZeRO: the optimizer's leaf and state sharded, a whole copy to compute with
    ("fsdp", 1 / 4, 2 / 4, 0),   # FSDP: nothing whole between steps
])
def test_storage_levels_shard_what_they_claim(strategy, leaves, optimizer, copies, pools):
    (got,) = pools(4).run([{"call": "autopar.checks:check_memory", "kwargs": {"strategy": strategy}}])
    assert "error" not in got, got.get("traceback")
    total = got["model"]
    # The runtime holds exactly what the plan claims ...
    assert {k: got[k] for k in ("leaves", "optimizer", "copies")} == got["claimed"]
    # ... and the plan claims the strategy's shares, up to 2%: the gpt-tiny tied embedding is
    # shared by two ops but stored once.
    assert got["leaves"] == pytest.approx(total * leaves, rel=0.02)
    assert got["optimizer"] == pytest.approx(total * optimizer, rel=0.02)
    assert got["copies"] == pytest.approx(total * copies, rel=0.02)
