"""The `autopar` command line. Each subcommand prints; the library underneath does not.

    autopar estimate --model gpt3-175b --precision mixed --optimizer adam
    autopar run --model gpt-tiny --nproc 4 --steps 20 --strategy auto
    autopar models
    autopar clusters [--show h100 --nodes 2 --json > cluster.json]
    autopar plan --model gpt3-1.3b --cluster h100 --nodes 2 --batch-size 16 --out plan.json
    autopar bench capture --models gpt3-175b
    autopar profile --out cluster.json --nproc 2            # --device cpu: CPU ranks on a GPU machine
    autopar viz plan.json --out dump/
    autopar bench accuracy                                  # profiles 2 and 4 ranks first
    autopar bench accuracy --gpu                            # one-GPU plans, profiled first
    autopar demo
"""

from __future__ import annotations

import argparse
import signal
import sys

from autopar.cluster import Cluster
from autopar.errors import AutoparError
from autopar.runtime import profiler
from autopar.runtime.launch import add_device_argument, pipeline_args, pipeline_argv, pipeline_spec
from autopar.runtime.restarts import add_args as restarts_args
from autopar.runtime.nodes import add_args as nodes_args
from autopar.viz import command as viz_command


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
        try:
            count = f"{entry.num_params() / 1e9:10.3f}B" if args.count else ""
        except ImportError:  # a Hugging Face model, without transformers installed
            count = f"{'-':>11s}"
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


def _plan(args: argparse.Namespace) -> int:
    import torch

    from autopar import models
    from autopar.capture import capture
    from autopar.planner import plan_graph

    entry = models.get(args.model)
    if args.out:
        _check_out(args.out)
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise ValueError(f"--memory-budget: found {args.memory_budget:g} GB, required > 0")
    cluster = _cluster_from(args)  # a bad file fails before the capture, --out before the search
    dtype = torch.float32 if args.precision == "fp32" else getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[
        args.precision])
    overrides = {"seq_len": args.seq_len} if args.seq_len is not None else {}
    model = entry.build(device="meta", dtype=dtype, **overrides)
    inputs, target = entry.example_batch(args.batch_size, device="meta", **overrides)
    graph = capture(model, inputs, loss_fn=entry.loss_fn, target=target)
    budget = args.memory_budget * 1e9 if args.memory_budget is not None else None
    plan = plan_graph(graph, cluster, model_name=args.model, strategy=args.strategy,
                      precision=args.precision, optimizer=args.optimizer, memory_budget=budget,
                      time_limit=args.time_limit,
                      pipeline=pipeline_spec(args) or {"auto": None, "on": True, "off": False}[args.pipeline])
    print(plan.summary())
    if args.out:
        plan.save(args.out)  # atomic: a failed write leaves the old file, or none
        print(f"\nplan written to {args.out}")
    return 0


