"""Measured op times: each node of a captured graph timed on this machine, forward and backward,
and scaled to the profiled device.

A profile's matmul rates and bandwidth price a kernel from its FLOPs and bytes (`cost.compute`);
that misses what the rates do not see: a GELU's erf is compute-bound on a CPU, a linear's backward
runs two matmuls with transposed operands, attention's softmax is several passes. When the
cluster's profile was measured on a device of this machine's kind (gloo: a CPU; NCCL: a GPU here),
the planner times every node of the graph instead, once per distinct (op, argument shapes and
dtypes, constants), on random inputs of the node's shapes and strides, taking turns over copies
of them beyond a core's cache (`_time_node`); views too, for their dispatch and a reshape's copy:

    forward  = fastest time of the op
    backward = fastest time of the op and its `torch.autograd.grad` − forward − g

g is what one `torch.autograd.grad` call costs whatever it differentiates (the engine's start; on
a GPU also its hand-off to the device's thread), timed on x·2 of 64 elements as its both − 2 ·
forward. A training step pays it once, not once per node.

and scales both to the profiled device (other ranks share its cores there, not here):

    t_device = t_here · r_here / r_profiled

r is an fp32 matmul rate for nodes that do FLOPs and the bandwidth of a large add for the rest,
taken from the profile and measured here before and after timing the nodes (the faster of the two:
like every sample here, a rate is only lowered by what else the machine is doing). On a CPU the
matmul is the profile's nearest to 512×512×512 and the add 2²³ elements; on a GPU the profile's
largest matmul and 2²⁶ elements, since smaller ones time the launch and the L2 cache, not the
device (50 MB of L2 on an H100).
A node's share on `p` devices is o + (t − o) / p, o the profile's kernel overhead
(`strategies.local_time`). Nodes too large to time here (over `_LARGEST` bytes or `_LONGEST`
seconds predicted) and nodes whose op fails on random inputs keep the FLOPs-and-bytes price; so
does every node once `budget` seconds are spent.

The optimizer's update is timed the same way: one step of the plan's optimizer over `_ELEMENTS`
parameters, giving seconds per updated element (`OpTimes.update`), and one step over `_TENSORS`
tiny parameters, giving what each parameter tensor adds whatever its size (`OpTimes.per_tensor`:
on a CPU the foreach kernels loop over the tensors, a dozen small kernels each):

    t_update(tensor) = per_tensor + elements · update

One placement change of the lowered program (`runtime.collectives.Reshard`) is timed on a
one-process world, where it moves nothing: what its autograd function adds, run from Python both
ways (`OpTimes.reshard`), priced on every edge where the runtime makes one.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

from autopar.graph import CapturedGraph

_LARGEST = 256 * 2 ** 20
"""Bytes of a node's inputs and outputs beyond which it is not timed here."""
_LONGEST = 0.05
"""Seconds (the FLOPs-and-bytes estimate) beyond which a node is not timed here."""
_ELEMENTS = 2 ** 21
"""Parameters of the timed optimizer step."""
_TENSORS = 128
"""Tiny parameter tensors (64 elements each) of the step that times the per-tensor cost."""
_SAMPLE = 0.005
"""Least seconds of one timed sample."""
_ROTATE = 8 * 2 ** 20
"""Bytes of input copies a node's timing takes turns over: beyond a core's cache (`_time_node`)."""
_COPIES = 16
"""At most this many copies."""


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


