"""Bad input, systematically, through the public API (bad files: `test_bad_files`):
impossible options, unsupported models, inputs other than the traced ones, plans for another
model or world, and the command line. Each gets its documented error type, with a message naming
what was found and what was required; nothing hangs, nothing half-written is left behind, and
nothing read from a file is executed.

The error types (STYLE.md rule 6, `autopar.errors`):
- `ValueError`: a wrong value, in a file (the message starts with the field's path, e.g.
  `plan.stages[0].params['w1.weight'].storage[0]`) or in an argument (the argument's name);
- `TypeError`: an argument of the wrong type (a string where a `Cluster` or a `Plan` goes);
- `CaptureError`: a model torch.export cannot trace; `InfeasibleError`: nothing fits, with numbers;
- `OSError`: a file that cannot be read or written.
The command line prints each as one line on stderr and exits with 2.
"""

import contextlib
import json
import signal

import pytest
import torch
import torch.nn as nn

import autopar
from autopar import CaptureError, Cluster, InfeasibleError, PipelineSpec, Plan
from autopar.cli import main

CPU2 = Cluster.preset("cpu", gpus_per_node=2)


@contextlib.contextmanager
def within(seconds: int):
    """Fails the test instead of hanging it: SIGALRM after `seconds`."""
    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- options of autopar.plan: refused before anything is captured --------------------------------

@pytest.mark.parametrize("options, error, message", [
    (dict(strategy="pp"), ValueError, r"strategy: found 'pp', required one of auto, dp"),
    (dict(precision="fp64"), ValueError, r"precision: found 'fp64', required one of fp32, bf16, fp16"),
    (dict(optimizer="lion"), ValueError, r"optimizer: found 'lion', required one of sgd"),
    (dict(memory_budget="lots"), TypeError, r"memory_budget: found str 'lots', required a number of bytes > 0"),
    (dict(memory_budget=-1.0), ValueError, r"memory_budget: found -1\.0, required > 0 bytes"),
    (dict(memory_budget=float("nan")), ValueError, r"memory_budget: found nan, required > 0 bytes"),
    (dict(time_limit=0), ValueError, r"time_limit: found 0, required > 0 seconds"),
    (dict(time_limit="fast"), TypeError, r"time_limit: found str 'fast', required a number of seconds > 0"),
    (dict(zero_levels=(5,)), ValueError, r"zero_levels: found \(5,\), required a non-empty subset of \(0, 1, 2, 3\)"),
    (dict(pipeline="yes"), TypeError, r"pipeline: found str 'yes', required True, False, None or an"),
    (dict(quantize="int3"), ValueError, r"scheme: found 'int3', required one of 'int8'"),
    (dict(cluster="h100"), TypeError, r"cluster: found str 'h100', required an autopar\.Cluster"),
    (dict(example_inputs=[torch.ones(4, 16)]), TypeError, r"example_inputs: found list, required a tuple"),
    (dict(target=None), ValueError, r"loss_fn and target: found only one of them, required both"),
    (dict(model=lambda x: x), TypeError, r"model: found function, required a torch\.nn\.Module"),
    (dict(example_inputs=(torch.ones(0, 16),), target=torch.ones(0, 16)), ValueError,
     r"example_inputs\[0\]: found shape \(0, 16\) with no elements, required a non-empty tensor"),
])
def test_impossible_plan_options(mlp, options, error, message):
    entry, inputs, target = mlp
    args = dict(model=entry.build(device="meta"), cluster=CPU2, example_inputs=inputs, loss_fn=entry.loss_fn,
                target=target) | options
    with within(30), pytest.raises(error, match=message):
        autopar.plan(args.pop("model"), args.pop("cluster"), **args)


@pytest.mark.parametrize("spec, error, message", [
    (dict(stages=0), ValueError, r"found 0 stages, 1 microbatches, 1 chunks; required at least 1 of each"),
    (dict(stages="2"), TypeError, r"PipelineSpec\.stages: found str '2', required an integer >= 1"),
    (dict(stages=2, schedule="magic"), ValueError, r"schedule: found 'magic', required one of gpipe, 1f1b"),
    (dict(stages=2, virtual=3), ValueError, r"found 3 chunks per device, required 1 \(only interleaved has more\)"),
])
def test_impossible_pipeline_specs(spec, error, message):
    with pytest.raises(error, match=message):
        PipelineSpec(**spec)


