"""Quantized graphs through the compiler: plans hold the smaller weights, and quantized models
train and run on several ranks like the same quantized model on one device."""

import math

import pytest
import torch

import autopar
from autopar import models
from autopar.quant import quantize_model, quantized_bytes
from autopar.testing import differences


@pytest.mark.parametrize(("scheme", "world", "strategy"), [("int8", 2, "auto"), ("int4-g32", 2, "tp"),
                                                           ("w8a8", 2, "dp"), ("llm.int8", 4, "dp+tp"),
                                                           ("kmeans4", 2, "fsdp")])
def test_quantized_models_train_like_one_device(scheme, world, strategy, pools):
    case = {"model": "gpt-tiny", "strategy": strategy, "quantize": scheme}
    (got,) = pools(world).run([case])
    problems = differences(case, got, parameters=False)
    assert not problems, "\n".join(problems)
    assert any(key.endswith("qweight") for key in got["state"])  # the integers, not a float weight


def test_rank_zeros_value_keeps_a_column_major_weight_column_major():
    from autopar.compiler import _from_rank_zero

    w = torch.arange(12, dtype=torch.int8).reshape(3, 4)
    got = _from_rank_zero(w.t(), torch.device("cpu"))  # a w8a8 weight's layout (broadcast dense, then laid out)
    assert torch.equal(got, w.t()) and got.stride() == (1, 4) and got.data_ptr() != w.data_ptr()


def test_plans_hold_the_smaller_weights():
    entry = models.get("gpt3-125m")
    model = entry.build(device="meta")
    inputs, target = entry.example_batch(8, device="meta")
    cluster = autopar.Cluster.preset("h100", gpus_per_node=2)
    plans = {q: autopar.plan(model, cluster, example_inputs=inputs, quantize=q) for q in (None, "int8", "int4-g128")}
    assert plans[None].quantized == {} and set(plans["int8"].quantized.values()) == {"int8"}
    memory = {q: p.cost.peak_memory for q, p in plans.items()}
    linear_fp32 = sum(m.weight.numel() * 4 for _, m in autopar.quant.replaced_linears(model))
    saved = linear_fp32 - quantized_bytes(model, "int8")
    assert memory["int8"] < memory[None] - 0.5 * saved / 2  # weights replicated or split over 2 devices
    assert memory["int4-g128"] < memory["int8"]


def test_auto_bits_keep_more_bits_where_the_loss_is_sensitive_and_compile_rebuilds_them():
    entry = models.get("gpt-tiny")
    model = entry.build(seed=0)
    inputs, target = entry.example_batch(8)
    layers = [name for name, _ in autopar.quant.replaced_linears(model)]
    all4 = quantized_bytes(model, "int4")
    all8 = quantized_bytes(model, "int8")
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=1)
    plan = autopar.plan(model, cluster, example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                        quantize="auto", quantize_budget=(all4 + all8) / 2)
    chosen = plan.quantized
    assert set(chosen.values()) <= {"int4", "int8"} and "int4" in chosen.values()
    assert "int8" in chosen.values() or len(chosen) < len(layers)  # a mix, not all at the least bits
    assert quantized_bytes(model, chosen) <= (all4 + all8) / 2
    again = autopar.Plan.from_json(plan.to_json())
    compiled = autopar.compile(model, cluster, example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                               plan=again, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    expected = entry.loss_fn(quantize_model(model, chosen)(*inputs), target).item()
    assert math.isclose(compiled.step(*inputs, target=target).item(), expected, rel_tol=1e-6)
    compiled.close()


def test_bad_quantize_arguments_are_errors():
    entry = models.get("gpt-tiny")
    model = entry.build(seed=0)
    inputs, target = entry.example_batch(8)
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=1)
    with pytest.raises(ValueError, match="scheme: found 'int3'"):
        autopar.plan(model, cluster, example_inputs=inputs, quantize="int3")
    with pytest.raises(ValueError, match="found no quantize_budget"):
        autopar.plan(model, cluster, example_inputs=inputs, loss_fn=entry.loss_fn, target=target, quantize="auto")
    with pytest.raises(ValueError, match="meta device"):
        autopar.plan(entry.build(device="meta"), cluster, example_inputs=inputs, loss_fn=entry.loss_fn,
                     target=target, quantize="auto", quantize_budget=1e6)
    with pytest.raises(ValueError, match="layers: found \\['nope'\\]"):
        autopar.plan(model, cluster, example_inputs=inputs, quantize={"nope": "int8"})
