"""Measured op times: each node of a captured graph timed on this machine, forward and backward,
and scaled to the profiled device.

A profile's matmul rates and bandwidth price a kernel from its FLOPs and bytes (`cost.compute`);
that misses what the rates do not see: a GELU's erf is compute-bound on a CPU, a linear's backward
runs two matmuls with transposed operands, attention's softmax is several passes. When the
cluster's profile was measured on a device of this machine's kind (gloo: a CPU; NCCL: a GPU here),
the planner times every node of the graph instead, once per distinct (op, argument shapes and
dtypes, constants), on random inputs of the node's shapes and strides, taking turns over copies
of them beyond a core's cache (`_node_timer`); views too, for their dispatch and a reshape's copy:

    forward  = mean time of the op
    backward = mean time of the op and its `torch.autograd.grad` − forward − g

each mean a trimmed mean of `_ROUNDS` samples taken in turns: every round samples every distinct
node once, with the reference kernels and fixed costs below (`cost.sampling`), so that the nodes
and the rates that scale them see the same machine, and a drift of its speed over seconds lands
on one sample of many nodes rather than on every sample of a few.
g is what one `torch.autograd.grad` call costs whatever it differentiates (the engine's start; on
a GPU also its hand-off to the device's thread), timed on x·2 of 64 elements as its both − 2 ·
forward. A training step pays it once, not once per node.

Both are scaled to the profiled device (other ranks share its cores there, not here):

    t_device = t_here · r_here / r_profiled

r is an fp32 matmul rate for nodes that do FLOPs and the bandwidth of a large add for the rest,
taken from the profile and measured here in the nodes' rounds. On a CPU the matmul is the
profile's nearest to 512×512×512 and the add 2²³ elements; on a GPU the profile's largest matmul
and 2²⁶ elements, since smaller ones time the launch and the L2 cache, not the device (50 MB of
L2 on an H100).
A node's share on `p` devices is o + (t − o) / p (`strategies.local_time`), o what a split does
not shrink: each node is timed again on half its leading dim, every input that shares it halved
as a batch split makes it (`_node_timer`'s `half`), and o = 2 · t_half − t, between 0 and t
(`OpTimes.fixed`: a smaller matmul's lower rate, every call's dispatch); the profile's kernel
overhead for a node without such a dim. Nodes too large to time here (over `_LARGEST` bytes or `_LONGEST`
seconds predicted) and nodes whose op fails on random inputs keep the FLOPs-and-bytes price; so
does every node left once `budget` / `_ROUNDS` seconds are spent preparing them (each costs as
much again every round), and the rounds stop early where the next would end after `budget`.

The optimizer's update is timed in the same rounds: one step of the plan's optimizer over `_ELEMENTS`
parameters, giving seconds per updated element (`OpTimes.update`), and one step over `_TENSORS`
tiny parameters, giving what each parameter tensor adds whatever its size (`OpTimes.per_tensor`:
on a CPU the foreach kernels loop over the tensors, a dozen small kernels each):

    t_update(tensor) = per_tensor + elements · update

One placement change of the lowered program (`runtime.collectives.Reshard`) is timed in one
process as rank 0 of a two-way axis, on a change whose steps are local both ways (a cut forward, a
zero padding of the gradient back): what its autograd function and its steps add, run from Python
both ways, beyond the bytes it copies and the collectives it runs (`OpTimes.reshard`), priced on
every edge where the runtime makes one.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

from autopar.cost.sampling import Sampler, in_turns
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
_ROUNDS = 7
"""Samples of every timing, one per round (`cost.sampling.in_turns`)."""
_ROTATE = 8 * 2 ** 20
"""Bytes of input copies a node's timing takes turns over: beyond a core's cache (`_node_timer`)."""
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
    fixed: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per node, the (forward, backward) seconds that do not shrink when its work is split: from
    the node timed again on half its leading dim, t_fixed = 2 · t_half − t (`_node_timer`'s `half`)."""
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


