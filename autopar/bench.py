"""`autopar bench`: benchmarks that print a markdown table (and can append it to a file).

    autopar bench capture --models gpt3-175b llama3-8b
    autopar bench planner

capture: wall time to build a zoo model on the meta device and capture its training step
(export, per-node analysis, layers), with the graph's size. Nothing is allocated.
planner: wall time of `autopar.plan` on large models and simulated clusters, with the ILP's size,
and the predicted step time and MFU of the plan found.
pipeline: the `auto` plan with pipeline stages (`autopar.plan(..., pipeline=True)`) against the best
configuration of the Megatron-LM grid (`passes.grid`), both under the same cost model, and the
search's wall time; mixed precision (fp32 master weights, the graph rewritten by `passes.precision`).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import torch

from autopar.capture import capture
from autopar.cluster import Cluster
from autopar.units import fmt_count, fmt_flops, fmt_seconds, markdown_table
from autopar.vocab import LogicalMesh


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


def cpu_times(path: str = "/proc/stat") -> list[int] | None:
    """The machine's CPU time so far, in ticks per state (Linux's /proc/stat "cpu" line: user, nice,
    system, idle, iowait, irq, softirq, steal, ...); None where there is no such file."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    return [int(x) for x in fields[1:]] if fields and fields[0] == "cpu" else None


