"""The captured graph's records: what capture and analysis learned about each node, parameter and layer.

Small frozen records in the spirit of torch.fx's `TensorMetadata`; `CapturedGraph` holds them with
the `torch.export.ExportedProgram` they describe. Produced by `autopar.capture`, read by the cost
model and the planning passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from autopar.units import fmt_bytes, fmt_count, fmt_flops


@dataclass(frozen=True, slots=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """One node of the graph with its forward costs (per step, unsharded)."""

    name: str
    op: str
    """The ATen overload (`aten.linear.default`), or `placeholder` / `output`."""
    outputs: tuple[TensorMeta, ...]
    inputs: tuple[str, ...]
    """Producer nodes of the tensor arguments, in argument order."""
    module_path: str
    """The module the user wrote, as in `model.named_modules()` ("" for the top level)."""
    module_type: str
    params: tuple[str, ...] = ()
    """Parameters (state_dict names) this node reads directly."""
    flops: int = 0
    """Forward FLOPs: matmul-like ops as torch.utils.flop_counter counts them (2·m·n·k for a matmul)."""
    backward_flops: int = 0
    bytes_moved: int = 0
    """Bytes read and written by the forward kernel; 0 for views."""
    saved_bytes: int = 0
    """Bytes this node adds to what autograd keeps for backward (its outputs saved by anyone, plus
    tensors its own backward keeps, such as layer_norm's mean and rstd)."""
    internal_saved: int = 0
    """The part of `saved_bytes` that is not the node's output (mean and rstd, a loss's log-softmax)."""
    alias_of: str | None = None
    """For views: the node whose storage this node's output shares."""
    requires_grad: bool = False
    layer: int | None = None
    """Index into `CapturedGraph.layers`, or None outside the repeated blocks."""
    source: str = ""
    """`file:line` of the user's code that created the node."""

    @property
    def output(self) -> TensorMeta | None:
        return self.outputs[0] if self.outputs else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamInfo:
    name: str
    meta: TensorMeta
    placeholder: str
    """The graph input that carries it."""
    tied: tuple[str, ...] = ()
    """Other state_dict names of the same tensor (tied embeddings)."""
    requires_grad: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
    """One repeated block (a transformer layer, a residual block): a contiguous run of nodes."""

    index: int
    name: str
    """Module path of the block, e.g. `layers.3`."""
    nodes: tuple[str, ...]
    signature: str
    """Equal signatures mean structurally identical blocks (same ops, shapes, wiring and parameters)."""
    flops: int
    params: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class CapturedGraph:
    """A model's training (or inference) step as an ATen-level graph, with per-node costs."""

    program: torch.export.ExportedProgram
    nodes: dict[str, NodeInfo]
    params: dict[str, ParamInfo]
    inputs: tuple[str, ...]
    """Placeholders of the user's example inputs, then of the target when a loss was captured."""
    has_loss: bool
    layers: tuple[Layer, ...]
    outputs: tuple[str, ...] = ()
    """The graph's outputs: with a loss, the loss first, then the model's output tensors."""
    warnings: tuple[str, ...] = field(default=())
    precision: str = "fp32"
    """The mixed-precision rewrite the graph carries (`passes.precision`): fp32 (none), bf16, fp16."""

    @property
    def reduced_outputs(self) -> tuple[str, ...]:
        """Outputs a training step returns whole on every rank: the loss, or every output without one."""
        return self.outputs[:1] if self.has_loss else self.outputs

    @property
    def flops(self) -> int:
        return sum(n.flops for n in self.nodes.values())

    @property
    def backward_flops(self) -> int:
        return sum(n.backward_flops for n in self.nodes.values())

    @property
    def num_params(self) -> int:
        """Distinct parameters (tied ones once)."""
        seen = {min((p.name, *p.tied)) for p in self.params.values()}
        return sum(self.params[n].meta.numel for n in seen)

    @property
    def saved_bytes(self) -> int:
        return sum(n.saved_bytes for n in self.nodes.values())

    def summary(self) -> str:
        ops = sum(1 for n in self.nodes.values() if n.op not in ("placeholder", "output"))
        distinct = len({layer.signature for layer in self.layers})
        lines = [
            f"{ops} ops, {fmt_count(self.num_params)} parameters, "
            f"forward {fmt_flops(self.flops)}, backward {fmt_flops(self.backward_flops)}, "
            f"saved for backward {fmt_bytes(self.saved_bytes)}",
            f"{len(self.layers)} layers ({distinct} distinct)"
            + (f": {self.layers[0].name} … {self.layers[-1].name}" if self.layers else ""),
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)
