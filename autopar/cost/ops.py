"""Measured op times: each node of a captured graph timed on this machine, forward and backward,
and scaled to the profiled device.

A profile's matmul rates and bandwidth price a kernel from its FLOPs and bytes (`cost.compute`);
that misses what the rates do not see: a GELU's erf is compute-bound on a CPU, a linear's backward
runs two matmuls with transposed operands, attention's softmax is several passes. When the
cluster's profile was measured on a device of this machine's kind (gloo: a CPU; NCCL: a GPU here),
the planner times every node of the graph instead, once per distinct (op, argument shapes and
dtypes, constants), on random inputs of the node's shapes and strides, taking turns over copies
of them beyond a core's cache (`timers.node_timer`); views too, for their dispatch and a reshape's copy:

    forward  = mean time of the op
    backward = (mean time of k copies' forwards and one `torch.autograd.grad` through them − g) / k − forward

each mean a trimmed mean of `timers.ROUNDS` samples taken in turns: every round samples every distinct
node once, with the reference kernels and fixed costs below (`cost.sampling`), so that the nodes
and the rates that scale them see the same machine, and a drift of its speed over seconds lands
on one sample of many nodes rather than on every sample of a few. On a GPU one round comes first
whose samples are dropped (`in_turns`'s `warm`): without it the first plan of a process on an
H100 read 46.4 ms where the next read 33.9 (GPT-3 111M bf16, batch 2); with it 39.0, 40.6, 34.8.
g is what one `torch.autograd.grad` call costs whatever it differentiates (the engine's start; on
a GPU also its hand-off to the device's thread), timed on x·2 of 64 elements as its both − 2 ·
forward. A training step pays it once, not once per node; k is as many runs of the op as one
sample's time holds, up to 16 (`timers.node_timer`), so that g's noise is divided by k.

Both are scaled to the profiled device (other ranks share its cores there, not here):

    t_device = t_here · r_here / r_profiled

r is an fp32 matmul rate for nodes that do FLOPs and the bandwidth of a large add for the rest,
taken from the profile and measured here in the nodes' rounds. On a CPU the matmul is the
profile's nearest to 512×512×512 and the add 2²³ elements; on a GPU the profile's largest matmul
and 2²⁶ elements, since smaller ones time the launch and the L2 cache, not the device (50 MB of
L2 on an H100).
A node's share on `p` devices is o + (t − o) / p (`strategies.local_time`), o what a split does
not shrink: each node is timed again on half its leading dim, every input that shares it halved
as a batch split makes it (`timers.node_timer`'s `half`), and o = 2 · t_half − t, between 0 and t
(`OpTimes.fixed`: a smaller matmul's lower rate, every call's dispatch); the profile's kernel
overhead for a node without such a dim. A node that does FLOPs (a matmul, a linear, attention)
is also timed on the shards of every split its rules allow on the plan's mesh (`shard_times`),
and that is the split's share outright: which dim a split halves sets a small matmul's rate.
Nodes too large to time here (over `_LARGEST` bytes, `_GPU_LARGEST` on a GPU, or `_LONGEST`
seconds predicted) and nodes whose op fails on random inputs keep the FLOPs-and-bytes price; so
does every node left once `budget` / `timers.ROUNDS` seconds are spent preparing them, their first
calls not counted (`_Budget`), and the rounds stop early where the next would end after `budget`.

The optimizer's update is timed in the same rounds: one step of the plan's optimizer over `_ELEMENTS`
parameters (`_GPU_ELEMENTS` on a GPU), giving seconds per updated element (`OpTimes.update`), and
one step over `_TENSORS` tiny parameters more, giving what each parameter tensor adds whatever its
size (`OpTimes.per_tensor`: on a CPU the foreach kernels loop over the tensors, a dozen small
kernels each):

    t_update(tensor) = per_tensor + elements · update

On a CPU the tiny parameters are stepped alone. On a GPU they are stepped beside the large one
and per_tensor is what they add to its step: alone, their step times the launches of its kernels
and the Python of its loop, which in a model's step run while the device works through the large
tensors (an H100, AdamW over 111M parameters in 150 tensors: 4.5 ms measured, 30.8 ms priced with
the tiny tensors stepped alone and 2²¹ elements, whose step times its launches too).

One placement change of the lowered program (`runtime.collectives.Reshard`) is timed in one
process as rank 0 of a two-way axis, on a change whose steps are local both ways (a cut forward, a
zero padding of the gradient back): what its autograd function and its steps add, run from Python
both ways, beyond the bytes it copies and the collectives it runs (`OpTimes.reshard`), priced on
every edge where the runtime makes one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from autopar.cost.sampling import Sampler, in_turns
from autopar.cost.timers import (ROUNDS, SAMPLE, NodeTimer, Reference, kernel_timer, leading, node_timer, nodes_of,
                                 op_key)
from autopar.graph import CapturedGraph

_LARGEST = 256 * 2 ** 20
"""Bytes of a node's inputs and outputs beyond which it is not timed here, on a CPU."""
_GPU_LARGEST = 4 * 2 ** 30
"""The same on a GPU: a GPT's loss over a 32768-token vocabulary at batch 32 × 1024 holds 4 GiB of
logits, and the FLOPs-and-bytes price of such memory-bound nodes (softmax, layer norm, the casts
of mixed precision) is what they miss most (an H100: 77 ms priced against 89 ms measured when
every node over 256 MiB kept it)."""
_LONGEST = 0.05
"""Seconds (the FLOPs-and-bytes estimate) beyond which a node is not timed here."""
_ELEMENTS = 2 ** 21
"""Parameters of the timed optimizer step, on a CPU."""
_GPU_ELEMENTS = 2 ** 26
"""The same on a GPU, where a step over fewer times its kernels' launches (2²¹ elements: 0.14 ns
each on an H100, against 0.04 in a 111M-parameter model's step)."""
_TENSORS = 128
"""Tiny parameter tensors (64 elements each) of the step that times the per-tensor cost."""


