"""The Plan: what was chosen for every node and parameter, on which devices, and what it costs.

A frozen dataclass tree with no solver objects in it; `to_json` / `from_json` round-trip it
exactly, and a malformed file gives a `ValueError` naming the field (`autopar.serialize`).

    plan = autopar.plan(model, cluster, example_inputs=(x,), loss_fn=loss, target=y)
    print(plan.summary()); plan.visualize("dump/")
    plan.save("plan.json"); same = Plan.load("plan.json")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch.distributed.tensor.placement_types import Placement

from autopar.cluster import Cluster, parse_json
from autopar.serialize import from_data, to_data
from autopar.vocab import LogicalMesh

if TYPE_CHECKING:
    from autopar.viz import Dumps

FORMAT = 1
STRATEGIES = ("auto", "dp", "zero1", "zero2", "fsdp", "tp", "dp+tp", "sp")


@dataclass(frozen=True, kw_only=True, slots=True)
class NodePlan:
    op: str
    module: str
    layer: int | None
    inputs: tuple[tuple[Placement, ...], ...]
    """Per tensor argument (flattened order), its placement per mesh axis as the op consumes it."""
    outputs: tuple[tuple[Placement, ...], ...]
    kinds: tuple[str, ...] = ()
    """Per axis, how the op runs on local shards (`passes.rules.Rule.kind`)."""
    args: tuple[str, ...] = ()
    """Per tensor argument (as `inputs`), the node that produces it: an op, an input or a parameter's
    placeholder. The graph's edges; empty in plans written before it was recorded."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamPlan:
    shape: tuple[int, ...]
    use: tuple[Placement, ...]
    """As the op consumes it."""
    storage: tuple[Placement, ...]
    """As it is kept between steps."""
    grad: tuple[Placement, ...]
    """Where its gradient is reduced to, and the optimizer state lives."""
    level: int
    """0 DDP (gradients all-reduced), 1 ZeRO-1, 2 ZeRO-2, 3 ZeRO-3/FSDP."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CollectiveRecord:
    node: str
    module: str
    phase: str
    """"forward", "backward" or "step" (after the optimizer)."""
    kind: str
    axis: int
    group_size: int
    bytes: float
    time: float
    """Seconds, once."""
    count: int
    """Times per step (identical layers)."""
    source: str = ""
    """The producer whose tensor the collective brings to `node` (the graph edge it runs on); "" for
    the collectives an op runs itself and for parameter synchronization."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Cost:
    step_time: float
    """Predicted seconds per training step."""
    compute: float
    communication: float
    optimizer: float
    peak_memory: float
    """Predicted bytes on the busiest device."""
    activations: float
    parameter_state: float
    """Weights, gradients and optimizer state, bytes per device."""
    mfu: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Stage:
    index: int
    layers: tuple[int, int]
    """The layer range [first, last) the stage runs."""
    mesh: LogicalMesh
    nodes: dict[str, NodePlan]
    params: dict[str, ParamPlan]
    cost: Cost
    checkpoint: bool = False
    """Activation checkpointing at layer boundaries (layers run forward again in backward)."""
    microbatch_time: float = 0.0
    """Seconds per microbatch, forward and backward, transfers included (pipelined plans)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    kind: str = "none"
    """"none" (one stage), "gpipe", "1f1b", "interleaved", "zero-bubble" (`passes.schedules`)."""
    microbatches: int = 1
    virtual: int = 1
    """Chunks per device (interleaved)."""
    bubble: float = 0.0
    """Idle / work of the schedule with equal stages."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MeshResult:
    shape: tuple[int, ...]
    step_time: float | None
    """None when nothing fits on this mesh."""
    note: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchReport:
    solver: str
    status: str
    gap: float
    variables: int
    constraints: int
    seconds: float
    """The whole search: every mesh, baselines and ILPs (capture not included)."""
    meshes: tuple[MeshResult, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Comparison:
    """A named strategy evaluated by the same cost model, for the summary's comparison."""

    strategy: str
    mesh: tuple[int, ...]
    step_time: float | None
    peak_memory: float | None
    note: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    model: str
    fingerprint: str
    """Hash of the captured graph's ops and shapes: a plan only runs on the graph it was made for."""
    strategy: str
    precision: str
    optimizer: str
    cluster: Cluster
    stages: tuple[Stage, ...]
    schedule: Schedule
    cost: Cost
    collectives: tuple[CollectiveRecord, ...]
    search: SearchReport
    baselines: tuple[Comparison, ...] = ()
    warnings: tuple[str, ...] = ()
    quantized: dict[str, str] = field(default_factory=dict)
    """Linear layer → quantization scheme (`autopar.quant.modules`) the graph was captured with."""
    format: int = FORMAT

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ValueError(f"Plan.format: found {self.format}, required {FORMAT}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Plan.strategy: found {self.strategy!r}, required one of {', '.join(STRATEGIES)}")
        if not self.stages:
            raise ValueError("Plan.stages: found none, required at least one")

    @property
    def num_devices(self) -> int:
        """Distinct devices (interleaved chunks share their group's)."""
        return len({d for s in self.stages for d in s.mesh.devices})

    def to_json(self) -> str:
        return json.dumps(to_data(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return from_data(cls, parse_json(text, "plan file"), "plan")

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        return cls.from_json(Path(path).read_text())

    def summary(self) -> str:
        from autopar.summary import summarize

        return summarize(self)

    def visualize(self, directory: str | os.PathLike, *, graphviz: bool | None = None) -> Dumps:
        """Writes graph.dot, graph.svg (with Graphviz), timeline.svg and report.html into `directory`
        (`autopar.viz`); gives their paths."""
        from autopar.viz import visualize

        return visualize(self, directory, graphviz=graphviz)
