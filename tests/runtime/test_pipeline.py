"""Pipelined plans train like one device: GPipe, 1F1B and interleaved 1F1B with 2 and 4 stages and
1, 2, 4 and 8 microbatches, alone and with data or tensor parallelism inside 2 stages of 2 ranks.

On 4 gloo ranks, gpt-tiny with 8 layers (its head tied to the token embedding, so the first and
last stages share a weight) trains 5 AdamW steps on batches of 16: the losses equal the
single-device run in fp32 (rtol 1e-5), and in fp64 the losses (rtol 1e-10) and every parameter
(rtol 1e-8) do too (`test_equivalence.check`).
"""

import re

import pytest

from autopar.checks import pipeline_plan, searched_pipeline_plan
from autopar.testing import differences

LAYERS = {"n_layers": 8}


def check(case, got, *, parameters: bool):
    problems = differences(case, got, parameters=parameters)
    assert not problems, "\n".join(problems)


def run(pools, pipeline: dict, strategy: str = "auto", world: int = 4, model: str = "gpt-tiny",
        overrides: dict = LAYERS):
    for dtype in ("float32", "float64"):
        case = {"model": model, "dtype": dtype, "batch": 16, "overrides": overrides,
                "plan": pipeline_plan(model, world, pipeline, strategy=strategy, dtype=dtype, batch=16,
                                      overrides=overrides)}
        (got,) = pools(world).run([case])
        check(case, got, parameters=dtype == "float64")


@pytest.mark.parametrize("microbatches", [1, 2, 4, 8])
@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_pipelines_train_like_one_device(schedule, stages, microbatches, pools):
    run(pools, {"stages": stages, "schedule": schedule, "microbatches": microbatches},
        world=stages)


@pytest.mark.parametrize("microbatches", [2, 4])  # 1 and 8 per schedule: test_pipelines_train_like_one_device
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
@pytest.mark.parametrize("inside", ["dp", "tp"])
def test_pipelines_with_parallel_stages_train_like_one_device(inside, schedule, microbatches, pools):
    run(pools, {"stages": 2, "schedule": schedule, "microbatches": microbatches}, strategy=inside)


@pytest.mark.parametrize("stages", [2, 4])
def test_zero_bubble_trains_like_one_device(stages, pools):
    run(pools, {"stages": stages, "schedule": "zero-bubble", "microbatches": 4}, world=stages)


@pytest.mark.parametrize(("schedule", "stages", "inside"), [("1f1b", 4, "auto"), ("interleaved", 2, "tp"),
                                                         ("zero-bubble", 2, "dp")])
def test_dropout_draws_the_one_device_mask_in_pipelines(schedule, stages, inside, pools):
    """Dropout 0.1 (GPT-2's): every rank draws the step's masks as one device does and each stage
    keeps its microbatch's part (`runtime.dropout.Masks`). Drawn by each stage per microbatch, the
    losses miss rtol 1e-10 from the first step."""
    run(pools, {"stages": stages, "schedule": schedule, "microbatches": 4}, strategy=inside,
        world=stages if inside == "auto" else 4, overrides={"n_layers": 4, "dropout": 0.1})


def test_one_stage_with_microbatches_accumulates_gradients(pools):
    run(pools, {"stages": 1, "schedule": "gpipe", "microbatches": 4}, world=1)


@pytest.mark.parametrize(("model", "stages", "microbatches"), [
    ("llama-tiny", 2, 4), ("moe-tiny", 2, 4), ("wresnet-tiny", 2, 1), ("mlp-tiny", 1, 4)])
def test_other_models_pipeline(model, stages, microbatches, pools):
    """Llama (rotary tables computed before the layers, read by every stage), the MoE, Wide-ResNet
    (batch norm: its running statistics live in the stage that runs it), and the MLP (no repeated
    layers: one stage accumulating gradients over microbatches; its MSE loss is divided by m)."""
    for dtype in ("float32", "float64"):
        case = {"model": model, "dtype": dtype, "batch": 16,
                "plan": pipeline_plan(model, 2, {"stages": stages, "schedule": "1f1b", "microbatches": microbatches},
                                      dtype=dtype, batch=16)}
        (got,) = pools(2).run([case])
        check(case, got, parameters=dtype == "float64")


def test_pipeline_state_dict_forward_and_dump(pools, tmp_path):
    plan = pipeline_plan("gpt-tiny", 4, {"stages": 2, "schedule": "1f1b", "microbatches": 2}, strategy="tp",
                         overrides={"n_layers": 4})
    (got,) = pools(4).run([{"call": "autopar.checks:check_runtime",
                            "kwargs": {"strategy": "auto", "dump": str(tmp_path), "plan": plan}}])
    assert "error" not in got, got.get("traceback")
    assert got["state"] == [] and got["extra"] == []
    assert got["forward"] == [] and got["load"] == []
    for rank in range(4):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert f"device group {rank // 2} of 2, 1f1b over 2 microbatches" in text
        assert re.search(r"# order: F\d\.0 ", text), text[:500]


def test_microbatches_must_divide_the_split_batch(pools):
    case = {"model": "gpt-tiny", "batch": 8, "overrides": LAYERS,
            "plan": pipeline_plan("gpt-tiny", 4, {"stages": 2, "microbatches": 8}, strategy="dp", overrides=LAYERS)}
    (got,) = pools(4).run([case])
    assert "splits dim 0 into 2 pieces, found size 1 at one microbatch of 8" in got["error"]


def test_batch_norm_refuses_microbatches(pools):
    """Batch norm in training normalizes by the batch's statistics: microbatches would change them."""
    case = {"model": "wresnet-tiny", "batch": 16,
            "plan": pipeline_plan("wresnet-tiny", 2, {"stages": 2, "microbatches": 4}, batch=16)}
    (got,) = pools(2).run([case])
    assert "found 4 microbatches and batch norm in training" in got["error"]
    assert "required 1 microbatch" in got["error"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved", "zero-bubble"])
def test_plans_of_the_stage_dp_train_like_one_device(schedule, pools):
    """The inter-op pass's own choices (stage split, submeshes, microbatches, each stage's ILP plan)."""
    for dtype in ("float32", "float64"):
        case = {"model": "gpt-tiny", "dtype": dtype, "batch": 16, "overrides": LAYERS,
                "plan": searched_pipeline_plan("gpt-tiny", 4, schedule, dtype=dtype, batch=16, overrides=LAYERS)}
        (got,) = pools(4).run([case])
        check(case, got, parameters=dtype == "float64")
