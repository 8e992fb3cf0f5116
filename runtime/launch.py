"""`autopar run`: torchrun on this machine, for a zoo model or a user's script.

    autopar run --model gpt-tiny --nproc 4 --steps 20 --strategy auto
    autopar run train.py --nproc 2 -- --lr 3e-4          # arguments after -- go to the script

The launcher builds the torchrun command (`--standalone` on one machine, or the rendezvous of
`runtime.nodes` on several; one process per device, one thread per CPU rank) and waits for it.
For a zoo model every rank runs `train`: compile the model with the strategy, train on the zoo's
synthetic batches, and rank 0 prints the plan's mesh, each step's loss and time, and the mean
step time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from autopar.runtime import restarts
from autopar.runtime.nodes import Nodes


def torchrun_command(nproc: int, target: list[str], nodes: Nodes | None = None, max_restarts: int = 0) -> list[str]:
    """`nodes`: the machines the job spans (`runtime.nodes`); default this one alone (--standalone).
    `max_restarts`: times torchrun starts every rank again after one fails."""
    placement = (nodes or Nodes()).torchrun_args()
    again = [f"--max-restarts={max_restarts}"] if max_restarts else []
    return [sys.executable, "-m", "torch.distributed.run", *placement, *again, f"--nproc-per-node={nproc}", *target]


def launch(*, nproc: int, model: str | None, script: str | None, script_args: list[str], steps: int,
           strategy: str, batch_size: int, lr: float, timeout: float, plan: str | None = None,
           pipeline: list[str] | None = None, precision: str = "fp32", nodes: Nodes | None = None,
           report: str | None = None, checkpoints: list[str] | None = None, max_restarts: int = 0,
           device: str = "auto") -> int:
    """Run torchrun and return its exit code. `report`: a JSON file rank 0 writes (see `train`).
    `checkpoints`: --save-every/--resume for the ranks (`runtime.restarts.rank_argv`). `device`:
    "auto" (a GPU per rank over NCCL where CUDA is available, else CPU ranks over gloo) or "cpu"."""
    if (model is None) == (script is None):
        raise ValueError("autopar run: found " + ("both --model and a script" if model else "neither --model nor a "
                         "script") + ", required exactly one")
    if nproc < 1:
        raise ValueError(f"--nproc: found {nproc}, required >= 1")
    check_local_ranks(nproc, device)
    if plan is not None:
        check_plan_file(plan, nproc * (nodes.count if nodes is not None else 1))
    if report and script is not None:
        raise ValueError("--report: found with a script, required --model (a script reports what it likes)")
    if checkpoints and script is not None:
        raise ValueError("--save-every/--resume: found with a script, required --model (a script saves with "
                         "compiled.save and loads with compiled.load)")
    if script is not None:
        if not os.path.isfile(script):
            raise ValueError(f"script: found no file {script!r}, required a Python file to run on every rank")
        target = [script, *script_args]
    else:
        target = ["-m", "autopar.runtime.launch", *(["--plan", plan] if plan else []), *(pipeline or []),
                  "--model", model, "--steps", str(steps), "--strategy", strategy,
                  "--batch-size", str(batch_size), "--lr", str(lr), "--timeout", str(timeout),
                  "--precision", precision, *(["--report", report] if report else []), *(checkpoints or [])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if device == "cpu":
        env.update(CPU_ONLY)
    if max_restarts:  # a fresh store per attempt: in the agent's shared one, restarted ranks can read the
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # last attempt's addresses (pytorch#135712)
    return subprocess.run(torchrun_command(nproc, target, nodes, max_restarts), env=env).returncode


CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
"""The environment of a process that is to see no GPU: its ranks join gloo on CPUs
(`runtime.world.init_from_env`). Set before anything touches CUDA."""


def check_local_ranks(nproc: int, device: str) -> None:
    """`nproc` ranks on this machine with `device` ("auto": a GPU per rank over NCCL where CUDA is
    available, else CPU ranks over gloo; "cpu": CPU ranks over gloo whatever the machine has), or a
    ValueError saying what does not fit, before any rank starts."""
    if device not in ("auto", "cpu"):
        raise ValueError(f"--device: found {device!r}, required 'auto' or 'cpu'")
    gpus = _gpus() if device == "auto" else 0
    if gpus and nproc > gpus:
        raise ValueError(f"--nproc: found {nproc}, required at most the {gpus} GPU(s) here (NCCL takes one GPU per "
                         f"rank; --device cpu runs CPU ranks over gloo)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device of the commands that start local ranks (`autopar run`, `autopar profile`)."""
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: a GPU per rank over NCCL where CUDA is available, else CPU ranks over gloo; cpu: "
                             "CPU ranks over gloo on any machine (default: %(default)s)")


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_plan_file(path: str, world: int) -> None:
    """A plan file that is malformed or made for another number of ranks fails here, before torchrun
    starts any (every rank would fail the same way, or wait for ranks that never come)."""
    from autopar.plan import Plan

    devices = Plan.load(path).num_devices
    if devices != world:
        raise ValueError(f"--plan {path}: found a plan for {devices} device(s), required one for the {world} rank(s) "
                         f"launched (--nproc × nodes); launch {devices} rank(s) or plan for {world}")


