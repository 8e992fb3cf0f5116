"""Measured tensor memory (`runtime.memory.LiveMemory`), and that a compiled model keeps only its own state."""

import gc

import pytest
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


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "momentum"])
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_the_optimizer_step_allocates_its_predicted_workspace(optimizer, backend):
    """torch steps CPU tensors one at a time and CUDA ones with foreach kernels (the "nccl" figure,
    taken here with foreach forced on CPU tensors); Adam's sqrt(v) / sqrt(1 − β2^t) is the step's
    one allocation beyond its state."""
    from autopar.cost.memory import optimizer_workspace

    params = [torch.nn.Parameter(torch.randn(512, 256)), torch.nn.Parameter(torch.randn(64, 256)),
              torch.nn.Parameter(torch.randn(300))]
    for p in params:
        p.grad = torch.randn_like(p)
    make = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
            "momentum": lambda ps, **kw: torch.optim.SGD(ps, momentum=0.9, **kw)}[optimizer]
    step = make(params, lr=1e-3, foreach=backend == "nccl")
    step.step()  # the state is made
    with LiveMemory() as live:
        step.step()
    predicted = optimizer_workspace([p.numel() for p in params], optimizer, backend)
    assert live.peak - live.start == predicted
    assert predicted > 0 or optimizer in ("sgd", "momentum")


def test_a_model_with_small_activations_peaks_in_the_optimizer_step():
    """One wide linear layer at batch 2: its activations are a few kilobytes, and the step's AdamW
    allocates twice its weight (per tensor on CPU; on a GPU every parameter's sqrt(v) at once).
    The plan's peak is that step's, as measured."""
    torch.manual_seed(0)
    with LiveMemory() as before:  # whatever else this process holds
        pass
    net = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 8))
    x, y = torch.randn(2, 512), torch.randn(2, 8)
    compiled = autopar.compile(net, autopar.Cluster.local(), example_inputs=(x,), loss_fn=torch.nn.functional.mse_loss,
                               target=y, optimizer=lambda ps: torch.optim.AdamW(ps), strategy="dp")
    del net
    compiled.step(x, target=y)
    gc.collect()
    with LiveMemory() as live:
        compiled.step(x, target=y)
    cost = compiled.plan.cost
    weight, every = 512 * 1024 * 4, sum(p.numel() for p in compiled.parameters()) * 4
    held = 2 * weight if compiled.plan.cluster.backend == "gloo" else every
    assert cost.peak_memory == pytest.approx(cost.parameter_state + held, rel=0.01)
    assert live.peak - before.start == pytest.approx(cost.peak_memory, rel=0.05)