def _measure(captured: CapturedGraph, profile, optimizer: str, budget: float) -> OpTimes:
    from autopar.passes.units import roles

    start = time.perf_counter()
    ignored = roles(captured).ignored
    differentiable = {n for n, info in captured.nodes.items() if info.requires_grad}
    differentiable |= {p.placeholder for p in captured.params.values() if p.requires_grad}
    device = torch.device("cuda" if profile.backend == "nccl" else "cpu")
    before = _scales(profile, device)
    grad_call = _grad_call(device)
    times: dict[tuple, tuple[float, float] | None] = {}
    out = {}
    for node in captured.program.graph.nodes:
        info = captured.nodes.get(node.name)
        if not isinstance(node.target, torch._ops.OpOverload) or info is None or node.name in ignored:
            continue
        if time.perf_counter() - start > budget or not _small(info, profile):
            continue
        grads = tuple(a.name in differentiable for a in _nodes_of(node))  # by position: shared timings
        key = (_key(node), grads)
        if key not in times:
            wanted = frozenset(a.name for a in _nodes_of(node) if a.name in differentiable)
            times[key] = _time_node(node, info.requires_grad, device, grad_call, wanted)
        if times[key] is not None:
            out[node.name] = times[key]
    after = _scales(profile, device)
    matmul_scale, memory_scale = max(before[0], after[0]), max(before[1], after[1])
    for name, (forward, backward) in out.items():
        scale = matmul_scale if captured.nodes[name].flops else memory_scale
        out[name] = (forward * scale, backward * scale)
    update, per_tensor = None, 0.0
    if time.perf_counter() - start < budget:
        update = _time_update(optimizer, device, [_ELEMENTS]) / _ELEMENTS
        tiny = _time_update(optimizer, device, [64] * _TENSORS)
        per_tensor = max(tiny - 64 * _TENSORS * update, 0.0) / _TENSORS * memory_scale
        update *= memory_scale
    return OpTimes(nodes=out, update=update, per_tensor=per_tensor, reshard=_reshard_overhead(device) * memory_scale,
                   seconds=time.perf_counter() - start)


def _small(info, profile) -> bool:
    held = info.bytes_moved + sum(o.nbytes for o in info.outputs)
    rate = profile.large_matmul_rate("fp32") or 1e9
    return held <= _LARGEST and (info.flops + info.backward_flops) / rate <= _LONGEST


