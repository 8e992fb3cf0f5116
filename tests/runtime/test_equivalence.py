"""The test that makes the compiler trustworthy: every plan trains like one device.

For each tiny zoo model, named strategy and world size (gloo ranks on loopback), 5 AdamW steps
on the same batches give the same losses as plain PyTorch on one device (fp32, rtol 1e-5), and,
run again in fp64, the same losses (rtol 1e-10) and the same parameters and buffers after them
(rtol 1e-8, atol 1e-10; the worst case seen is about 1e-10). In fp32 the parameters are not compared elementwise: AdamW
divides each update by the root of its squared-gradient average, which turns the last-bit
differences that any change of summation order makes (one device against several, or DDP) into
visible ones for parameters whose gradient is nearly zero; fp64 shows the program is the same.
"""

import pytest
import torch

from autopar.checks import random_plan, squeezed_plan
from autopar.testing import differences

MODELS = ["gpt-tiny", "llama-tiny", "mlp-tiny", "moe-tiny", "wresnet-tiny"]
STRATEGIES = ["dp", "zero1", "fsdp", "tp", "dp+tp", "auto"]
FP32_OPTIMIZER = {"optimizer": "sgd", "lr": 0.1}
"""fp32 runs take SGD steps; fp64 runs AdamW's (the default). A plan sums in another order than
one device, and in fp32 AdamW's per-element normalization turns that last-bit difference of a
near-zero gradient into a whole learning-rate step (wresnet-tiny tensor parallel drifts past
rtol 1e-5 in loss within five steps on some processors). SGD's step is proportional to the gradient, so the
fp32 parameters can be held to float32 tolerances; fp64 holds AdamW's to 1e-8."""


def check(case, got, *, parameters: bool):
    problems = differences(case, got, parameters=parameters)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model", MODELS)
def test_trains_like_one_device(model, strategy, world, pools):
    if strategy == "dp+tp" and world < 4:
        pytest.skip("dp+tp is a 2-D mesh (data parallel × tensor parallel): it needs 4 devices or more")
    for dtype, optimizer in (("float32", FP32_OPTIMIZER), ("float64", {})):
        case = {"model": model, "strategy": strategy, "dtype": dtype, **optimizer}
        if strategy == "auto":
            case["plan"] = squeezed_plan(model, world, dtype)
        (got,) = pools(world).run([case])
        check(case, got, parameters=True)


@pytest.mark.parametrize(("world", "seed"), [(2, s) for s in range(3)] + [(4, s) for s in range(5)])
@pytest.mark.parametrize("model", MODELS)
def test_random_plans_train_like_one_device(model, world, seed, pools):
    case = {"model": model, "dtype": "float64", "plan": random_plan(model, world, seed, dtype="float64")}
    (got,) = pools(world).run([case])
    check(case, got, parameters=True)


DROPOUT = {"dropout": 0.1}


@pytest.mark.parametrize(("world", "strategy"), [(2, "dp"), (2, "tp"), (2, "fsdp"), (4, "zero1"), (4, "dp+tp")])
def test_dropout_draws_the_one_device_mask_under_every_plan(world, strategy, pools):
    """GPT-2's dropout (0.1) on the embeddings and every residual branch: each rank keeps its part of
    the mask one device draws (`runtime.dropout.Dropout`), so every plan trains to the same losses and
    parameters. Drawn on each rank's own part instead, the losses miss rtol 1e-5 from the first step."""
    for dtype, optimizer in (("float32", FP32_OPTIMIZER), ("float64", {})):
        case = {"model": "gpt-tiny", "strategy": strategy, "dtype": dtype, "overrides": DROPOUT, **optimizer}
        (got,) = pools(world).run([case])
        check(case, got, parameters=True)


def test_ranks_seeded_apart_are_an_error_when_the_step_draws_random_numbers(pools):
    (got,) = pools(2).run([{"model": "gpt-tiny", "strategy": "tp", "overrides": DROPOUT, "seed_apart": True}])
    assert "random ops in the step (aten.dropout.default)" in got.get("error", ""), got
    assert "rank(s) [1] than on rank 0" in got["error"] and "torch.manual_seed" in got["error"]
    # A step without random ops does not care how the ranks were seeded.
    (got,) = pools(2).run([{"model": "gpt-tiny", "strategy": "tp", "seed_apart": True, "steps": 1}])
    assert "error" not in got, got.get("traceback")