def test_pipeline_specs_that_do_not_fit_the_cluster_or_batch(plan_mlp):
    with pytest.raises(ValueError, match=r"pipeline: found 3 stages for 2 devices, required a divisor of 2"):
        plan_mlp(CPU2, pipeline=PipelineSpec(stages=3))
    # A billion microbatches used to build a billion-step schedule first; now the batch refuses it.
    with within(30), pytest.raises(ValueError, match=r"pipeline: found 1000000000 microbatches for input .* of shape "
                                                     r"\(4, 16\), required a number that divides its batch"):
        plan_mlp(CPU2, pipeline=PipelineSpec(stages=2, microbatches=10**9))


# -- models that cannot be planned (an op with no rule runs replicated: test_planner) -----------------

class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if y.sum() > 0 else y


def test_untraceable_model_names_what_and_what_instead():
    with pytest.raises(CaptureError, match=r"control flow depends on tensor values .*required: control flow that "
                                           r"depends only on shapes"):
        autopar.plan(ValueBranch(), CPU2, example_inputs=(torch.randn(4, 16),))


def test_inputs_the_model_does_not_accept(mlp):
    entry, _, target = mlp
    with pytest.raises(CaptureError, match=r"\[4, 7\] X \[16, 64\].*required: a model torch\.export can trace"):
        autopar.plan(entry.build(device="meta"), CPU2, example_inputs=(torch.ones(4, 7),), loss_fn=entry.loss_fn,
                     target=target)


def test_cluster_too_small_for_the_model_on_meta():
    # The GPT-3 175B FFN (1.2B parameters, 19 GB of fp32 Adam state) on one 16 GB V100: never allocated.
    entry = autopar.models.get("mlp")
    inputs, target = entry.example_batch(8, device="meta")
    with pytest.raises(InfeasibleError, match=r"needs at least .* per device .* 1 × V100.* have .*required: more "
                                              r"devices") as info:
        autopar.plan(entry.build(device="meta"), Cluster.preset("v100", gpus_per_node=1), example_inputs=inputs,
                     loss_fn=entry.loss_fn, target=target, time_limit=10)
    assert info.value.required_bytes > info.value.available_bytes > 0


def test_memory_budget_too_small_names_the_budget(plan_mlp):
    with pytest.raises(InfeasibleError, match=r"needs at least .* have a memory budget of 1 kB each"):
        plan_mlp(CPU2, memory_budget=1000.0)


# -- compile: plans for another world or model, inputs other than the traced ones -----------------

def compile_mlp(mlp, **options):
    entry, inputs, target = mlp
    return autopar.compile(entry.build(seed=0), example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                           optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), **options)


def test_plan_for_two_devices_in_a_one_process_world_fails_at_once(mlp, plan2):
    with within(30), pytest.raises(ValueError, match=r"world size: found 1 process\(es\), required 2 \(the plan's "
                                                     r"devices\); launch with --nproc 2"):
        compile_mlp(mlp, plan=plan2)


def test_plan_for_another_model_or_other_shapes(mlp, plan1):
    entry, inputs, target = mlp
    other = autopar.plan(nn.Sequential(nn.Linear(16, 16)), Cluster.preset("cpu"), example_inputs=inputs,
                         loss_fn=entry.loss_fn, target=target)
    message = r"plan: made for a graph with fingerprint \w+, found \w+ .*required the same model, input shapes"
    with pytest.raises(ValueError, match=message):
        compile_mlp(mlp, plan=other)
    x8, y8 = entry.example_batch(8)
    with pytest.raises(ValueError, match=message):
        autopar.compile(entry.build(seed=0), example_inputs=x8, loss_fn=entry.loss_fn, target=y8, plan=plan1)


def test_edited_plan_with_the_same_fingerprint_fails_by_name(mlp, plan1):
    data = json.loads(plan1.to_json())
    params = data["stages"][0]["params"]
    params["w9.weight"] = params.pop("w1.weight")
    with pytest.raises(ValueError, match=r"plan\.stages\[0\]\.params: found 'w9\.weight', required one of this "
                                         r"model's parameters"):
        compile_mlp(mlp, plan=Plan.from_json(json.dumps(data)))
    data = json.loads(plan1.to_json())
    data["stages"][0]["params"]["w1.weight"]["shape"] = [64, 8]
    with pytest.raises(ValueError, match=r"params\['w1\.weight'\]\.shape: found \(64, 8\), required \(64, 16\)"):
        compile_mlp(mlp, plan=Plan.from_json(json.dumps(data)))


