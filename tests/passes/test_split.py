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


def test_every_microbatch_pays_whole_the_part_a_cut_of_the_batch_does_not_shrink():
    """A microbatch is a cut of the batch in time: of a stage's t, the part f that does not shrink
    with the batch (each op's dispatch, a small matmul's lower rate) is paid by every microbatch,
    so each takes f + (t − f) / m, not t / m."""
    import dataclasses

    entry = autopar.models.get("gpt-tiny")
    inputs, target = entry.example_batch(8)
    captured = autopar.capture(entry.build(device="meta", n_layers=4), inputs, loss_fn=entry.loss_fn, target=target)
    cluster = Cluster.preset("h100", gpus_per_node=2)
    plain = plan_graph(captured, Cluster.preset("h100", gpus_per_node=1), model_name="gpt-tiny", strategy="dp")
    stage = plain.stages[0]
    fixed = 0.25 * stage.cost.compute
    with_fixed = dataclasses.replace(plain, stages=(dataclasses.replace(
        stage, cost=dataclasses.replace(stage.cost, fixed=fixed)),))
    m = 4
    spec = PipelineSpec(stages=2, microbatches=m)
    for paid, free in zip(split(with_fixed, captured, cluster, spec).stages, split(plain, captured, cluster, spec).stages):
        f = fixed * free.cost.compute / stage.cost.compute  # the chunk's share of it
        assert paid.cost.fixed == pytest.approx(f) and f > 0
        assert paid.microbatch_time == pytest.approx(free.microbatch_time + f * (1 - 1 / m))
        assert paid.cost.compute == pytest.approx(free.cost.compute + f * (m - 1))
    assert split(with_fixed, captured, cluster, PipelineSpec(stages=2, microbatches=1)).stages[0].microbatch_time == \
        pytest.approx(split(plain, captured, cluster, PipelineSpec(stages=2, microbatches=1)).stages[0].microbatch_time)
