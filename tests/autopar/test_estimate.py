"""`autopar estimate` reproduces the seeds' GPT-3 175B analysis."""

import pytest

from autopar import Cluster
from autopar.estimate import estimate


@pytest.fixture(scope="module")
def gpt3():
    return estimate("gpt3-175b", precision="mixed", optimizer="adam", cluster=Cluster.preset("h100", nodes=128),
                    mfu=0.5)


def test_training_state_is_16n(gpt3):
    per = gpt3.state_per_param
    assert (per.weights, per.gradients, per.master, per.optimizer) == (2, 2, 4, 8)
    assert gpt3.state.total == 16 * gpt3.num_params
    assert gpt3.num_params == pytest.approx(175e9, rel=0.01) and gpt3.nominal_params == 175e9
    # At the seeds' N = 175B: 350 GB fp16 parameters, 350 GB gradients, 700 GB master, 1400 GB Adam.
    assert [gpt3.nominal_params * b / 1e9 for b in (per.weights, per.gradients, per.master, per.optimizer)] == [
        350, 350, 700, 1400]


def test_checkpointed_activations_follow_the_seeds_formula(gpt3):
    # Seeds 000/001: (N = 96) × 3.2M × 12288 × 2 bytes; they print 7488 G after rounding 78.6 G to 78 G.
    assert gpt3.tokens == 3.2e6
    assert gpt3.activations_checkpointed.boundaries == pytest.approx(96 * 3.2e6 * 12288 * 2, rel=1e-12)
    assert gpt3.activations_checkpointed.total < gpt3.activations_full.total / 10


def test_flops_and_time(gpt3):
    assert gpt3.model_flops == pytest.approx(6 * gpt3.num_params * gpt3.tokens, rel=0.05)
    assert gpt3.step_seconds == pytest.approx(gpt3.model_flops / (1024 * 989.5e12 * 0.5))
    report = gpt3.report()
    assert "16N" in report and "7,549.7" in report and "1,400.0" in report


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        estimate("gpt5")
    with pytest.raises(ValueError, match="mfu: found 1.5"):
        estimate("gpt-tiny", mfu=1.5)
    with pytest.raises(ValueError, match="precision: found 'int4'"):
        estimate("gpt-tiny", precision="int4")
