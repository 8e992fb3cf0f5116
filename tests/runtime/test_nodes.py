"""`autopar run --nnodes/--node-rank/--rdzv-endpoint`: the torchrun options that join a machine to
a job, and the mistakes explained before anything starts."""

import re

import pytest

from autopar.cli import main
from autopar.runtime.launch import torchrun_command
from autopar.runtime.nodes import Nodes


def test_one_machine_is_standalone():
    command = torchrun_command(2, ["train.py"])
    assert command[-3:] == ["--standalone", "--nproc-per-node=2", "train.py"]
    assert Nodes().torchrun_args() == ["--standalone"]
    assert Nodes(count=1, rank=0).torchrun_args() == ["--standalone"]


def test_a_node_rank_gives_a_static_rendezvous_served_by_node_zero():
    nodes = Nodes(count=2, rank=1, endpoint="node0:29500")
    assert nodes.torchrun_args() == ["--nnodes=2", "--rdzv-endpoint=node0:29500", "--rdzv-backend=static",
                                     "--node-rank=1"]
    assert "--standalone" not in torchrun_command(8, ["train.py"], nodes)


def test_without_a_node_rank_the_c10d_rendezvous_numbers_the_nodes():
    assert Nodes(count=4, endpoint="[fe80::1]:29500").torchrun_args() == [
        "--nnodes=4", "--rdzv-endpoint=[fe80::1]:29500", "--rdzv-backend=c10d"]


@pytest.mark.parametrize(("options", "message"), [
    ({"count": 0}, "--nnodes: found 0, required an integer >= 1"),
    ({"count": 2}, "--rdzv-endpoint: found none with --nnodes 2, required HOST:PORT"),
    ({"count": 2, "rank": 2, "endpoint": "h:1"}, "--node-rank: found 2, required 0 <= node rank < --nnodes (2)"),
    ({"count": 2, "rank": -1, "endpoint": "h:1"}, "--node-rank: found -1"),
    ({"count": 2, "endpoint": "node0"}, "--rdzv-endpoint: found 'node0', required HOST:PORT"),
    ({"count": 2, "endpoint": "node0:http"}, "--rdzv-endpoint: found 'node0:http'"),
    ({"count": 2, "endpoint": "node0:70000"}, "--rdzv-endpoint: found 'node0:70000'"),
    ({"count": 2, "endpoint": ":29500"}, "--rdzv-endpoint: found ':29500'"),
])
def test_inconsistent_options_are_explained(options, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        Nodes(**options)


def test_the_command_line_reports_them(capsys, tmp_path):
    assert main(["run", "--model", "mlp-tiny", "--nnodes", "2", "--node-rank", "0"]) == 2
    assert "autopar run: error: --rdzv-endpoint: found none with --nnodes 2" in capsys.readouterr().err
    assert main(["run", "--model", "mlp-tiny", "--nnodes", "2", "--node-rank", "3",
                 "--rdzv-endpoint", "127.0.0.1:29500"]) == 2
    assert "--node-rank: found 3" in capsys.readouterr().err
    script = tmp_path / "train.py"
    script.write_text("")
    assert main(["run", str(script), "--report", str(tmp_path / "r.json")]) == 2
    assert "--report: found with a script, required --model" in capsys.readouterr().err
