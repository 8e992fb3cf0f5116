"""The plan's graph as something that can be drawn: items (ops, or boxes of repeated layers),
grouped by stage and layer, and edges labelled with the collectives that run on them.

Takes a `Plan`; gives a `Drawing`, which `autopar.viz.dot` writes as Graphviz DOT and
`autopar.viz.report` draws as a small layered SVG when Graphviz is absent.

Large models repeat one block many times (GPT-3 175B: 96 layers of about 20 ops each), and a
drawing of every op is unreadable. So each distinct layer (the same ops with the same placements)
is drawn op by op once, where it first occurs; every later layer like it joins one box per run of
consecutive such layers in its stage ("layers 7-17, ×11, as layer 6"). Layers keep being drawn in
full only while the drawing has fewer than `MAX_OPS` ops; past that, new kinds of layers are boxed
too. Ops outside the repeated layers (embeddings, the head, the loss) are always drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autopar.plan import CollectiveRecord, NodePlan, Plan, Stage
from autopar.units import fmt_bytes, fmt_seconds
from autopar.vocab import fmt

MAX_OPS = 400
"""Ops drawn one by one, at most (more only for the ops outside the repeated layers)."""
PALETTE = ("#a6cee3", "#b2df8a", "#fdbf6f", "#cab2d6", "#fb9a99", "#ffff99", "#8dd3c7", "#bebada",
           "#80b1d3", "#fccde5", "#d9d9d9", "#ccebc5")
"""Fill colour of stage j: PALETTE[j % 12] (ColorBrewer Paired/Set3 pastels)."""


@dataclass(slots=True)
class Item:
    """One drawn node: an op (`ops` == 1, `layers` == 0) or a box of `layers` repeated layers."""

    id: str
    stage: int
    layer: int | None
    """The layer cluster it sits in (the first of a box's layers); None outside the layers."""
    lines: list[str]
    ops: int = 1
    layers: int = 0
    notes: list[str] = field(default_factory=list)
    """Collectives the op runs itself (on no drawn edge): its own all-reduces, parameter synchronization."""


@dataclass(slots=True)
class Edge:
    src: str
    dst: str
    collectives: list[CollectiveRecord] = field(default_factory=list)


@dataclass(slots=True)
class Drawing:
    plan: Plan
    items: list[Item]
    edges: list[Edge]
    hidden: int
    """Ops drawn inside boxes rather than one by one."""

    def colour(self, stage: int) -> str:
        return PALETTE[stage % len(PALETTE)]


def op_name(op: str) -> str:
    """`aten.linear.default` → "linear"; `placeholder` stays."""
    return op.split(".")[1] if op.count(".") >= 2 else op


def collective_text(r: CollectiveRecord) -> str:
    """One line per collective: "all_gather 12.6 MB 35.1 µs ×96 (backward)"."""
    return (f"{r.kind} {fmt_bytes(r.bytes)} {fmt_seconds(r.time)}" + (f" ×{r.count}" if r.count > 1 else "")
            + f" ({r.phase})")


def stage_title(plan: Plan, stage: Stage) -> str:
    p = len(plan.stages) // plan.schedule.virtual
    group = f" on device group {stage.index % p}" if plan.schedule.virtual > 1 else ""
    devices = stage.mesh.devices
    return (f"stage {stage.index}{group}: mesh {'×'.join(map(str, stage.mesh.shape))}, devices {devices[0]}.."
            f"{devices[-1]}, layers {stage.layers[0]}..{stage.layers[1] - 1}")


def build(plan: Plan, max_ops: int = MAX_OPS) -> Drawing:
    """The drawing of `plan`: every stage's ops, repeated layers boxed, edges from `NodePlan.args`."""
    items: list[Item] = []
    where: dict[tuple[int, str], str] = {}  # (stage, node) → the item drawing it
    drawn: dict[tuple, int] = {}  # layer signature → the layer drawn in full
    hidden = 0
    for stage in plan.stages:
        budget = max_ops - sum(i.ops for i in items if not i.layers)
        hidden += _stage_items(stage, items, where, drawn, budget)
    edges = _edges(plan, items, where)
    return Drawing(plan=plan, items=items, edges=edges, hidden=hidden)


def _signature(nodes: list[NodePlan]) -> tuple:
    """What makes two layers draw the same: the same ops in the same order, with the same placements."""
    return tuple((n.op, n.inputs, n.outputs, n.kinds) for n in nodes)


def _stage_items(stage: Stage, items: list[Item], where: dict, drawn: dict, budget: int) -> int:
    """Appends the stage's items; gives the number of ops hidden in boxes."""
    layers: dict[int, list[str]] = {}
    for name, node in stage.nodes.items():
        if node.layer is not None:
            layers.setdefault(node.layer, []).append(name)
    run: tuple[Item, tuple] | None = None  # the box the previous layer joined, and its signature
    hidden = 0
    for name, node in stage.nodes.items():
        members = [name] if node.layer is None else layers.pop(node.layer, None)
        if members is None:  # a layer already placed
            continue
        sig = None if node.layer is None else _signature([stage.nodes[n] for n in members])
        if sig is None or (sig not in drawn and len(members) <= budget):
            if sig is not None:
                drawn[sig] = node.layer
                budget -= len(members)
            for n in members:
                items.append(_op_item(f"n{len(items)}", stage.index, n, stage.nodes[n]))
                where[(stage.index, n)] = items[-1].id
            run = None
            continue
        if run is None or run[1] != sig or run[0].layer + run[0].layers != node.layer:
            run = (Item(id=f"n{len(items)}", stage=stage.index, layer=node.layer, lines=[], ops=0), sig)
            items.append(run[0])
        box = run[0]
        box.layers += 1
        box.ops += len(members)
        like = drawn.get(sig)
        span = f"layer {box.layer}" if box.layers == 1 else f"layers {box.layer}-{node.layer}"
        box.lines = [f"{span} (×{box.layers})", f"as layer {like}" if like is not None else "not drawn (op limit)",
                     f"{len(members)} ops each"]
        hidden += len(members)
        for n in members:
            where[(stage.index, n)] = box.id
    return hidden


def _op_item(id_: str, stage: int, name: str, node: NodePlan) -> Item:
    op = op_name(node.op)
    lines = [f"{op} {name}" if op == "placeholder" else op]
    if node.module:
        lines.append(node.module)
    if node.outputs:
        lines.append("out " + " ".join(fmt(p) for p in node.outputs[:2]))
    if node.inputs and op != "placeholder":
        shown = " | ".join(fmt(p) for p in node.inputs[:3]) + (" | …" if len(node.inputs) > 3 else "")
        lines.append("in " + shown)
    return Item(id=id_, stage=stage, layer=node.layer, lines=lines)


def _edges(plan: Plan, items: list[Item], where: dict[tuple[int, str], str]) -> list[Edge]:
    """Producer → consumer for every tensor argument whose producer is drawn (parameters and
    constants are not); collectives go on their edge, or into their op's notes."""
    holders: dict[str, list[int]] = {}
    for stage in plan.stages:
        for name in stage.nodes:
            holders.setdefault(name, []).append(stage.index)
    by_edge: dict[tuple[str, str], list[CollectiveRecord]] = {}
    for r in plan.collectives:
        by_edge.setdefault((r.node, r.source), []).append(r)
    edges: dict[tuple[str, str], Edge] = {}
    for stage in plan.stages:
        for name, node in stage.nodes.items():
            dst = where[(stage.index, name)]
            for arg in dict.fromkeys(node.args):
                src = _producer(where, holders, stage.index, arg)
                if src is None or src == dst:
                    continue
                edge = edges.setdefault((src, dst), Edge(src, dst))
                edge.collectives += by_edge.pop((name, arg), [])
    item_of = {i.id: i for i in items}
    first = {name: where[(holders[name][0], name)] for name in holders}
    for (node, _), records in by_edge.items():  # the op's own, or on an edge that is not drawn
        if node in first:
            item_of[first[node]].notes += [collective_text(r) for r in records]
    return list(edges.values())


def _producer(where: dict, holders: dict[str, list[int]], stage: int, arg: str) -> str | None:
    """The drawn item of `arg` as seen from `stage`: its own copy, else the latest stage before."""
    found = holders.get(arg)
    if not found:
        return None
    earlier = [s for s in found if s <= stage]
    return where[(max(earlier) if earlier else found[0], arg)]
