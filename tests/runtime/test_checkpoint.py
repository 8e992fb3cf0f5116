"""Checkpoints: saved under one plan and world size, loaded under another, training goes on as if never stopped.

A zoo model trains k steps under plan A (gloo ranks), is saved, then is compiled under plan B on
another number of ranks, loaded, and trains on: the losses of all steps equal the single-device
run's (fp32 rtol 1e-5, fp64 rtol 1e-10 with every parameter within rtol 1e-8, as in
`test_equivalence`). Then what must be refused: another model's checkpoint, a missing or
half-written one, and files crafted to run code.
"""

import itertools
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from autopar.runtime.checkpoint_format import CheckpointError, box
from autopar.runtime.restarts import Checkpoints
from autopar.checks import pipeline_plan
from autopar.testing import differences, run_case


@pytest.mark.parametrize("shape", [(8, 6), (7, 5), (3, 2)])
def test_a_ranks_part_is_the_box_the_runtime_cuts(shape):
    """`box` against nested `torch.chunk`, outer mesh axis first (what `collectives.transform` cuts),
    on a 2×3 mesh, even and uneven sizes, one dim cut by both axes too."""
    whole = torch.arange(math.prod(shape)).reshape(shape)
    for placements in itertools.product([Replicate(), Shard(0), Shard(1)], repeat=2):
        for coordinate in itertools.product(range(2), range(3)):
            piece = whole
            for axis, p in enumerate(placements):
                if isinstance(p, Shard):
                    chunks = piece.chunk((2, 3)[axis], p.dim)
                    index = coordinate[axis]
                    piece = chunks[index] if index < len(chunks) else piece.narrow(p.dim, 0, 0)
            offsets, sizes = box(shape, placements, (2, 3), coordinate)
            assert sizes == tuple(piece.shape)
            expected = whole[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
            assert torch.equal(piece, expected), (placements, coordinate)


def resumed(first: dict, second: dict) -> dict:
    """The second run's result with the first run's losses in front: the whole run's losses."""
    assert "error" not in first, first.get("traceback")
    return {**second, "losses": first["losses"] + second.get("losses", [])}


def check(case, got, *, parameters: bool):
    problems = differences(case, got, parameters=parameters)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fsdp_on_4_ranks_resumes_as_tp_on_2(dtype, pools, tmp_path):
    first = {"model": "gpt-tiny", "strategy": "fsdp", "steps": 2, "dtype": dtype, "save": str(tmp_path / "ck")}
    second = {"model": "gpt-tiny", "strategy": "tp", "steps": 4, "dtype": dtype, "load": str(tmp_path / "ck")}
    (a,) = pools(4).run([first])
    (b,) = pools(2).run([second])
    assert b.get("strategy") == "tp", b.get("traceback")
    check(second, resumed(a, b), parameters=dtype == "float64")


def test_a_pipelined_plan_resumes_as_dp(pools, tmp_path):
    """2 stages of 2 ranks (tensor parallel inside, 1F1B over 2 microbatches) on 4 ranks, then dp on 2."""
    layers = {"n_layers": 4}
    plan = pipeline_plan("gpt-tiny", 4, {"stages": 2, "schedule": "1f1b", "microbatches": 2}, strategy="tp",
                         batch=16, overrides=layers)
    common = {"model": "gpt-tiny", "batch": 16, "overrides": layers}
    (a,) = pools(4).run([{**common, "plan": plan, "steps": 2, "save": str(tmp_path / "ck")}])
    second = {**common, "strategy": "dp", "steps": 4, "load": str(tmp_path / "ck")}
    (b,) = pools(2).run([second])
    check(second, resumed(a, b), parameters=False)


def test_a_checkpoint_taken_before_any_step_has_no_optimizer_state(pools, tmp_path):
    """The optimizer's state is made at its first step: saved before one, there is none, and the
    loading optimizer starts afresh too (here on one device, without torch.distributed)."""
    (a,) = pools(2).run([{"model": "mlp-tiny", "strategy": "tp", "steps": 0, "save": str(tmp_path / "ck")}])
    assert "error" not in a, a.get("traceback")
    saved = json.loads((tmp_path / "ck" / ".metadata").read_text())["tensors"]
    assert sorted(saved) == ["model/w1.weight", "model/w2.weight"]
    case = {"model": "mlp-tiny", "steps": 3, "load": str(tmp_path / "ck")}
    check(case, run_case(case), parameters=False)


def test_when_one_stage_cannot_load_every_rank_says_so(pools, tmp_path):
    """A 4-layer gpt-tiny's checkpoint into an 8-layer one, 2 pipeline stages: only the second
    stage's rank finds layers missing; both raise rather than one waiting on the other."""
    (a,) = pools(2).run([{"model": "gpt-tiny", "strategy": "dp", "steps": 0, "overrides": {"n_layers": 4},
                          "save": str(tmp_path / "ck")}])
    assert "error" not in a, a.get("traceback")
    plan = pipeline_plan("gpt-tiny", 2, {"stages": 2}, overrides={"n_layers": 8})
    (b,) = pools(2).run([{"model": "gpt-tiny", "overrides": {"n_layers": 8}, "plan": plan,
                          "load": str(tmp_path / "ck")}], timeout=120)
    first, second = b["errors"]
    assert first.startswith("CheckpointError: rank 1 failed: CheckpointError: model/layers.4.")
    assert second.startswith("CheckpointError: model/layers.4.") and "found no such tensor" in second


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    """mlp-tiny after one step on one device, saved."""
    path = tmp_path_factory.mktemp("saved") / "ck"
    run_case({"model": "mlp-tiny", "steps": 1, "save": str(path)})
    return path


def copy_of(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "ck")
    return tmp_path / "ck"


def test_another_models_checkpoint_is_refused(saved_mlp):
    with pytest.raises(ValueError, match=r"model/w1\.weight: found shape \(64, 16\) in .*, required \(32, 16\)"):
        run_case({"model": "mlp-tiny", "overrides": {"d_hidden": 32}, "steps": 1, "load": str(saved_mlp)})
    with pytest.raises(ValueError, match=r"model/tok_emb\.weight: found no such tensor in .*, required one"):
        run_case({"model": "gpt-tiny", "steps": 1, "load": str(saved_mlp)})


def test_a_missing_or_incomplete_checkpoint_is_refused(saved_mlp, tmp_path):
    with pytest.raises(CheckpointError, match="found no such directory, required a directory written by save"):
        run_case({"model": "mlp-tiny", "load": str(tmp_path / "nothing")})
    path = copy_of(saved_mlp, tmp_path)
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"file __0_0\.distcp found 100 bytes, required \d+ bytes"):
        run_case({"model": "mlp-tiny", "load": str(path)})
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        run_case({"model": "mlp-tiny", "load": str(path)})