@dataclass(frozen=True, slots=True)
class OpTimes:
    """Seconds on the profiled device, per captured node: (forward, backward)."""

    nodes: dict[str, tuple[float, float]] = field(default_factory=dict)
    update: float | None = None
    """Seconds per parameter element of one optimizer step; None when not timed."""
    per_tensor: float = 0.0
    """Seconds one optimizer step spends per parameter tensor beyond its elements."""
    reshard: float = 0.0
    """Seconds one placement change of the lowered program (`runtime.collectives.Reshard`) costs
    forward and backward beyond its data movement and collectives: an autograd function run from
    Python, both ways."""
    fixed: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per node, the (forward, backward) seconds that do not shrink when its work is split: from
    the node timed again on half its leading dim, t_fixed = 2 · t_half − t (`timers.node_timer`'s `half`)."""
    seconds: float = 0.0
    """How long the timing took."""


def measurable(profile) -> bool:
    """Whether this machine has the kind of device `profile` was measured on."""
    if profile is None:
        return False
    return profile.backend == "gloo" or (profile.backend == "nccl" and torch.cuda.is_available())


_CACHE: dict[tuple, OpTimes] = {}


def op_times(captured: CapturedGraph, profile, optimizer: str, *, budget: float = 20.0) -> OpTimes | None:
    """The captured graph's measured op times (see the module docstring), or None when `profile` is
    None or of a device this machine lacks. Timed once per graph, profile and optimizer."""
    if not measurable(profile):
        return None
    from autopar.assemble import fingerprint

    key = (fingerprint(captured), profile, optimizer)  # the profile by value: an id could be reused
    if key not in _CACHE:
        _CACHE[key] = _measure(captured, profile, optimizer, budget)
    return _CACHE[key]


_SHARDS: dict[tuple, tuple[float, float] | None] = {}


def shard_times(captured: CapturedGraph, profile, shards: dict[str, set[tuple]], mesh_shape: tuple[int, ...] = (),
                *, budget: float = 10.0) -> dict[tuple, tuple[float, float]]:
    """(forward, backward) seconds on the profiled device of nodes as one device of a split runs
    them: for node `name`, each (shapes, sharding) of `shards[name]`, a shape per tensor argument,
    and the `passes.strategies.NodeSharding` whose rule kinds make the runtime run a kernel of its
    own on `mesh_shape` (`timers.kernel_timer`), or None for the op itself. Timed as `op_times`
    times a node (in turns, with the reference kernels in the same rounds, scaled alike), once per
    distinct (op, shard shapes, kernel, gradients wanted) and profile, keyed (name, shapes,
    sharding); none when `profile` is of a device this machine lacks. What `budget` leaves
    untimed is missing from the answer.

    A split's share of a matmul is not its whole time over the ways: the shard's own shape sets
    its rate (a row-parallel linear halves its inner dim, which a small matmul feels more than
    half its rows), which the fit o + (t − o) / p from the node's halved batch cannot see; and a
    kernel (a vocabulary-parallel cross-entropy's max, exponentials and masks) does more than the
    op's share."""
    if not measurable(profile):
        return {}
    spent = _Budget(budget)
    device = _device(profile)
    differentiable = _differentiable(captured)
    fx_nodes = {n.name: n for n in captured.program.graph.nodes}
    key_of, pending, computes = {}, {}, {}
    for name in sorted(shards):
        node, info = fx_nodes[name], captured.nodes[name]
        grads, wanted = _gradients(node, differentiable)
        for shapes, sharding in sorted(shards[name], key=repr):
            key = (profile, op_key(node), grads, shapes, sharding, tuple(mesh_shape) if sharding else ())
            key_of[(name, shapes, sharding)] = key
            if key in _SHARDS or key in pending or not spent.left():
                continue
            pending[key] = (node_timer(node, info.requires_grad, device, wanted, shapes=shapes) if sharding is None
                            else kernel_timer(node, sharding, mesh_shape, shapes, info.requires_grad, device, wanted))
            spent.add(pending[key])
            computes[key] = bool(info.flops)
    live = [t for t in pending.values() if t is not None]
    if live:
        reference = Reference(profile, device)
        in_turns(reference.samplers + [s for t in live for s in t.samplers], ROUNDS, deadline=spent.deadline(),
                 warm=device.type == "cuda")
        matmul_scale, memory_scale = reference.scales()
        grad_call = reference.grad_call()
    for key, timer in pending.items():
        scale = matmul_scale if computes[key] else memory_scale
        _SHARDS[key] = None if timer is None else tuple(t * scale for t in timer.seconds(grad_call))
    return {where: _SHARDS[key] for where, key in key_of.items() if _SHARDS.get(key) is not None}


def _device(profile) -> torch.device:
    return torch.device("cuda" if profile.backend == "nccl" else "cpu")


def _differentiable(captured: CapturedGraph) -> set[str]:
    """Names of the nodes and parameter placeholders whose gradient a step computes."""
    out = {n for n, info in captured.nodes.items() if info.requires_grad}
    return out | {p.placeholder for p in captured.params.values() if p.requires_grad}


def _gradients(node: torch.fx.Node, differentiable: set[str]) -> tuple[tuple[bool, ...], frozenset[str]]:
    """Per tensor argument by position, whether the step computes its gradient (nodes that differ
    only in names share timings), and the names of those arguments."""
    args = nodes_of(node)
    return tuple(a.name in differentiable for a in args), frozenset(a.name for a in args if a.name in differentiable)


def _measure(captured: CapturedGraph, profile, optimizer: str, budget: float) -> OpTimes:
    from autopar.passes.units import roles

    spent = _Budget(budget)
    ignored = roles(captured).ignored
    differentiable = _differentiable(captured)
    device = _device(profile)
    fixed = _Fixed(profile, device, optimizer)
    timers: dict[tuple, NodeTimer | None] = {}
    halves: dict[tuple, NodeTimer | None] = {}
    key_of: dict[str, tuple] = {}
    for node in captured.program.graph.nodes:
        info = captured.nodes.get(node.name)
        if not isinstance(node.target, torch._ops.OpOverload) or info is None or node.name in ignored:
            continue
        if not spent.left() or not _small(info, profile):
            continue
        grads, wanted = _gradients(node, differentiable)
        key = (op_key(node), grads)
        if key not in timers:
            timers[key] = node_timer(node, info.requires_grad, device, wanted)
            halves[key] = node_timer(node, info.requires_grad, device, wanted, half=True) if timers[key] else None
            spent.add(timers[key], halves[key])
        if timers[key] is not None:
            key_of[node.name] = key
    live = [t for t in [*timers.values(), *halves.values()] if t is not None]
    in_turns(fixed.samplers + [s for t in live for s in t.samplers], ROUNDS, deadline=spent.deadline(),
             warm=device.type == "cuda")
    matmul_scale, memory_scale = fixed.scales()
    grad_call = fixed.grad_call()
    out, fixed_parts = {}, {}
    for name, key in key_of.items():
        scale = matmul_scale if captured.nodes[name].flops else memory_scale
        whole = timers[key].seconds(grad_call)
        out[name] = (whole[0] * scale, whole[1] * scale)
        if halves[key] is not None:
            half = halves[key].seconds(grad_call)
            fixed_parts[name] = tuple(min(max(2 * h - t, 0.0), t) * scale for h, t in zip(half, whole))
    update, per_tensor = fixed.update()
    return OpTimes(nodes=out, update=update * memory_scale, per_tensor=per_tensor * memory_scale,
                   reshard=fixed.reshard() * memory_scale, fixed=fixed_parts,
                   seconds=time.perf_counter() - spent.start)


class _Budget:
    """What timing a graph's nodes may spend: nodes are prepared while preparing has taken less than
    `budget` / `ROUNDS` seconds (each costs about as much again every round), not counting their
    first calls (`NodeTimer.setup`: loading kernels, which no round pays again; on an H100 the first
    plan of a process prepared 149 of a 111M-parameter GPT's 408 nodes in its 2.9 s when they
    counted, every later plan all of them). The rounds end by `budget` seconds after the start,
    those first calls again not counted (`deadline`)."""

    def __init__(self, budget: float) -> None:
        self.budget, self.start, self.excused = budget, time.perf_counter(), 0.0

    def left(self) -> bool:
        return time.perf_counter() - self.start - self.excused <= self.budget / ROUNDS

    def add(self, *timers: NodeTimer | None) -> None:
        self.excused += sum(t.setup for t in timers if t is not None)

    def deadline(self) -> float:
        return self.start + self.excused + self.budget


def _small(info, profile) -> bool:
    held = info.bytes_moved + sum(o.nbytes for o in info.outputs)
    rate = profile.large_matmul_rate("fp32") or 1e9
    largest = _GPU_LARGEST if profile.backend == "nccl" else _LARGEST
    return held <= largest and (info.flops + info.backward_flops) / rate <= _LONGEST


class _Fixed:
    """What every graph's timing needs besides its nodes, sampled in the same rounds:

    - the reference kernels and one `torch.autograd.grad` call's fixed cost (`timers.Reference`);
    - one step of the plan's optimizer (torch's, default settings) over `_ELEMENTS` parameters
      (`_GPU_ELEMENTS` on a GPU) and over `_TENSORS` parameters of 64 elements, on a GPU beside
      the large one (`update`);
    - a `Reshard` node run as rank 0 of a two-way axis with local steps both ways (`_reshard_node`):
      both of Reshard(x)·2 − both of x·2, 64 elements (`reshard`)."""

    def __init__(self, profile, device: torch.device, optimizer: str):
        self.reference = Reference(profile, device)
        tiny, g = self.reference.tiny, self.reference.g
        self.elements, self.beside = (_GPU_ELEMENTS, True) if device.type == "cuda" else (_ELEMENTS, False)
        self.large = Sampler(_optimizer_step(optimizer, device, [self.elements]), device, SAMPLE)
        sizes = ([self.elements] if self.beside else []) + [64] * _TENSORS
        self.small = Sampler(_optimizer_step(optimizer, device, sizes), device, SAMPLE)
        through = _reshard_node(device)
        half = g[:32]
        self.reshard_both = Sampler(lambda: torch.autograd.grad(through(tiny).mul(2), tiny, half), device, SAMPLE)

    @property
    def samplers(self) -> list[Sampler]:
        return self.reference.samplers + [self.large, self.small, self.reshard_both]

    def scales(self) -> tuple[float, float]:
        return self.reference.scales()

    def grad_call(self) -> float:
        return self.reference.grad_call()

    def update(self) -> tuple[float, float]:
        """(seconds per element, seconds per tensor beyond its elements) of one optimizer step, here."""
        large = self.large.seconds()
        per_element = large / self.elements
        alone = self.small.seconds() - (large if self.beside else 0.0)
        return per_element, max(alone - 64 * _TENSORS * per_element, 0.0) / _TENSORS

    def reshard(self) -> float:
        return max(self.reshard_both.seconds() - self.reference.mul_both.seconds(), 0.0)


def _optimizer_step(optimizer: str, device: torch.device, sizes: list[int]):
    """One step of `optimizer` (torch's, default settings) over parameters of `sizes`, as a call."""
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in sizes]
    for param in params:
        param.grad = torch.randn_like(param)
    make = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if optimizer == "momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9).step
    return make.get(optimizer, torch.optim.AdamW)(params, lr=1e-3).step


def _reshard_node(device: torch.device):
    """A `Reshard` as rank 0 of a two-way axis runs it, whose steps are local both ways: R → S(0)
    forward (a cut), its gradient S(0) → P back (this rank's piece padded with zeros). It runs
    what every placement change runs (the autograd function, its steps, their dispatch) with no
    collective, which needs no process group."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    from autopar.runtime.collectives import Reshard, ReshardSpec
    from autopar.runtime.world import World

    return Reshard(ReshardSpec(src=(Replicate(),), dst=(Shard(0),), grad_in=(Shard(0),), grad_out=(Partial(),)),
                   World.for_timing((2,), device))
