"""Bad files, systematically: malformed plan, cluster and profile files, each with a message
naming the field's path, what was found and what was required; a save interrupted half-way keeps
the old file; and nothing read from a file is executed (`test_bad_input` has the rest of the bad
input and the error types)."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

import autopar
from autopar import Cluster, Plan
from autopar.cost import ProfileTable

ROOT = Path(autopar.__file__).resolve().parent.parent
CPU2 = Cluster.preset("cpu", gpus_per_node=2)


# -- plan files: each edit of a good plan's JSON, and the message it must give ------------------

W1 = r"plan\.stages\[0\]\.params\['w1\.weight'\]"
PLAN_EDITS = [
    (lambda d: d.pop("stages"), r"plan\.stages: missing, required"),
    (lambda d: d.update(colour="blue"), r"plan: found unknown field\(s\) \['colour'\], required only \["),
    (lambda d: d.update(model=3), r"plan\.model: found 3 \(int\), required a string"),
    (lambda d: d.update(format=99), r"plan\.format: found 99, required 1"),
    (lambda d: d.update(strategy="magic"), r"plan\.strategy: found 'magic', required one of auto, dp"),
    (lambda d: d.update(precision="fp64"), r"plan\.precision: found 'fp64', required one of fp32, bf16, fp16"),
    (lambda d: d.update(optimizer="lion"), r"plan\.optimizer: found 'lion', required one of sgd"),
    (lambda d: d.update(stages=[]), r"plan\.stages: found none, required at least one"),
    (lambda d: d["schedule"].update(kind="magic"), r"plan\.schedule\.kind: found 'magic', required one of none, gpipe"),
    (lambda d: d["schedule"].update(microbatches=0), r"plan\.schedule\.microbatches: found 0, required >= 1"),
    (lambda d: d["stages"][0]["params"]["w1.weight"].update(storage=["S(x)"]),
     W1 + r"\.storage\[0\]: placement: found 'S\(x\)', required one of S\(<dim>\), R, P"),
    (lambda d: d["stages"][0]["params"]["w1.weight"].update(storage=["S(2)"]),
     W1 + r"\.storage\[0\]: found S\(2\), required S\(dim\) with dim < 2"),
    (lambda d: d["stages"][0]["params"]["w1.weight"].update(storage=["R", "R"]),
     W1 + r"\.storage: found 2 placement\(s\), required 1"),
    (lambda d: d["stages"][0]["params"]["w1.weight"].update(storage="R"),
     W1 + r"\.storage: found str, required a JSON array"),
    (lambda d: d["stages"][0]["params"]["w1.weight"].update(level=7), W1 + r"\.level: found 7, required one of"),
    (lambda d: d["stages"][0]["params"]["w1.weight"].update(level="3"),
     W1 + r"\.level: found '3' \(str\), required an integer"),
    (lambda d: d["stages"][0]["params"]["w1.weight"].update(level=True),
     W1 + r"\.level: found True \(bool\), required an integer"),
    (lambda d: d["stages"][0].update(params=[]), r"plan\.stages\[0\]\.params: found list, required a JSON object"),
    (lambda d: d["stages"][0]["mesh"].update(shape=[4]),
     r"plan\.stages\[0\]\.mesh\.devices: found 2 devices for shape \(4,\), required 4 distinct ones"),
    (lambda d: d["stages"][0]["mesh"].update(devices=[0, 7]),
     r"plan\.stages\[0\]\.mesh\.devices: found device\(s\) \[7\], required devices 0\.\.1 of the plan's cluster"),
    (lambda d: d["stages"][0].update(index=3), r"plan\.stages\[0\]\.index: found 3, required 0"),
    (lambda d: d["stages"][0].update(layers=[2, 0]), r"plan\.stages\[0\]\.layers: found \[2, 0\], required"),
    (lambda d: d["stages"][0]["nodes"]["linear"].update(outputs=[["R", "R"]]),
     r"plan\.stages\[0\]\.nodes\['linear'\]\.outputs\[0\]: found 2 entries, required 1, one per axis"),
    (lambda d: d["stages"][0]["nodes"]["linear"].update(kinds=["magic"]),
     r"nodes\['linear'\]\.kinds\[0\]: found 'magic', required one of local, partial_bias"),
    (lambda d: d["cost"].update(step_time=-1), r"plan\.cost\.step_time: found -1\.0, required >= 0"),
    (lambda d: d["cost"].update(mfu="nan"), r"plan\.cost\.mfu: found nan, required >= 0"),
    (lambda d: d["collectives"][0].update(phase="sideways"),
     r"plan\.collectives\[0\]\.phase: found 'sideways', required one of forward, backward, step"),
    (lambda d: d["collectives"][0].update(kind="all_gossip"),
     r"plan\.collectives\[0\]\.kind: found 'all_gossip', required one of broadcast"),
    (lambda d: d.update(quantized={"w1": "int3"}), r"plan\.quantized\['w1'\]: found 'int3', required one of int8"),
    (lambda d: d["cluster"].update(nodes=0), r"plan\.cluster: Cluster\.nodes: found 0, required > 0"),
]


@pytest.mark.parametrize("edit, message", PLAN_EDITS)
def test_malformed_plan_file(plan2, edit, message):
    data = json.loads(plan2.to_json())
    edit(data)
    with pytest.raises(ValueError, match=message):
        Plan.from_json(json.dumps(data))


@pytest.mark.parametrize("text, message", [
    ("{", r"plan file: found malformed JSON .*, required a JSON object"),
    ("[]", r"plan: found list, required a JSON object"),
    ('{"model": "a", "model": "b"}', r"plan file: found the key 'model' twice in one object, required each key once"),
    ('{"model": NaN}', r"plan file: found the constant NaN, required a JSON number"),
    ("[" * 100_000 + "]" * 100_000, r"plan file: found JSON nested too deeply to read, required"),
])
def test_plan_text_that_is_not_strict_json(text, message):
    with pytest.raises(ValueError, match=message):
        Plan.from_json(text)


def test_plan_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=r"plan file .*plan\.json: found bytes that are not UTF-8 .*required JSON"):
        Plan.load(bad)
    bad.write_text('{"model": 1}')
    with pytest.raises(ValueError, match=r"plan file .*plan\.json: plan\.model: found 1 \(int\), required a string"):
        Plan.load(bad)
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "missing.json")


def test_a_plan_without_a_proven_gap_round_trips(plan2):
    # A solver stopped by its time limit before any bound reports a NaN gap: JSON has no NaN, so the
    # file says "nan" (it used to say null, which the reader then refused).
    plan = dataclasses.replace(plan2, search=dataclasses.replace(plan2.search, gap=float("nan")))
    assert '"gap": "nan"' in plan.to_json()
    again = Plan.from_json(plan.to_json())
    assert again.search.gap != again.search.gap and again.stages == plan.stages


# -- cluster and profile files -----------------------------------------------------------------

CLUSTER_EDITS = [
    (lambda d: d.update(nodes=0), r"Cluster\.nodes: found 0, required > 0"),
    (lambda d: d.update(devices_per_node=-2), r"Cluster\.devices_per_node: found -2, required > 0"),
    (lambda d: d.update(nodes="2"), r"Cluster\.nodes: found '2' \(str\), required an integer"),
    (lambda d: d.update(nodes=True), r"Cluster\.nodes: found True \(bool\), required an integer"),
    (lambda d: d.update(backend="mpi"), r"Cluster\.backend: found 'mpi', required one of nccl, gloo"),
    (lambda d: d.update(colour="blue"), r"Cluster: found unknown field\(s\) \['colour'\], required only"),
    (lambda d: d.pop("device"), r"Cluster: missing field\(s\) \['device'\], required all of"),
    (lambda d: d["intra_node"].update(bandwidth=0), r"Cluster\.intra_node: Link\.bandwidth: found 0, required > 0"),
    (lambda d: d["inter_node"].update(latency=-1e-6),
     r"Cluster\.inter_node: Link\.latency: found -1e-06, required >= 0"),
    (lambda d: d["device"].update(memory=0), r"Cluster\.device: DeviceSpec\.memory: found 0, required > 0"),
    (lambda d: d["device"].update(memory=1.5e10),
     r"DeviceSpec\.memory: found 15000000000\.0 \(float\), required an integer"),
    (lambda d: d["device"].update(name=""), r"DeviceSpec\.name: found '', required a non-empty string"),
    (lambda d: d["device"].update(matmul_efficiency=1.5), r"matmul_efficiency: found 1\.5, required a fraction in"),
    (lambda d: d["device"]["peak_flops"].update(fp32=0),
     r"Cluster\.device\.peak_flops: PeakFlops\.fp32: found 0, required > 0"),
    (lambda d: d["device"].update(bf16=1e12),  # a figure one level too high: peak_flops holds it
     r"Cluster\.device: found unknown field\(s\) \['bf16'\], required only"),
    (lambda d: d.update(device=[1, 2]), r"Cluster\.device: found list, required a JSON object"),
    (lambda d: d.update(profile={"backend": "gloo"}), r"Cluster\.profile: missing field\(s\) \["),
]


@pytest.mark.parametrize("edit, message", CLUSTER_EDITS)
def test_malformed_cluster_file(edit, message):
    data = CPU2.to_dict()
    edit(data)
    with pytest.raises(ValueError, match=message):
        Cluster.from_json(json.dumps(data))


def test_cluster_file_with_infinity_and_unknown_preset(tmp_path):
    data = CPU2.to_dict()
    data["intra_node"]["latency"] = "INF"
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data).replace('"INF"', "Infinity"))
    with pytest.raises(ValueError, match=r"cluster file .*cluster\.json: found the constant Infinity, required"):
        Cluster.load(path)
    with pytest.raises(ValueError, match=r"preset: found 'tpu', required one of"):
        Cluster.preset("tpu")


@pytest.mark.parametrize("text, message", [
    ("[1]", r"profile table: found list, required a JSON object"),
    ('{"aten.mm|4x4|fp32": -1}', r"profile table\['aten\.mm\|4x4\|fp32'\]: found -1, required seconds >= 0"),
    ('{"aten.mm|4x4|fp32": "fast"}', r"found 'fast', required seconds >= 0"),
])
def test_malformed_profile_table(text, message):
    with pytest.raises(ValueError, match=message):
        ProfileTable.from_json(text)


@pytest.mark.parametrize("what", ["plan", "cluster"])
def test_interrupted_save_keeps_the_old_file(tmp_path, plan1, monkeypatch, what):
    import autopar.files

    thing = plan1 if what == "plan" else CPU2
    path = tmp_path / f"{what}.json"
    path.write_text("old\n")

    def refuse(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(autopar.files.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        thing.save(path)
    assert path.read_text() == "old\n" and list(tmp_path.iterdir()) == [path]  # no temporary file left
    monkeypatch.undo()
    thing.save(path)
    assert type(thing).load(path) == thing and list(tmp_path.iterdir()) == [path]


# -- files are data ----------------------------------------------------------------------------

CODE = "__import__('pathlib').Path({!r}).touch()"


def test_code_in_string_fields_is_stored_not_run(tmp_path, plan1):
    sentinel = tmp_path / "ran"
    code = CODE.format(str(sentinel))
    data = json.loads(plan1.to_json())
    data["model"] = code
    data["warnings"] = [code]
    data["cluster"]["name"] = code
    plan = Plan.from_json(json.dumps(data))
    assert plan.model == code and plan.warnings == (code,) and plan.cluster.name == code
    plan.summary()
    data["stages"][0]["params"]["w1.weight"]["use"] = [code]
    with pytest.raises(ValueError, match=r"use\[0\]: placement: found \"__import__"):
        Plan.from_json(json.dumps(data))
    cluster = CPU2.to_dict()
    cluster["backend"] = code
    with pytest.raises(ValueError, match=r"Cluster\.backend: found \"__import__.*required one of nccl, gloo"):
        Cluster.from_json(json.dumps(cluster))
    assert not sentinel.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _unsafe(path: Path) -> list[str]:
    """eval/exec, pickle and friends, and torch.load without weights_only=True, in one source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [f"import {n}" for n in names if n.split(".")[0] in ("pickle", "marshal", "shelve", "dill", "yaml")]
    for call in _calls(tree):
        f = call.func
        if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
            found.append(f"{f.id}() at line {call.lineno}")
        if isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", None) == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in call.keywords)
            if not safe:
                found.append(f"torch.load without weights_only=True at line {call.lineno}")
    return [f"{path.relative_to(ROOT)}: {f}" for f in found]


def test_no_code_is_executed_from_files():
    sources = [p for folder in ("autopar", "passes", "runtime", "models") for p in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 50
    assert [f for p in sources for f in _unsafe(p)] == []
