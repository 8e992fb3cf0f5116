"""The machines a torchrun job spans: `autopar run`'s --nnodes, --node-rank and --rdzv-endpoint.

Takes the options one machine was started with and gives the torchrun arguments that join it to
the job. Every machine runs the same command but for its --node-rank:

    autopar run --model gpt-tiny --nproc 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500  # on node0
    autopar run --model gpt-tiny --nproc 8 --nnodes 2 --node-rank 1 --rdzv-endpoint node0:29500  # on node1

One node and no endpoint is torchrun's --standalone. With --node-rank the rendezvous is torchrun's
static one: node 0 serves it at the endpoint and every node keeps the rank it was given. Without
it, the c10d rendezvous at the endpoint numbers the nodes as they join. Either way torchrun gives
node g the ranks g·L … g·L + L - 1 (L = --nproc), which `Cluster.local()` checks and the planner
relies on: a mesh axis that steps by L crosses nodes.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class Nodes:
    """Where this machine's torchrun agent joins the job; validated on construction."""

    count: int = 1
    """Machines in the job (torchrun --nnodes); each runs the same --nproc."""
    rank: int | None = None
    """This machine's place, 0 … count - 1 (torchrun --node-rank); node 0 serves the rendezvous.
    None: the c10d rendezvous numbers the nodes as they join."""
    endpoint: str | None = None
    """HOST:PORT where the nodes meet (torchrun --rdzv-endpoint): node 0's address and a free port."""

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"--nnodes: found {self.count!r}, required an integer >= 1")
        if self.rank is not None and not 0 <= self.rank < self.count:
            raise ValueError(f"--node-rank: found {self.rank}, required 0 <= node rank < --nnodes ({self.count})")
        if self.count > 1 and self.endpoint is None:
            raise ValueError(f"--rdzv-endpoint: found none with --nnodes {self.count}, required HOST:PORT where "
                             f"the nodes meet (node 0's address and a free port, the same on every node)")
        if self.endpoint is not None:
            _check_endpoint(self.endpoint)

    @property
    def standalone(self) -> bool:
        """One machine and no rendezvous to join: torchrun starts its own."""
        return self.count == 1 and self.endpoint is None

    def torchrun_args(self) -> list[str]:
        """The torchrun options that place this machine's agent in the job."""
        if self.standalone:
            return ["--standalone"]
        common = [f"--nnodes={self.count}", f"--rdzv-endpoint={self.endpoint}"]
        if self.rank is None:
            return [*common, "--rdzv-backend=c10d"]
        return [*common, "--rdzv-backend=static", f"--node-rank={self.rank}"]


def _check_endpoint(endpoint: str) -> None:
    host, colon, port = endpoint.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rdzv-endpoint: found {endpoint!r}, required HOST:PORT with a port in 1..65535 "
                         f"(e.g. node0:29500)")


def add_args(parser: argparse.ArgumentParser) -> None:
    """--nnodes, --node-rank, --rdzv-endpoint, named as torchrun names them."""
    parser.add_argument("--nnodes", type=int, default=1,
                        help="machines in the job, each running this command with the same --nproc "
                             "(default: %(default)s)")
    parser.add_argument("--node-rank", type=int, default=None,
                        help="this machine's place, 0 .. nnodes-1; node 0 serves the rendezvous (default: none, "
                             "the nodes are numbered as they join)")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="where the nodes meet: node 0's address and a free port (required with --nnodes > 1)")


def from_args(args: argparse.Namespace) -> Nodes:
    return Nodes(count=args.nnodes, rank=args.node_rank, endpoint=args.rdzv_endpoint)


def node_of_each_rank() -> list[int]:
    """The node (torchrun's GROUP_RANK) every rank of the job runs on, by rank; every rank must call.
    Under `torchrun --nnodes 2 --nproc-per-node 2` every rank gets [0, 0, 1, 1]; in a plain process, [0].
    """
    import torch
    import torch.distributed as dist

    mine = torch.tensor([int(os.environ.get("GROUP_RANK", 0))])
    if not (dist.is_available() and dist.is_initialized()):
        return [int(mine)]
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [int(t) for t in everyone]
