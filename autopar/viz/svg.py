"""SVG drawing of a `Timeline`: rows of device groups against time, one box per action.

Boxes are coloured by kind (forward, backward, its I and W halves, communication, step) with
later interleaved chunks in a lighter shade, and numbered with their microbatch when wide enough;
idle time is hatched, so the bubbles show. A dashed line marks the plan's own predicted step time.
When boxes are narrower than `MIN_PX` (GPT-3 175B: 1536 microbatches in one step), adjacent ones
are drawn as one run with a tooltip, and two more panels show the start and the end of the step,
where the pipeline fills and drains, at a scale where every action is visible.
"""

from __future__ import annotations

import math
from html import escape

from autopar.units import fmt_seconds
from autopar.viz.timeline import Box, Timeline

LEFT, WIDTH, ROW, GAP, TOP = 170, 900, 20, 4, 34
MIN_PX = 2.0
"""Boxes narrower than this (in pixels) are merged with their neighbours into runs."""
COLOURS = {"F": ("#4e79a7", "#a0cbe8"), "B": ("#59a14f", "#8cd17d"), "I": ("#59a14f", "#8cd17d"),
           "W": ("#b07aa1", "#d4a6c8"), "comm": ("#e15759",), "opt": ("#9c755f",),
           "step": ("#9c755f",)}
NAMES = {"F": "forward", "B": "backward", "I": "backward, input gradient", "W": "backward, weight gradient",
         "comm": "communication (resharding, gradient sync)", "opt": "optimizer",
         "step": "gradient sync + optimizer"}


def timeline_svg(timeline: Timeline, uid: str = "tl") -> str:
    """The whole step; with start and end panels added when boxes had to be merged."""
    end = max(timeline.span, timeline.predicted)
    parts, height = [], 0
    whole = (f"the whole step, simulated {fmt_seconds(timeline.span)} (the plan predicts "
             f"{fmt_seconds(timeline.predicted)}, dashed)")
    body, h, merged = _panel(timeline, 0.0, end, height, uid, whole)
    parts.append(body)
    height += h
    if merged:
        w = _zoom_width(timeline)
        last = max(b.end for b in timeline.boxes if b.microbatch >= 0)
        for name, (a, b) in (("start of the step (pipeline fill)", (0.0, w)),
                             ("end of the microbatches (pipeline drain)", (max(last - w, 0.0), last))):
            body, h, _ = _panel(timeline, a, b, height, uid, name)
            parts.append(body)
            height += h
    parts.append(_legend(timeline, height, uid))
    height += 30
    defs = (f'<defs><pattern id="{uid}-idle" width="6" height="6" patternUnits="userSpaceOnUse" '
            f'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f7f7f7"/>'
            f'<line x1="0" y1="0" x2="0" y2="6" stroke="#d5d5d5" stroke-width="2"/></pattern></defs>')
    width = LEFT + WIDTH + 20
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">'
            f"{defs}{''.join(parts)}</svg>\n")


def _zoom_width(t: Timeline) -> float:
    """Seconds until row 0 has run 4 actions per chunk of the pipeline (fill on every row)."""
    first = sorted(b.end for b in t.boxes if b.row == 0 and b.microbatch >= 0)
    chunks = len({b.chunk for b in t.boxes if b.chunk >= 0})
    return first[min(4 * chunks, len(first)) - 1] if first else t.span


def _panel(t: Timeline, t0: float, t1: float, y0: int, uid: str, title: str) -> tuple[str, int, bool]:
    scale = WIDTH / (t1 - t0) if t1 > t0 else 0.0
    out = [f'<g class="panel" transform="translate(0,{y0})">',
           f'<text x="{LEFT}" y="14" font-weight="bold">{escape(title)}: {fmt_seconds(t0)} to '
           f'{fmt_seconds(t1)}</text>']
    out += _axis(t0, t1, scale, len(t.rows))
    merged = False
    for r, name in enumerate(t.rows):
        y = TOP + r * (ROW + GAP)
        out.append(f'<text x="{LEFT - 6}" y="{y + ROW * 0.7:.1f}" text-anchor="end">{escape(name)}</text>')
        out.append(f'<rect x="{LEFT}" y="{y}" width="{WIDTH}" height="{ROW}" fill="url(#{uid}-idle)">'
                   f"<title>{escape(name)}: idle where hatched</title></rect>")
        row = sorted((b for b in t.boxes if b.row == r and b.end > t0 and b.start < t1), key=lambda b: b.start)
        for run in _runs(row, scale):
            merged |= len(run) > 1
            out.append(_draw(run, t0, t1, scale, y, len(t.rows)))
    if t0 <= t.predicted <= t1:
        x = LEFT + (t.predicted - t0) * scale
        bottom = TOP + len(t.rows) * (ROW + GAP)
        out.append(f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{bottom}" stroke="#333" '
                   f'stroke-dasharray="4,3"><title>the plan\'s predicted step time, '
                   f"{fmt_seconds(t.predicted)}</title></line>")
    out.append("</g>")
    return "".join(out), TOP + len(t.rows) * (ROW + GAP) + 10, merged


