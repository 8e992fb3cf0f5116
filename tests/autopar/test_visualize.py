"""Plan.visualize and `autopar viz`: the DOT graph is well formed and labelled, the timeline simulates
the schedule (every action once, no overlaps, dependencies kept, bubbles where the schedule has
them, the schedules' own step times for equal stages), and the report holds every section, escapes
what it shows, loads nothing from elsewhere and renders in headless Chromium without console errors."""

import dataclasses
import json
import re
import shutil
import subprocess
import tempfile
from html import escape
from html.parser import HTMLParser

import pytest

import autopar
from autopar import Cluster, Plan
from autopar.cli import main
from autopar.passes import schedules
from autopar.passes.split import PipelineSpec, split
from autopar.planner import plan_graph
from autopar.viz import graph, report, timeline

HOSTILE = '<script>alert("x")</script> {a} \\ </svg>'
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
STRING = r'"(?:[^"\\]|\\.)*"'


def _captured(layers):
    entry = autopar.models.get("gpt-tiny")
    inputs, target = entry.example_batch(8)
    return autopar.capture(entry.build(device="meta", n_layers=layers), inputs, loss_fn=entry.loss_fn, target=target)


@pytest.fixture(scope="module")
def four():
    """gpt-tiny with 4 layers, and its tensor-parallel plan on 2 H100s (it has collectives)."""
    captured = _captured(4)
    one = plan_graph(captured, Cluster.preset("h100", gpus_per_node=2), model_name="gpt-tiny", strategy="tp")
    return captured, one


def _piped(four, stages=2, microbatches=4, schedule="gpipe", virtual=1):
    captured, one = four
    cluster = Cluster.preset("h100", gpus_per_node=2 * stages)
    return split(one, captured, cluster, PipelineSpec(stages=stages, microbatches=microbatches, schedule=schedule,
                                                      virtual=virtual))


def parse_dot(text):
    """Node ids, edges and cluster colours of a DOT text, after checking its braces balance outside
    quoted strings."""
    bare = re.sub(STRING, '""', text)
    depth = 0
    for ch in bare:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "a } closes nothing"
    assert depth == 0 and bare.lstrip().startswith("digraph")
    nodes = set(re.findall(r"^\s*(\w+) \[", bare, re.M)) - {"graph", "node", "edge"}
    edges = re.findall(r"^\s*(\w+) -> (\w+)", bare, re.M)
    colours = dict(re.findall(rf'subgraph cluster_stage(\d+) {{\s*label={STRING}; style=rounded; color="(#\w+)"',
                              text))
    return nodes, edges, colours


def test_dot_is_well_formed_with_collectives_on_edges(four, tmp_path):
    plan = dataclasses.replace(four[1], model=HOSTILE)
    written = plan.visualize(tmp_path, graphviz=False)
    dot = written.graph_dot.read_text()
    nodes, edges, colours = parse_dot(dot)
    assert edges and all(a in nodes and b in nodes for a, b in edges)
    drawing = graph.build(plan)
    # every collective lands on its edge, or (the op's own) in its op's label
    assert sum(len(e.collectives) for e in drawing.edges) + sum(len(i.notes) for i in drawing.items) == len(
        plan.collectives) > 0
    for e in (e for e in drawing.edges if e.collectives):
        line = next(x for x in dot.splitlines() if x.strip().startswith(f"{e.src} -> {e.dst} "))
        assert graph.collective_text(e.collectives[0]) in line and "c0392b" in line
    assert "S(0)" in dot or "S(1)" in dot
    assert len(colours) == 1 and written.graph_svg is None


def test_repeated_layers_are_boxed(four):
    plan = _piped(four, stages=2)
    drawing = graph.build(plan)
    layers = {n.layer for s in plan.stages for n in s.nodes.values() if n.layer is not None}
    boxes = [i for i in drawing.items if i.layers]
    full = {i.layer for i in drawing.items if not i.layers and i.layer is not None}
    assert len(full) == 1 and sum(b.layers for b in boxes) == len(layers) - 1
    assert drawing.hidden == sum(b.ops for b in boxes)
    capped = graph.build(plan, max_ops=3)
    assert not any(i.layer is not None and not i.layers for i in capped.items)
    assert any("op limit" in line for i in capped.items for line in i.lines)