def pipeline_args(parser: argparse.ArgumentParser) -> None:
    """--stages, --microbatches, --schedule: a pipeline fixed by hand (`autopar.PipelineSpec`)."""
    parser.add_argument("--stages", type=int, default=None,
                        help="pipeline stages of equal layer counts, fixed by hand (default: none)")
    parser.add_argument("--microbatches", type=int, default=1, help="with --stages (default: %(default)s)")
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved", "zero-bubble"],
                        help="with --stages (default: %(default)s)")


def pipeline_spec(args: argparse.Namespace):
    """The `PipelineSpec` the --stages options give, or False."""
    if args.stages is None:
        return False
    from autopar.passes.split import PipelineSpec

    return PipelineSpec(stages=args.stages, microbatches=args.microbatches, schedule=args.schedule)


def pipeline_argv(args: argparse.Namespace) -> list[str]:
    """The same options, for the ranks' command line."""
    if args.stages is None:
        return []
    return ["--stages", str(args.stages), "--microbatches", str(args.microbatches), "--schedule", args.schedule]


def train(model: str, *, steps: int, strategy: str, batch_size: int, lr: float, timeout: float,
          plan: str | None = None, pipeline=False, precision: str = "fp32", report: str | None = None,
          save_every: int | None = None, resume: str | None = None) -> None:
    """One rank of `autopar run --model`: compile, train on synthetic batches, report on rank 0
    (and, with `report`, write `write_report`'s JSON there). `resume`: a directory of checkpoints
    (`runtime.restarts.Checkpoints`) to continue from, and to save into every `save_every` steps."""
    import torch
    import torch.distributed as dist

    import autopar
    from autopar.runtime.restarts import Checkpoints, crash_if_asked, name_lost_ranks_on_sigterm
    from autopar.units import fmt_seconds

    cluster = autopar.Cluster.local()
    entry = autopar.models.get(model)
    net = entry.build(seed=0)
    inputs, target = entry.example_batch(batch_size, seed=0)
    compiled = autopar.compile(net, cluster, example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                               optimizer=lambda ps: torch.optim.AdamW(ps, lr=lr), strategy=strategy, timeout=timeout,
                               plan=autopar.Plan.load(plan) if plan else None, pipeline=pipeline,
                               precision=precision)
    rank = dist.get_rank() if dist.is_initialized() else 0
    plan = compiled.plan
    if rank == 0:
        stages = (f", {len(plan.stages)} stages, {plan.schedule.kind} over {plan.schedule.microbatches} microbatches"
                  if plan.schedule.kind != "none" else "")
        print(f"{model} on {plan.num_devices} rank(s), {plan.strategy} plan, mesh "
              f"{'×'.join(map(str, plan.stages[0].mesh.shape))}{stages}, batch {batch_size}", flush=True)
    name_lost_ranks_on_sigterm(compiled.world)  # torchrun stopping this rank: say which rank was lost
    checkpoints = Checkpoints(resume) if resume else None
    resumed = checkpoints.resume(compiled) if checkpoints else None
    if resumed and rank == 0:
        print(f"resumed from step {resumed[0]} ({resumed[1]})", flush=True)
    times, losses = [], []
    for step in range(resumed[0] if resumed else 0, steps):  # the batches go on from the checkpoint's step
        crash_if_asked(rank, step)
        inputs, target = entry.example_batch(batch_size, seed=step)
        start = time.perf_counter()
        loss = compiled.step(*inputs, target=target)
        times.append(time.perf_counter() - start)
        if rank == 0:
            losses.append(loss.item())
            print(f"step {step:4d}  loss {losses[-1]:.6f}  {fmt_seconds(times[-1])}", flush=True)
        if save_every and compiled.step_count % save_every == 0:
            saved = checkpoints.save(compiled)
            if rank == 0:
                print(f"saved {saved}", flush=True)
    if rank == 0 and times:
        steady = times[1:] or times
        print(f"mean step time {fmt_seconds(sum(steady) / len(steady))} (first step excluded)", flush=True)
    if report:
        write_report(report, cluster=cluster, plan=plan, losses=losses, rank=rank)
    compiled.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def write_report(path: str, *, cluster, plan, losses: list[float], rank: int) -> None:
    """Rank 0 writes what the run saw as JSON: the cluster (nodes × devices per node), the node each
    rank ran on, the plan's strategy and first-stage mesh, and the losses. Every rank must call."""
    import json

    from autopar.runtime.nodes import node_of_each_rank

    nodes = node_of_each_rank()
    if rank != 0:
        return
    mesh = plan.stages[0].mesh
    data = {"cluster": {"nodes": cluster.nodes, "devices_per_node": cluster.devices_per_node},
            "node_of_rank": nodes, "strategy": plan.strategy,
            "mesh": {"shape": list(mesh.shape), "devices": list(mesh.devices)}, "losses": losses}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autopar.runtime.launch")
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--plan", default=None)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--report", default=None)
    pipeline_args(parser)
    restarts.add_args(parser, launcher=False)
    args = parser.parse_args(argv)
    train(args.model, steps=args.steps, strategy=args.strategy, batch_size=args.batch_size, lr=args.lr,
          timeout=args.timeout, plan=args.plan, pipeline=pipeline_spec(args), precision=args.precision,
          report=args.report, save_every=args.save_every, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
