"""`Plan.summary()`: the plan as text a person can check.

Takes a `Plan`; gives the predicted step time and MFU, memory per device, a per-layer table of
placements (layers with the same placements are one row), every collective with its bytes and
predicted time (largest total first), the named strategies it was compared with, and warnings.
"""

from __future__ import annotations

from autopar.plan import Plan, Stage
from autopar.units import fmt_bytes, fmt_seconds
from autopar.vocab import fmt

_KEY_OPS = ("linear", "embedding", "conv2d", "einsum", "scaled_dot_product_attention", "layer_norm", "rms_norm",
            "batch_norm", "cross_entropy_loss", "mse_loss", "mm", "bmm", "matmul", "addmm")
_LEVEL = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "FSDP"}


def summarize(plan: Plan) -> str:
    c = plan.cost
    lines = [f"plan for {plan.model} ({plan.strategy}, {plan.precision}, {plan.optimizer}) on {plan.cluster.describe()}"]
    for s in plan.stages:
        line = (f"stage {s.index}: mesh {'×'.join(map(str, s.mesh.shape))} (devices {s.mesh.devices[0]}.."
                f"{s.mesh.devices[-1]}), layers {s.layers[0]}..{s.layers[1] - 1}")
        if len(plan.stages) > 1:
            line += (f"; {fmt_seconds(s.microbatch_time)} per microbatch, busy {fmt_seconds(s.cost.step_time)}, "
                     f"memory {fmt_bytes(s.cost.peak_memory)}" + (", checkpointed" if s.checkpoint else ""))
        lines.append(line)
    if plan.schedule.kind != "none":
        sch = plan.schedule
        chunks = f", {sch.virtual} chunks per device" if sch.kind == "interleaved" else ""
        lines.append(f"schedule: {sch.kind}, {sch.microbatches} microbatches{chunks}, bubble {sch.bubble:.1%} of work")
    budget = plan.cluster.device.memory
    lines += [
        f"predicted step {fmt_seconds(c.step_time)}: compute {fmt_seconds(c.compute)}, communication "
        f"{fmt_seconds(c.communication)}, optimizer {fmt_seconds(c.optimizer)}; MFU {c.mfu:.1%}",
        f"memory per device {fmt_bytes(c.peak_memory)} of {fmt_bytes(budget)}: activations "
        f"{fmt_bytes(c.activations)}, parameters+gradients+optimizer {fmt_bytes(c.parameter_state)}",
        f"search: {plan.search.solver} {plan.search.status} in {plan.search.seconds:.2f} s"
        + (f", {plan.search.variables} variables, {plan.search.constraints} constraints"
           if plan.search.variables else "") + "; meshes tried: "
        + ", ".join(f"{'×'.join(map(str, m.shape))} "
                    + (fmt_seconds(m.step_time) + (f" ({m.note})" if m.note else "") if m.step_time is not None
                       else m.note) for m in plan.search.meshes),
        "",
    ]
    for s in plan.stages:
        lines += _layer_table(s)
    lines += ["", "collectives per step (largest total first)",
              f"  {'kind':15s}{'axis':>5s}{'ranks':>6s}{'bytes':>11s}{'time':>11s}{'×':>5s}  {'phase':9s}where"]
    for r in plan.collectives[:25]:
        lines.append(f"  {r.kind:15s}{r.axis:5d}{r.group_size:6d}{fmt_bytes(r.bytes):>11s}{fmt_seconds(r.time):>11s}"
                     f"{r.count:5d}  {r.phase:9s}{r.module or r.node} ({r.node})")
    if len(plan.collectives) > 25:
        lines.append(f"  … and {len(plan.collectives) - 25} more")
    if plan.baselines:
        lines += ["", "hand-written strategies under the same cost model"]
        for b in plan.baselines:
            if b.step_time is None:
                lines.append(f"  {b.strategy:7s}{'×'.join(map(str, b.mesh)):>8s}  does not fit: {b.note}")
            else:
                lines.append(f"  {b.strategy:7s}{'×'.join(map(str, b.mesh)):>8s}  {fmt_seconds(b.step_time):>10s}  "
                             f"{b.step_time / c.step_time:5.2f}× this plan's time, {fmt_bytes(b.peak_memory)}")
    if plan.warnings:
        lines += ["", "warnings"] + [f"  {w}" for w in plan.warnings]
    return "\n".join(lines)


def _layer_table(stage: Stage) -> list[str]:
    """Key ops with their output and parameter placements; consecutive identical layers are one row set."""
    sections: list[list] = []  # [first layer, last layer, rows]
    for node in stage.nodes.values():
        op = node.op.split(".")[1] if node.op.count(".") else node.op
        if op not in _KEY_OPS:
            continue
        prefix = node.module + "."
        held = " ".join(f"{p[len(prefix):]}:{fmt(q.storage)}{'/' + _LEVEL[q.level] if q.level else ''}"
                        for p, q in stage.params.items() if node.module and p.startswith(prefix)
                        and "." not in p[len(prefix):])
        module = node.module if node.layer is None else node.module.replace(f".{node.layer}.", ".*.", 1)
        row = (module, op, fmt(node.outputs[0]) if node.outputs else "", held)
        if sections and sections[-1][0] == node.layer:
            sections[-1][2].append(row)
        else:
            sections.append([node.layer, node.layer, [row]])
    merged: list[list] = []
    for first, last, rows in sections:
        if merged and first is not None and merged[-1][1] is not None and merged[-1][1] + 1 == first \
                and merged[-1][2] == rows:
            merged[-1][1] = last
        else:
            merged.append([first, last, rows])
    lines = [f"  {'layers':10s}{'module':30s}{'op':30s}{'output':16s}parameters (storage/level)"]
    for first, last, rows in merged:
        label = "-" if first is None else (str(first) if first == last else f"{first}-{last}")
        for module, op, out, held in rows:
            lines.append(f"  {label:10s}{module[:29]:30s}{op[:29]:30s}{out:16s}{held}")
    return lines
