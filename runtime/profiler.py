"""`autopar profile`: measure the devices and links of the world this runs in, and write a cluster file.

    autopar profile --out cluster.json --nproc 2 [--quick]      # spawns 2 local ranks (gloo, or NCCL on GPUs)
    torchrun --nnodes 2 --nproc-per-node 8 ... -m autopar.runtime.profiler --out cluster.json

Under torchrun (WORLD_SIZE set) every rank takes part and rank 0 writes; otherwise `--nproc` local
ranks are spawned. Every rank measures at once, as in training, and each figure is the slowest
rank's (all-reduce MAX):

- matmul: (s, s) @ (s, s) for growing s in fp32, bf16, fp16 (and tf32 on a GPU), 2s³ FLOPs over the
  time, every shape taking turns round by round, each the trimmed mean of its samples
  (`measure_matmul`); a dtype's sizes stop where the next would take longer than the budget;
- memory bandwidth: out = a + b on large arrays, 3 × bytes of one array over the time;
- kernel overhead: a chain of multiplications of one-element tensors, forward and backward through
  autograd as training runs them, per kernel (dispatch and autograd on a CPU rank, launch on a GPU);
  these two in 3 rounds that every rank starts together, each rank keeping its fastest round;
- every collective of `autopar.cost.profile.PROFILED`, on every group size 2, 4, 8, ... and the
  world's (inside a node; and across nodes when there are several): disjoint groups run at once,
  timed as a step meets them (`in_step_seconds`: after a chunk of computation, not right after a
  barrier), over message sizes 4 KiB .. 64 MiB (--quick: 4 KiB .. 2 MiB), every size of every
  kind taking turns round by round, each the trimmed mean of its repeats (a step pays the mean);
  α and β least-squares fitted per (collective, group size, scope), and the measured times kept;
- the slowest rank's excess: a chunk of mixed kernels on every rank in rounds started together, the
  slowest of each group of p ranks against its slowest mean, per group size
  (`runtime.profile_straggle`).

The cluster written is `presets.local()`'s with the measured figures (`cost.profile.calibrated`).
Device memory is the GPU's; on CPU ranks it is the machine's RAM (os.sysconf) divided by the ranks
on one node, since they share it. On GPUs, time is taken with CUDA events after a synchronize.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autopar.cost.profile import MatmulRate, Profile, calibrated
from autopar.cost.sampling import Sampler, agree_calls, in_turns
from autopar.errors import AutoparError
from autopar.progress import Bar
from autopar.runtime.launch import CPU_ONLY, add_device_argument, check_local_ranks
from autopar.runtime.profile_collectives import group_sizes, measure_collectives, rounds
from autopar.runtime.profile_straggle import measure_straggle
from autopar.runtime.timing import max_over_ranks, median_seconds, seconds_per_call
from autopar.runtime.world import free_port

logger = logging.getLogger(__name__)
KiB, MiB = 1 << 10, 1 << 20
_TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """How much to measure: the full run, or `--quick`."""

    sides: tuple[int, ...]
    """Matmul sides s, smallest first."""
    matmul_budget: float
    """Seconds one matmul may take; larger sides of that dtype are skipped."""
    stream_elements: int
    """fp32 elements of each array of the bandwidth measurement."""
    message_sizes: tuple[int, ...]
    """Bytes."""
    repeats: int
    straggle_rounds: int = 30
    """Rounds of the slowest-rank measurement (`runtime.profile_straggle`)."""
    straggle_seconds: float = 0.08
    """Seconds of its chunk of computation: about a step's, since the share depends on it
    (`runtime.profile_straggle`)."""
    sample: float = 0.0
    """Least seconds one timed sample of a kernel lasts. CPU ranks sharing cores are time-sliced
    by the OS in slices of milliseconds: a shorter sample may run alone on a core and miss the
    sharing that a training step sees."""

    @property
    def matmul_sample(self) -> float:
        """Least seconds of one sample of a matmul: `sample`, and at least 1 ms."""
        return max(self.sample, 1e-3)

    @classmethod
    def make(cls, *, quick: bool, cuda: bool) -> Settings:
        if quick:
            return cls(sides=(256, 1024, 4096) if cuda else (64, 256, 1024), matmul_budget=0.02,
                       stream_elements=(64 if cuda else 16) * MiB, repeats=5,
                       message_sizes=(4 * KiB, 32 * KiB, 256 * KiB, 2 * MiB), sample=0.0 if cuda else 0.02,
                       straggle_rounds=8, straggle_seconds=0.01)
        return cls(sides=(256, 1024, 2048, 4096, 8192) if cuda else (64, 128, 256, 512, 1024, 2048, 4096),
                   matmul_budget=0.3, stream_elements=(256 if cuda else 32) * MiB,
                   message_sizes=tuple(4 * KiB * 4 ** i for i in range(8)), repeats=5, sample=0.0 if cuda else 0.05)


def _dtypes(device: torch.device) -> list[str]:
    """The matmul formats this device runs: fp32, bf16, fp16 where a small matmul works; tf32 on
    GPUs with TF32 tensor cores (compute capability 8 and later)."""
    found = ["fp32"]
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        found.append("tf32")
    for name in ("bf16", "fp16"):
        try:
            x = torch.ones(8, 8, dtype=_TORCH_DTYPES[name], device=device)
            torch.mm(x, x)
            found.append(name)
        except RuntimeError:
            logger.info("no %s matmul on %s", name, device)
    return found


def measure_matmul(settings: Settings, device: torch.device, dtypes: list[str],
                   progress: Bar) -> tuple[MatmulRate, ...]:
    """Every (dtype, side) taking turns for `settings.repeats` rounds that every rank starts
    together, each round one sample of each (`cost.sampling`); a shape's time is the trimmed mean
    of its samples on the slowest rank. The planner scales its op timings by one of these rates
    (`cost.ops`), so one moment of a drifting machine must not set it: timed one shape after
    another, the 512³ fp32 rate of 2 CPU ranks read 78 to 150 GFLOP/s in profiles of one day."""
    samplers, shapes = [], []
    for dtype in dtypes:
        for i, s in enumerate(settings.sides):
            progress.advance(f"matmul {dtype} {s}×{s}×{s}")
            a = torch.randn(s, s, device=device).to(_TORCH_DTYPES[dtype])
            b = torch.randn(s, s, device=device).to(_TORCH_DTYPES[dtype])
            call = _matmul(a, b, dtype, device)
            call()  # the first call sets the kernel up
            once = max_over_ranks([seconds_per_call(call, device, 1)], device)[0]
            samplers.append(Sampler(call, device, settings.matmul_sample))
            shapes.append((dtype, s))
            following = settings.sides[i + 1] if i + 1 < len(settings.sides) else None
            if following is not None and once * (following / s) ** 3 > settings.matmul_budget:
                progress.advance(f"matmul {dtype}: larger sides skipped", by=len(settings.sides) - i - 1)
                break
    agree_calls(samplers, device)
    for r in range(settings.repeats):
        progress.advance(f"matmul round {r + 1}/{settings.repeats}")
        if dist.is_initialized():
            dist.barrier()
        in_turns(samplers, 1)
    seconds = max_over_ranks([s.seconds() for s in samplers], device)
    return tuple(MatmulRate(dtype=dtype, m=s, k=s, n=s, rate=2.0 * s ** 3 / t) for (dtype, s), t in zip(shapes, seconds))


def _matmul(a: torch.Tensor, b: torch.Tensor, dtype: str, device: torch.device):
    """a @ b as a call; on a GPU with TF32 allowed only for "tf32"."""
    if device.type != "cuda":
        return lambda: torch.mm(a, b)

    def call():
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        try:
            return torch.mm(a, b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
    return call


_ROUNDS = 3
"""Rounds of the bandwidth and overhead measurements; each rank keeps its fastest."""


def _fastest_round(fn, device: torch.device, **kwargs) -> float:
    """`median_seconds` of `fn` in `_ROUNDS` rounds, every rank starting each round together (they
    share the machine as in training); the fastest round's. Another program's burst on a shared
    machine only slows a round down: on 4 gloo ranks on 2 cores one unguarded median once read the
    bandwidth at 1.5 GB/s against 5.6-6.0 in the other profiles, and every memory-bound op priced 4x."""
    found = []
    for _ in range(_ROUNDS):
        if dist.is_initialized():
            dist.barrier()
        found.append(median_seconds(fn, device, **kwargs))
    return min(found)


def measure_memory(settings: Settings, device: torch.device, progress: Bar) -> tuple[float, float]:
    """(bytes/s of a large add, seconds per tiny kernel)."""
    progress.advance("memory bandwidth")
    a, b = (torch.ones(settings.stream_elements, device=device) for _ in range(2))
    out = torch.empty_like(a)
    seconds = _fastest_round(lambda: torch.add(a, b, out=out), device, repeats=settings.repeats,
                             sample=settings.sample)
    progress.advance("kernel overhead")
    w, c, grad = (torch.ones(1, device=device, requires_grad=i == 0) for i in range(3))

    def chain() -> None:  # 32 tiny multiplications forward, their 32 gradients backward
        x = w
        for _ in range(32):
            x = torch.mul(x, c)
        x.backward(grad)

    tiny = _fastest_round(chain, device, repeats=settings.repeats, inner=10, sample=settings.sample) / 64
    seconds, tiny = max_over_ranks([seconds, tiny], device)
    return 3 * a.numel() * a.element_size() / seconds, tiny


def profile_world(*, quick: bool = False, progress: bool = True) -> Profile:
    """Measure this rank's device and the world's collectives; collective over every rank."""
    device = _this_device()
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    settings = Settings.make(quick=quick, cuda=device.type == "cuda")
    dtypes = _dtypes(device)
    collective_steps = len(group_sizes(world, per_node)) * rounds(settings) if world > 1 else 0
    straggle_steps = settings.straggle_rounds if world > 1 else 0
    total = len(dtypes) * len(settings.sides) + settings.repeats + 2 + collective_steps + straggle_steps
    shown = progress and (not dist.is_initialized() or dist.get_rank() == 0)
    with Bar(total, "profile", stream=None if shown else io.StringIO()) as bar:
        if dist.is_initialized():
            dist.barrier()  # every rank starts together: they share the machine as in training
        matmul = measure_matmul(settings, device, dtypes, bar)
        bandwidth, overhead = measure_memory(settings, device, bar)
        collectives = measure_collectives(settings, device, per_node, bar) if world > 1 else ()
        straggle = measure_straggle(device, per_node, seconds=settings.straggle_seconds,
                                    rounds=settings.straggle_rounds,
                                    progress=lambda: bar.advance("slowest rank")) if world > 1 else ()
    backend = dist.get_backend() if dist.is_initialized() else ("nccl" if device.type == "cuda" else "gloo")
    return Profile(backend=backend, matmul=matmul, memory_bandwidth=bandwidth, kernel_overhead=overhead,
                   collectives=collectives, straggle=straggle)


def _this_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# -- the command ------------------------------------------------------------------------------------

def run_rank(out: str | os.PathLike, *, quick: bool = False, timeout: float = 300.0, progress: bool = True):
    """One rank of `autopar profile` (under torchrun, or spawned): measure, and on rank 0 write the
    calibrated cluster to `out` and return it (None on the other ranks)."""
    from autopar import presets
    from autopar.runtime.world import init_from_env

    owned = not dist.is_initialized()
    init_from_env(timeout)
    try:
        profile = profile_world(quick=quick, progress=progress)
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        base = presets.local()
        memory = None if torch.cuda.is_available() else _ram() // base.devices_per_node
        cluster = dataclasses.replace(calibrated(base, profile, memory=memory),
                                      name=f"profiled-{'cuda' if torch.cuda.is_available() else 'cpu'}")
        cluster.save(out)
        return cluster
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _ram() -> int:
    """Bytes of RAM of this machine (os.sysconf: page size × physical pages)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _spawned(rank: int, world: int, port: int, out: str, quick: bool, threads: int, device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if device == "cpu":
        os.environ.update(CPU_ONLY)
    torch.set_num_threads(threads)
    run_rank(out, quick=quick)


def spawn(nproc: int, out: str | os.PathLike, *, quick: bool = False, timeout: float = 1800.0,
          device: str = "auto") -> None:
    """`autopar profile` outside torchrun: `nproc` local ranks, one thread each unless OMP_NUM_THREADS
    says otherwise (as `autopar run` starts them). `device`: "auto" (a GPU per rank over NCCL where
    CUDA is available, else CPU ranks over gloo) or "cpu" (CPU ranks whatever the machine has).
    Raises `AutoparError` when a rank fails or the whole takes longer than `timeout` seconds; every
    rank is stopped either way."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc: found {nproc!r}, required an integer >= 1")
    check_local_ranks(nproc, device)
    port = free_port()
    context = mp.get_context("spawn")
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    procs = [context.Process(target=_spawned, args=(r, nproc, port, str(out), quick, threads, device), daemon=True)
             for r in range(nproc)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs):
            failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                raise AutoparError(f"profile: rank {failed[0][0]} exited with code {failed[0][1]}, required 0")
            if time.monotonic() > deadline:
                raise AutoparError(f"profile: found the ranks still running after {timeout:g} s, required them done")
            time.sleep(0.05)
        failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise AutoparError(f"profile: rank {failed[0][0]} exited with code {failed[0][1]}, required 0")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)


def report(profile: Profile) -> str:
    """The measured figures as text tables."""
    from autopar.units import fmt_seconds

    lines = ["matmul (achieved GFLOP/s)", "| dtype | side | GFLOP/s |", "|---|---:|---:|"]
    lines += [f"| {r.dtype} | {r.m} | {r.rate / 1e9:,.1f} |" for r in profile.matmul]
    lines += ["", f"memory bandwidth {profile.memory_bandwidth / 1e9:,.2f} GB/s; kernel overhead "
              f"{fmt_seconds(profile.kernel_overhead)}; backend {profile.backend}", ""]
    if profile.straggle:
        lines += ["slowest rank of p over the same computation: "
                  + ", ".join(f"p={s.group_size} +{s.share:.1%}" for s in profile.straggle), ""]
    if profile.collectives:
        lines += ["collectives: time = α + n·β (least squares)",
                  "| collective | p | scope | α | 1/β (GB/s) | residual |", "|---|---:|---|---:|---:|---:|"]
        lines += [f"| {c.kind} | {c.group_size} | {c.scope} | {fmt_seconds(c.alpha)} | "
                  f"{(1 / c.beta / 1e9 if c.beta else float('inf')):,.3f} | {c.residual:.1%} |"
                  for c in profile.collectives]
    return "\n".join(lines)


def add_parser(sub) -> None:
    """The `profile` subcommand of `autopar.cli`."""
    p = sub.add_parser("profile", help="measure this machine's devices and links, and write a cluster file",
                       description="Time matmuls (fp32, bf16, fp16, tf32 on GPUs), memory bandwidth, the fixed "
                                   "cost of one kernel, and every collective over group sizes 2, 4, ... and "
                                   "message sizes 4 KiB to 64 MiB, each timed after a chunk of computation as a "
                                   "training step meets it (α and β least-squares fitted; the measured times "
                                   "are kept, and the cost model follows them between the sizes measured), and "
                                   "how much longer "
                                   "the slowest of p ranks takes over the same computation, on every rank "
                                   "at once; write a cluster JSON that `--cluster FILE` reads, and print the "
                                   "share of CPU time the hypervisor took meanwhile (steal; a warning above 5%). "
                                   "Under torchrun "
                                   "every rank takes part and rank 0 writes; otherwise --nproc local ranks are "
                                   "started. CPU ranks get the machine's RAM divided among them as memory.")
    p.add_argument("--out", required=True, help="the cluster JSON file to write")
    p.add_argument("--nproc", type=int, default=2, help="local ranks to start, outside torchrun (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer and smaller measurements (seconds, not minutes)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds the whole profile may take, outside torchrun (default: %(default)s)")
    add_device_argument(p)
    p.set_defaults(run=_command)


def _command(args: argparse.Namespace) -> int:
    from autopar.bench import cpu_times, stolen

    started, ticks = time.perf_counter(), cpu_times()
    if "WORLD_SIZE" in os.environ:
        if args.device == "cpu":  # this process is a rank
            os.environ.update(CPU_ONLY)
        cluster = run_rank(args.out, quick=args.quick)
        if cluster is None:
            return 0
    else:
        spawn(args.nproc, args.out, quick=args.quick, timeout=args.timeout, device=args.device)
        from autopar.cluster import Cluster

        cluster = Cluster.load(args.out)
    steal = stolen(ticks, cpu_times())
    print(f"{report(cluster.profile)}\n\n{cluster.describe()}\nwritten to {args.out} "
          f"in {time.perf_counter() - started:.1f} s"
          + (f"; CPU time taken by the hypervisor meanwhile (steal): {steal:.1%}" if steal is not None else ""))
    if steal is not None and steal > 0.05:
        logger.warning("the hypervisor took %.0f%% of this machine's CPU time while profiling: the timings are "
                       "as unsteady as that; profile again when the machine is quieter", steal * 100)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m autopar.runtime.profiler --out FILE [--quick]`, for torchrun."""
    parser = argparse.ArgumentParser(prog="python -m autopar.runtime.profiler")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return _command(parser.parse_args(["profile", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
