"""`autopar run`: torchrun on this machine, for a zoo model or a user's script.

    autopar run --model gpt-tiny --nproc 4 --steps 20 --strategy auto
    autopar run train.py --nproc 2 -- --lr 3e-4          # arguments after -- go to the script

The launcher builds the torchrun command (`--standalone`, one process per device, one thread per
CPU rank) and waits for it. For a zoo model every rank runs `train`: compile the model with the
strategy, train on the zoo's synthetic batches, and rank 0 prints the plan's mesh, each step's
loss and time, and the mean step time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def torchrun_command(nproc: int, target: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]


def launch(*, nproc: int, model: str | None, script: str | None, script_args: list[str], steps: int,
           strategy: str, batch_size: int, lr: float, timeout: float, plan: str | None = None,
           pipeline: list[str] | None = None, precision: str = "fp32") -> int:
    """Run torchrun and return its exit code."""
    if (model is None) == (script is None):
        raise ValueError("autopar run: found " + ("both --model and a script" if model else "neither --model nor a "
                         "script") + ", required exactly one")
    if nproc < 1:
        raise ValueError(f"--nproc: found {nproc}, required >= 1")
    if script is not None:
        if not os.path.isfile(script):
            raise ValueError(f"script: found no file {script!r}, required a Python file to run on every rank")
        target = [script, *script_args]
    else:
        target = ["-m", "autopar.runtime.launch", *(["--plan", plan] if plan else []), *(pipeline or []),
                  "--model", model, "--steps", str(steps), "--strategy", strategy,
                  "--batch-size", str(batch_size), "--lr", str(lr), "--timeout", str(timeout),
                  "--precision", precision]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(torchrun_command(nproc, target), env=env).returncode


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
          plan: str | None = None, pipeline=False, precision: str = "fp32") -> None:
    """One rank of `autopar run --model`: compile, train on synthetic batches, report on rank 0."""
    import torch
    import torch.distributed as dist

    import autopar
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
    times = []
    for step in range(steps):
        inputs, target = entry.example_batch(batch_size, seed=step)
        start = time.perf_counter()
        loss = compiled.step(*inputs, target=target)
        times.append(time.perf_counter() - start)
        if rank == 0:
            print(f"step {step:4d}  loss {loss.item():.6f}  {fmt_seconds(times[-1])}", flush=True)
    if rank == 0 and times:
        steady = times[1:] or times
        print(f"mean step time {fmt_seconds(sum(steady) / len(steady))} (first step excluded)", flush=True)
    compiled.close()
    if dist.is_initialized():
        dist.destroy_process_group()


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
    pipeline_args(parser)
    args = parser.parse_args(argv)
    train(args.model, steps=args.steps, strategy=args.strategy, batch_size=args.batch_size, lr=args.lr,
          timeout=args.timeout, plan=args.plan, pipeline=pipeline_spec(args), precision=args.precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
