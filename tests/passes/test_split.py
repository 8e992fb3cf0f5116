"""Hand-chosen pipelines (`passes.split`): what a stage pays to receive its input."""

import pytest

import autopar
from autopar import Cluster
from autopar.cost.comm import CommModel
from autopar.passes.split import PipelineSpec, split
from autopar.planner import plan_graph


@pytest.mark.parametrize("microbatches", [1, 4])
def test_a_later_stage_receives_the_residual_stream_and_sends_its_gradient_back(microbatches):
    entry = autopar.models.get("gpt-tiny")
    inputs, target = entry.example_batch(8)
    captured = autopar.capture(entry.build(device="meta", n_layers=4), inputs, loss_fn=entry.loss_fn, target=target)
    cluster = Cluster.preset("h100", gpus_per_node=2)
    one = plan_graph(captured, Cluster.preset("h100", gpus_per_node=1), model_name="gpt-tiny", strategy="dp")
    assert one.cost.communication == 0.0  # one device: whatever a stage communicates is the transfer
    piped = split(one, captured, cluster, PipelineSpec(stages=2, microbatches=microbatches))
    first, second = piped.stages
    stream = captured.nodes[next(n for n, info in captured.nodes.items() if info.layer == 1)]
    batch, seq, width = 8, inputs[0].shape[1], stream.outputs[0].shape[-1]
    nbytes = batch * seq * width * 4 / microbatches  # one microbatch of the fp32 (batch, seq, d_model) stream
    expected = 2 * microbatches * CommModel(cluster).time("send_recv", nbytes, (0, 1))
    assert first.cost.communication == 0.0
    assert second.cost.communication == pytest.approx(expected, rel=1e-9)
    assert second.microbatch_time == pytest.approx(second.cost.compute / microbatches + expected / microbatches)
