"""Small SVG charts for the report, drawn without Graphviz: the plan's structure by stage and layer,
and each stage's time and memory as stacked bars.

`structure_svg(drawing)`: one column per stage (in its colour), top to bottom the blocks it runs:
ops outside the layers, each layer drawn in full, each box of repeated layers; arrows follow the
order, and from each stage to the next. `stage_bars_svg(plan)`: per stage, compute /
communication / optimizer seconds, and parameter state / activations bytes against the device's
memory.
"""

from __future__ import annotations

from collections import Counter
from html import escape

from autopar.plan import Plan
from autopar.units import fmt_bytes, fmt_seconds
from autopar.viz.graph import Drawing, Item

COL, COL_GAP, BLOCK, BLOCK_GAP, HEAD = 230, 40, 46, 16, 40
_VIEWS = {"view", "reshape", "unflatten", "flatten", "transpose", "permute", "expand", "t", "unsqueeze",
          "squeeze", "slice", "select", "split", "getitem", "alias", "detach", "clone", "contiguous", "_to_copy"}


def _blocks(drawing: Drawing, stage: int) -> list[tuple[str, str, int]]:
    """(title, detail, collectives on edges into it) per block of the stage, in order."""
    into = Counter()
    for e in drawing.edges:
        into[e.dst] += len(e.collectives)
    blocks: list[tuple[object, list[Item]]] = []
    for item in (i for i in drawing.items if i.stage == stage):
        key = ("box", item.id) if item.layers else ("layer", item.layer)
        if blocks and blocks[-1][0] == key:
            blocks[-1][1].append(item)
        else:
            blocks.append((key, [item]))
    out = []
    for (kind, layer), items in blocks:
        ops = Counter(i.lines[0].split(" ")[0] for i in items if not i.layers)
        shown = ", ".join(f"{op}×{c}" if c > 1 else op for op, c in ops.most_common() if op not in _VIEWS)
        if kind == "box":
            title, detail = items[0].lines[0], f"{items[0].lines[1]}, {items[0].lines[2]}"
        elif layer is None:
            title, detail = f"{_ops(sum(ops.values()))} outside the layers", shown
        else:
            title, detail = f"layer {layer}: {_ops(sum(ops.values()))}", shown
        out.append((title, detail, sum(into[i.id] for i in items) + sum(len(i.notes) for i in items)))
    return out


def _ops(n: int) -> str:
    return f"{n} op" + ("s" if n != 1 else "")


def structure_svg(drawing: Drawing) -> str:
    stages = drawing.plan.stages
    columns = [_blocks(drawing, s.index) for s in stages]
    tallest = max((len(c) for c in columns), default=1)
    width = len(stages) * (COL + COL_GAP) + COL_GAP
    height = HEAD + tallest * (BLOCK + BLOCK_GAP) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#666"/></marker></defs>']
    for j, (stage, blocks) in enumerate(zip(stages, columns)):
        x = COL_GAP + j * (COL + COL_GAP)
        colour = drawing.colour(stage.index)
        out.append(f'<text x="{x}" y="16" font-weight="bold">stage {stage.index}</text>'
                   f'<text x="{x}" y="30" fill="#555">mesh {"×".join(map(str, stage.mesh.shape))}, layers '
                   f"{stage.layers[0]}..{stage.layers[1] - 1}</text>")
        for b, (title, detail, comms) in enumerate(blocks):
            y = HEAD + b * (BLOCK + BLOCK_GAP)
            tip = f"{title}; {detail}" + (f"; {comms} collective(s)" if comms else "")
            stroke = "#c0392b" if comms else "#777"
            out.append(f'<g><title>{escape(tip)}</title><rect x="{x}" y="{y}" width="{COL}" height="{BLOCK}" rx="6" '
                       f'fill="{colour}" stroke="{stroke}"/><text x="{x + 8}" y="{y + 17}" font-weight="bold">'
                       f'{escape(_clip(title, 34))}</text><text x="{x + 8}" y="{y + 34}" fill="#333">'
                       f"{escape(_clip(detail, 38))}</text></g>")
            if b:
                out.append(_arrow(x + COL / 2, y - BLOCK_GAP, x + COL / 2, y))
        if j + 1 < len(stages) and blocks:
            y = HEAD + (len(blocks) - 1) * (BLOCK + BLOCK_GAP) + BLOCK / 2
            out.append(_arrow(x + COL, y, x + COL + COL_GAP, HEAD + BLOCK / 2))
    out.append("</svg>")
    return "".join(out) + "\n"


