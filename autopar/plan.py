"""The Plan: what was chosen for every node and parameter, on which devices, and what it costs.

A frozen dataclass tree with no solver objects in it; `to_json` / `from_json` round-trip it
exactly, and a malformed file gives a `ValueError` naming the field (`autopar.serialize`). Every
record checks its own fields when built, by the planner or from a file: enums (strategy, precision,
schedule, placement kinds, collective phases), ranges (ZeRO level, counts, costs >= 0), one
placement per mesh axis, shard dims inside the tensor, stage meshes inside the cluster.

    plan = autopar.plan(model, cluster, example_inputs=(x,), loss_fn=loss, target=y)
    print(plan.summary()); plan.visualize("dump/")
    plan.save("plan.json"); same = Plan.load("plan.json")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from torch.distributed.tensor import Shard
from torch.distributed.tensor.placement_types import Placement

from autopar.cluster import Cluster
from autopar.cost.comm import COLLECTIVES
from autopar.cost.memory import OPTIMIZERS, PRECISIONS
from autopar.files import parse_json, read_json, write_atomic
from autopar.passes.schedules import SCHEDULES
from autopar.serialize import from_data, to_data
from autopar.vocab import LogicalMesh, short

if TYPE_CHECKING:
    from autopar.viz import Dumps

FORMAT = 1
STRATEGIES = ("auto", "dp", "zero1", "zero2", "fsdp", "tp", "dp+tp", "sp")
RULE_KINDS = ("local", "partial_bias", "vocab_embedding", "vocab_cross_entropy", "batch_mean_loss", "sync_batch_norm")
"""How an op runs on local shards along one axis (`passes.rules.Rule.kind`, `runtime.lower.kernel_of`)."""
LEVELS = (0, 1, 2, 3)
PHASES = ("forward", "backward", "step")


def _require(ok: bool, where: str, found: object, required: str) -> None:
    """The check every plan record makes: a ValueError "<where>: found <found>, required <required>"."""
    if not ok:
        raise ValueError(f"{where}: found {found}, required {required}")


def _at_least(owner: str, values: dict[str, float], low: float = 0) -> None:
    """`_require` value >= `low` for each named value of `owner`."""
    for name, value in values.items():
        _require(value >= low, f"{owner}.{name}", repr(value), f">= {low}")  # NaN fails too


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

    def __post_init__(self) -> None:
        for a, kind in enumerate(self.kinds):
            _require(kind in RULE_KINDS, f"NodePlan.kinds[{a}]", repr(kind), f"one of {', '.join(RULE_KINDS)}")
        _require(len(self.args) in (0, len(self.inputs)), "NodePlan.args", f"{len(self.args)} name(s)",
                 f"one per tensor argument ({len(self.inputs)}), or none")


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

    def __post_init__(self) -> None:
        _require(all(d >= 0 for d in self.shape), "ParamPlan.shape", self.shape, "sizes >= 0")
        _require(self.level in LEVELS, "ParamPlan.level", repr(self.level), f"one of {LEVELS}")
        for name in ("storage", "grad"):
            _require(len(getattr(self, name)) == len(self.use), f"ParamPlan.{name}",
                     f"{len(getattr(self, name))} placement(s)", f"{len(self.use)}, as many as `use` (one per axis)")
        for name in ("use", "storage", "grad"):
            for a, p in enumerate(getattr(self, name)):
                _require(not isinstance(p, Shard) or p.dim < len(self.shape), f"ParamPlan.{name}[{a}]", short(p),
                         f"S(dim) with dim < {len(self.shape)} (the parameter's dims {self.shape}), R or P")


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

    def __post_init__(self) -> None:
        _require(self.phase in PHASES, "CollectiveRecord.phase", repr(self.phase), f"one of {', '.join(PHASES)}")
        _require(self.kind in COLLECTIVES, "CollectiveRecord.kind", repr(self.kind),
                 f"one of {', '.join(COLLECTIVES)}")
        _at_least("CollectiveRecord", {"axis": self.axis, "bytes": self.bytes, "time": self.time})
        _at_least("CollectiveRecord", {"group_size": self.group_size, "count": self.count}, low=1)


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
    fixed: float = 0.0
    """The seconds of `compute` a cut of the batch does not shrink (`passes.strategies.fixed_time`):
    what every microbatch pays whole."""

    def __post_init__(self) -> None:
        _at_least("Cost", {f.name: getattr(self, f.name) for f in fields(self)})


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

    def __post_init__(self) -> None:
        _require(self.index >= 0, "Stage.index", self.index, ">= 0")
        first, last = self.layers
        _require(0 <= first <= last, "Stage.layers", list(self.layers), "[first, last) with 0 <= first <= last")
        _at_least("Stage", {"microbatch_time": self.microbatch_time})
        for name, node in self.nodes.items():
            for side in ("inputs", "outputs"):
                for i, placed in enumerate(getattr(node, side)):
                    self._per_axis(f"nodes[{name!r}].{side}[{i}]", len(placed))
            if node.kinds:
                self._per_axis(f"nodes[{name!r}].kinds", len(node.kinds))
        for name, param in self.params.items():
            self._per_axis(f"params[{name!r}].use", len(param.use))

    def _per_axis(self, where: str, count: int) -> None:
        _require(count == self.mesh.ndim, f"Stage.{where}", f"{count} entries",
                 f"{self.mesh.ndim}, one per axis of the stage's mesh {self.mesh.shape}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    kind: str = "none"
    """"none" (one stage), "gpipe", "1f1b", "interleaved", "zero-bubble" (`passes.schedules`)."""
    microbatches: int = 1
    virtual: int = 1
    """Chunks per device (interleaved)."""
    bubble: float = 0.0
    """Idle / work of the schedule with equal stages."""

    def __post_init__(self) -> None:
        kinds = ("none",) + SCHEDULES
        _require(self.kind in kinds, "Schedule.kind", repr(self.kind), f"one of {', '.join(kinds)}")
        _at_least("Schedule", {"microbatches": self.microbatches, "virtual": self.virtual}, low=1)
        _at_least("Schedule", {"bubble": self.bubble})


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
        for name, allowed in (("precision", PRECISIONS), ("optimizer", OPTIMIZERS)):
            value = getattr(self, name)
            _require(value in allowed, f"Plan.{name}", repr(value), f"one of {', '.join(allowed)}")
        for j, s in enumerate(self.stages):
            _require(s.index == j, f"Plan.stages[{j}].index", s.index, f"{j}, the stage's position")
            outside = [d for d in s.mesh.devices if not 0 <= d < self.cluster.num_devices]
            _require(not outside, f"Plan.stages[{j}].mesh.devices", f"device(s) {outside}",
                     f"devices 0..{self.cluster.num_devices - 1} of the plan's cluster")
        if self.quantized:
            from autopar.quant.modules import SCHEMES

            for layer, scheme in self.quantized.items():
                _require(scheme in SCHEMES, f"Plan.quantized[{layer!r}]", repr(scheme), f"one of {', '.join(SCHEMES)}")

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
        """Writes the JSON atomically (`autopar.files.write_atomic`)."""
        write_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Reads a file `save` wrote (JSON only; nothing in it is executed); errors name the file."""
        data = read_json(path, "plan file")
        try:
            return from_data(cls, data, "plan")
        except ValueError as e:
            raise ValueError(f"plan file {path}: {e}") from None

    def summary(self) -> str:
        from autopar.summary import summarize

        return summarize(self)

    def visualize(self, directory: str | os.PathLike, *, graphviz: bool | None = None) -> Dumps:
        """Writes graph.dot, graph.svg (with Graphviz), timeline.svg and report.html into `directory`
        (`autopar.viz`); gives their paths."""
        from autopar.viz import visualize

        return visualize(self, directory, graphviz=graphviz)