@pytest.mark.parametrize("options, error, message", [
    (dict(plan="plan.json"), TypeError, r"plan: found str 'plan\.json', required an autopar\.Plan or None"),
    (dict(cluster="cpu"), TypeError, r"cluster: found str 'cpu', required an autopar\.Cluster"),
    (dict(strategy="pp"), ValueError, r"strategy: found 'pp', required one of auto"),
])
def test_compile_arguments_refused_before_anything_runs(mlp, options, error, message):
    with pytest.raises(error, match=message):
        compile_mlp(mlp, **options)


@pytest.fixture(scope="module")
def compiled(mlp, plan1):
    return compile_mlp(mlp, plan=plan1)


@pytest.mark.parametrize("change, message", [
    (lambda x, y: ((x[0][:2],), y), r"input 0: found \(2, 16\) torch\.float32, required \(4, 16\) torch\.float32"),
    (lambda x, y: ((x[0].double(),), y), r"input 0: found \(4, 16\) torch\.float64, required \(4, 16\) torch\.float32"),
    (lambda x, y: ((x[0].tolist(),), y), r"inputs: found 65 value\(s\), not all tensors \(float\), required 2 "),
    (lambda x, y: ((x[0].numpy(),), y), r"input 0: found ndarray, required \(4, 16\) torch\.float32"),
    (lambda x, y: (x + x, y), r"inputs: found 3 value\(s\) \(tensors\), required 2 tensor\(s\) as traced"),
    (lambda x, y: (x, y[:, :8]), r"input 1: found \(4, 8\) torch\.float32, required \(4, 16\)"),
])
def test_step_inputs_other_than_the_traced_ones(mlp, compiled, change, message):
    _, inputs, target = mlp
    x, y = change(inputs, target)
    with pytest.raises(ValueError, match=message):
        compiled.step(*x, target=y)


# -- the command line --------------------------------------------------------------------------

PLAN = ["plan", "--model", "mlp-tiny", "--cluster", "cpu", "--gpus-per-node", "2", "--batch-size", "4"]


@pytest.mark.parametrize("extra, message", [
    (["--memory-budget", "0"], "--memory-budget: found 0 GB, required > 0"),
    (["--time-limit", "0"], "time_limit: found 0.0, required > 0 seconds"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1, found 0"),
    (["--nodes", "0"], "Cluster.nodes: found 0, required > 0"),
    (["--stages", "3"], "pipeline: found 3 stages for 2 devices, required a divisor of 2"),
    (["--stages", "2", "--microbatches", "0"], "0 microbatches, 1 chunks; required at least 1 of each"),
    (["--cluster", "missing.json"], "No such file or directory: 'missing.json'"),
])
def test_cli_plan_errors_exit_2_with_found_and_required(extra, message, capsys):
    with within(60):
        assert main(PLAN + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("autopar plan: error: ") and message in err, err


def test_cli_bad_files(tmp_path, plan2, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": 1')
    assert main(["plan", "--model", "mlp-tiny", "--cluster", str(bad)]) == 2
    assert "cluster file" in (err := capsys.readouterr().err) and "found malformed JSON" in err
    assert main(["viz", str(bad), "--out", str(tmp_path / "dump")]) == 2
    assert "plan file" in capsys.readouterr().err and not (tmp_path / "dump").exists()
    for_two = tmp_path / "plan2.json"
    plan2.save(for_two)  # `autopar run` refuses it before starting torchrun
    assert main(["run", "--model", "mlp-tiny", "--nproc", "1", "--plan", str(for_two)]) == 2
    assert "found a plan for 2 device(s), required one for the 1 rank(s)" in capsys.readouterr().err


def test_cli_unknown_choice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(PLAN + ["--strategy", "pp"])
    assert info.value.code == 2 and "invalid choice: 'pp'" in capsys.readouterr().err


# -- nothing half-written ----------------------------------------------------------------------

def test_failed_plan_command_writes_nothing(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(PLAN + ["--time-limit", "0", "--out", str(out)]) == 2
    assert list(tmp_path.iterdir()) == []
    out.write_text("the old plan\n")
    assert main(PLAN + ["--stages", "3", "--out", str(out)]) == 2
    assert out.read_text() == "the old plan\n" and list(tmp_path.iterdir()) == [out]
    assert main(PLAN + ["--out", str(tmp_path / "no" / "such" / "dir.json")]) == 2
    assert "required a file in an existing directory" in capsys.readouterr().err
