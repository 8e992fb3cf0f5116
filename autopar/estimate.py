"""`autopar estimate`: the memory and compute of training a zoo model, before any planning.

Takes a zoo model name, a precision, an optimizer, the tokens per step and a cluster; captures
one sequence of the model on the meta device and scales it to the batch. Gives an `Estimate`
whose `report()` is the seeds' GPT-3 analysis for any model:

- training state, 16N for mixed-precision Adam (seeds 000/004), at the model's exact parameter
  count and at the count its name claims (the seeds use N = 175B);
- activations with checkpointing at layer boundaries. The seeds' formula is
  L × tokens × d_model × 2 bytes; for GPT-3 175B and 3.2M tokens that is 96 × 3.2e6 × 12288 × 2
  = 7549.7 GB. The seeds print 7488 G = 96 × 78 G: they round the per-layer 78.6 G down to 78 G
  before multiplying. Here the layer inputs are read off the captured graph, which gives the
  formula's 7549.7 GB; the report also shows what checkpointing leaves out (the embedding, the
  head and the loss keep their activations; one layer is recomputed at a time in backward);
- FLOPs per step from the graph (forward + backward), against 6·N·T (Kaplan et al. 2020), and the
  step time on a cluster at a stated MFU: time = FLOPs / (devices × peak × MFU) (seed 002).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from autopar.capture import capture
from autopar.cluster import GiB, Cluster
from autopar.cost.memory import (ActivationMemory, StateBytes, activation_memory, normalize_precision,
                                 state_bytes_per_param, training_state)
from autopar.units import fmt_count, fmt_flops, fmt_seconds

# Seed 000's GPT-3 table, column "Batch Size" (tokens per step).
GPT3_BATCH_TOKENS = {
    "gpt3-125m": 0.5e6, "gpt3-350m": 0.5e6, "gpt3-760m": 0.5e6, "gpt3-1.3b": 1e6,
    "gpt3-2.7b": 1e6, "gpt3-6.7b": 2e6, "gpt3-13b": 2e6, "gpt3-175b": 3.2e6,
}
_COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class Estimate:
    model: str
    description: str
    precision: str
    optimizer: str
    num_params: int
    nominal_params: float | None
    tokens: float
    seq_len: int
    state: StateBytes
    state_per_param: StateBytes
    activations_checkpointed: ActivationMemory
    activations_full: ActivationMemory
    model_flops: float
    """Forward + backward FLOPs per step (no recomputation)."""
    recompute_flops: float
    """The extra forward that checkpointing at layer boundaries recomputes."""
    num_layers: int
    cluster: Cluster
    mfu: float
    capture_seconds: float

    @property
    def peak_dtype(self) -> str:
        return self.precision  # fp32, bf16 or fp16: the dtype the matmuls run in

    @property
    def step_seconds(self) -> float:
        peak = self.cluster.device.peak(self.peak_dtype)
        return self.model_flops / (self.cluster.num_devices * peak * self.mfu)

    def report(self) -> str:
        return "\n".join(_report_lines(self))


def estimate(name: str, *, precision: str = "mixed", optimizer: str = "adam", tokens: float | None = None,
             cluster: Cluster | None = None, mfu: float = 0.4) -> Estimate:
    """The estimate for zoo model `name`; `tokens` defaults to the GPT-3 table's batch (else 1M)."""
    from autopar import models

    entry = models.get(name)
    precision = normalize_precision(precision)
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu: found {mfu!r}, required a fraction in (0, 1]")
    tokens = float(tokens if tokens is not None else GPT3_BATCH_TOKENS.get(name, 2 ** 20))
    if tokens <= 0:
        raise ValueError(f"tokens: found {tokens!r}, required > 0")
    cluster = cluster or Cluster.preset("h100", nodes=128)

    # One sequence on the meta device, in the precision's compute dtype; scaled to the batch below.
    start = time.perf_counter()
    model = entry.build(device="meta", dtype=_COMPUTE_DTYPE[precision])
    inputs, target = entry.example_batch(1, device="meta")
    graph = capture(model, inputs, loss_fn=entry.loss_fn, target=target)
    seconds = time.perf_counter() - start

    per_sequence = _tokens_per_sample(inputs)
    scale = tokens / per_sequence
    n = graph.num_params
    return Estimate(
        model=name, description=entry.description, precision=precision, optimizer=optimizer, num_params=n,
        nominal_params=entry.nominal_params, tokens=tokens, seq_len=per_sequence,
        state=training_state(n, precision=precision, optimizer=optimizer),
        state_per_param=state_bytes_per_param(precision, optimizer),
        activations_checkpointed=activation_memory(graph, checkpoint="layers", scale=scale),
        activations_full=activation_memory(graph, checkpoint="none", scale=scale),
        model_flops=(graph.flops + graph.backward_flops) * scale,
        recompute_flops=sum(graph.nodes[m].flops for layer in graph.layers for m in layer.nodes) * scale,
        num_layers=len(graph.layers), cluster=cluster, mfu=mfu, capture_seconds=seconds)


