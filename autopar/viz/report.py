"""`report.html`: the whole plan in one self-contained page (inline CSS, SVG and a little JS).

Sections: summary (model, cluster, strategy, predicted step time, memory, MFU, search), stages
(time and memory breakdown), the costliest collectives (by time × count), the pipeline timeline,
the graph (Graphviz's SVG when it was rendered, else a built-in structure drawing; the DOT source
always, folded), the named strategies compared, warnings, and `Plan.summary()`'s text. Every piece
of text from the plan is escaped; the page loads nothing from elsewhere. The script only sorts a
table when its header is clicked.
"""

from __future__ import annotations

from html import escape

from autopar.plan import Plan
from autopar.units import fmt_bytes, fmt_seconds
from autopar.viz.graph import stage_title

TOP_COLLECTIVES = 15
SECTIONS = (("summary", "Summary"), ("stages", "Stages"), ("collectives", "Costliest collectives"),
            ("timeline", "Pipeline timeline"), ("graph", "Graph"), ("baselines", "Strategies compared"),
            ("warnings", "Warnings"), ("text", "Plan summary (text)"))

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:0 2em 3em;color:#222;max-width:1400px}
h1{font-size:1.5em;margin:.8em 0 .2em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em}
nav a{margin-right:1em;color:#2c5d8f;text-decoration:none}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}table.sortable th{cursor:pointer}table.sortable th:hover{background:#e6eef7}
th[data-dir=up]::after{content:" \\25B2"}th[data-dir=down]::after{content:" \\25BC"}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow:auto;max-height:80vh;border:1px solid #eee}
pre{background:#f8f8f8;padding:.8em;overflow:auto;font-size:.8em}
.note{color:#555;font-size:.9em}li.warn{color:#8a4b00}
"""

_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.querySelectorAll("th");
  heads.forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], up = th.getAttribute("data-dir") !== "up";
      var rows = Array.prototype.slice.call(body.rows);
      heads.forEach(function (h) { h.removeAttribute("data-dir"); });
      th.setAttribute("data-dir", up ? "up" : "down");
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute("data-v") || a.cells[col].textContent;
        var y = b.cells[col].getAttribute("data-v") || b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def report_html(plan: Plan, *, timeline_svg: str, graph_svg: str, graph_is_graphviz: bool, dot: str,
                assumptions: tuple[str, ...], structure_svg: str, bars_svg: str) -> str:
    """The page; the SVGs are inlined as given (they are autopar's own, already escaped)."""
    sections = {
        "summary": _summary(plan),
        "stages": bars_svg + _stage_table(plan),
        "collectives": _collectives(plan),
        "timeline": ("<ul class=note>" + "".join(f"<li>{escape(a)}</li>" for a in assumptions) + "</ul>"
                     f'<div class="scroll">{timeline_svg}</div>'),
        "graph": _graph(graph_svg if graph_is_graphviz else structure_svg, graph_is_graphviz, dot),
        "baselines": _baselines(plan),
        "warnings": ("<ul>" + "".join(f'<li class="warn">{escape(w)}</li>' for w in plan.warnings) + "</ul>"
                     if plan.warnings else "<p>None.</p>"),
        "text": f"<details><summary>show</summary><pre>{escape(plan.summary())}</pre></details>",
    }
    title = f"autopar plan: {plan.model}"
    nav = "".join(f'<a href="#{key}">{escape(name)}</a>' for key, name in SECTIONS)
    body = "".join(f'<section id="{key}"><h2>{escape(name)}</h2>{sections[key]}</section>' for key, name in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><header><h1>{escape(title)}</h1><nav>{nav}</nav></header>"
            f"{body}<script>{_JS}</script></body></html>\n")


def _table(head: list[str], rows: list[list[tuple[str, float | None]]], sortable: bool = True) -> str:
    """Cells are (text, number to sort by or None); text is escaped here."""
    out = [f'<table{" class=sortable" if sortable else ""}><thead><tr>'
           + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{escape(t)}</td>" if v is None else
                                    f'<td class=n data-v="{v!r}">{escape(t)}</td>' for t, v in row) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _summary(plan: Plan) -> str:
    c, s, sch = plan.cost, plan.search, plan.schedule
    budget = plan.cluster.device.memory
    rows = [("model", plan.model), ("cluster", plan.cluster.describe()), ("devices", str(plan.num_devices)),
            ("strategy", plan.strategy), ("precision", plan.precision), ("optimizer", plan.optimizer),
            ("stages", str(len(plan.stages))),
            ("schedule", "one stage" if sch.kind == "none" else
             f"{sch.kind}, {sch.microbatches} microbatches" + (f", {sch.virtual} chunks per device group"
                                                               if sch.virtual > 1 else "")
             + f", bubble {sch.bubble:.1%} of work"),
            ("predicted step time", f"{fmt_seconds(c.step_time)} (compute {fmt_seconds(c.compute)}, communication "
                                    f"{fmt_seconds(c.communication)}, optimizer {fmt_seconds(c.optimizer)})"),
            ("memory per device", f"{fmt_bytes(c.peak_memory)} of {fmt_bytes(budget)}: parameters, gradients and "
                                  f"optimizer state {fmt_bytes(c.parameter_state)}, activations "
                                  f"{fmt_bytes(c.activations)}"),
            ("MFU", f"{c.mfu:.1%}"),
            ("search", f"{s.solver} {s.status}" + (f", gap {s.gap:.2%}" if s.gap == s.gap and s.gap else "")
             + f", {s.seconds:.2f} s" + (f", {s.variables} variables, {s.constraints} constraints"
                                         if s.variables else "")),
            ("meshes tried", "; ".join(f"{'×'.join(map(str, m.shape))}: "
                                       + (fmt_seconds(m.step_time) if m.step_time is not None else "—")
                                       + (f" ({m.note})" if m.note else "") for m in s.meshes) or "—"),
            ("quantized layers", str(len(plan.quantized)) if plan.quantized else "none"),
            ("graph fingerprint", plan.fingerprint)]
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows) + "</table>"


def _stage_table(plan: Plan) -> str:
    p = len(plan.stages) // plan.schedule.virtual
    head = ["stage", "group", "layers", "mesh", "devices", "per microbatch", "busy per step", "compute",
            "communication", "optimizer", "peak memory", "param. state", "activations", "checkpointed"]
    rows = []
    for s in plan.stages:
        k = s.cost
        rows.append([(str(s.index), s.index), (str(s.index % p), s.index % p),
                     (f"{s.layers[0]}..{s.layers[1] - 1}", s.layers[0]), ("×".join(map(str, s.mesh.shape)), None),
                     (f"{s.mesh.devices[0]}..{s.mesh.devices[-1]}", s.mesh.devices[0]),
                     *[(fmt_seconds(x), x) for x in (s.microbatch_time, k.step_time, k.compute, k.communication,
                                                     k.optimizer)],
                     *[(fmt_bytes(x), x) for x in (k.peak_memory, k.parameter_state, k.activations)],
                     ("yes" if s.checkpoint else "no", None)])
    titles = "".join(f"<li>{escape(stage_title(plan, s))}</li>" for s in plan.stages)
    return _table(head, rows) + f"<details><summary>stage devices and layers</summary><ul>{titles}</ul></details>"


def _collectives(plan: Plan) -> str:
    if not plan.collectives:
        return ("<p>The plan records no collectives" + (" (pipelined plans record each stage's costs, not its "
                                                        "collectives)" if len(plan.stages) > 1 else "") + ".</p>")
    ranked = sorted(plan.collectives, key=lambda r: -r.time * r.count)
    total = sum(r.time * r.count for r in ranked)
    head = ["kind", "phase", "axis", "ranks", "bytes", "time", "×", "total", "op", "module", "tensor from"]
    rows = [[(r.kind, None), (r.phase, None), (str(r.axis), r.axis), (str(r.group_size), r.group_size),
             (fmt_bytes(r.bytes), r.bytes), (fmt_seconds(r.time), r.time), (str(r.count), r.count),
             (fmt_seconds(r.time * r.count), r.time * r.count), (r.node, None), (r.module or "—", None),
             (r.source or "— (the op's own)", None)] for r in ranked[:TOP_COLLECTIVES]]
    return (f"<p class=note>{len(ranked)} collectives in all, {fmt_seconds(total)} per step if none overlapped; "
            f"the {min(len(ranked), TOP_COLLECTIVES)} costliest:</p>" + _table(head, rows))


def _graph(svg: str, graphviz: bool, dot: str) -> str:
    what = ("Graphviz's drawing of graph.dot." if graphviz else
            "Graphviz was not available, so this is the plan's structure by stage and layer; the full graph is "
            "the DOT source below (render it with <code>dot -Tsvg graph.dot</code>).")
    return (f"<p class=note>{what}</p><div class=scroll>{svg}</div>"
            f"<details><summary>DOT source</summary><pre>{escape(dot)}</pre></details>")


def _baselines(plan: Plan) -> str:
    if not plan.baselines:
        return "<p>None were evaluated for this plan.</p>"
    t = plan.cost.step_time
    head = ["strategy", "mesh", "step time", "× this plan", "memory", "note"]
    rows = [[(b.strategy, None), ("×".join(map(str, b.mesh)), None),
             (fmt_seconds(b.step_time) if b.step_time is not None else "does not fit", b.step_time),
             (f"{b.step_time / t:.2f}×" if b.step_time is not None and t else "—",
              b.step_time / t if b.step_time is not None and t else None),
             (fmt_bytes(b.peak_memory) if b.peak_memory is not None else "—", b.peak_memory), (b.note, None)]
            for b in plan.baselines]
    return _table(head, rows)