def test_stage_colours_differ_and_cross_stage_edges_resolve(four, tmp_path):
    plan = _piped(four, stages=2, schedule="interleaved", virtual=2)
    dot = plan.visualize(tmp_path, graphviz=False).graph_dot.read_text()
    nodes, edges, colours = parse_dot(dot)
    assert len(colours) == len(plan.stages) == 4 and len(set(colours.values())) == 4
    assert all(a in nodes and b in nodes for a, b in edges)
    stage_of = {i.id: i.stage for i in graph.build(plan).items}
    assert {(stage_of[a], stage_of[b]) for a, b in edges if stage_of[a] != stage_of[b]} >= {(0, 1), (1, 2), (2, 3)}


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_graphviz_renders_the_dot_and_the_report_inlines_it(four, tmp_path):
    written = dataclasses.replace(_piped(four), model=HOSTILE).visualize(tmp_path, graphviz=True)
    svg = written.graph_svg.read_text()
    assert "<svg" in svg and "cluster_stage1" in svg
    page = written.report_html.read_text()
    assert "<!DOCTYPE svg" not in page and page.count("<svg") == 3 and 'class="graph"' in page


def _check_timeline(t, plan):
    m, v = plan.schedule.microbatches, plan.schedule.virtual
    p = len(plan.stages) // v
    halves = ("F", "I", "W") if plan.schedule.kind == "zero-bubble" else ("F", "B")
    work = [b for b in t.boxes if b.microbatch >= 0]
    assert len(t.rows) == p and len(work) == p * v * m * len(halves)
    assert {(b.kind, b.chunk, b.microbatch) for b in work} == {(k, c, i) for k in halves for c in range(p * v)
                                                               for i in range(m)}
    for r in range(p):
        row = sorted((b for b in t.boxes if b.row == r), key=lambda b: b.start)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(row, row[1:])), f"row {r} overlaps"
    end = {(b.kind if b.kind != "I" else "B", b.chunk, b.microbatch): b.end for b in work}
    for b in work:
        if b.kind == "F" and b.chunk:
            assert b.start >= end[("F", b.chunk - 1, b.microbatch)] - 1e-12
        if b.kind in ("B", "I") and b.chunk < p * v - 1:
            assert b.start >= end[("B", b.chunk + 1, b.microbatch)] - 1e-12


@pytest.mark.parametrize("schedule,stages,virtual", [("gpipe", 2, 1), ("1f1b", 2, 1), ("interleaved", 2, 2),
                                                     ("zero-bubble", 2, 1), ("gpipe", 4, 1)])
def test_timeline_runs_every_action_once_in_order(four, schedule, stages, virtual):
    plan = _piped(four, stages=stages, schedule=schedule, virtual=virtual)
    t = timeline.simulate(plan)
    _check_timeline(t, plan)
    if schedule == "gpipe":
        assert all(sum(b - a for a, b in t.idle(r)) > 0 for r in range(stages))  # bubbles on every device group


