"""Measured tensor memory (`runtime.memory.LiveMemory`), and that a compiled model keeps only its own state."""

import gc

import torch

import autopar
from autopar import models
from autopar.runtime.memory import LiveMemory


def test_counts_live_storages_once_and_frees_them():
    weight = torch.zeros(1000, 250)  # 1 MB, alive before the mode: counted at the start
    view = weight[:10]  # a view shares the storage: not counted again
    with LiveMemory() as live:
        a = torch.ones(500, 500)  # 1 MB
        b = a.mul(2)  # 1 MB more: peak
        del a, b
        c = torch.ones(250, 250)  # 0.25 MB
    assert live.start >= weight.numel() * 4
    assert live.peak - live.start == 2_000_000
    assert live.current - live.start == c.numel() * 4
    del view


def test_fake_and_meta_tensors_have_no_bytes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(1 << 20)
    meta = torch.empty(1 << 20, device="meta")
    with LiveMemory() as live:
        torch.empty(1 << 20, device="meta").add(1)
    assert live.peak - live.start == 0
    assert fake.shape == meta.shape


def test_a_compiled_model_holds_its_training_state_not_the_whole_model_again():
    """After compile, with the user's model gone, what is alive is the plan's parameter state
    (weights, gradients, AdamW's two moments): capture keeps no second copy of the weights."""
    entry = models.get("gpt-tiny")
    inputs, target = entry.example_batch(8)
    with LiveMemory() as before:  # whatever else this process holds
        pass
    net = entry.build(seed=0)
    compiled = autopar.compile(net, autopar.Cluster.local(), example_inputs=inputs, loss_fn=entry.loss_fn,
                               target=target, optimizer=lambda ps: torch.optim.AdamW(ps), strategy="dp")
    del net
    compiled.step(*inputs, target=target)
    gc.collect()
    with LiveMemory() as live:
        compiled.step(*inputs, target=target)
    state = compiled.plan.cost.parameter_state
    assert state <= live.start - before.start <= state * 1.05
    assert live.peak > live.start  # activations
