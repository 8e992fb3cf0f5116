"""`autopar bench`: benchmarks that print a markdown table (and can append it to a file).

    autopar bench capture --models gpt3-175b llama3-8b

capture: wall time to build a zoo model on the meta device and capture its training step
(export, per-node analysis, layers), with the graph's size. Nothing is allocated.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import torch

from autopar.capture import capture
from autopar.units import fmt_count, fmt_flops


@dataclass(frozen=True, slots=True)
class CaptureRow:
    model: str
    params: int
    ops: int
    layers: int
    distinct_layers: int
    forward_flops: int
    build_seconds: float
    capture_seconds: float


def capture_benchmark(names: list[str], *, batch_size: int = 1) -> list[CaptureRow]:
    from autopar import models

    rows = []
    for name in names:
        entry = models.get(name)
        start = time.perf_counter()
        model = entry.build(device="meta")
        inputs, target = entry.example_batch(batch_size, device="meta")
        built = time.perf_counter()
        graph = capture(model, inputs, loss_fn=entry.loss_fn, target=target)
        done = time.perf_counter()
        rows.append(CaptureRow(model=name, params=graph.num_params,
                               ops=sum(1 for n in graph.nodes.values() if n.op not in ("placeholder", "output")),
                               layers=len(graph.layers), distinct_layers=len({x.signature for x in graph.layers}),
                               forward_flops=graph.flops, build_seconds=built - start, capture_seconds=done - built))
    return rows


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def capture_table(rows: list[CaptureRow]) -> str:
    lines = ["| model | parameters | ATen ops | layers (distinct) | forward FLOPs | build (s) | capture (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {fmt_count(r.params)} | {r.ops} | {r.layers} ({r.distinct_layers}) | "
                     f"{fmt_flops(r.forward_flops)} | {r.build_seconds:.2f} | {r.capture_seconds:.2f} |")
    return "\n".join(lines)