def _tokens_per_sample(inputs: tuple) -> int:
    """Tokens in one sample: the sequence length for token inputs, 1 for anything else (images)."""
    first = inputs[0]
    if first.dtype in (torch.int64, torch.int32) and first.dim() == 2:
        return int(first.shape[1])
    return 1


_W = 50  # label column


def _unit(total: float) -> tuple[str, float]:
    """GB for real models (the seeds' unit), smaller units for the tiny ones."""
    return next(((u, f) for u, f in (("GB", 1e9), ("MB", 1e6)) if total >= f), ("kB", 1e3))


def _report_lines(e: Estimate) -> list[str]:
    per, name = e.state_per_param, e.precision
    nominal = e.nominal_params
    rows = [(f"{name} parameters", e.state.weights, per.weights), (f"{name} gradients", e.state.gradients, per.gradients)]
    if per.master:
        rows.append(("fp32 master copy", e.state.master, per.master))
    if per.optimizer:
        label = "Adam moments (fp32 m and v)" if e.optimizer in ("adam", "adamw") else "SGD momentum (fp32)"
        rows.append((label, e.state.optimizer, per.optimizer))
    rows.append((f"training state ({per.total:g}N)", e.state.total, per.total))

    ck, full = e.activations_checkpointed, e.activations_full
    unit, div = _unit(e.state.total)

    def num(x: float) -> str:
        return f"{x / div:14,.1f}"

    at_nominal = f"{'at N = ' + fmt_count(nominal):>14s}" if nominal else ""
    lines = [
        f"{e.model}: {e.description}",
        f"precision {name}{' (mixed: fp32 master weights)' if name != 'fp32' else ''}, optimizer {e.optimizer}, "
        f"{fmt_count(e.num_params)} parameters (captured on the meta device in {e.capture_seconds:.1f} s)",
        f"tokens per step {fmt_count(e.tokens)} ({e.tokens / e.seq_len:,.1f} samples of {e.seq_len})",
        "",
        f"{'memory, one copy of the model':{_W}s}{unit:>14s}{at_nominal}{'bytes/param':>13s}",
    ]
    for label, total, bytes_per in rows:
        extra = num(nominal * bytes_per) if nominal else ""
        lines.append(f"  {label:{_W - 2}s}{num(total)}{extra}{bytes_per:13g}")
    layers = e.num_layers
    lines += [
        "  activations, checkpointing at layer boundaries:",
        f"    {'layer inputs (L × tokens × d_model × bytes)':{_W - 4}s}{num(ck.boundaries)}"
        + (f"   = {layers} × {ck.boundaries / layers / div:,.1f}" if layers else ""),
        f"    {'outside the layers (embedding, head, loss)':{_W - 4}s}{num(ck.outside_layers)}",
        f"    {'one layer recomputed during backward':{_W - 4}s}{num(ck.recompute_peak)}",
        f"    {'total':{_W - 4}s}{num(ck.total)}",
        f"  {'activations, no checkpointing':{_W - 2}s}{num(full.total)}",
        f"  {'state + checkpointed activations':{_W - 2}s}{num(e.state.total + ck.total)}",
        f"  -> at least {math.ceil((e.state.total + ck.total) / e.cluster.device.memory)} × "
        f"{e.cluster.device.name} ({e.cluster.device.memory / GiB:.0f} GiB) just to hold it",
        "",
        "compute per step",
        f"  {'model FLOPs, forward + backward':{_W - 2}s}{fmt_flops(e.model_flops):>14s}"
        f"   (6·N·T = {fmt_flops(6 * e.num_params * e.tokens)})",
        f"  {'recomputed by checkpointing':{_W - 2}s}{fmt_flops(e.recompute_flops):>14s}",
        f"  on {e.cluster.num_devices} × {e.cluster.device.name} at {e.mfu:.0%} MFU "
        f"({e.peak_dtype} peak {e.cluster.device.peak(e.peak_dtype) / 1e12:,.1f} TFLOP/s): "
        f"{fmt_seconds(e.step_seconds)} per step",
    ]
    return lines
