"""The `autopar` command line: every subcommand runs and has --help; errors exit 2 with a message."""

import subprocess
import sys

import pytest

from autopar import Cluster
from autopar.cli import main


@pytest.mark.parametrize("argv", [[], ["estimate"], ["plan"], ["models"], ["clusters"], ["bench"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--help"])
    assert info.value.code == 0
    assert "usage: autopar" in capsys.readouterr().out


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "autopar.cli", "--help"], capture_output=True, text=True, check=True)
    assert "estimate" in out.stdout and "models" in out.stdout and "clusters" in out.stdout


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("gpt3-175b", "llama3-8b", "mlp-tiny", "moe-tiny", "wresnet-tiny"):
        assert name in out


def test_clusters_json_is_a_cluster_file(capsys, tmp_path):
    assert main(["clusters", "--show", "v100", "--nodes", "8", "--json"]) == 0
    cluster = Cluster.from_json(capsys.readouterr().out)
    assert cluster == Cluster.preset("v100", nodes=8)
    path = tmp_path / "c.json"
    cluster.save(path)
    assert main(["estimate", "--model", "mlp-tiny", "--cluster", str(path), "--tokens", "8"]) == 0
    assert "on 64 × V100-SXM2-16GB" in capsys.readouterr().out


def test_estimate_prints_a_breakdown(capsys):
    assert main(["estimate", "--model", "gpt-tiny", "--precision", "bf16", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "bf16 parameters" in out and "training state (16N)" in out and "per step" in out


@pytest.mark.parametrize("argv, message", [
    (["estimate", "--model", "nope"], "unknown model 'nope'"),
    (["estimate", "--model", "gpt-tiny", "--cluster", "missing.json"], "missing.json"),
    (["clusters", "--show", "tpu"], "preset: found 'tpu'"),
])
def test_errors_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_capture_table(capsys, tmp_path):
    out_file = tmp_path / "bench.md"
    assert main(["bench", "capture", "--models", "gpt-tiny", "mlp-tiny", "--out", str(out_file)]) == 0
    assert "| gpt-tiny |" in capsys.readouterr().out and "| mlp-tiny |" in out_file.read_text()


def test_plan_prints_and_writes_a_plan(capsys, tmp_path):
    from autopar import Plan

    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "mlp-tiny", "--cluster", "cpu", "--gpus-per-node", "2", "--batch-size", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "predicted step" in printed and "plan written to" in printed
    plan = Plan.load(out)
    assert plan.model == "mlp-tiny" and plan.num_devices == 2


def test_plan_errors_are_clear(capsys):
    assert main(["plan", "--model", "gpt3-2.7b", "--cluster", "v100", "--gpus-per-node", "2", "--seq-len",
                 "256"]) == 2
    assert "needs at least" in capsys.readouterr().err
