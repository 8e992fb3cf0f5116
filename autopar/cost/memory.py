"""Memory: training state per parameter by precision and optimizer, and activations from the graph.

Bytes per parameter (seeds 000 and 004; Micikevicius et al. 2018 for mixed precision):

| precision          | weights | gradients | fp32 master | Adam m and v | SGD momentum | Adam total |
|--------------------|---------|-----------|-------------|--------------|--------------|------------|
| fp32               | 4       | 4         | -           | 8            | 4            | 16         |
| bf16/fp16 (mixed)  | 2       | 2         | 4           | 8            | 4            | 16         |

the seeds' rule of thumb (4 + 2 + 2 + 4 + 4)·N = 16N. ZeRO (Rajbhandari et al. 2020; seed 004)
divides by the data-parallel degree d: stage 1 the master copy and optimizer state, stage 2 also
the gradients, stage 3 (FSDP) also the weights.

Activations are what autograd saves for backward, summed from the captured graph. With
checkpointing at layer boundaries (Chen et al. 2016) only each layer's input is kept, and in
backward one layer at a time is recomputed, so its own saved activations come back for a while:

    kept = Σ_layers input(ℓ) + Σ_outside layers saved(n) + max_ℓ saved(ℓ)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from autopar.graph import CapturedGraph

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
ZERO_STAGES = (0, 1, 2, 3)


def normalize_precision(precision: str) -> str:
    """"mixed" is the seeds' fp16 mixed precision; the others are their own names."""
    name = "fp16" if precision == "mixed" else precision
    if name not in PRECISIONS:
        raise ValueError(f"precision: found {precision!r}, required one of {', '.join(PRECISIONS + ('mixed',))}")
    return name


@dataclass(frozen=True, slots=True)
class StateBytes:
    """Bytes of training state (per parameter, or in total)."""

    weights: float
    gradients: float
    master: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.master + self.optimizer

    def scaled(self, factor: float) -> StateBytes:
        return StateBytes(self.weights * factor, self.gradients * factor, self.master * factor,
                          self.optimizer * factor)


def state_bytes_per_param(precision: str, optimizer: str) -> StateBytes:
    precision = normalize_precision(precision)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: found {optimizer!r}, required one of {', '.join(OPTIMIZERS)}")
    moments = {"sgd": 0, "momentum": 4, "adam": 8, "adamw": 8}[optimizer]
    if precision == "fp32":
        return StateBytes(weights=4, gradients=4, master=0, optimizer=moments)
    return StateBytes(weights=2, gradients=2, master=4, optimizer=moments)


def training_state(n_params: float, *, precision: str, optimizer: str, zero: int = 0, dp: int = 1) -> StateBytes:
    """Bytes of training state on one device holding `n_params`, under ZeRO stage `zero` over `dp` ranks."""
    if zero not in ZERO_STAGES:
        raise ValueError(f"zero: found {zero!r}, required one of {ZERO_STAGES}")
    if not isinstance(dp, int) or dp < 1:
        raise ValueError(f"dp: found {dp!r}, required an integer >= 1")
    per = state_bytes_per_param(precision, optimizer).scaled(n_params)
    return StateBytes(weights=per.weights / (dp if zero >= 3 else 1),
                      gradients=per.gradients / (dp if zero >= 2 else 1),
                      master=per.master / (dp if zero >= 1 else 1),
                      optimizer=per.optimizer / (dp if zero >= 1 else 1))


def optimizer_workspace(leaves: Iterable[float], optimizer: str, backend: str) -> float:
    """Bytes the optimizer's step allocates beyond the training state, on one device whose leaves
    (the local tensors it updates, fp32: the runtime keeps fp32 leaves at every precision) hold
    `leaves` elements each. Adam and AdamW divide by

        denom = sqrt(v) / sqrt(1 − β2^t) + ε

    a new tensor per leaf (torch.optim.adam, Kingma and Ba 2015, Algorithm 1). torch runs the
    update per tensor on CPU tensors and as foreach kernels over every tensor on CUDA ones
    (`torch.optim.optimizer._default_to_fused_or_foreach`), so it holds

        per tensor (gloo, CPU ranks):  2 · 4 · max leaf       sqrt(v) and its quotient at once
        foreach (NCCL, GPUs):          4 · Σ leaves           every leaf's sqrt(v) at once

    (measured with `runtime.memory.LiveMemory` around a step: leaves of 4 and 1 MiB, 8.0 and
    5.0 MiB). SGD, with or without momentum, updates in place and holds none. In a step the
    optimizer runs after backward has freed the activations, so a device peaks at

        max(state + activations + backward workspace, state + optimizer workspace)
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: found {optimizer!r}, required one of {', '.join(OPTIMIZERS)}")
    if optimizer in ("sgd", "momentum"):
        return 0.0
    sizes = list(leaves)
    if backend == "gloo":
        return 2 * 4 * max(sizes, default=0)
    return 4 * sum(sizes)


@dataclass(frozen=True, slots=True)
class ActivationMemory:
    """Bytes kept for backward. `boundaries` is the seeds' checkpointed figure (layer inputs only)."""

    checkpoint: str
    boundaries: float
    outside_layers: float
    recompute_peak: float
    saved: float
    """Without checkpointing: everything autograd saves."""

    @property
    def total(self) -> float:
        if self.checkpoint == "none":
            return self.saved
        return self.boundaries + self.outside_layers + self.recompute_peak


def activation_memory(graph: CapturedGraph, *, checkpoint: str = "none", scale: float = 1.0) -> ActivationMemory:
    """Activation bytes of one step of `graph`, times `scale` (e.g. more sequences than captured)."""
    if checkpoint not in ("none", "layers"):
        raise ValueError(f"checkpoint: found {checkpoint!r}, required 'none' or 'layers'")
    nodes = graph.nodes
    state = {p.placeholder for p in graph.params.values()}
    by_layer: dict[int, float] = {}
    outside = 0.0
    for info in nodes.values():
        if info.layer is None:
            outside += info.saved_bytes
        else:
            by_layer[info.layer] = by_layer.get(info.layer, 0.0) + info.saved_bytes
    boundaries = 0.0
    for layer in graph.layers:
        members = set(layer.nodes)
        entering = {p for n in layer.nodes for p in nodes[n].inputs
                    if p not in members and p not in state and nodes[p].requires_grad}
        boundaries += sum(nodes[p].output.nbytes for p in entering if nodes[p].output is not None)
    return ActivationMemory(checkpoint=checkpoint, boundaries=boundaries * scale, outside_layers=outside * scale,
                            recompute_peak=max(by_layer.values(), default=0.0) * scale,
                            saved=graph.saved_bytes * scale)