@pytest.mark.parametrize("schedule,virtual", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zero-bubble", 1)])
def test_equal_stages_take_the_schedules_step_time(four, schedule, virtual):
    plan = _piped(four, stages=2, schedule=schedule, virtual=virtual)
    equal = tuple(dataclasses.replace(s, microbatch_time=1.0 / virtual, cost=dataclasses.replace(s.cost, optimizer=0.0))
                  for s in plan.stages)
    t = timeline.simulate(dataclasses.replace(plan, stages=equal))
    expected = schedules.step_time(schedule, [1.0, 1.0], 4, virtual=virtual)  # (m + c·(p - 1)) t
    assert t.span == pytest.approx(expected)


def test_one_stage_timeline_is_one_row(four):
    plan = four[1]
    t = timeline.simulate(plan)
    assert len(t.rows) == 1 and [b.kind for b in t.boxes] == ["F", "B", "comm", "opt"]
    assert t.span == pytest.approx(plan.cost.compute + plan.cost.communication + plan.cost.optimizer)
    assert t.idle(0) == []


def test_report_has_every_section_escapes_and_loads_nothing_from_elsewhere(four, tmp_path):
    plan = dataclasses.replace(four[1], model=HOSTILE, warnings=(HOSTILE,))
    page = plan.visualize(tmp_path, graphviz=False).report_html.read_text()
    for key, _ in report.SECTIONS:
        assert f'<section id="{key}">' in page
    assert escape(HOSTILE) in page and page.count("<script") == 1 and "<script>alert" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|@import|url\((?!#)""", page)
    assert "<details><summary>DOT source</summary><pre>digraph plan" in page


def test_plans_without_edges_still_load_and_draw(four, tmp_path):
    data = json.loads(four[1].to_json())
    for node in data["stages"][0]["nodes"].values():
        del node["args"]
    for record in data["collectives"]:
        del record["source"]
    old = Plan.from_json(json.dumps(data))
    written = old.visualize(tmp_path, graphviz=False)
    assert "->" not in written.graph_dot.read_text() and written.report_html.exists()


def test_cli_viz_prints_the_paths(four, tmp_path, capsys):
    path = tmp_path / "plan.json"
    _piped(four).save(path)
    assert main(["viz", str(path), "--out", str(tmp_path / "dump"), "--no-graphviz"]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in printed] == ["graph.dot", "timeline.svg", "report.html"]
    assert main(["viz", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 2
    assert "autopar viz: error:" in capsys.readouterr().err


# -- headless Chromium ------------------------------------------------------------------------------

SORT_CHECK = """<script>
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.click();
    var v = Array.prototype.map.call(table.tBodies[0].rows, function (r) {
      return parseFloat(r.cells[col].getAttribute("data-v")); });
    for (var i = 1; i < v.length; i++) {
      if (v[i] < v[i - 1]) { console.error("column " + col + " not sorted"); }
    }
  });
});
</script>"""


def render(path):
    """Loads a page in headless Chromium: its console messages (uncaught errors among them) and the
    DOM after its scripts ran."""
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                              "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "<html" in run.stdout, run.stderr[-2000:]
    messages = re.findall(r':CONSOLE[^\]]*\] "(.*)", source: ', run.stderr)
    return messages + [line for line in run.stderr.splitlines() if "Uncaught" in line and "CONSOLE" not in line], \
        run.stdout


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.svgs, self.scripts = [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.sections.append(dict(attrs).get("id"))
        self.svgs += tag == "svg"
        self.scripts += tag == "script"


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium)")


@needs_chromium
def test_the_console_check_sees_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><p>x</p><script>console.error("boom"); undefinedFunction();'
                   "</script></body></html>")
    messages, _ = render(bad)
    assert any("boom" in m for m in messages) and any("Uncaught ReferenceError" in m for m in messages)


@needs_chromium
def test_report_renders_without_console_errors(four, tmp_path):
    plan = dataclasses.replace(_piped(four, schedule="1f1b"), model=HOSTILE, warnings=(HOSTILE,))
    page = plan.visualize(tmp_path, graphviz=None).report_html
    messages, dom = render(page)
    assert messages == []
    ids = _Ids()
    ids.feed(dom)
    assert ids.sections == [key for key, _ in report.SECTIONS] and ids.svgs >= 3 and ids.scripts == 1
    # the sorting script runs: clicking every header of the tables sorts them, without errors
    single = four[1].visualize(tmp_path / "one", graphviz=False).report_html
    clicked = tmp_path / "clicked.html"
    clicked.write_text(single.read_text().replace("</body>", SORT_CHECK + "</body>"))
    messages, _ = render(clicked)
    assert messages == []
