"""`autopar bench accuracy`: the cost model's predictions against real runs on the local cluster.

Each case is a plan (a zoo model, a batch, a strategy or a hand-chosen pipeline) run for real on
local ranks with the cluster `autopar profile` measured for that many ranks. Per plan it reports
the predicted and measured step time (median over rounds, the slowest rank; the plans of one world
size take their rounds in turns, so that all are measured over the same minutes) and peak tensor memory
per rank (`runtime.memory.LiveMemory`), and over all plans the errors and Kendall's τ of the
two rankings (`accuracy_report`).

A prediction is for the machine as it was profiled, and a shared machine's speed drifts: on 2 gloo
ranks of a 2-core virtual machine the profile's 512³ matmul ran at 0.51–1.00 of its profiled rate
in the rounds of one run an hour after the profile, and every plan read 15–30% slower than
predicted; minutes after a fresh profile, at 0.85–1.31, the same plans read −24% to +6%. So after
each round of plans every rank times the reference matmul and add that the planner scales its op
timings by (`cost.timers.Reference`), all at once, and the report gives the machine's speed during
the rounds against the profile's, s = median over rounds of r_round / r_profile (the matmul's: it
tracked the plans' drift, the add's did not), and the error at the profile's speed, the measured
step scaled by s (`accuracy_report`).

Both runs above then agree within 4–9 points per plan (GPT dp 13% and 20%, tp 9% and 5%, Llama 8%
and 8%, MLP 0% and 9%). The plain error stays the headline: it is what a user comparing a plan's
prediction with a run would see.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from autopar.accuracy_report import AccuracyCase, AccuracyRow


_GPT = {"n_layers": 4, "d_model": 128, "n_heads": 4, "d_head": 32, "vocab_size": 1024, "seq_len": 64}
_LLAMA = {"n_layers": 4, "dim": 128, "n_heads": 8, "n_kv_heads": 4, "ffn_dim": 384, "vocab_size": 1024, "seq_len": 64}
_MLP = {"d_in": 512, "d_hidden": 2048, "d_out": 512}

ACCURACY_CASES = (
    AccuracyCase(label="GPT dp", model="gpt-tiny", world=2, batch=16, strategy="dp", overrides=_GPT),
    AccuracyCase(label="GPT fsdp", model="gpt-tiny", world=2, batch=16, strategy="fsdp", overrides=_GPT),
    AccuracyCase(label="GPT tp", model="gpt-tiny", world=2, batch=16, strategy="tp", overrides=_GPT),
    AccuracyCase(label="GPT auto", model="gpt-tiny", world=2, batch=16, strategy="auto", overrides=_GPT),
    AccuracyCase(label="GPT 1F1B, 2 stages", model="gpt-tiny", world=2, batch=16, strategy="dp", overrides=_GPT,
                 pipeline={"stages": 2, "microbatches": 4, "schedule": "1f1b"}),
    AccuracyCase(label="Llama dp", model="llama-tiny", world=2, batch=16, strategy="dp", overrides=_LLAMA),
    AccuracyCase(label="Llama tp", model="llama-tiny", world=2, batch=16, strategy="tp", overrides=_LLAMA),
    AccuracyCase(label="MLP dp", model="mlp-tiny", world=2, batch=256, strategy="dp", overrides=_MLP),
    AccuracyCase(label="MLP tp", model="mlp-tiny", world=2, batch=256, strategy="tp", overrides=_MLP),
    AccuracyCase(label="GPT dp", model="gpt-tiny", world=4, batch=16, strategy="dp", overrides=_GPT),
    AccuracyCase(label="GPT fsdp", model="gpt-tiny", world=4, batch=16, strategy="fsdp", overrides=_GPT),
    AccuracyCase(label="GPT dp+tp", model="gpt-tiny", world=4, batch=16, strategy="dp+tp", overrides=_GPT),
    AccuracyCase(label="GPT tp", model="gpt-tiny", world=4, batch=16, strategy="tp", overrides=_GPT),
    AccuracyCase(label="Llama dp", model="llama-tiny", world=4, batch=16, strategy="dp", overrides=_LLAMA),
    AccuracyCase(label="Llama fsdp", model="llama-tiny", world=4, batch=16, strategy="fsdp", overrides=_LLAMA),
    AccuracyCase(label="MLP tp", model="mlp-tiny", world=4, batch=256, strategy="tp", overrides=_MLP),
)

_GPT_GPU = {"seq_len": 1024, "vocab_size": 32768}
_LLAMA_GPU = {"n_layers": 8, "dim": 1024, "n_heads": 16, "n_kv_heads": 4, "ffn_dim": 2816, "vocab_size": 32768,
              "seq_len": 1024}
_MLP_GPU = {"d_in": 4096, "d_hidden": 16384, "d_out": 4096}

GPU_CASES = (
    AccuracyCase(label="GPT-3 111M fp32", model="gpt3-125m", world=1, batch=8, overrides=_GPT_GPU),
    AccuracyCase(label="GPT-3 111M bf16", model="gpt3-125m", world=1, batch=8, overrides=_GPT_GPU, precision="bf16"),
    AccuracyCase(label="GPT-3 111M bf16", model="gpt3-125m", world=1, batch=2, overrides=_GPT_GPU, precision="bf16"),
    AccuracyCase(label="GPT-3 111M bf16", model="gpt3-125m", world=1, batch=32, overrides=_GPT_GPU,
                 precision="bf16"),
    AccuracyCase(label="Llama 157M bf16", model="llama-tiny", world=1, batch=8, overrides=_LLAMA_GPU,
                 precision="bf16"),
    AccuracyCase(label="MLP 134M fp32", model="mlp-tiny", world=1, batch=8192, overrides=_MLP_GPU),
    AccuracyCase(label="MLP 134M bf16", model="mlp-tiny", world=1, batch=8192, overrides=_MLP_GPU, precision="bf16"),
    AccuracyCase(label="GPT-3 337M bf16", model="gpt3-350m", world=1, batch=8, overrides=_GPT_GPU, precision="bf16"),
)
"""Plans on one GPU (`autopar bench accuracy --gpu`): no collectives, so these check the compute,
memory-bound and optimizer times the cost model reads off the profiled device."""


def _my_stage_memory(plan, rank: int) -> float:
    for stage in plan.stages:
        if rank in stage.mesh.devices:
            return stage.cost.peak_memory
    raise ValueError(f"rank {rank} is in none of the plan's stages")


class _Prepared:
    """One case on this rank: its compiled plan, warmed up, its batches and its memory measured."""

    def __init__(self, *, model: str, batch: int, strategy: str, pipeline: dict | None, overrides: dict,
                 cluster: str, steps: int = 3, precision: str = "fp32") -> None:
        import autopar
        from autopar import models
        from autopar.cluster import Cluster
        from autopar.passes.split import PipelineSpec
        from autopar.runtime.memory import LiveMemory
        from autopar.runtime.world import this_device

        entry = models.get(model)
        self.device = this_device()
        with LiveMemory() as before:  # what this process already holds (other cases): not this plan's
            pass
        net = entry.build(self.device, seed=0, **overrides)
        inputs, target = entry.example_batch(batch, seed=0, device=self.device, **overrides)
        self.cluster = Cluster.from_json(cluster)
        self.compiled = autopar.compile(net, self.cluster, example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                                        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4), strategy=strategy,
                                        precision=precision,
                                        pipeline=PipelineSpec(**pipeline) if pipeline else False)
        del net
        try:
            for _ in range(2 * steps):  # warm up: optimizer state, buffers, the allocator, gloo's threads
                self.compiled.step(*inputs, target=target)
            with LiveMemory() as live:  # one batch alive, as a training loop holds
                self.compiled.step(*inputs, target=target)
            self.peaks = [None] * dist.get_world_size()
            dist.all_gather_object(self.peaks, live.peak - before.start)
            del inputs, target
            self.batches = [entry.example_batch(batch, seed=s, device=self.device, **overrides) for s in range(steps)]
        except BaseException:
            self.compiled.close()
            raise
        self.times: list[float] = []
        self.starts: list[float] = []
        """perf_counter() at the start of each timed round."""
        self.speeds: list[float] = []
        """The machine's speed against the profile's after each round (`Speed`), where it has one."""

    def round(self, warm: bool = False) -> None:
        """Times one round: the batches' steps, all ranks started together, the slowest's time per
        step. `warm`: one untimed step first (another plan ran since this one's last round)."""
        from autopar.runtime.timing import sync

        if warm:
            x, y = self.batches[-1]
            self.compiled.step(*x, target=y)
        dist.barrier()
        sync(self.device)
        start = time.perf_counter()
        self.starts.append(start)
        for x, y in self.batches:
            self.compiled.step(*x, target=y)
        sync(self.device)
        dist.barrier()
        self.times.append((time.perf_counter() - start) / len(self.batches))

    def result(self) -> dict[str, Any]:
        from autopar import presets
        from autopar.bench import describe

        plan = self.compiled.plan
        flops = plan.cost.mfu * plan.cost.step_time * plan.num_devices * self.cluster.device.peak(plan.precision)
        return {"predicted_time": plan.cost.step_time, "measured_time": statistics.median(self.times),
                "times": self.times, "starts": self.starts, "speeds": self.speeds,
                "predicted_memory": [_my_stage_memory(plan, r) for r in range(dist.get_world_size())],
                "measured_memory": self.peaks, "plan": describe(plan), "flops": flops,
                "datasheet_peak": presets.local().device.peak(plan.precision) if self.device.type == "cuda" else 0.0}


class Speed:
    """The machine's speed against its profile's: the planner's reference matmul
    (`cost.timers.Reference`) timed on every rank at once, `SAMPLES` samples in turns with the
    reference add, each started together; r_here / r_profile of the slowest rank (the module
    docstring). Collective: every rank calls `measure` together."""

    SAMPLES = 3

    def __init__(self, profile, device: torch.device) -> None:
        from autopar.cost.sampling import agree_calls
        from autopar.cost.timers import Reference
        from autopar.runtime.profiler import Settings

        # samples as long as the profile's: ranks sharing cores are time-sliced, and a short sample
        # reads another share of the core (2.5 ms samples read 2 and 4 ranks at ×0.81 and ×0.67 of
        # a profile whose plans they predicted within 0.6–13% on 4 ranks)
        settings = Settings.make(quick=False, cuda=device.type == "cuda")
        self.reference = Reference(profile, device, settings.matmul_sample)
        self.device = device
        agree_calls([self.reference.matmul, self.reference.add], device)

    def measure(self) -> float:
        from autopar.cost.sampling import in_turns
        from autopar.runtime.timing import max_over_ranks

        samplers = [self.reference.matmul, self.reference.add]
        for sampler in samplers:
            sampler.samples.clear()
        for _ in range(self.SAMPLES):
            if dist.is_initialized():
                dist.barrier()
            in_turns(samplers, 1)
        matmul, _ = self.reference.scales()
        return -max_over_ranks([-matmul], self.device)[0]


def _speed(prepared: list[_Prepared]) -> Speed | None:
    profile = prepared[0].cluster.profile if prepared else None
    return Speed(profile, prepared[0].device) if profile is not None else None


def _rounds(prepared: list[_Prepared], rounds: int) -> None:
    """`rounds` rounds, each timing every case once (after one untimed step when there are several),
    then the machine's speed (`Speed`), recorded on every case."""
    speed = _speed(prepared)
    for _ in range(rounds):
        for p in prepared:
            p.round(warm=len(prepared) > 1)
        if speed is not None:
            now = speed.measure()
            for p in prepared:
                p.speeds.append(now)


def measure(*, rounds: int = 5, **case) -> dict[str, Any]:
    """On every rank (inside `autopar.testing.RankPool`, or a world of one GPU): compile the case's
    plan on `cluster` (JSON), warm it up, measure one step under `LiveMemory`, then time `rounds` ×
    `steps` training steps, and after each round the machine's speed (`Speed`). Returns the plan's
    predictions and, per rank, the measurements."""
    prepared = _Prepared(**case)
    try:
        _rounds([prepared], rounds)
        return prepared.result()
    finally:
        prepared.compiled.close()


def measure_in_turns(*, cases: list[dict[str, Any]], rounds: int = 5) -> dict[str, list[dict[str, Any]]]:
    """`measure` for several cases on the same ranks, their rounds taken in turns: every round
    times each case once (after one untimed step), so a burst of another program's load slows one
    round of many plans rather than every round of one, and plans compared with each other were
    measured over the same minutes (as the profiler times its collectives, `in_step_seconds`).
    Returns {"results": `measure`'s dict per case, in order}."""
    prepared: list[_Prepared] = []
    try:
        for case in cases:
            try:
                prepared.append(_Prepared(**case))
            except Exception as e:  # name the case: the others on these ranks share the error
                raise RuntimeError(f"{case['model']} {case['strategy']}{' pipelined' if case.get('pipeline') else ''}"
                                   f" (batch {case['batch']}): {type(e).__name__}: {e}") from e
        _rounds(prepared, rounds)
        return {"results": [p.result() for p in prepared]}
    finally:
        for p in prepared:
            p.compiled.close()


def accuracy_benchmark(clusters: dict[int, str], cases=ACCURACY_CASES, rounds: int = 5,
                       progress=None) -> list[AccuracyRow]:
    """Runs every case on a pool of its world size, the cases of one world size in turns
    (`measure_in_turns`); `clusters`: world size → cluster JSON (profiled)."""
    from autopar.testing import RankPool

    rows = []
    for world in sorted({c.world for c in cases}):
        if world not in clusters:
            raise ValueError(f"cluster: found profiles for {sorted(clusters)} rank(s), required one for {world}")
        mine = [c for c in cases if c.world == world]
        kwargs = [{"model": c.model, "batch": c.batch, "strategy": c.strategy, "pipeline": c.pipeline,
                   "overrides": c.overrides, "cluster": clusters[world]} for c in mine]
        with RankPool(world, timeout=600) as pool:
            (got,) = pool.run([{"call": "autopar.bench_accuracy:measure_in_turns",
                                "kwargs": {"cases": kwargs, "rounds": rounds}}], timeout=3600)
        if "error" in got:
            raise RuntimeError(f"the cases on {world} ranks: {got['error']}\n{got.get('traceback', '')}")
        for case, result in zip(mine, got["results"], strict=True):
            rows.append(_row(case, result))
            if progress is not None:
                progress(rows[-1])
    return rows


def _row(case: AccuracyCase, got: dict[str, Any]) -> AccuracyRow:
    worst = max(range(case.world), key=lambda r: got["measured_memory"][r])
    return AccuracyRow(case=case, plan=got["plan"], predicted_time=got["predicted_time"],
                       measured_time=got["measured_time"], predicted_memory=got["predicted_memory"][worst],
                       measured_memory=got["measured_memory"][worst], rounds=tuple(got["times"]),
                       speeds=tuple(got.get("speeds", ())),
                       flops=got["flops"], datasheet_peak=got["datasheet_peak"])


def require_gpu() -> None:
    from autopar.errors import AutoparError

    if not torch.cuda.is_available():
        raise AutoparError("bench accuracy --gpu: found no CUDA device, required one (torch.cuda.is_available())")


def gpu_accuracy_benchmark(cluster: str, cases=GPU_CASES, rounds: int = 5, progress=None) -> list[AccuracyRow]:
    """Runs every case in this process on its first GPU, a world of one over NCCL; `cluster`: the
    cluster JSON `autopar profile --nproc 1` measured on this GPU."""
    import os

    from autopar.runtime.world import free_port

    require_gpu()
    if any(c.world != 1 for c in cases):
        raise ValueError("bench accuracy --gpu: found a case of several ranks, required world size 1 for each")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    rows = []
    try:
        for case in cases:
            got = measure(model=case.model, batch=case.batch, strategy=case.strategy, pipeline=case.pipeline,
                          overrides=case.overrides, cluster=cluster, rounds=rounds, precision=case.precision)
            rows.append(_row(case, got))
            torch.cuda.empty_cache()
            if progress is not None:
                progress(rows[-1])
    finally:
        dist.destroy_process_group()
    return rows


def command(args) -> str:
    """`autopar bench accuracy`: profiles 2 and 4 local ranks (or one GPU with --gpu; or reads the
    --cluster files), runs the cases, prints the table and returns it."""
    import tempfile

    from autopar import accuracy_report, bench
    from autopar.cluster import Cluster
    from autopar.runtime import profiler

    if args.gpu:
        require_gpu()  # before profiling anything
    clusters = {}
    for world in (1,) if args.gpu else (2, 4):
        given = getattr(args, f"cluster{world}")
        if given:
            clusters[world] = Cluster.load(given).to_json()
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/cluster{world}.json"
            profiler.spawn(world, path, quick=args.quick)
            clusters[world] = Cluster.load(path).to_json()
    before = bench.cpu_times()
    if args.gpu:
        import torch

        rows = gpu_accuracy_benchmark(clusters[1], rounds=args.rounds)
        where = f"one {torch.cuda.get_device_name(0)} over NCCL (world size 1)"
    else:
        rows = accuracy_benchmark(clusters, rounds=args.rounds)
        where = "local gloo ranks (one thread each)"
    table = accuracy_report.accuracy_table(rows)
    steal = bench.stolen(before, bench.cpu_times())
    print(f"predicted against measured, AdamW training steps on {where} with the cluster `autopar profile` "
          f"measured for that many ranks; {bench.machine()}"
          + (f"; CPU time taken by the hypervisor during the steps (steal): {steal:.1%}" if steal is not None else "")
          + f"\n\n{table}")
    return table