def shard_times(captured: CapturedGraph, profile, shards: dict[str, set[tuple]], *,
                budget: float = 10.0) -> dict[tuple[str, tuple], tuple[float, float]]:
    """(forward, backward) seconds on the profiled device of nodes as one device of a split runs
    them: node `name` on each of `shards[name]`, a shape per tensor argument. Timed as `op_times`
    times a node (in turns, with the reference kernels in the same rounds, scaled alike), once per
    distinct (op, shard shapes, gradients wanted) and profile; none when `profile` is of a device
    this machine lacks. What `budget` leaves untimed is missing from the answer.

    A split's share of a matmul is not its whole time over the ways: the shard's own shape sets
    its rate (a row-parallel linear halves its inner dim, which a small matmul feels more than
    half its rows), which the fit o + (t − o) / p from the node's halved batch cannot see."""
    if not measurable(profile):
        return {}
    start = time.perf_counter()
    device = _device(profile)
    differentiable = _differentiable(captured)
    fx_nodes = {n.name: n for n in captured.program.graph.nodes}
    key_of, pending, computes = {}, {}, {}
    for name in sorted(shards):
        node, info = fx_nodes[name], captured.nodes[name]
        grads = tuple(a.name in differentiable for a in _nodes_of(node))
        wanted = frozenset(a.name for a in _nodes_of(node) if a.name in differentiable)
        for shapes in sorted(shards[name]):
            key = (profile, _key(node), grads, shapes)
            key_of[(name, shapes)] = key
            if key in _SHARDS or key in pending or time.perf_counter() - start > budget / _ROUNDS:
                continue
            pending[key] = _node_timer(node, info.requires_grad, device, wanted, shapes=shapes)
            computes[key] = bool(info.flops)
    live = [t for t in pending.values() if t is not None]
    if live:
        reference = _Reference(profile, device)
        in_turns(reference.samplers + [s for t in live for s in t.samplers], _ROUNDS, deadline=start + budget)
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


def _measure(captured: CapturedGraph, profile, optimizer: str, budget: float) -> OpTimes:
    from autopar.passes.units import roles

    start = time.perf_counter()
    ignored = roles(captured).ignored
    differentiable = _differentiable(captured)
    device = _device(profile)
    fixed = _Fixed(profile, device, optimizer)
    timers: dict[tuple, _NodeTimer | None] = {}
    halves: dict[tuple, _NodeTimer | None] = {}
    key_of: dict[str, tuple] = {}
    for node in captured.program.graph.nodes:
        info = captured.nodes.get(node.name)
        if not isinstance(node.target, torch._ops.OpOverload) or info is None or node.name in ignored:
            continue
        if time.perf_counter() - start > budget / _ROUNDS or not _small(info, profile):
            continue  # each node prepared costs about as much again every round
        grads = tuple(a.name in differentiable for a in _nodes_of(node))  # by position: shared timings
        key = (_key(node), grads)
        if key not in timers:
            wanted = frozenset(a.name for a in _nodes_of(node) if a.name in differentiable)
            timers[key] = _node_timer(node, info.requires_grad, device, wanted)
            halves[key] = _node_timer(node, info.requires_grad, device, wanted, half=True) if timers[key] else None
        if timers[key] is not None:
            key_of[node.name] = key
    live = [t for t in [*timers.values(), *halves.values()] if t is not None]
    in_turns(fixed.samplers + [s for t in live for s in t.samplers], _ROUNDS, deadline=start + budget)
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
                   reshard=fixed.reshard() * memory_scale, fixed=fixed_parts, seconds=time.perf_counter() - start)


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


