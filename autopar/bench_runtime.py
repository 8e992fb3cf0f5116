"""`autopar bench runtime`: autopar's plans against PyTorch's own parallel wrappers, side by side.

On local gloo ranks, for a zoo model: autopar's `dp` plan against `DistributedDataParallel`, its
`fsdp` plan against FSDP2 `fully_shard` (per block, then the root), its `tp` plan against Megatron
tensor parallelism through `parallelize_module` (q, k, v and fc1 column-parallel, proj and fc2
row-parallel, the rest replicated), and its `auto` plan against the fastest of the three. Every variant trains on the same global batch with AdamW; the variants take turns
within each round, each leading a round in turn (so drift on a noisy machine hits all of them alike) and the median step time
over all rounds is reported, with each autopar plan's ratio to its PyTorch counterpart.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def _torch_variant(kind: str, entry, overrides: dict, batch: int):
    """A DDP, FSDP2 or tensor-parallel model, its optimizer, and the slice of the batch this rank trains on."""
    model = entry.build(seed=0, **overrides)
    world, rank = dist.get_world_size(), dist.get_rank()
    if kind == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif kind == "tp":
        wrapped, world, rank = _megatron_tp(model, world), 1, 0  # every rank runs the whole batch
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)

    def step(inputs, target):
        local = [x.chunk(world)[rank] for x in inputs]
        optimizer.zero_grad(set_to_none=True)
        loss = entry.loss_fn(wrapped(*local), target.chunk(world)[rank])
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _megatron_tp(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """Megatron-LM's layout (Shoeybi et al. 2019, §3) with PyTorch's `parallelize_module`: per block,
    the attention's q, k, v and the MLP's fc1 split by columns, proj and fc2 by rows, so each block
    all-reduces once in forward and once in backward per sublayer; each rank keeps n_heads / world heads."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    layout = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
              "attn.proj": RowwiseParallel(), "ffn.fc1": ColwiseParallel(), "ffn.fc2": RowwiseParallel()}
    for block in model.layers:
        if block.attn.n_heads % world:
            raise ValueError(f"tensor parallelism: found {block.attn.n_heads} heads, required a multiple of "
                             f"the {world} ranks")
        parallelize_module(block, mesh, layout)
        block.attn.n_heads //= world
    return model


def _autopar_variant(strategy: str, entry, overrides: dict, batch: int):
    import autopar

    model = entry.build(seed=0, **overrides)
    inputs, target = entry.example_batch(batch, seed=0, **_batch_args(overrides))
    compiled = autopar.compile(model, autopar.Cluster.local(), example_inputs=inputs, loss_fn=entry.loss_fn,
                               target=target, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4), strategy=strategy)
    return lambda inputs, target: compiled.step(*inputs, target=target)


def _batch_args(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k == "seq_len"}


def step_times(model: str, batch: int, variants: list[str], rounds: int = 5, steps: int = 4,
               overrides: dict | None = None) -> dict[str, Any]:
    """Runs on every rank (inside `autopar.testing.RankPool`); rank 0's seconds per step per variant."""
    from autopar import models

    overrides = overrides or {}
    torch.manual_seed(0)
    entry = models.get(model)
    runners = {}
    for name in variants:
        kind, _, strategy = name.partition(":")
        runners[name] = (_autopar_variant(strategy, entry, overrides, batch) if kind == "autopar"
                         else _torch_variant(kind, entry, overrides, batch))
    batches = [entry.example_batch(batch, seed=s, **_batch_args(overrides)) for s in range(steps)]
    for run in runners.values():  # warm up: first steps allocate and plan communication buffers
        run(*batches[0])
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(runners)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:  # each variant leads a round in turn
            run = runners[name]
            dist.barrier()
            start = time.perf_counter()
            for inputs, target in batches:
                run(inputs, target)
            dist.barrier()
            times[name].append((time.perf_counter() - start) / steps)
    return {"median": {k: statistics.median(v) for k, v in times.items()}, "all": times,
            "params": sum(p.numel() for p in entry.build(device="meta", **overrides).parameters())}


@dataclass(frozen=True, slots=True)
class RuntimeCase:
    label: str
    model: str
    batch: int
    world: int
    overrides: tuple[tuple[str, int], ...] = ()


RUNTIME_CASES = (
    RuntimeCase(label="gpt-tiny", model="gpt-tiny", batch=16, world=2),
    RuntimeCase(label="GPT, 4 layers, d_model 256 (3.2M parameters)", model="gpt-tiny", batch=16, world=2,
                overrides=(("n_layers", 4), ("d_model", 256), ("n_heads", 8), ("d_head", 32), ("vocab_size", 4096),
                           ("seq_len", 128))),
)
VARIANTS = ["autopar:dp", "ddp", "autopar:fsdp", "fsdp2", "autopar:tp", "tp", "autopar:auto"]


def runtime_benchmark(cases=RUNTIME_CASES, rounds: int = 5, steps: int = 4) -> list[tuple[RuntimeCase, dict]]:
    from autopar.testing import RankPool

    results = []
    for case in cases:
        with RankPool(case.world) as pool:
            (got,) = pool.run([{"call": "autopar.bench_runtime:step_times",
                                "kwargs": {"model": case.model, "batch": case.batch, "variants": VARIANTS,
                                           "rounds": rounds, "steps": steps, "overrides": dict(case.overrides)}}],
                              timeout=3600)
        if "error" in got:
            raise RuntimeError(f"{case.label}: {got['error']}\n{got.get('traceback', '')}")
        results.append((case, got))
    return results


def runtime_table(results: list[tuple[RuntimeCase, dict]]) -> str:
    lines = ["| model | ranks | batch | autopar dp | DDP | dp / DDP | autopar fsdp | FSDP2 | fsdp / FSDP2 | "
             "autopar tp | TP (parallelize_module) | tp / TP | autopar auto | auto / fastest by hand |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, got in results:
        m = got["median"]
        fastest = min(m["ddp"], m["fsdp2"], m["tp"])
        cells = [f"{m[ours] * 1e3:.1f} ms | {m[theirs] * 1e3:.1f} ms | {m[ours] / m[theirs]:.3f}"
                 for ours, theirs in (("autopar:dp", "ddp"), ("autopar:fsdp", "fsdp2"), ("autopar:tp", "tp"))]
        lines.append(f"| {case.label} | {case.world} | {case.batch} | {' | '.join(cells)} | "
                     f"{m['autopar:auto'] * 1e3:.1f} ms | {m['autopar:auto'] / fastest:.3f} |")
    return "\n".join(lines)
