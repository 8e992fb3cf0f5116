"""`autopar profile`: measure the devices and links of the world this runs in, and write a cluster file.

    autopar profile --out cluster.json --nproc 2 [--quick]      # spawns 2 local ranks (gloo, or NCCL on GPUs)
    torchrun --nnodes 2 --nproc-per-node 8 ... -m autopar.runtime.profiler --out cluster.json

Under torchrun (WORLD_SIZE set) every rank takes part and rank 0 writes; otherwise `--nproc` local
ranks are spawned. Every rank measures at once, as in training, and each figure is the median over
repeats of the slowest rank's time (all-reduce MAX):

- matmul: (s, s) @ (s, s) for growing s in fp32, bf16, fp16 (and tf32 on a GPU), 2s³ FLOPs over the
  time; a dtype's sizes stop where the next would take longer than the budget;
- memory bandwidth: out = a + b on large arrays, 3 × bytes of one array over the time;
- kernel overhead: a chain of multiplications of one-element tensors, forward and backward through
  autograd as training runs them, per kernel (dispatch and autograd on a CPU rank, launch on a GPU);
- every collective of `autopar.cost.profile.PROFILED`, on every group size 2, 4, 8, ... and the
  world's (inside a node; and across nodes when there are several): disjoint groups run at once,
  timed as a step meets them (`in_step_seconds`: after a chunk of computation, not right after a
  barrier), over message sizes 4 KiB .. 64 MiB (--quick: 4 KiB .. 2 MiB); α and β least-squares
  fitted per (collective, group size, scope).

The cluster written is `presets.local()`'s with the measured figures (`cost.profile.calibrated`).
Device memory is the GPU's; on CPU ranks it is the machine's RAM (os.sysconf) divided by the ranks
on one node, since they share it. On GPUs, time is taken with CUDA events after a synchronize.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autopar.cost.profile import PROFILED, CollectiveFit, MatmulRate, Profile, calibrated, fit_alpha_beta
from autopar.errors import AutoparError
from autopar.progress import Bar

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
    sample: float = 0.0
    """Least seconds one timed sample of a kernel lasts. CPU ranks sharing cores are time-sliced
    by the OS in slices of milliseconds: a shorter sample may run alone on a core and miss the
    sharing that a training step sees."""

    @classmethod
    def make(cls, *, quick: bool, cuda: bool) -> Settings:
        if quick:
            return cls(sides=(256, 1024, 4096) if cuda else (64, 256, 1024), matmul_budget=0.02,
                       stream_elements=(64 if cuda else 16) * MiB, repeats=5,
                       message_sizes=(4 * KiB, 32 * KiB, 256 * KiB, 2 * MiB), sample=0.0 if cuda else 0.02)
        return cls(sides=(256, 1024, 2048, 4096, 8192) if cuda else (64, 128, 256, 512, 1024, 2048, 4096),
                   matmul_budget=0.3, stream_elements=(256 if cuda else 32) * MiB,
                   message_sizes=tuple(4 * KiB * 4 ** i for i in range(8)), repeats=5, sample=0.0 if cuda else 0.05)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, *, repeats: int, inner: int = 1, warmup: int = 1, before=None,
                   sample: float = 0.0) -> float:
    """Seconds per call of `fn`: the median over `repeats` of `inner` calls in a row (more, so that
    each repeat lasts `sample` seconds), after `warmup` calls; `before` (a barrier) runs ahead of
    each repeat, outside the time. CUDA events on a GPU."""
    for _ in range(warmup):
        _sync(device)
        begin = time.perf_counter()
        fn()
        _sync(device)
        once = time.perf_counter() - begin
    if sample > 0 and warmup > 0:
        inner = max(inner, math.ceil(sample / max(once, 1e-9)))
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            begin = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - begin) / inner)
    return statistics.median(times)


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over every rank of the world (ranks that did not take part send 0)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


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
    rates = []
    for dtype in dtypes:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        for i, s in enumerate(settings.sides):
            progress.advance(f"matmul {dtype} {s}×{s}×{s}")
            a = torch.randn(s, s, device=device).to(_TORCH_DTYPES[dtype])
            b = torch.randn(s, s, device=device).to(_TORCH_DTYPES[dtype])
            begin = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            inner = max(1, min(100, int(1e-3 / max(time.perf_counter() - begin, 1e-9))))
            seconds = _max_over_ranks([median_seconds(lambda: torch.mm(a, b), device, repeats=settings.repeats,
                                                      inner=inner, sample=settings.sample)], device)[0]
            rates.append(MatmulRate(dtype=dtype, m=s, k=s, n=s, rate=2.0 * s ** 3 / seconds))
            following = settings.sides[i + 1] if i + 1 < len(settings.sides) else None
            if following is not None and seconds * (following / s) ** 3 > settings.matmul_budget:
                progress.advance(f"matmul {dtype}: larger sides skipped", by=len(settings.sides) - i - 1)
                break
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    return tuple(rates)


def measure_memory(settings: Settings, device: torch.device, progress: Bar) -> tuple[float, float]:
    """(bytes/s of a large add, seconds per tiny kernel)."""
    progress.advance("memory bandwidth")
    a, b = (torch.ones(settings.stream_elements, device=device) for _ in range(2))
    out = torch.empty_like(a)
    seconds = median_seconds(lambda: torch.add(a, b, out=out), device, repeats=settings.repeats,
                             sample=settings.sample)
    progress.advance("kernel overhead")
    w, c, grad = (torch.ones(1, device=device, requires_grad=i == 0) for i in range(3))

    def chain() -> None:  # 32 tiny multiplications forward, their 32 gradients backward
        x = w
        for _ in range(32):
            x = torch.mul(x, c)
        x.backward(grad)

    tiny = median_seconds(chain, device, repeats=settings.repeats, inner=10, sample=settings.sample) / 64
    seconds, tiny = _max_over_ranks([seconds, tiny], device)
    return 3 * a.numel() * a.element_size() / seconds, tiny


def group_sizes(world: int, per_node: int) -> list[tuple[int, str]]:
    """(group size, scope) to measure: 2, 4, 8, ... and the node's size inside a node; 2, 4, ... and
    the world's across nodes, when there are several."""
    def sizes(top: int) -> list[int]:
        out = [1 << i for i in range(1, top.bit_length()) if 1 << i <= top]
        return sorted(set(out + ([top] if top > 1 else [])))

    found = [(p, "intra") for p in sizes(per_node)]
    if world > per_node:
        found += [(p, "inter") for p in sizes(world) if groups(p, world, per_node, "inter")]
    return found


