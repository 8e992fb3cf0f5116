"""`autopar demo`: what autopar does, end to end, on this machine, in about two minutes.

1. Plan GPT-3 175B on a simulated cluster of 1024 H100 (128 nodes of 8) on the meta device, with
   pipeline stages searched, and print the plan.
2. Train a tiny GPT on 4 local ranks (gloo) with its `auto` plan.
3. Train the same model on one process in plain PyTorch, and check every step's loss agrees
   (fp32, relative 1e-5).
4. Write the HTML reports (graph, pipeline timeline, costs) of both plans.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any

import torch

from autopar.progress import Bar, Clock

TOLERANCE = 1e-5
"""Relative difference allowed between a parallel and the one-process loss (fp32)."""
SMALL = {"n_layers": 4, "d_model": 128, "n_heads": 4, "d_head": 32, "vocab_size": 1024, "seq_len": 64}
"""The GPT trained for real: gpt-tiny widened to 0.9M parameters, so that splitting it pays on 4 ranks."""


def train(*, model: str, steps: int, batch: int, lr: float, overrides: dict) -> dict[str, Any]:
    """On every rank (inside `autopar.testing.RankPool`): compile `model` with the auto plan, train
    `steps` steps, rank 0 drawing the progress bar. Returns the losses and the plan (JSON)."""
    import torch.distributed as dist

    import autopar
    from autopar import models

    entry = models.get(model)
    net = entry.build(seed=0, **overrides)
    inputs, target = entry.example_batch(batch, seed=0, **overrides)
    compiled = autopar.compile(net, autopar.Cluster.local(), example_inputs=inputs, loss_fn=entry.loss_fn,
                               target=target, optimizer=lambda ps: torch.optim.AdamW(ps, lr=lr), strategy="auto")
    rank = dist.get_rank() if dist.is_initialized() else 0
    losses = []
    try:
        with Bar(steps, f"training {model} on {compiled.plan.num_devices} ranks",
                 stream=sys.stderr if rank == 0 else io.StringIO()) as bar:
            for step in range(steps):
                x, y = entry.example_batch(batch, seed=step, **overrides)
                losses.append(compiled.step(*x, target=y).item())
                bar.advance(f"loss {losses[-1]:.4f}")
        return {"losses": losses, "plan": compiled.plan.to_json()}
    finally:
        compiled.close()


def reference(*, model: str, steps: int, batch: int, lr: float, overrides: dict) -> list[float]:
    """The same training in plain PyTorch on one process."""
    from autopar import models

    entry = models.get(model)
    net = entry.build(seed=0, **overrides)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    losses = []
    with Bar(steps, f"training {model} on one process") as bar:
        for step in range(steps):
            x, y = entry.example_batch(batch, seed=step, **overrides)
            optimizer.zero_grad()
            loss = entry.loss_fn(net(*x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.advance(f"loss {losses[-1]:.4f}")
    return losses


def plan_large(name: str = "gpt3-175b", nodes: int = 128, batch: int = 1024):
    import autopar
    from autopar import models

    entry = models.get(name)
    with Clock(f"planning {name} on {nodes * 8} simulated H100 (meta device, pipeline stages searched)"):
        net = entry.build(device="meta")
        inputs, target = entry.example_batch(batch, device="meta")
        return autopar.plan(net, autopar.Cluster.preset("h100", nodes=nodes), example_inputs=inputs,
                            loss_fn=entry.loss_fn, target=target, precision="bf16", pipeline=True)


def run(out: str = "autopar-demo", nproc: int = 4, steps: int = 20, model: str = "gpt-tiny", batch: int = 16,
        lr: float = 1e-3, large: bool = True) -> int:
    """The demo; returns the exit status (1 when the losses disagree)."""
    from autopar.errors import AutoparError
    from autopar.plan import Plan
    from autopar.testing import RankPool

    for name, value in (("nproc", nproc), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name}: found {value!r}, required an integer >= 1")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    reports = []
    if large:
        print("== 1. Planning GPT-3 175B for 1024 H100 ==", flush=True)
        big = plan_large()
        print(big.summary(), flush=True)
        big.save(root / "gpt3-175b.plan.json")
        reports.append(("gpt3-175b", big))
    print(f"\n== 2. Training {model} on {nproc} local ranks with its auto plan ==", flush=True)
    kwargs = {"model": model, "steps": steps, "batch": batch, "lr": lr,
              "overrides": SMALL if model == "gpt-tiny" else {}}
    with RankPool(nproc) as pool:
        (got,) = pool.run([{"call": "autopar.demo:train", "kwargs": kwargs}], timeout=1800)
    if "error" in got:
        raise AutoparError(f"training on {nproc} ranks failed: {got['error']}\n{got.get('traceback', '')}")
    small = Plan.from_json(got["plan"])
    small.save(root / f"{model}.plan.json")
    reports.append((model, small))
    print(small.summary(), flush=True)
    print(f"\n== 3. The same {steps} steps on one process ==", flush=True)
    expected = reference(**kwargs)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], expected))
    print(f"\n{'step':>4}  {nproc} ranks      one process")
    for step, (a, b) in enumerate(zip(got["losses"], expected)):
        print(f"{step:4d}  {a:.8f}  {b:.8f}")
    agree = len(got["losses"]) == len(expected) and worst <= TOLERANCE and all(map(math.isfinite, expected))
    print(f"largest relative difference {worst:.2e}: "
          + ("the parallel plan trains exactly like one device" if agree else f"MISMATCH (allowed {TOLERANCE:g})"))
    print("\n== 4. Reports ==", flush=True)
    for name, plan in reports:
        written = plan.visualize(root / name)
        print(f"{name}: {written.report_html}")
    return 0 if agree else 1