def _nodes_of(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The node's tensor arguments in the order of its (args, kwargs) leaves."""
    return [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]


def _key(node: torch.fx.Node) -> tuple:
    def describe(a):
        if isinstance(a, torch.fx.Node):
            v = a.meta.get("val")
            return ("t", tuple(v.shape), str(v.dtype), tuple(v.stride())) if isinstance(v, torch.Tensor) else repr(v)
        return repr(a)
    return (str(node.target), tuple(describe(a) for a in pytree.tree_leaves((node.args, node.kwargs))))


def _real(value, device: torch.device):
    """A random tensor like the fake `value`, with its strides (integer ones zero: valid indices and
    class targets). Strides matter: an add or a multiply reading a transposed view (attention's
    heads, a rotary embedding's halves) runs several times slower than on contiguous memory, and a
    reshape of one copies."""
    if not isinstance(value, torch.Tensor):
        return value
    shape, stride = tuple(value.shape), tuple(value.stride())
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    if value.dtype.is_floating_point:
        base = torch.randn(size, dtype=value.dtype, device=device)
    else:
        base = torch.zeros(size, dtype=value.dtype, device=device)
    return base.as_strided(shape, stride)


def _time_node(node: torch.fx.Node, requires_grad: bool, device: torch.device,
               grad_call: float = 0.0, wanted: frozenset[str] | None = None) -> tuple[float, float] | None:
    """(forward, backward) seconds of the node's op on random inputs; None when it fails on them.
    `grad_call`: the fixed cost of one `torch.autograd.grad` call (`_grad_call`), not the node's.
    `wanted`: the inputs whose gradient the step's backward computes (None: every floating one).
    The others are constants to backward: the first linear's batch, a rotary embedding's cos and
    sin; a linear's backward without its input's gradient is one matmul, not two.

    Calls take turns over several copies of the inputs, `_ROTATE` bytes in all: in a step an op
    reads what other ops wrote a while before, from the shared cache or memory, not what it read a
    moment ago from its core's own cache."""
    real = lambda a: _real(a.meta.get("val"), device) if isinstance(a, torch.fx.Node) else a  # noqa: E731
    first = pytree.tree_map(real, (node.args, node.kwargs))
    held = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(first) if isinstance(t, torch.Tensor))
    copies = [first] + [pytree.tree_map(real, (node.args, node.kwargs))
                        for _ in range(min(_COPIES, _ROTATE // max(held, 1)) - 1)]
    turn = itertools.cycle(copies)

    def run():
        args, kwargs = next(turn)
        return node.target(*args, **kwargs)

    try:
        forward = _fastest(run, device)
        sources = pytree.tree_leaves((node.args, node.kwargs))
        floating = [[t for t, a in zip(pytree.tree_leaves(c), sources)
                     if isinstance(t, torch.Tensor) and t.dtype.is_floating_point
                     and (wanted is None or (isinstance(a, torch.fx.Node) and a.name in wanted))]
                    for c in copies]
        if not requires_grad or not floating[0]:
            return forward, 0.0
        for t in itertools.chain.from_iterable(floating):
            t.requires_grad_(True)
        outputs = [t for t in pytree.tree_leaves(run()) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not outputs:
            return forward, 0.0
        grads = [torch.randn_like(t) for t in outputs]
        pairs = itertools.cycle(list(zip(copies, floating)))

        def both() -> None:
            (args, kwargs), leaves = next(pairs)
            made = [t for t in pytree.tree_leaves(node.target(*args, **kwargs))
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad(made, leaves, grads, allow_unused=True)

        return forward, max(_fastest(both, device) - forward - grad_call, 0.0)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None


def _time_update(optimizer: str, device: torch.device, sizes: list[int]) -> float:
    """Seconds of one step of `optimizer` (torch's, default settings) over parameters of `sizes`."""
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in sizes]
    for param in params:
        param.grad = torch.randn_like(param)
    make = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if optimizer == "momentum":
        step = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    else:
        step = make.get(optimizer, torch.optim.AdamW)(params, lr=1e-3)
    return _fastest(step.step, device)


def _reshard_overhead(device: torch.device) -> float:
    """Seconds a `Reshard` node adds to forward and backward, on a one-process world where it moves
    nothing: both of Reshard(x)·2 − both of x·2 (64 elements)."""
    from torch.distributed.tensor import Replicate, Shard

    from autopar.runtime.collectives import Reshard, ReshardSpec
    from autopar.runtime.world import World
    from autopar.vocab import LogicalMesh

    mesh = LogicalMesh(shape=(1,), devices=(0,))
    world = World(rank=0, size=1, device=device, mesh=mesh, coordinate=(0,), groups=[None])
    node = Reshard(ReshardSpec(src=(Replicate(),), dst=(Shard(0),), grad_in=(Shard(0),), grad_out=(Replicate(),)),
                   world)
    x = torch.randn(64, device=device, requires_grad=True)
    g = torch.randn(64, device=device)
    through = _fastest(lambda: torch.autograd.grad(node(x).mul(2), x, g), device)
    plain = _fastest(lambda: torch.autograd.grad(x.mul(2), x, g), device)
    return max(through - plain, 0.0)


def _grad_call(device: torch.device) -> float:
    """Seconds one `torch.autograd.grad` call costs beyond its nodes: both − 2 · forward of x·2
    (the backward of x·2 is one such multiply), x of 64 elements."""
    x = torch.randn(64, device=device, requires_grad=True)
    g = torch.randn(64, device=device)
    forward = _fastest(lambda: x.mul(2), device)
    both = _fastest(lambda: torch.autograd.grad(x.mul(2), x, g), device)
    return max(both - 2 * forward, 0.0)


def _scales(profile, device: torch.device) -> tuple[float, float]:
    """(matmul, memory) ratios r_here / r_profiled of the module docstring."""
    fp32 = [r for r in profile.matmul if r.dtype == "fp32"]
    if device.type == "cuda":
        side, elements = max(fp32, key=lambda r: r.flops), 2 ** 26
    else:
        side, elements = min(fp32, key=lambda r: abs(math.log2(r.m / 512))), 2 ** 23
    a, b = torch.randn(side.m, side.k, device=device), torch.randn(side.k, side.n, device=device)
    here = side.flops / _fastest(lambda: torch.mm(a, b), device, repeats=15)
    x, y = torch.ones(elements, device=device), torch.ones(elements, device=device)
    z = torch.empty_like(x)
    bandwidth = 3 * x.numel() * 4 / _fastest(lambda: torch.add(x, y, out=z), device, repeats=15)
    return here / side.rate, bandwidth / profile.memory_bandwidth


def _fastest(fn, device: torch.device, repeats: int = 7) -> float:
    """Seconds per call of `fn`: the fastest of `repeats` samples, each `_SAMPLE` seconds or more of
    calls in a row. The fastest, not the median: here the op runs alone, and whatever else the
    machine is doing meanwhile only slows samples down (sharing with other ranks is the profile's
    part, through the scale)."""
    def timed(calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - begin) / calls

    calls = max(1, math.ceil(_SAMPLE / max(timed(1), 1e-9)))
    return min(timed(calls) for _ in range(repeats))