def stolen(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of CPU time the hypervisor gave to others between two `cpu_times` readings (steal
    ticks / all ticks, guest time excluded as Linux already counts it in user); None when unknown. A
    virtual machine's timings are only as steady as this is low."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return None
    spent = [a - b for a, b in zip(after[:8], before[:8])]
    return spent[7] / sum(spent) if sum(spent) > 0 else None


def capture_table(rows: list[CaptureRow]) -> str:
    header = ["model", "parameters", "ATen ops", "layers (distinct)", "forward FLOPs", "build (s)", "capture (s)"]
    return markdown_table(header, [[r.model, fmt_count(r.params), str(r.ops), f"{r.layers} ({r.distinct_layers})",
                                     fmt_flops(r.forward_flops), f"{r.build_seconds:.2f}", f"{r.capture_seconds:.2f}"]
                                    for r in rows])


@dataclass(frozen=True, slots=True)
class PlannerCase:
    label: str
    model: str
    batch: int
    nodes: int
    mesh: tuple[int, ...] | None = None
    """Plan on this mesh only; None: every candidate mesh (the full search)."""
    overrides: tuple[tuple[str, int], ...] = ()


PLANNER_CASES = (
    PlannerCase(label="GPT-3 175B, one layer, 128×8 mesh of H100", model="gpt3-175b", batch=1536, nodes=128,
                mesh=(128, 8), overrides=(("n_layers", 1),)),
    PlannerCase(label="GPT-3 175B, 96 layers, 1024 H100", model="gpt3-175b", batch=512, nodes=128),
    PlannerCase(label="Llama-3 8B, 64 H100", model="llama3-8b", batch=64, nodes=8),
)


@dataclass(frozen=True, slots=True)
class PlannerRow:
    case: PlannerCase
    capture_seconds: float
    plan_seconds: float
    variables: int
    constraints: int
    status: str
    mesh: tuple[int, ...]
    step_time: float
    mfu: float
    baseline: str = ""
    """The fastest hand-written strategy under the same cost model, and its step time."""
    baseline_time: float | None = None


def planner_benchmark(cases=PLANNER_CASES, *, precision: str = "bf16") -> list[PlannerRow]:
    """Each case end to end: build on meta, capture, plan (bf16 mixed precision)."""
    from autopar import models
    from autopar.planner import plan_graph

    rows = []
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    for case in cases:
        entry = models.get(case.model)
        start = time.perf_counter()
        model = entry.build(device="meta", dtype=dtype, **dict(case.overrides))
        inputs, target = entry.example_batch(case.batch, device="meta")
        graph = capture(model, inputs, loss_fn=entry.loss_fn, target=target)
        captured = time.perf_counter()
        cluster = Cluster.preset("h100", nodes=case.nodes)
        meshes = [LogicalMesh.build(cluster, case.mesh)] if case.mesh else None
        plan = plan_graph(graph, cluster, model_name=case.model, precision=precision, meshes=meshes)
        done = time.perf_counter()
        named = [b for b in plan.baselines if b.step_time is not None]
        best = min(named, key=lambda b: b.step_time, default=None)
        rows.append(PlannerRow(case=case, capture_seconds=captured - start, plan_seconds=done - captured,
                               variables=plan.search.variables, constraints=plan.search.constraints,
                               status=plan.search.status, mesh=plan.stages[0].mesh.shape,
                               step_time=plan.cost.step_time, mfu=plan.cost.mfu,
                               baseline=f"{best.strategy} on {'×'.join(map(str, best.mesh))}" if best else "none fits",
                               baseline_time=best.step_time if best else None))
    return rows


def planner_table(rows: list[PlannerRow]) -> str:
    header = ["case", "batch", "build + capture (s)", "plan (s)", "total (s)", "ILP variables", "constraints", "status",
              "mesh", "predicted step", "MFU", "fastest hand-written", "its step / auto's"]
    return markdown_table(header, [[
        r.case.label, str(r.case.batch), f"{r.capture_seconds:.1f}", f"{r.plan_seconds:.1f}",
        f"{r.capture_seconds + r.plan_seconds:.1f}", str(r.variables), str(r.constraints), r.status,
        "×".join(map(str, r.mesh)), fmt_seconds(r.step_time), f"{r.mfu:.1%}", r.baseline,
        f"{r.baseline_time / r.step_time:.2f}" if r.baseline_time else "-"] for r in rows])


@dataclass(frozen=True, slots=True)
class PipelineCase:
    label: str
    model: str
    preset: str
    nodes: int
    batch: int
    precision: str = "bf16"


PIPELINE_CASES = (
    PipelineCase("GPT-3 1.3B, 8 H100", "gpt3-1.3b", "h100", 1, 128),
    PipelineCase("GPT-3 6.7B, 64 H100", "gpt3-6.7b", "h100", 8, 256),
    PipelineCase("GPT-3 13B, 128 H100", "gpt3-13b", "h100", 16, 512),
    PipelineCase("GPT-3 175B, 1024 H100", "gpt3-175b", "h100", 128, 1024),
    PipelineCase("Llama-3 8B, 64 H100", "llama3-8b", "h100", 8, 256),
    PipelineCase("Llama-3 70B, 512 H100", "llama3-70b", "h100", 64, 512),
    PipelineCase("MoE 2.4B, 64 H100", "moe-2.4b", "h100", 8, 256),
    PipelineCase("Wide-ResNet 2B, 32 H100", "wresnet-1.97b", "h100", 4, 1536),
    PipelineCase("GPT-39B (Alpa), 64 V100", "gpt-39b", "v100", 8, 1024, "fp16"),
)


@dataclass(frozen=True, slots=True)
class PipelineRow:
    case: PipelineCase
    auto_step: float
    auto_plan: str
    search_seconds: float
    grid_step: float | None
    grid_plan: str
    grid_points: int


def pipeline_benchmark(cases=PIPELINE_CASES) -> list[PipelineRow]:
    """Each case: capture on meta, `auto` with pipeline stages (timed: capture included), then the
    Megatron grid on the same captured graph."""
    from autopar import models
    from autopar.errors import InfeasibleError
    from autopar.passes.grid import grid
    from autopar.passes.sharding import ShardingOptions
    from autopar.planner import plan_graph

    rows = []
    for case in cases:
        entry = models.get(case.model)
        start = time.perf_counter()
        model = entry.build(device="meta")  # fp32 master weights; the graph runs `case.precision`
        inputs, target = entry.example_batch(case.batch, device="meta")
        graph = capture(model, inputs, loss_fn=entry.loss_fn, target=target, precision=case.precision)
        cluster = Cluster.preset(case.preset, nodes=case.nodes)
        try:
            plan = plan_graph(graph, cluster, model_name=case.model, precision=case.precision, pipeline=True)
            auto_step, auto_plan = plan.cost.step_time, describe(plan)
        except InfeasibleError:
            auto_step, auto_plan = float("inf"), "nothing fits"
        seconds = time.perf_counter() - start
        points = grid(graph, cluster, ShardingOptions(precision=case.precision), case.batch)
        rows.append(PipelineRow(case=case, auto_step=auto_step, auto_plan=auto_plan, search_seconds=seconds,
                                grid_step=points[0].step_time if points else None,
                                grid_plan=points[0].describe() if points else "nothing fits",
                                grid_points=len(points)))
    return rows


def describe(plan) -> str:
    p = len(plan.stages) // plan.schedule.virtual
    meshes = sorted({"×".join(map(str, s.mesh.shape)) for s in plan.stages})
    if p == 1 and plan.schedule.kind == "none":
        return f"one stage on {', '.join(meshes)}"
    return (f"{p} stages on {', '.join(meshes)}, {plan.schedule.kind}, {plan.schedule.microbatches} microbatches"
            f"{', checkpointed' if any(s.checkpoint for s in plan.stages) else ''}")


def pipeline_table(rows: list[PipelineRow]) -> str:
    lines = ["| case | batch | auto: predicted step | auto plan | search (s) | grid best | grid plan | "
             "grid / auto |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r.grid_step / r.auto_step:.3f}" if r.grid_step and r.auto_step < float("inf") else "-"
        grid_step = fmt_seconds(r.grid_step) if r.grid_step else "-"
        lines.append(f"| {r.case.label} ({r.case.precision}) | {r.case.batch} | {fmt_seconds(r.auto_step)} | "
                     f"{r.auto_plan} | {r.search_seconds:.1f} | {grid_step} | {r.grid_plan} | {ratio} |")
    return "\n".join(lines)