def forged(path, name: str, content: bytes) -> None:
    """Replace a file of a checkpoint, and its size in the manifest (as a forger would)."""
    (path / name).write_bytes(content)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = len(content)
    (path / "manifest.json").write_text(json.dumps(manifest))


class RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickled_metadata_is_refused_without_running_it(saved_mlp, tmp_path):
    path, marker = copy_of(saved_mlp, tmp_path), tmp_path / "ran"
    forged(path, ".metadata", pickle.dumps(RunsCode(f"touch {marker}")))
    with pytest.raises(CheckpointError, match=r"\.metadata: found \d+ bytes that are not JSON"):
        run_case({"model": "mlp-tiny", "load": str(path)})
    assert not marker.exists()


@pytest.mark.parametrize("random, message", [
    ({"cpu": "not base64!"}, r"random generator state 'cpu': found 'not base64!', required base64"),
    ({"cpu": "AAAA"}, r"random generator state 'cpu': found 3 bytes, required \d+ \(this torch's generator\)"),
    ([1, 2], r"random generator states: found \[1, 2\], required an object of 'cpu'"),
])
def test_a_malformed_random_state_is_refused(saved_mlp, tmp_path, random, message):
    path = copy_of(saved_mlp, tmp_path)
    state = json.loads((path / "state.json").read_text())
    forged(path, "state.json", json.dumps({**state, "random": random}).encode())
    with pytest.raises(CheckpointError, match=r"state\.json: " + message):
        run_case({"model": "mlp-tiny", "load": str(path)})