def _arrow(x1: float, y1: float, x2: float, y2: float) -> str:
    return (f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#666" stroke-width="1.2" '
            f'marker-end="url(#arrow)"/>')


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


BAR_LEFT, BAR_WIDTH, BAR_ROW = 90, 520, 18
TIME_PARTS = (("compute", "#4e79a7"), ("communication", "#e15759"), ("optimizer", "#9c755f"))
MEMORY_PARTS = (("parameter_state", "#76b7b2", "parameters, gradients, optimizer state"),
                ("activations", "#edc948", "activations"))


def stage_bars_svg(plan: Plan) -> str:
    """Two stacked bar charts, one row per stage: busy seconds per step, and bytes per device."""
    stages = plan.stages
    busiest = max(sum(getattr(s.cost, k) for k, _ in TIME_PARTS) for s in stages) or 1.0
    budget = plan.cluster.device.memory
    fullest = max(max(s.cost.peak_memory for s in stages), budget) or 1.0
    rows = len(stages)
    chart_h = 26 + rows * (BAR_ROW + 4)
    height = 2 * chart_h + 40
    width = BAR_LEFT + BAR_WIDTH + 200
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">']
    for c, (title, unit) in enumerate((("time per step (busy, per stage)", busiest), ("memory per device", fullest))):
        y0 = c * (chart_h + 20)
        out.append(f'<text x="{BAR_LEFT}" y="{y0 + 14}" font-weight="bold">{title}</text>')
        for r, s in enumerate(stages):
            y = y0 + 22 + r * (BAR_ROW + 4)
            out.append(f'<text x="{BAR_LEFT - 6}" y="{y + 13}" text-anchor="end">stage {s.index}</text>')
            x = BAR_LEFT
            parts = ([(getattr(s.cost, k), col, k) for k, col in TIME_PARTS] if c == 0 else
                     [(getattr(s.cost, k), col, name) for k, col, name in MEMORY_PARTS])
            for value, colour, name in parts:
                w = BAR_WIDTH * value / unit
                text = fmt_seconds(value) if c == 0 else fmt_bytes(value)
                out.append(f'<rect x="{x:.2f}" y="{y}" width="{max(w, 0):.2f}" height="{BAR_ROW}" fill="{colour}">'
                           f"<title>stage {s.index} {escape(name)}: {text}</title></rect>")
                x += w
            total = (fmt_seconds(sum(v for v, _, _ in parts)) if c == 0 else
                     f"{fmt_bytes(s.cost.peak_memory)} peak")
            out.append(f'<text x="{x + 6:.1f}" y="{y + 13}" fill="#333">{total}</text>')
        if c == 1:
            x = BAR_LEFT + BAR_WIDTH * budget / unit
            out.append(f'<line x1="{x:.1f}" y1="{y0 + 18}" x2="{x:.1f}" y2="{y0 + chart_h}" stroke="#333" '
                       f'stroke-dasharray="4,3"><title>device memory {fmt_bytes(budget)}</title></line>')
    legend = [(name, col) for name, col in TIME_PARTS] + [(name, col) for _, col, name in MEMORY_PARTS]
    x = BAR_LEFT
    for name, colour in legend:
        out.append(f'<rect x="{x}" y="{height - 16}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{x + 16}" y="{height - 6}">{escape(name)}</text>')
        x += 30 + 6 * len(name)
    out.append("</svg>")
    return "".join(out) + "\n"
