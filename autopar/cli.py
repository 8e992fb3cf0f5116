"""The `autopar` command line. Each subcommand prints; the library underneath does not.

    autopar estimate --model gpt3-175b --precision mixed --optimizer adam
    autopar models
    autopar clusters [--show h100 --nodes 2 --json > cluster.json]
    autopar bench capture --models gpt3-175b
"""

from __future__ import annotations

import argparse
import sys

from autopar.cluster import Cluster
from autopar.errors import AutoparError


def _cluster_args(parser: argparse.ArgumentParser, *, default: str | None = "h100", nodes: int = 1) -> None:
    parser.add_argument("--cluster", default=default, metavar="PRESET|FILE",
                        help="a preset (h100, a100, v100, cpu) or a cluster JSON file (default: %(default)s)")
    parser.add_argument("--nodes", type=int, default=nodes, help="nodes, for a preset (default: %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="devices per node, for a preset")


def _cluster_from(args: argparse.Namespace) -> Cluster:
    from autopar import presets

    if args.cluster in presets.names():
        return Cluster.preset(args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    return Cluster.load(args.cluster)


def _estimate(args: argparse.Namespace) -> int:
    from autopar.estimate import estimate

    result = estimate(args.model, precision=args.precision, optimizer=args.optimizer, tokens=args.tokens,
                      cluster=_cluster_from(args), mfu=args.mfu)
    print(result.report())
    return 0


def _models(args: argparse.Namespace) -> int:
    from autopar import models

    for name in models.names():
        entry = models.get(name)
        count = f"{entry.num_params() / 1e9:10.3f}B" if args.count else ""
        print(f"{name:16s}{count}  {entry.description}")
    return 0


def _clusters(args: argparse.Namespace) -> int:
    from autopar import presets

    if args.show:
        cluster = Cluster.preset(args.show, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
        print(cluster.to_json() if args.json else cluster.describe())
        return 0
    for name in presets.names():
        print(Cluster.preset(name).describe())
    return 0


def _bench(args: argparse.Namespace) -> int:
    from autopar import bench

    rows = bench.capture_benchmark(args.models, batch_size=args.batch_size)
    table = bench.capture_table(rows)
    print(f"capture on the meta device, batch {args.batch_size}; {bench.machine()}\n\n{table}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autopar", description="Auto-parallelization compiler for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("estimate", help="memory and compute of training a zoo model (no devices needed)",
                       description="Memory breakdown (training state, activations with and without "
                                   "checkpointing), FLOPs per step and step time at a stated MFU.")
    p.add_argument("--model", required=True, help="a zoo model (see `autopar models`)")
    p.add_argument("--precision", default="mixed", choices=["mixed", "fp32", "bf16", "fp16"],
                   help="mixed = fp16 compute with fp32 master weights, as in the seeds (default: %(default)s)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "momentum"],
                   help="(default: %(default)s)")
    p.add_argument("--tokens", type=float, default=None,
                   help="tokens per step (default: the GPT-3 table's batch for GPT-3 models, else 2^20)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization to assume (default: %(default)s)")
    _cluster_args(p, nodes=128)
    p.set_defaults(run=_estimate)

    p = sub.add_parser("models", help="list the model zoo", description="The zoo's models, with descriptions.")
    p.add_argument("--count", action="store_true", help="also count parameters (builds each model on meta)")
    p.set_defaults(run=_models)

    p = sub.add_parser("clusters", help="list cluster presets, or print one as JSON",
                       description="Cluster presets. With --show, one preset (as JSON with --json, to save "
                                   "and edit as a cluster file).")
    p.add_argument("--show", default=None, metavar="PRESET", help="the preset to print")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="devices per node (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_clusters)

    p = sub.add_parser("bench", help="benchmarks, printed as markdown tables",
                       description="Benchmarks. `capture`: build zoo models on meta and time their capture.")
    p.add_argument("suite", choices=["capture"], help="which benchmark")
    p.add_argument("--models", nargs="+", default=["gpt3-175b"], help="zoo models (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per step (default: %(default)s)")
    p.add_argument("--out", default=None, help="append the table to this file")
    p.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, AutoparError, OSError) as e:
        print(f"autopar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