def _real(value, device: torch.device, halve: int | None = None, shape: tuple[int, ...] | None = None):
    """A random tensor like the fake `value`, with its strides (integer ones zero: valid indices and
    class targets). Strides matter: an add or a multiply reading a transposed view (attention's
    heads, a rotary embedding's halves) runs several times slower than on contiguous memory, and a
    reshape of one copies. `shape`: a shard's shape instead, its dims laid out in the same order."""
    if not isinstance(value, torch.Tensor):
        return value
    stride = tuple(value.stride())
    if shape is not None and tuple(shape) != tuple(value.shape):
        stride = _strides_in_order(stride, shape)
    shape = tuple(value.shape) if shape is None else tuple(shape)
    if halve is not None and shape and shape[0] == halve:
        shape = (halve // 2,) + shape[1:]
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    if value.dtype.is_floating_point:
        base = torch.randn(size, dtype=value.dtype, device=device)
    else:
        base = torch.zeros(size, dtype=value.dtype, device=device)
    return base.as_strided(shape, stride)


def _strides_in_order(stride: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Dense strides for `shape` whose dims lie in memory in the order `stride` lays them (a
    transposed view's shard is transposed too)."""
    order = sorted(range(len(shape)), key=lambda d: (stride[d], -d))  # innermost first
    out, step = [0] * len(shape), 1
    for d in order:
        out[d] = step
        step *= max(shape[d], 1)
    return tuple(out)


class _NodeTimer:
    """A node's samplers: its forward, and its forward with its `torch.autograd.grad` (None when the
    step computes no gradient through it)."""

    def __init__(self, forward: Sampler, both: Sampler | None):
        self.forward, self.both = forward, both

    @property
    def samplers(self) -> list[Sampler]:
        return [self.forward] + ([self.both] if self.both is not None else [])

    def seconds(self, grad_call: float) -> tuple[float, float]:
        """(forward, backward): backward = both − forward − `grad_call`, at least 0."""
        forward = self.forward.seconds()
        if self.both is None:
            return forward, 0.0
        return forward, max(self.both.seconds() - forward - grad_call, 0.0)


def _node_timer(node: torch.fx.Node, requires_grad: bool, device: torch.device,
                wanted: frozenset[str] | None = None, half: bool = False,
                shapes: tuple[tuple[int, ...], ...] | None = None) -> _NodeTimer | None:
    """The node's op on random inputs, ready to be sampled; None when it fails on them.
    `wanted`: the inputs whose gradient the step's backward computes (None: every floating one).
    The others are constants to backward: the first linear's batch, a rotary embedding's cos and
    sin; a linear's backward without its input's gradient is one matmul, not two.

    Calls take turns over several copies of the inputs, `_ROTATE` bytes in all: in a step an op
    reads what other ops wrote a while before, from the shared cache or memory, not what it read a
    moment ago from its core's own cache.

    `half`: every input whose leading dim is the output's (an even one) gets half of it, as a
    split of the batch makes it; None when the output has no such dim or the op fails so.
    `shapes`: the shape of each tensor argument (flattened order, repeats kept) as a shard, to time
    the op as one device of a split runs it."""
    halve = _leading(node) if half else None
    if half and halve is None:
        return None

    def leaves():
        flat, spec = pytree.tree_flatten((node.args, node.kwargs))
        places = iter(shapes) if shapes is not None else itertools.repeat(None)
        made = [_real(a.meta.get("val"), device, halve,
                      next(places) if isinstance(a.meta.get("val"), torch.Tensor) else None)
                if isinstance(a, torch.fx.Node) else a for a in flat]
        return pytree.tree_unflatten(made, spec)

    first = leaves()
    held = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(first) if isinstance(t, torch.Tensor))
    copies = [first] + [leaves() for _ in range(min(_COPIES, _ROTATE // max(held, 1)) - 1)]
    turn = itertools.cycle(copies)

    def run():
        args, kwargs = next(turn)
        return node.target(*args, **kwargs)

    try:
        forward = Sampler(run, device, _SAMPLE)
        sources = pytree.tree_leaves((node.args, node.kwargs))
        floating = [[t for t, a in zip(pytree.tree_leaves(c), sources)
                     if isinstance(t, torch.Tensor) and t.dtype.is_floating_point
                     and (wanted is None or (isinstance(a, torch.fx.Node) and a.name in wanted))]
                    for c in copies]
        if not requires_grad or not floating[0]:
            return _NodeTimer(forward, None)
        for t in itertools.chain.from_iterable(floating):
            t.requires_grad_(True)
        outputs = [t for t in pytree.tree_leaves(run()) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not outputs:
            return _NodeTimer(forward, None)
        grads = [torch.randn_like(t) for t in outputs]
        pairs = itertools.cycle(list(zip(copies, floating)))

        def both() -> None:
            (args, kwargs), leaves = next(pairs)
            made = [t for t in pytree.tree_leaves(node.target(*args, **kwargs))
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad(made, leaves, grads, allow_unused=True)

        return _NodeTimer(forward, Sampler(both, device, _SAMPLE))
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None


def _leading(node: torch.fx.Node) -> int | None:
    """The output's leading dim, when it is even and some input shares it."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or not out.dim() or out.shape[0] < 2 or out.shape[0] % 2:
        return None
    shared = any(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == out.shape[0]
                 for v in (a.meta.get("val") for a in _nodes_of(node)))
    return int(out.shape[0]) if shared else None


def _time_node(node: torch.fx.Node, requires_grad: bool, device: torch.device, grad_call: float = 0.0,
               wanted: frozenset[str] | None = None) -> tuple[float, float] | None:
    """(forward, backward) seconds of one node timed alone, `_ROUNDS` samples each; None when it
    fails on random inputs. `grad_call`: the fixed cost of one `torch.autograd.grad` call, not the
    node's."""
    timer = _node_timer(node, requires_grad, device, wanted)
    if timer is None:
        return None
    in_turns(timer.samplers, _ROUNDS)
    return timer.seconds(grad_call)


class _Fixed:
    """What every graph's timing needs besides its nodes, sampled in the same rounds:

    - the reference kernels and one `torch.autograd.grad` call's fixed cost (`_Reference`);
    - one step of the plan's optimizer (torch's, default settings) over `_ELEMENTS` parameters and
      over `_TENSORS` parameters of 64 elements (`update`);
    - a `Reshard` node run as rank 0 of a two-way axis with local steps both ways (`_reshard_node`):
      both of Reshard(x)·2 − both of x·2, 64 elements (`reshard`)."""

    def __init__(self, profile, device: torch.device, optimizer: str):
        self.reference = _Reference(profile, device)
        tiny, g = self.reference.tiny, self.reference.g
        self.large = Sampler(_optimizer_step(optimizer, device, [_ELEMENTS]), device, _SAMPLE)
        self.small = Sampler(_optimizer_step(optimizer, device, [64] * _TENSORS), device, _SAMPLE)
        through = _reshard_node(device)
        half = g[:32]
        self.reshard_both = Sampler(lambda: torch.autograd.grad(through(tiny).mul(2), tiny, half), device, _SAMPLE)

    @property
    def samplers(self) -> list[Sampler]:
        return self.reference.samplers + [self.large, self.small, self.reshard_both]

    def scales(self) -> tuple[float, float]:
        return self.reference.scales()

    def grad_call(self) -> float:
        return self.reference.grad_call()

    def update(self) -> tuple[float, float]:
        """(seconds per element, seconds per tensor beyond its elements) of one optimizer step, here."""
        per_element = self.large.seconds() / _ELEMENTS
        return per_element, max(self.small.seconds() - 64 * _TENSORS * per_element, 0.0) / _TENSORS

    def reshard(self) -> float:
        return max(self.reshard_both.seconds() - self.reference.mul_both.seconds(), 0.0)


class _Reference:
    """The reference matmul and add whose rates here, against the profile's, scale every timing
    (`scales`, the module docstring's r_here / r_profiled), and one `torch.autograd.grad` call's
    fixed cost: both − 2 · forward of x·2, x of 64 elements (`grad_call`)."""

    def __init__(self, profile, device: torch.device):
        fp32 = [r for r in profile.matmul if r.dtype == "fp32"]
        if device.type == "cuda":
            self.side, elements = max(fp32, key=lambda r: r.flops), 2 ** 26
        else:
            self.side, elements = min(fp32, key=lambda r: abs(math.log2(r.m / 512))), 2 ** 23
        self.profile = profile
        a, b = torch.randn(self.side.m, self.side.k, device=device), torch.randn(self.side.k, self.side.n, device=device)
        x, y, z = (torch.ones(elements, device=device) for _ in range(3))
        self.added = 3 * x.numel() * 4
        self.matmul = Sampler(lambda: torch.mm(a, b), device, _SAMPLE)
        self.add = Sampler(lambda: torch.add(x, y, out=z), device, _SAMPLE)
        self.tiny, self.g = torch.randn(64, device=device, requires_grad=True), torch.randn(64, device=device)
        self.mul = Sampler(lambda: self.tiny.mul(2), device, _SAMPLE)
        self.mul_both = Sampler(lambda: torch.autograd.grad(self.tiny.mul(2), self.tiny, self.g), device, _SAMPLE)

    @property
    def samplers(self) -> list[Sampler]:
        return [self.matmul, self.add, self.mul, self.mul_both]

    def scales(self) -> tuple[float, float]:
        """(matmul, memory) ratios r_here / r_profiled."""
        here = self.side.flops / self.matmul.seconds()
        return here / self.side.rate, self.added / self.add.seconds() / self.profile.memory_bandwidth

    def grad_call(self) -> float:
        return max(self.mul_both.seconds() - 2 * self.mul.seconds(), 0.0)


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
    from autopar.vocab import LogicalMesh

    mesh = LogicalMesh(shape=(2,), devices=(0, 1))
    world = World(rank=0, size=2, device=device, mesh=mesh, coordinate=(0,), groups=[None])
    return Reshard(ReshardSpec(src=(Replicate(),), dst=(Shard(0),), grad_in=(Shard(0),), grad_out=(Partial(),)),
                   world)
