"""The NCCL path on a real GPU (world size 1). Skipped where there is no CUDA device."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist

import autopar

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_nccl_world_of_one_trains_like_plain_pytorch():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        entry = autopar.models.get("gpt-tiny")
        model = entry.build(device="cuda", seed=0)
        reference = entry.build(device="cuda", seed=0)
        inputs, target = entry.example_batch(8, device="cuda")
        compiled = autopar.compile(model, autopar.Cluster.local(), example_inputs=inputs, loss_fn=entry.loss_fn,
                                   target=target, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
        assert compiled.world.device.type == "cuda" and dist.get_backend() == "nccl"
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        for _ in range(3):
            loss = compiled.step(*inputs, target=target)
            optimizer.zero_grad()
            expected = entry.loss_fn(reference(*inputs), target)
            expected.backward()
            optimizer.step()
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_adamw_on_cuda_allocates_the_foreach_workspace():
    """On CUDA tensors torch's AdamW defaults to foreach kernels: its step holds sqrt(v) of every
    parameter at once (`cost.memory.optimizer_workspace`, the NCCL figure)."""
    from autopar.cost.memory import optimizer_workspace

    params = [torch.nn.Parameter(torch.randn(1024, 1024, device="cuda")),
              torch.nn.Parameter(torch.randn(4096, device="cuda"))]
    for p in params:
        p.grad = torch.randn_like(p)
    step = torch.optim.AdamW(params)
    step.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step.step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    predicted = optimizer_workspace([p.numel() for p in params], "adamw", "nccl")
    assert predicted <= extra <= predicted + 64 * 1024  # the allocator rounds each block up to 512 B
