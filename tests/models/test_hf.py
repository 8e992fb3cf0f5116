"""Hugging Face `transformers` models from configs (GPT-2, Llama, BERT): captured, planned, and
trained on 2 gloo ranks like one device (named strategies, the auto plan, random plans); a construct
export cannot trace is named.

The equivalence checks follow tests/runtime/test_equivalence.py: 3 AdamW steps give the same
losses as plain PyTorch on one device in fp32 (rtol 1e-5), and in fp64 the same losses (rtol
1e-10) and parameters (rtol 1e-8, atol 1e-10). Llama is the exception in fp64: transformers'
`LlamaRMSNorm` computes in fp32 whatever the model's dtype, so a plan that sums in another order
before a norm (tensor parallel) turns 1e-16 differences into fp32 roundings. Its fp64 runs use SGD
(AdamW divides by the root of tiny second moments and magnifies those roundings) and fp32-level
tolerances: losses rtol 1e-8, parameters rtol 1e-6, atol 1e-8.

`transformers` is optional (the `hf` extra): without it these tests are skipped, except the one
that checks the zoo still lists and refuses these models cleanly.
"""

import math
import sys

import pytest
import torch
from torch import nn

import autopar
from autopar import models
from autopar.planner import plan_graph
from autopar.checks import random_plan
from autopar.testing import RankPool, reference

MODELS = ["hf-gpt2", "hf-llama", "hf-bert"]
BATCH, STEPS = 8, 3


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pool(transformers):
    with RankPool(2) as started:
        yield started


def _captured(model: str, dtype: str = "float32", **overrides):
    """The training step of a zoo model built on the CPU, as `compile` captures it (sdpa's output
    strides differ between the meta and the CPU kernel, and with them a `contiguous` node)."""
    entry = models.get(model)
    net = entry.build(seed=0, dtype=getattr(torch, dtype), **overrides)
    inputs, target = entry.example_batch(BATCH, **overrides)
    return autopar.capture(net, inputs, loss_fn=entry.loss_fn, target=target)


def _squeezed_plan(model: str, dtype: str) -> str:
    """The auto plan when a rank may hold half of what the replicated plan needs (as little as
    fits): at this size the replicated plan is otherwise the cheapest, and tests nothing."""
    graph, cluster = _captured(model, dtype), autopar.Cluster.preset("cpu", gpus_per_node=2)
    replicated = plan_graph(graph, cluster, model_name=model).cost.peak_memory
    for fraction in (0.5, 0.7, 0.85, 1.0):
        try:
            return plan_graph(graph, cluster, model_name=model, memory_budget=replicated * fraction).to_json()
        except autopar.InfeasibleError:
            continue
    raise AssertionError(f"{model}: no auto plan within its replicated memory")


def _tolerances(case: dict) -> tuple[float, float, float]:
    """(loss rtol, parameter rtol, parameter atol); in fp32 the parameters are not compared (nan)."""
    if case["dtype"] == "float32":
        return 1e-5, math.nan, math.nan
    if case["model"] == "hf-llama":
        return 1e-8, 1e-6, 1e-8
    return 1e-10, 1e-8, 1e-10