def groups(p: int, world: int, per_node: int, scope: str) -> list[list[int]]:
    """Disjoint groups of p ranks that are measured at once: p consecutive ranks of a node
    ("intra"), or p / k ranks on each of k = min(p, nodes) nodes ("inter")."""
    nodes = world // per_node
    if scope == "intra":
        return [[n * per_node + o * p + j for j in range(p)] for n in range(nodes) for o in range(per_node // p)]
    k = min(p, nodes)
    if k < 2 or p % k or p // k > per_node:
        return []
    g = p // k
    return [[(b * k + node) * per_node + o * g + j for node in range(k) for j in range(g)]
            for b in range(nodes // k) for o in range(per_node // g)]


def _collective(kind: str, members: list[int], group, nbytes: int, device: torch.device):
    """(call, bytes n as CommModel counts them) for one collective of about `nbytes` on this rank."""
    p, rank = len(members), dist.get_rank()
    per = max(nbytes // 4 // p, 1)  # fp32 elements of one rank's piece
    whole = torch.zeros(per * p, device=device)
    piece = torch.zeros(per, device=device)
    if kind == "all_reduce":
        return (lambda: dist.all_reduce(whole, group=group)), whole.nbytes
    if kind == "all_gather":
        return (lambda: dist.all_gather_single(whole, piece, group=group)), whole.nbytes
    if kind == "reduce_scatter":
        return (lambda: dist.reduce_scatter_single(piece, whole, group=group)), whole.nbytes
    if kind == "broadcast":
        return (lambda: dist.broadcast(whole, src=members[0], group=group)), whole.nbytes
    if kind == "all_to_all":
        received = torch.empty_like(whole)
        return (lambda: dist.all_to_all_single(received, whole, group=group)), whole.nbytes
    if rank == members[0]:  # send_recv: the first member sends, the second receives
        return (lambda: dist.send(whole, dst=members[1])), whole.nbytes
    return (lambda: dist.recv(whole, src=members[0])), whole.nbytes


def _chunk(device: torch.device):
    """The computation a CPU rank does between two collectives of a step: a (128, 512) @ (512, 512)
    matmul, about a millisecond on one core. None on a GPU, where kernels queue asynchronously and a
    collective waits for its stream, not for the host."""
    if device.type == "cuda":
        return None
    a, b = torch.randn(128, 512), torch.randn(512, 512)
    return lambda: torch.mm(a, b)


def in_step_seconds(call, device: torch.device, group, *, repeats: int, sample: float) -> float:
    """Seconds of one collective as a training step meets it: each timed repeat runs `inner`
    (chunk, collective) pairs in a row, and the same number of chunks alone is timed in alternation,

        t = median(chunk + collective) − median(chunk alone)

    A single collective timed right after a barrier finds every rank waiting and its connections
    hot; inside a step the ranks arrive from computing, apart, with their communication threads
    asleep, which on CPU ranks sharing cores costs about twice the barrier-aligned time (2 gloo
    ranks on 2 cores: 1.5–1.9 ms against 0.5–0.8 ms for 4 KiB). `inner` is agreed over the group
    (each rank runs the same number of collectives), enough for a repeat to last `sample` seconds.
    On a GPU (no chunk) this is `median_seconds` of the collective after a barrier."""
    chunk = _chunk(device)
    barrier = lambda: dist.barrier(group=group)  # noqa: E731
    if chunk is None:
        return median_seconds(call, device, repeats=repeats, warmup=2, before=barrier)
    for _ in range(2):  # warm-up; the second pair's time sizes `inner`
        barrier()
        begin = time.perf_counter()
        chunk()
        call()
        once = time.perf_counter() - begin
    agreed = torch.tensor([math.ceil(sample / max(once, 1e-9))], dtype=torch.int64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    inner = max(1, min(int(agreed), 200))
    both, alone = [], []
    for _ in range(repeats):
        for times, collective in ((both, True), (alone, False)):
            barrier()
            begin = time.perf_counter()
            for _ in range(inner):
                chunk()
                if collective:
                    call()
            times.append((time.perf_counter() - begin) / inner)
    return max(statistics.median(both) - statistics.median(alone), 1e-7)


def measure_collectives(settings: Settings, device: torch.device, per_node: int,
                        progress: Bar) -> tuple[CollectiveFit, ...]:
    world, rank = dist.get_world_size(), dist.get_rank()
    fits = []
    for p, scope in group_sizes(world, per_node):
        mine, handle = None, None
        for members in groups(p, world, per_node, scope):  # new_group is collective: every rank, same order
            g = dist.new_group(members)
            if rank in members:
                mine, handle = members, g
        if mine is not None:  # a new group's first collectives set up its connections: not timed
            for _ in range(20):
                dist.all_reduce(torch.zeros(16, device=device), group=handle)
        for kind in PROFILED:
            if kind == "send_recv" and p != 2:
                continue
            sizes, times = [], []
            for nbytes in settings.message_sizes:
                progress.advance(f"{kind} p={p} {scope} {nbytes // KiB} KiB")
                seconds, n = 0.0, nbytes
                if mine is not None:
                    call, n = _collective(kind, mine, handle, nbytes, device)
                    # Small messages are cheap and the noisiest: three times the repeats (a count
                    # every rank of the group agrees on).
                    repeats = settings.repeats * (3 if n <= 256 * KiB else 1)
                    seconds = in_step_seconds(call, device, handle, repeats=repeats,
                                              sample=settings.sample / 2)
                sizes.append(n)
                times.append(seconds)
            times = _max_over_ranks(times, device)
            logger.debug("%s p=%d %s: bytes %s, seconds %s", kind, p, scope, sizes, times)
            alpha, beta, residual = fit_alpha_beta(sizes, times)
            fits.append(CollectiveFit(kind=kind, group_size=p, scope=scope, alpha=alpha, beta=beta, residual=residual))
    return tuple(fits)


def profile_world(*, quick: bool = False, progress: bool = True) -> Profile:
    """Measure this rank's device and the world's collectives; collective over every rank."""
    device = _this_device()
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    settings = Settings.make(quick=quick, cuda=device.type == "cuda")
    dtypes = _dtypes(device)
    collective_steps = sum(len(settings.message_sizes) * (len(PROFILED) - (p != 2))
                           for p, _ in group_sizes(world, per_node)) if world > 1 else 0
    total = len(dtypes) * len(settings.sides) + 2 + collective_steps
    shown = progress and (not dist.is_initialized() or dist.get_rank() == 0)
    with Bar(total, "profile", stream=None if shown else io.StringIO()) as bar:
        if dist.is_initialized():
            dist.barrier()  # every rank starts together: they share the machine as in training
        matmul = measure_matmul(settings, device, dtypes, bar)
        bandwidth, overhead = measure_memory(settings, device, bar)
        collectives = measure_collectives(settings, device, per_node, bar) if world > 1 else ()
    backend = dist.get_backend() if dist.is_initialized() else ("nccl" if device.type == "cuda" else "gloo")
    return Profile(backend=backend, matmul=matmul, memory_bandwidth=bandwidth, kernel_overhead=overhead,
                   collectives=collectives)


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


def _spawned(rank: int, world: int, port: int, out: str, quick: bool, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    run_rank(out, quick=quick)


def spawn(nproc: int, out: str | os.PathLike, *, quick: bool = False, timeout: float = 1800.0) -> None:
    """`autopar profile` outside torchrun: `nproc` local ranks, one thread each unless OMP_NUM_THREADS
    says otherwise (as `autopar run` starts them). Raises `AutoparError` when a rank fails or the
    whole takes longer than `timeout` seconds; every rank is stopped either way."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc: found {nproc!r}, required an integer >= 1")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc: found {nproc}, required at most the {torch.cuda.device_count()} GPU(s) here "
                         f"(NCCL takes one GPU per rank)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    procs = [context.Process(target=_spawned, args=(r, nproc, port, str(out), quick, threads), daemon=True)
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
                                   "message sizes 4 KiB to 64 MiB (α and β least-squares fitted), on every rank "
                                   "at once; write a cluster JSON that `--cluster FILE` reads. Under torchrun "
                                   "every rank takes part and rank 0 writes; otherwise --nproc local ranks are "
                                   "started. CPU ranks get the machine's RAM divided among them as memory.")
    p.add_argument("--out", required=True, help="the cluster JSON file to write")
    p.add_argument("--nproc", type=int, default=2, help="local ranks to start, outside torchrun (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer and smaller measurements (seconds, not minutes)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds the whole profile may take, outside torchrun (default: %(default)s)")
    p.set_defaults(run=_command)


def _command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if "WORLD_SIZE" in os.environ:
        cluster = run_rank(args.out, quick=args.quick)
        if cluster is None:
            return 0
    else:
        spawn(args.nproc, args.out, quick=args.quick, timeout=args.timeout)
        from autopar.cluster import Cluster

        cluster = Cluster.load(args.out)
    print(f"{report(cluster.profile)}\n\n{cluster.describe()}\nwritten to {args.out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m autopar.runtime.profiler --out FILE [--quick]`, for torchrun."""
    parser = argparse.ArgumentParser(prog="python -m autopar.runtime.profiler")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return _command(parser.parse_args(["profile", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