def _runs(row: list[Box], scale: float) -> list[list[Box]]:
    """Consecutive boxes narrower than MIN_PX, with gaps under half a pixel, as one run each."""
    runs: list[list[Box]] = []
    for b in row:
        narrow = (b.end - b.start) * scale < MIN_PX
        last = runs[-1] if runs else None
        if (narrow and last and (last[-1].end - last[-1].start) * scale < MIN_PX
                and (b.start - last[-1].end) * scale < 0.5):
            last.append(b)
        else:
            runs.append([b])
    return runs


def _draw(run: list[Box], t0: float, t1: float, scale: float, y: int, rows: int) -> str:
    a, b = max(run[0].start, t0), min(run[-1].end, t1)
    x, w = LEFT + (a - t0) * scale, max((b - a) * scale, 0.5)
    if len(run) > 1:
        kinds = ", ".join(sorted({NAMES[r.kind] for r in run}))
        tip = (f"{len(run)} actions ({kinds}) of microbatches {min(r.microbatch for r in run)}-"
               f"{max(r.microbatch for r in run)}, {fmt_seconds(run[0].start)} to {fmt_seconds(run[-1].end)}")
        return (f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{ROW}" fill="#7f8fa6">'
                f"<title>{escape(tip)}</title></rect>")
    (box,) = run
    shades = COLOURS[box.kind]
    fill = shades[min(max(box.chunk, 0) // rows, len(shades) - 1)]
    what = NAMES[box.kind] + (f", microbatch {box.microbatch}" if box.microbatch >= 0 else "") + (
        f", stage {box.chunk}" if box.chunk >= 0 else "")
    tip = f"{what}: {fmt_seconds(box.start)} to {fmt_seconds(box.end)}"
    out = (f'<rect class="box" data-kind="{box.kind}" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{ROW}" '
           f'fill="{fill}" stroke="#fff" stroke-width="0.5"><title>{escape(tip)}</title></rect>')
    label = str(box.microbatch) if box.microbatch >= 0 else {"comm": "comm", "opt": "opt", "step": "opt"}[box.kind]
    if w >= 7 * len(label) + 4:
        out += (f'<text x="{x + w / 2:.2f}" y="{y + ROW * 0.7:.1f}" text-anchor="middle" fill="#fff" '
                f'pointer-events="none">{label}</text>')
    return out


def _axis(t0: float, t1: float, scale: float, rows: int) -> list[str]:
    if t1 <= t0:
        return []
    raw = (t1 - t0) / 6
    base = 10 ** math.floor(math.log10(raw))
    step = next(k * base for k in (1, 2, 5, 10) if k * base >= raw)
    bottom = TOP + rows * (ROW + GAP)
    out, tick = [], math.ceil(t0 / step) * step
    while tick <= t1 + step * 1e-9:
        x = LEFT + (tick - t0) * scale
        out.append(f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{bottom}" stroke="#e0e0e0"/>'
                   f'<text x="{x:.1f}" y="{TOP - 7}" text-anchor="middle" fill="#555">{fmt_seconds(tick)}</text>')
        tick += step
    return out


def _legend(t: Timeline, y0: int, uid: str) -> str:
    kinds = [k for k in NAMES if any(b.kind == k for b in t.boxes)]
    out, x = [f'<g transform="translate({LEFT},{y0 + 8})">'], 0
    for k in kinds + ["idle"]:
        fill = f"url(#{uid}-idle)" if k == "idle" else COLOURS[k][0]
        name = "idle (bubble)" if k == "idle" else NAMES[k]
        out.append(f'<rect x="{x}" y="0" width="12" height="12" fill="{fill}" stroke="#999" stroke-width="0.5"/>'
                   f'<text x="{x + 16}" y="10">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    out.append("</g>")
    return "".join(out)
