"""autopar's model zoo: GPT-3 sizes, Llama 3, the seeds' MLP, GShard MoE, Wide-ResNet.

Takes a name; gives a `ModelEntry` that builds the model (on "meta" for free),
makes a matching random batch and computes the loss:

    from autopar import models
    models.names()                                   # ["gpt-tiny", "gpt3-125m", ...]
    entry = models.get("llama-tiny")
    model = entry.build(seed=0)
    inputs, target = entry.example_batch(8)
    loss = entry.loss_fn(model(*inputs), target)

Every family has a tiny variant (`*-tiny`) for fast CPU tests.
"""

from .registry import ModelEntry, get, names

__all__ = ["ModelEntry", "get", "names"]
