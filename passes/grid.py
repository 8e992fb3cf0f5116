"""The Megatron-LM grid: every hand-written 3-D configuration, costed like the search's own plans.

Takes a captured graph, the cluster and the sharding options; gives every configuration that fits,
fastest first:

    dp × tp × pp = N devices, tp dividing the devices of a node (Megatron-LM keeps tensor
    parallelism inside one), pp stages of equal layer counts (the first also runs the embedding,
    the last the head), each stage on a (dp, tp) mesh of its own devices;
    ZeRO level z in {0, 1, 2} over dp (and 3, FSDP, when pp = 1 and m = 1);
    m microbatches, the divisors of the batch that leave each data-parallel rank whole samples;
    1F1B (Narayanan et al. 2021), activation checkpointing at layer boundaries on or off.

Each configuration's parts (embedding side, layer, head side) are solved under the baseline's
predicate (`passes.baselines`: Megatron's column/row tensor parallelism on tp, data parallelism on
dp) on the same sharding problems the inter-op pass uses (`passes.stage_costs.StageCosts`), and a stage's
time and memory come from the same figures: the grid and `auto` differ only in what they may choose.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autopar.cluster import Cluster
from autopar.graph import CapturedGraph
from autopar.vocab import LogicalMesh
from autopar.passes import schedules
from autopar.passes.baselines import predicate
from autopar.passes.interop import first_buckets
from autopar.passes.stage_costs import StageCosts
from autopar.passes.sharding import ShardingOptions
from autopar.passes.split import batch_statistics, layer_ranges


@dataclass(frozen=True, slots=True)
class GridPoint:
    dp: int
    tp: int
    pp: int
    microbatches: int
    zero: int
    checkpoint: bool
    step_time: float
    memory: float
    """Peak bytes per device, over the stages."""

    def describe(self) -> str:
        return (f"dp {self.dp} × tp {self.tp} × pp {self.pp}, {self.microbatches} microbatches, ZeRO-{self.zero}"
                f"{', checkpointed' if self.checkpoint else ''}")


def grid(captured: CapturedGraph, cluster: Cluster, options: ShardingOptions, batch: int,
         time_limit: float = 60.0) -> list[GridPoint]:
    """Every configuration of the grid that fits in memory, fastest first."""
    n, per_node, layers = cluster.num_devices, cluster.devices_per_node, len(captured.layers)
    if layers < 1:
        raise ValueError("grid: found a model with no repeated layers, required at least one (stages split layers)")
    options = dataclasses.replace(options, levels=(0, 1, 2, 3))
    counts = [1] if batch_statistics(captured) else schedules.microbatch_counts(batch)  # batch norm: whole batches
    costs = StageCosts(captured, cluster, options, [(i, i + 1) for i in range(layers)], batch, time_limit)
    points = []
    for tp in [t for t in range(1, per_node + 1) if per_node % t == 0 and n % t == 0]:
        for pp in [p for p in range(1, layers + 1) if (n // tp) % p == 0]:
            dp = n // (tp * pp)
            devices = dp * tp
            if not (per_node % devices == 0 or devices % per_node == 0):
                continue  # a stage is a part of one node or whole nodes
            for zero in (0, 1, 2, 3):
                if (zero and dp == 1) or (zero == 3 and pp > 1):
                    continue
                points += _configuration(costs, dp, tp, pp, zero, batch, counts)
    return sorted(points, key=lambda q: (q.step_time, q.memory))


def _configuration(costs: StageCosts, dp: int, tp: int, pp: int, zero: int, batch: int,
                   counts: list[int]) -> list[GridPoint]:
    """The configuration for every microbatch count and checkpointing choice that fits."""
    shape = (dp, tp) if dp > 1 and tp > 1 else (dp * tp,)
    name = "dp+tp" if dp > 1 and tp > 1 else ("tp" if tp > 1 else "dp")
    parts = costs.parts(shape)
    allowed = predicate(name, parts.problem, zero)
    ranges = layer_ranges(len(costs.blocks), pp)
    chosen = []
    for a, b in ranges:
        plans = {part: parts.restricted(part, allowed) for part in costs.part_counts(a, b)}
        if any(plan is None for plan in plans.values()):
            return []
        chosen.append(plans)
    mesh = LogicalMesh.build(costs.cluster, shape)
    out = []
    for ckpt in (False, True):
        figures = [costs.figures_of(a, b, shape, ckpt, plans) for (a, b), plans in zip(ranges, chosen)]
        for m in counts:
            micro = batch // m
            if any(micro % f.shards for f in figures) or micro % dp or (zero == 3 and m > 1):
                continue  # (FSDP gathers again every microbatch: costed without accumulation)
            kept = [schedules.in_flight("1f1b", pp, m, i) if pp > 1 else 1.0 for i in range(pp)]
            memory = max(f.state + (f.flight * k + f.largest) / m for f, k in zip(figures, kept))
            if memory > costs.budget:
                continue
            times = [f.per_microbatch(m) + costs.transfer(a, mesh, plans, m)
                     for f, (a, _), plans in zip(figures, ranges, chosen)]
            once = [f.once for f in figures]
            step = schedules.step_time("1f1b", times, m, once) if pp > 1 else m * times[0] + once[0]
            step += first_buckets(figures)
            out.append(GridPoint(dp=dp, tp=tp, pp=pp, microbatches=m, zero=zero, checkpoint=ckpt, step_time=step,
                                 memory=memory))
    return out