def _check_out(path: str) -> None:
    """An --out that cannot be written fails before the work, not after it."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--out: found {path!r}, whose directory {folder} does not exist; required a file in an "
                         f"existing directory")
    if os.path.isdir(path):
        raise ValueError(f"--out: found the directory {path!r}, required a file name")


def _run(args: argparse.Namespace) -> int:
    from autopar.runtime import nodes, restarts
    from autopar.runtime.launch import launch

    return launch(nproc=args.nproc, model=args.model, script=args.script, script_args=args.script_args,
                  steps=args.steps, strategy=args.strategy, batch_size=args.batch_size, lr=args.lr,
                  timeout=args.timeout, plan=args.plan, pipeline=pipeline_argv(args), precision=args.precision,
                  nodes=nodes.from_args(args), report=args.report, checkpoints=restarts.rank_argv(args),
                  max_restarts=args.max_restarts, device=args.device)


def _bench(args: argparse.Namespace) -> int:
    from autopar import bench

    if args.suite == "planner":
        from autopar import bench_runtime

        table = bench.planner_table(bench.planner_benchmark())
        print(f"autopar.plan, capture included, against the fastest hand-written strategy (dp, ZeRO, FSDP, tp, "
              f"dp+tp, sp) under the same cost model; {bench.machine()}\n\n{table}", flush=True)
        measured = bench_runtime.runtime_table(bench_runtime.runtime_benchmark(rounds=args.rounds, steps=args.steps))
        print(f"\nmeasured side by side on local gloo ranks: median seconds per AdamW step, {args.rounds} rounds "
              f"of {args.steps} steps\n\n{measured}")
        table += "\n\n" + measured
    elif args.suite == "pipeline":
        table = bench.pipeline_table(bench.pipeline_benchmark())
        print(f"auto (pipeline stages searched) against the Megatron-LM grid, same cost model; search time "
              f"includes capture; {bench.machine()}\n\n{table}")
    elif args.suite == "runtime":
        from autopar import bench_runtime

        results = bench_runtime.runtime_benchmark(rounds=args.rounds, steps=args.steps)
        table = bench_runtime.runtime_table(results)
        print(f"median seconds per training step (AdamW), {args.rounds} rounds of {args.steps} steps, "
              f"local gloo ranks; {bench.machine()}\n\n{table}")
    elif args.suite == "accuracy":
        from autopar import bench_accuracy

        table = bench_accuracy.command(args)
    elif args.suite == "quant":
        from autopar import bench_quant

        accuracy = bench_quant.accuracy_table(bench_quant.accuracy_benchmark())
        speed = bench_quant.speed_table(bench_quant.speed_benchmark())
        table = f"{accuracy}\n\n{speed}"
        print(f"held-out perplexity of a byte-level GPT trained on the standard library's source, then the "
              f"linear layers quantized; linear-layer speed, median of interleaved rounds; {bench.machine()}"
              f"\n\n{table}")
    else:
        rows = bench.capture_benchmark(args.models, batch_size=args.batch_size)
        table = bench.capture_table(rows)
        print(f"capture on the meta device, batch {args.batch_size}; {bench.machine()}\n\n{table}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from autopar import demo

    return demo.run(out=args.out, nproc=args.nproc, steps=args.steps, large=not args.skip_large)


def _add_estimate(sub) -> None:

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


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="find the fastest plan for a zoo model on a cluster (no devices needed)",
                       description="Capture a zoo model on the meta device, search data/tensor/sequence/expert "
                                   "parallelism and ZeRO levels with the ILP, print the plan and optionally "
                                   "write it as JSON.")
    p.add_argument("--model", required=True, help="a zoo model (see `autopar models`)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the model's context)")
    p.add_argument("--strategy", default="auto", choices=["auto", "dp", "zero1", "zero2", "fsdp", "tp", "dp+tp", "sp"],
                   help="auto searches everything; the others give that hand-written family (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="(default: %(default)s)")
    p.add_argument("--optimizer", default="adamw", choices=["adam", "adamw", "sgd", "momentum"],
                   help="(default: %(default)s)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="usable memory per device in GB (default: 90%% of the device)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per ILP solve (default: %(default)s)")
    p.add_argument("--pipeline", default="off", choices=["auto", "on", "off"],
                   help="pipeline stages: on searches them too, auto only when one stage cannot fit "
                        "(default: %(default)s)")
    pipeline_args(p)
    p.add_argument("--out", default=None, help="write the plan as JSON here")
    _cluster_args(p)
    p.set_defaults(run=_plan)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="train a zoo model (or run a script) on local ranks under torchrun",
                       description="Launch torchrun on this machine. With --model, every rank compiles the zoo "
                                   "model with --strategy and trains it on synthetic batches, printing losses and "
                                   "step times; with a script, torchrun runs it (arguments after -- go to it). "
                                   "On several machines, run the same command on each with --nnodes, "
                                   "--node-rank and --rdzv-endpoint.")
    p.add_argument("script", nargs="?", default=None,
                   help="a Python script to run on every rank; its own arguments go after --")
    p.add_argument("--model", default=None, help="a zoo model (see `autopar models`)")
    p.add_argument("--nproc", type=int, default=2, help="processes (devices) on this machine (default: %(default)s)")
    add_device_argument(p)
    p.add_argument("--steps", type=int, default=10, help="training steps (default: %(default)s)")
    p.add_argument("--strategy", default="auto", choices=["auto", "dp", "zero1", "zero2", "fsdp", "tp", "dp+tp", "sp"],
                   help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective waits for a missing rank (default: %(default)s)")
    p.add_argument("--plan", default=None, help="a plan file (JSON, from `autopar plan --out`) to run")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="mixed precision: matmuls in bf16/fp16, norms, softmax and losses in fp32, fp32 master "
                        "weights; fp16 adds dynamic loss scaling (default: %(default)s)")
    pipeline_args(p)
    nodes_args(p)
    restarts_args(p, launcher=True)
    p.add_argument("--report", default=None, metavar="FILE",
                   help="with --model: rank 0 writes the cluster, the node of each rank, the plan's mesh and the "
                        "losses here as JSON (on the machine that runs rank 0)")
    p.set_defaults(run=_run)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo", description="The zoo's models, with descriptions.")
    p.add_argument("--count", action="store_true", help="also count parameters (builds each model on meta)")
    p.set_defaults(run=_models)


def _add_clusters(sub) -> None:
    p = sub.add_parser("clusters", help="list cluster presets, or print one as JSON",
                       description="Cluster presets. With --show, one preset (as JSON with --json, to save "
                                   "and edit as a cluster file).")
    p.add_argument("--show", default=None, metavar="PRESET", help="the preset to print")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="devices per node (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_clusters)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autopar", description="Auto-parallelization compiler for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_estimate(sub)
    _add_plan(sub)
    _add_run(sub)
    _add_models(sub)
    _add_clusters(sub)
    _add_bench(sub)
    _add_demo(sub)
    return parser


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, printed as markdown tables",
                       description="Benchmarks. `capture`: build zoo models on meta and time their capture. "
                                   "`planner`: time autopar.plan on GPT-3 175B (1024 H100) and Llama-3 8B (64 H100) "
                                   "against the hand-written strategies, then auto against DDP, FSDP2 and TP "
                                   "(parallelize_module) measured on local ranks. "
                                   "`pipeline`: auto with pipeline stages against the best Megatron-LM dp×tp×pp "
                                   "configuration, 8 to 1024 GPUs. "
                                   "`accuracy`: predicted against measured step time and memory of 16 plans on "
                                   "2 and 4 local ranks, profiled first, the plans of one world size taking their "
                                   "rounds in turns (with --gpu: 8 plans on this machine's first GPU); each error against the median and the fastest round, the "
                                   "machine's speed during the rounds against its profile's (the reference matmul, timed "
                                   "after each round) with the error at the profile's speed, and the "
                                   "CPU time the hypervisor took meanwhile (steal). "
                                   "`runtime`: step times of autopar's dp, fsdp, tp and auto plans against "
                                   "DistributedDataParallel, FSDP2 and parallelize_module on local gloo ranks.")
    p.add_argument("suite", choices=["capture", "planner", "pipeline", "runtime", "quant", "accuracy"],
                   help="which benchmark")
    p.add_argument("--models", nargs="+", default=["gpt3-175b"], help="zoo models (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per step (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="runtime and accuracy: timed rounds, the variants or plans taking turns (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="runtime: timed steps per round (default: %(default)s)")
    p.add_argument("--out", default=None, help="append the table to this file")
    p.add_argument("--cluster2", default=None, metavar="FILE",
                   help="accuracy: the cluster file of 2 local ranks (default: profile them first)")
    p.add_argument("--cluster4", default=None, metavar="FILE",
                   help="accuracy: the cluster file of 4 local ranks (default: profile them first)")
    p.add_argument("--quick", action="store_true", help="accuracy: profile with fewer measurements")
    p.add_argument("--gpu", action="store_true",
                   help="accuracy: one-GPU plans (GPT-3 111M and 337M, a Llama, an MLP; fp32 and bf16) on this "
                        "machine's first GPU over NCCL, instead of the 2- and 4-rank CPU cases")
    p.add_argument("--cluster1", default=None, metavar="FILE",
                   help="accuracy --gpu: the cluster file of this GPU (default: profile it first)")
    p.set_defaults(run=_bench)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="plan GPT-3 175B for 1024 H100, then train a tiny GPT on 4 local ranks",
                       description="The tour: plan GPT-3 175B on a simulated 1024-GPU H100 cluster and print "
                                   "the plan; train a tiny GPT on local ranks with its auto plan and check its "
                                   "losses against one process; write both plans' HTML reports.")
    p.add_argument("--out", default="autopar-demo", help="directory for plans and reports (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=4, help="local ranks (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="training steps (default: %(default)s)")
    p.add_argument("--skip-large", action="store_true", help="skip planning GPT-3 175B (about a minute)")
    p.set_defaults(run=_demo)
    profiler.add_parser(sub)
    viz_command.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `autopar plan ... | head` ends quietly, like any Unix tool
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args = []
    if "--" in argv:  # `autopar run script.py --nproc 2 -- --lr 3e-4`: what follows -- is the script's
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.script_args = script_args
    try:
        return args.run(args)
    except (ValueError, AutoparError, OSError) as e:
        print(f"autopar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
