"""`Plan.visualize(directory)`: the plan's drawings written as files.

    written = plan.visualize("dump/")   # graph.dot, graph.svg (with Graphviz), timeline.svg, report.html
    print(written.report)

Steps, in order:
1. the graph: stages and layers as clusters, repeated layers boxed (`viz.graph`), as DOT (`viz.dot`);
2. graph.svg by Graphviz's `dot`, when it is on PATH (skipped, not failed, otherwise);
3. the pipeline timeline, simulated from the schedule's action orders (`viz.timeline`, `viz.svg`);
4. report.html, one self-contained page with all of it (`viz.report`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from autopar.plan import Plan
from autopar.viz import charts, dot, graph, report, svg, timeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Dumps:
    """The files `visualize` wrote."""

    graph_dot: Path
    graph_svg: Path | None
    """None when Graphviz was not used."""
    timeline_svg: Path
    report_html: Path

    def paths(self) -> list[Path]:
        return [p for p in (self.graph_dot, self.graph_svg, self.timeline_svg, self.report_html) if p is not None]


def visualize(plan: Plan, directory: str | os.PathLike, *, graphviz: bool | None = None) -> Dumps:
    """Writes the plan's drawings into `directory` (created if missing). `graphviz`: None renders
    graph.svg when `dot` is on PATH, False never, True requires it (`ValueError` when missing)."""
    if graphviz and shutil.which("dot") is None:
        raise ValueError("graphviz: found no `dot` on PATH, required Graphviz installed (or graphviz=None)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # 1. the graph, with repeated layers boxed so that the DOT stays small
    drawing = graph.build(plan)
    dot_text = dot.to_dot(drawing)
    dot_path = out / "graph.dot"
    dot_path.write_text(dot_text, encoding="utf-8")
    # 2. Graphviz's SVG, when it is there
    svg_path: Path | None = out / "graph.svg"
    if graphviz is False or not dot.render_svg(dot_path, svg_path):
        if graphviz:
            raise ValueError(f"graphviz: `dot -Tsvg {dot_path}` failed, required a rendered graph.svg")
        svg_path.unlink(missing_ok=True)  # not a stale one from an earlier plan
        svg_path = None
    # 3. the timeline of one step
    steps = timeline.simulate(plan)
    timeline_path = out / "timeline.svg"
    timeline_text = svg.timeline_svg(steps)
    timeline_path.write_text(timeline_text, encoding="utf-8")
    # 4. the report, with every drawing inline
    html = report.report_html(
        plan, timeline_svg=timeline_text, graph_svg=_inline(svg_path.read_text(encoding="utf-8")) if svg_path else "",
        graph_is_graphviz=svg_path is not None, dot=dot_text, assumptions=steps.assumptions,
        structure_svg=charts.structure_svg(drawing), bars_svg=charts.stage_bars_svg(plan))
    report_path = out / "report.html"
    report_path.write_text(html, encoding="utf-8")
    logger.info("plan drawings written to %s", out)
    return Dumps(graph_dot=dot_path, graph_svg=svg_path, timeline_svg=timeline_path, report_html=report_path)


def _inline(svg_text: str) -> str:
    """Graphviz's SVG without its XML declaration, DOCTYPE (which names a remote DTD) and comments."""
    start = svg_text.find("<svg")
    return re.sub(r"<!--.*?-->", "", svg_text[start:] if start >= 0 else svg_text, flags=re.S)
