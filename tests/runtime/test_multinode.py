"""Two torchrun agents on loopback, as two nodes of two ranks each, run one plan whose mesh spans both.

Each agent is started by `autopar run --nnodes 2 --node-rank i --rdzv-endpoint 127.0.0.1:PORT`, the
command two machines would run. Rank 0 writes `--report`: the cluster `Cluster.local()` saw, the node
each rank ran on, the plan's mesh, and the losses, which must equal one device's.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

from autopar import Cluster
from autopar.testing import free_port, reference
from autopar.vocab import LogicalMesh

STEPS = 3


def start_node(node_rank: int, port: int, report) -> subprocess.Popen:
    command = [sys.executable, "-m", "autopar.cli", "run", "--device", "cpu", "--model", "mlp-tiny", "--strategy", "dp+tp",
               "--steps", str(STEPS), "--nproc", "2", "--nnodes", "2", "--node-rank", str(node_rank),
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--timeout", "60", "--report", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, deadline: float) -> tuple[int, str]:
    """Exit code and output. A node still running at `deadline` is stopped: SIGTERM to its session
    (`autopar run` and the torchrun agent, which stops its ranks), SIGKILL if that is not enough."""
    try:
        out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        return -1, "timed out\n" + out
    return proc.returncode, out


def test_two_nodes_on_loopback_train_one_plan_like_one_device(tmp_path):
    port = free_port()
    nodes = [start_node(i, port, tmp_path / f"report{i}.json") for i in range(2)]
    deadline = time.monotonic() + 150  # about 30 s on 2 cores
    results = [finish(proc, deadline) for proc in nodes]
    for i, (code, out) in enumerate(results):
        assert code == 0, f"node {i} exited {code}:\n{out[-4000:]}"
    report = json.loads((tmp_path / "report0.json").read_text())  # node 0 runs rank 0

    # Cluster.local() on every rank: 2 nodes × 2 devices, ranks laid out node by node
    assert report["cluster"] == {"nodes": 2, "devices_per_node": 2}
    assert report["node_of_rank"] == [0, 0, 1, 1]
    planned = Cluster.preset("cpu", nodes=2, gpus_per_node=2)
    assert [planned.node_of(r) for r in range(4)] == report["node_of_rank"]

    # the mesh is 2×2: axis 0 crosses the nodes (ranks 0 and 2 in one group), axis 1 stays inside them
    mesh = LogicalMesh(shape=tuple(report["mesh"]["shape"]), devices=tuple(report["mesh"]["devices"]))
    assert mesh.shape == (2, 2)
    node = report["node_of_rank"]
    assert mesh.groups(0) == [(0, 2), (1, 3)]
    assert all(len({node[r] for r in group}) == 2 for group in mesh.groups(0))
    assert all(len({node[r] for r in group}) == 1 for group in mesh.groups(1))

    expected = reference({"model": "mlp-tiny", "steps": STEPS})["losses"]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(report["losses"], expected, strict=True)), \
        f"losses: found {report['losses']}, required {expected} (rtol 1e-5)"