def test_tensor_data_is_read_with_weights_only(saved_mlp, tmp_path):
    path, marker = copy_of(saved_mlp, tmp_path), tmp_path / "ran"
    data = bytearray((path / "__0_0.distcp").read_bytes())
    payload = pickle.dumps(RunsCode(f"touch {marker}"), protocol=2)
    for chunk in json.loads((path / ".metadata").read_text())["storage"]:  # the payload where each tensor starts
        data[chunk["start"]:chunk["start"] + len(payload)] = payload
    forged(path, "__0_0.distcp", bytes(data))
    with pytest.raises(CheckpointError, match="Weights only load failed"):
        run_case({"model": "mlp-tiny", "load": str(path)})
    assert not marker.exists()


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    """A process saving step 2 over step 1's checkpoint dies once its tensors are written (before
    the metadata and the manifest): step 1's loads, whole."""
    script = textwrap.dedent(f"""
        import os
        from autopar.runtime import checkpoint_format
        from autopar.testing import run_case

        run_case({{"model": "mlp-tiny", "steps": 1, "save": {str(tmp_path / "ck")!r}}})
        write = checkpoint_format.JsonMetadataWriter.write_data
        def dies(self, plan, planner):
            write(self, plan, planner).wait()
            os._exit(9)
        checkpoint_format.JsonMetadataWriter.write_data = dies
        run_case({{"model": "mlp-tiny", "steps": 2, "save": {str(tmp_path / "ck")!r}}})
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 9, out.stderr[-3000:]
    partial = tmp_path / ".ck.partial"
    assert (partial / "__0_0.distcp").is_file() and not (partial / "manifest.json").exists()
    got = run_case({"model": "mlp-tiny", "steps": 1, "load": str(tmp_path / "ck")})
    assert got["losses"] == []  # it resumed at step 1: nothing left to train
    assert got["state"] == run_case({"model": "mlp-tiny", "steps": 1})["state"]
    os.rename(tmp_path / "ck", tmp_path / ".ck.previous")  # cut short between a replacing save's renames
    assert run_case({"model": "mlp-tiny", "steps": 1, "load": str(tmp_path / "ck")})["losses"] == []


def test_numbered_checkpoints_keep_the_latest(tmp_path):
    import autopar
    from autopar import models

    entry = models.get("mlp-tiny")
    inputs, target = entry.example_batch(8)
    compiled = autopar.compile(entry.build(seed=0), example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                               optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.latest() is None and checkpoints.resume(compiled) is None
    for _ in range(3):
        compiled.step(*inputs, target=target)
        checkpoints.save(compiled)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003"]
    assert (tmp_path / "latest").read_text().strip() == "step-000003"
    assert checkpoints.resume(compiled) == (3, tmp_path / "step-000003")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="found a directory that is not a checkpoint"):
        compiled.save(tmp_path / "other")


def test_a_resumed_run_draws_the_dropout_masks_the_uninterrupted_run_draws(tmp_path):
    """The checkpoint keeps the random generator's state and loading sets it back, so a run resumed
    in a fresh process (its generator elsewhere) drops the units the uninterrupted run drops: the
    same losses to the bit. Without it, the first step after resuming already differs."""
    import autopar
    from autopar import models

    entry = models.get("gpt-tiny")
    batches = [entry.example_batch(8, seed=step, dropout=0.1) for step in range(4)]

    def compiled():
        inputs, target = batches[0]
        return autopar.compile(entry.build(seed=0, dropout=0.1), example_inputs=inputs, loss_fn=entry.loss_fn,
                               target=target, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))

    torch.manual_seed(0)
    whole = compiled()
    losses = [whole.step(*inputs, target=target).item() for inputs, target in batches[:2]]
    whole.save(tmp_path / "ck")
    losses += [whole.step(*inputs, target=target).item() for inputs, target in batches[2:]]
    torch.manual_seed(1)  # a fresh process: its generator anywhere
    resumed = compiled()
    assert resumed.load(tmp_path / "ck") == 2
    assert [resumed.step(*inputs, target=target).item() for inputs, target in batches[2:]] == losses[2:]
