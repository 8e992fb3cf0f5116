"""The mixed-precision rewrite: which ops run in 16 bits, which in fp32, and what the graph's
costs then see."""

import pytest
import torch

from autopar import models
from autopar.capture import capture
from autopar.passes.precision import low_precision

aten = torch.ops.aten


def _graph(name: str, precision: str):
    entry = models.get(name)
    inputs, target = entry.example_batch(4)
    return capture(entry.build(), inputs, loss_fn=entry.loss_fn, target=target, precision=precision)


def _input_dtypes(graph, packet):
    return [[a.meta["val"].dtype for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
             and a.meta["val"].is_floating_point()]
            for n in graph.program.graph.nodes if getattr(n.target, "overloadpacket", None) is packet]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_matmuls_run_low_and_sensitive_ops_fp32(precision):
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    graph = _graph("gpt-tiny", precision)
    for packet in (aten.linear, aten.scaled_dot_product_attention):
        found = _input_dtypes(graph, packet)
        assert found and all(d == low for dtypes in found for d in dtypes), (packet, found)
    for packet in (aten.layer_norm, aten.cross_entropy_loss):
        found = _input_dtypes(graph, packet)
        assert found and all(d == torch.float32 for dtypes in found for d in dtypes), (packet, found)
    assert graph.nodes[graph.outputs[0]].outputs[0].dtype == torch.float32  # the loss
    assert all(p.meta.dtype == torch.float32 for p in graph.params.values())  # fp32 master weights


def test_a_weight_is_cast_once_and_costs_see_16_bit_matmuls():
    fp32, bf16 = _graph("gpt-tiny", "fp32"), _graph("gpt-tiny", "bf16")
    casts = [n for n in bf16.program.graph.nodes if n.target is aten._to_copy.default]
    sources = [n.args[0].name for n in casts]
    assert len(sources) == len(set(sources))  # one cast per value and dtype, shared by its readers
    linear = next(name for name, n in bf16.nodes.items() if n.op == "aten.linear.default")
    assert bf16.nodes[linear].outputs[0].dtype == torch.bfloat16
    assert bf16.nodes[linear].flops == fp32.nodes[linear].flops
    assert bf16.precision == "bf16" and fp32.precision == "fp32"


def test_the_rewritten_graph_computes_the_mixed_precision_loss():
    entry = models.get("llama-tiny")
    model = entry.build(seed=0)
    inputs, target = entry.example_batch(4)
    graph = capture(model, inputs, loss_fn=entry.loss_fn, target=target, precision="bf16")
    step = graph.program.module()  # the captured program keeps shapes only: give it the model's weights
    step.load_state_dict({f"model.{k}": v for k, v in model.state_dict().items()}, assign=True)
    loss = step(*inputs, target)[0]
    with torch.no_grad():
        exact = entry.loss_fn(model(*inputs), target)
    assert loss.dtype == torch.float32
    assert loss.item() != exact.item()  # bf16 matmuls round
    assert loss.item() == pytest.approx(exact.item(), rel=1e-2)


def test_unknown_precision_is_an_error():
    graph = _graph("mlp-tiny", "fp32")
    with pytest.raises(ValueError, match="precision: found 'int3', required one of fp32, bf16, fp16"):
        low_precision(graph.program, "int3")
