"""Graphviz DOT text of a `Drawing`, and its rendering to SVG when Graphviz's `dot` is installed.

One cluster per stage (its mesh, devices and layers in the label), inside it one cluster per
layer; ops are filled with their stage's colour and labelled with the op, the module and the
placements per mesh axis in short form (`out S(0),R`, `in S(0),R | R,S(1)`). Edges that carry
collectives are red and list them: kind, bytes, predicted time once, times per step, phase.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from autopar.viz.graph import Drawing, Item, collective_text, stage_title

logger = logging.getLogger(__name__)

RENDER_TIMEOUT = 120.0
"""Seconds `dot -Tsvg` may take before the SVG is given up (the DOT file is kept)."""
_NOTES = 3
"""Collectives listed in an op's own label; more are counted."""


def quote(text: str) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as centred breaks."""
    return '"' + "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in text.split("\n")) + '"'


def to_dot(drawing: Drawing) -> str:
    plan = drawing.plan
    title = (f"{plan.model}: {plan.strategy}, {plan.precision}, {len(plan.stages)} stage(s), "
             f"{plan.num_devices} devices" + (f", {drawing.hidden} ops in boxes of repeated layers"
                                              if drawing.hidden else ""))
    out = ["digraph plan {",
           f"  graph [label={quote(title)}, labelloc=t, fontname=Helvetica, fontsize=12, rankdir=TB, newrank=true];",
           '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=9];',
           "  edge [fontname=Helvetica, fontsize=8, color=\"#555555\"];"]
    for stage in plan.stages:
        colour = drawing.colour(stage.index)
        out += [f"  subgraph cluster_stage{stage.index} {{",
                f"    label={quote(stage_title(plan, stage))}; style=rounded; color={quote(colour)}; penwidth=2;"]
        layers: dict[int | None, list[Item]] = {}  # ops of a layer drawn in full, in a cluster of their own
        for item in drawing.items:
            if item.stage == stage.index:
                layers.setdefault(None if item.layers else item.layer, []).append(item)
        for layer, members in layers.items():
            if layer is None:
                out += ["    " + _node(item, colour) for item in members]
                continue
            out += [f"    subgraph cluster_stage{stage.index}_layer{layer} {{",
                    f"      label={quote(f'layer {layer}')}; style=dashed; color=\"#888888\";"]
            out += ["      " + _node(item, colour) for item in members] + ["    }"]
        out.append("  }")
    for edge in drawing.edges:
        if edge.collectives:
            label = "\n".join(collective_text(r) for r in edge.collectives)
            out.append(f"  {edge.src} -> {edge.dst} [label={quote(label)}, color=\"#c0392b\", fontcolor=\"#c0392b\", "
                       f"penwidth=2];")
        else:
            out.append(f"  {edge.src} -> {edge.dst};")
    out.append("}")
    return "\n".join(out) + "\n"


def _node(item: Item, colour: str) -> str:
    lines = list(item.lines)
    if item.notes:
        lines += ["runs " + n for n in item.notes[:_NOTES]]
        if len(item.notes) > _NOTES:
            lines.append(f"… {len(item.notes) - _NOTES} more collectives")
    shape = ', shape=box3d, style="filled"' if item.layers else ""
    return f"{item.id} [label={quote(chr(10).join(lines))}, fillcolor={quote(colour)}{shape}];"


def render_svg(dot_path: Path, svg_path: Path) -> bool:
    """Runs `dot -Tsvg`; False (and a logged warning) when Graphviz is missing or fails."""
    exe = shutil.which("dot")
    if exe is None:
        return False
    try:
        subprocess.run([exe, "-Tsvg", str(dot_path), "-o", str(svg_path)], check=True, capture_output=True,
                       timeout=RENDER_TIMEOUT)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        logger.warning("Graphviz could not render %s: %s", dot_path, getattr(e, "stderr", b"") or e)
        return False
    return True