def _check(case: dict, got: dict) -> None:
    assert "error" not in got, got.get("error", "") + "\n" + got.get("traceback", "")
    ref = reference(case)
    loss_rtol, rtol, atol = _tolerances(case)
    assert len(got["losses"]) == len(ref["losses"]) == STEPS
    assert all(math.isclose(a, b, rel_tol=loss_rtol) for a, b in zip(got["losses"], ref["losses"])), \
        f"losses: found {got['losses']}, required {ref['losses']} (rtol {loss_rtol:g})"
    if math.isnan(rtol):
        return
    assert set(got["state"]) == set(ref["state"])
    for key in sorted(ref["state"]):
        torch.testing.assert_close(torch.tensor(got["state"][key]), torch.tensor(ref["state"][key]),
                                   rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def _case(model: str, dtype: str, **fields) -> dict:
    sgd = model == "hf-llama" and dtype == "float64"  # see the module docstring
    return {"model": model, "dtype": dtype, "batch": BATCH, "steps": STEPS,
            "optimizer": "sgd" if sgd else "adamw", **fields}


# ---- building and capturing ---------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_built_from_a_config_seeded_and_tied(model, transformers):
    entry = models.get(model)
    a, b, other = entry.build(seed=0), entry.build(seed=0), entry.build(seed=1)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in a.state_dict().items())
    fresh = dict(a.hf.__class__(a.hf.config).named_buffers())
    for name, buffer in a.hf.named_buffers():  # computed at construction: restored after to_empty
        assert torch.equal(buffer, fresh[name]), name
    shared = {"hf-gpt2": ("transformer.wte", "lm_head"), "hf-bert": ("bert.embeddings.word_embeddings",
                                                                     "cls.predictions.decoder")}.get(model)
    if shared:
        assert a.hf.get_submodule(shared[0]).weight is a.hf.get_submodule(shared[1]).weight
    inputs, target = entry.example_batch(4)
    logits = a(*inputs)
    assert logits.shape == (4, entry.config.seq_len, entry.config.vocab_size)
    assert torch.isfinite(entry.loss_fn(logits, target))
    assert all(p.is_meta for p in entry.build("meta").parameters())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model", MODELS)
def test_every_op_is_captured_and_has_a_rule(model, attention, transformers):
    graph = _captured(model, attention=attention)
    wrappers = [n.format_node() for n in graph.program.graph.nodes
                if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)]
    assert wrappers == []  # Llama's no-grad rotary embedding is inlined
    assert len(graph.layers) == 2 and graph.layers[0].signature == graph.layers[1].signature
    plan = plan_graph(graph, autopar.Cluster.preset("cpu", gpus_per_node=2), model_name=model)
    assert plan.warnings == ()  # no op fell back to replicated for want of a rule


def test_listed_and_refused_cleanly_without_transformers(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    assert set(MODELS) <= set(models.names())
    with pytest.raises(ImportError, match=r"autopar\[hf\]"):
        models.get("hf-llama").build(seed=0)
    from autopar.cli import main

    assert main(["models", "--count"]) == 0
    assert "hf-bert" in capsys.readouterr().out


class ValueGatedMLP(nn.Module):
    """GPT-2's MLP, skipped when the activations' mean is negative: a branch on a tensor's value."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        if x.mean() > 0:
            return self.mlp(x)
        return torch.zeros_like(x)


def test_untraceable_module_is_named_by_compile(transformers):
    entry = models.get("hf-gpt2")
    model = entry.build(seed=0)
    block = model.hf.transformer.h[1]
    block.mlp = ValueGatedMLP(block.mlp)
    inputs, target = entry.example_batch(4)
    with pytest.raises(autopar.CaptureError) as info:
        autopar.compile(model, autopar.Cluster.local(), example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert info.value.module_path == "hf.transformer.h.1.mlp"
    assert "'hf.transformer.h.1.mlp'" in str(info.value) and "control flow depends on tensor values" in str(info.value)
    assert "if x.mean() > 0:" in info.value.source


# ---- training on 2 ranks --------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["auto", "tp", "fsdp"])
@pytest.mark.parametrize("model", MODELS)
def test_trains_like_one_device(model, strategy, pool):
    for dtype in ("float32", "float64"):
        case = _case(model, dtype, strategy=strategy)
        if strategy == "auto":
            case["plan"] = _squeezed_plan(model, dtype)
        (got,) = pool.run([case], timeout=300)
        _check(case, got)


@pytest.mark.parametrize("model", MODELS)
def test_eager_attention_trains_like_one_device(model, pool):
    """transformers' own attention (masks built and added, softmax, matmuls) instead of sdpa, tensor parallel."""
    case = _case(model, "float64", strategy="tp", overrides={"attention": "eager"})
    (got,) = pool.run([case], timeout=300)
    _check(case, got)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("model", MODELS)
def test_random_plans_train_like_one_device(model, seed, pool):
    """A random strategy for every op (sequence- or head-sharded attention, vocabulary-parallel
    heads, ...), captured on the CPU as compile captures it."""
    case = _case(model, "float64", plan=random_plan(model, 2, seed, batch=BATCH, dtype="float64", device="cpu"))
    (got,) = pool.run([case], timeout=300)
    _check(case, got)
