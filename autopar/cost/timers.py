"""Timing one node of a captured graph on this machine: its op on random inputs of its shapes
and strides (or a shard's shapes), forward and with its `torch.autograd.grad`, sampled in turns
(`cost.sampling`), and the reference kernels that scale such timings to a profiled device. What
they are for and how they combine: `cost.ops`."""

from __future__ import annotations

import itertools
import math

import torch
from torch.utils import _pytree as pytree

from autopar.cost.sampling import Sampler, first_call, in_turns
from autopar.runtime.timing import seconds_per_call

SAMPLE = 0.0025
"""Least seconds of one timed sample. (Samples counted their calls from a cold first call until
`Sampler` took a second one: at 5 ms they then lasted 2.3 ms on average on a CPU, and this keeps
that, and the planner's time.)"""
ROUNDS = 7
"""Samples of every timing, one per round (`cost.sampling.in_turns`)."""
ROTATE = 8 * 2 ** 20
"""Bytes of input copies a node's timing takes turns over: beyond a core's cache (`node_timer`)."""
COPIES = 16
"""At most this many copies."""


def nodes_of(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The node's tensor arguments in the order of its (args, kwargs) leaves."""
    return [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]


def op_key(node: torch.fx.Node) -> tuple:
    def describe(a):
        if isinstance(a, torch.fx.Node):
            v = a.meta.get("val")
            return ("t", tuple(v.shape), str(v.dtype), tuple(v.stride())) if isinstance(v, torch.Tensor) else repr(v)
        return repr(a)
    return (str(node.target), tuple(describe(a) for a in pytree.tree_leaves((node.args, node.kwargs))))


def real(value, device: torch.device, halve: int | None = None, shape: tuple[int, ...] | None = None):
    """A random tensor like the fake `value`, with its strides (integer ones zero: valid indices and
    class targets). Strides matter: an add or a multiply reading a transposed view (attention's
    heads, a rotary embedding's halves) runs several times slower than on contiguous memory, and a
    reshape of one copies. `shape`: a shard's shape instead, its dims laid out in the same order."""
    if not isinstance(value, torch.Tensor):
        return value
    stride = tuple(value.stride())
    if shape is not None and tuple(shape) != tuple(value.shape):
        stride = strides_in_order(stride, shape)
    shape = tuple(value.shape) if shape is None else tuple(shape)
    if halve is not None and shape and shape[0] == halve:
        shape = (halve // 2,) + shape[1:]
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    if value.dtype.is_floating_point:
        base = torch.randn(size, dtype=value.dtype, device=device)
    else:
        base = torch.zeros(size, dtype=value.dtype, device=device)
    return base.as_strided(shape, stride)


def strides_in_order(stride: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Dense strides for `shape` whose dims lie in memory in the order `stride` lays them (a
    transposed view's shard is transposed too)."""
    order = sorted(range(len(shape)), key=lambda d: (stride[d], -d))  # innermost first
    out, step = [0] * len(shape), 1
    for d in order:
        out[d] = step
        step *= max(shape[d], 1)
    return tuple(out)


class NodeTimer:
    """A node's samplers: its forward, and the forwards of `together` copies with one
    `torch.autograd.grad` through them all (None when the step computes no gradient through it)."""

    def __init__(self, forward: Sampler, both: Sampler | None, together: int = 1, warm: float = 0.0):
        self.forward, self.both, self.together = forward, both, together
        self.setup = warm + sum(s.first for s in self.samplers)
        """Seconds its first calls took (`Sampler.first`), which no round pays again."""

    @property
    def samplers(self) -> list[Sampler]:
        return [self.forward] + ([self.both] if self.both is not None else [])

    def seconds(self, grad_call: float) -> tuple[float, float]:
        """(forward, backward): backward = (both − `grad_call`) / together − forward, at least 0."""
        forward = self.forward.seconds()
        if self.both is None:
            return forward, 0.0
        return forward, max((self.both.seconds() - grad_call) / self.together - forward, 0.0)


def node_timer(node: torch.fx.Node, requires_grad: bool, device: torch.device,
                wanted: frozenset[str] | None = None, half: bool = False,
                shapes: tuple[tuple[int, ...], ...] | None = None, call=None) -> NodeTimer | None:
    """The node's op on random inputs, ready to be sampled; None when it fails on them.
    `wanted`: the inputs whose gradient the step's backward computes (None: every floating one).
    The others are constants to backward: the first linear's batch, a rotary embedding's cos and
    sin; a linear's backward without its input's gradient is one matmul, not two.

    Calls take turns over several copies of the inputs, `ROTATE` bytes in all: in a step an op
    reads what other ops wrote a while before, from the shared cache or memory, not what it read a
    moment ago from its core's own cache. The backward's call runs the op k times, on the copies in
    turn (and again on them as new leaves on the same memory, `_aliased`), k as many as fit in one
    sample's `SAMPLE` seconds, up to `COPIES`, and one `torch.autograd.grad` through them all, as
    a step's one backward call runs many nodes: what the call itself costs (`Reference.grad_call`,
    on an H100 about 130 µs, the engine handing the work to its device thread, against 5–50 µs of
    a small node's own backward) is taken off once for all k, so that its noise lands on each node
    divided by k (one call per run: a 111M-parameter GPT's summed backward read 18.9 and 34.2 ms
    in two plans a second apart).

    `half`: every input whose leading dim is the output's (an even one) gets half of it, as a
    split of the batch makes it; None when the output has no such dim or the op fails so.
    `shapes`: the shape of each tensor argument (flattened order, repeats kept) as a shard, to time
    the op as one device of a split runs it; `call`: what runs instead of the op (a kernel of the
    runtime, `kernel_timer`)."""
    halve = leading(node) if half else None
    if half and halve is None:
        return None

    def leaves():
        flat, spec = pytree.tree_flatten((node.args, node.kwargs))
        places = iter(shapes) if shapes is not None else itertools.repeat(None)
        made = [real(a.meta.get("val"), device, halve,
                      next(places) if isinstance(a.meta.get("val"), torch.Tensor) else None)
                if isinstance(a, torch.fx.Node) else a for a in flat]
        return pytree.tree_unflatten(made, spec)

    op = call if call is not None else node.target
    first = leaves()
    held = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(first) if isinstance(t, torch.Tensor))
    copies = [first] + [leaves() for _ in range(min(COPIES, ROTATE // max(held, 1)) - 1)]
    turn = itertools.cycle(copies)

    def run():
        args, kwargs = next(turn)
        return op(*args, **kwargs)

    try:
        forward = Sampler(run, device, SAMPLE)
        sources = pytree.tree_leaves((node.args, node.kwargs))
        floating = [[t for t, a in zip(pytree.tree_leaves(c), sources)
                     if isinstance(t, torch.Tensor) and t.dtype.is_floating_point
                     and (wanted is None or (isinstance(a, torch.fx.Node) and a.name in wanted))]
                    for c in copies]
        if not requires_grad or not floating[0]:
            return NodeTimer(forward, None)
        for t in itertools.chain.from_iterable(floating):
            t.requires_grad_(True)
        outputs = [t for t in pytree.tree_leaves(run()) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not outputs:
            return NodeTimer(forward, None)
        return _with_backward(op, forward, list(zip(copies, floating)), [torch.randn_like(t) for t in outputs],
                              device)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None


def _with_backward(op, forward: Sampler, pairs: list, grads: list, device: torch.device) -> NodeTimer:
    """`forward` and the backward's sampler: k runs of `op` on the (inputs, leaves) `pairs` in turn,
    aliased again up to `COPIES` (`_aliased`), and one `torch.autograd.grad` of them all with the
    output gradients `grads` (`node_timer`)."""
    copies = len(pairs)
    while len(pairs) < COPIES:  # more uses of the same inputs, as leaves of their own
        pairs.append(_aliased(pairs[len(pairs) % copies][0]))

    def both(together: int) -> None:
        made, wrt = [], []
        for (args, kwargs), leaves in pairs[:together]:
            made += [t for t in pytree.tree_leaves(op(*args, **kwargs))
                     if isinstance(t, torch.Tensor) and t.requires_grad]
            wrt += leaves
        torch.autograd.grad(made, wrt, grads * together, allow_unused=True)

    warm = first_call(lambda: both(1), device)  # loads the backward's kernels
    one = seconds_per_call(lambda: both(1), device, 1)
    together = max(1, min(len(pairs), int(SAMPLE / max(one, 1e-9))))
    return NodeTimer(forward, Sampler(lambda: both(together), device, SAMPLE), together=together, warm=warm)


def _aliased(inputs) -> tuple:
    """(`inputs` with each tensor that requires grad replaced by a new leaf on the same memory,
    those leaves): the op run on them is a graph of its own, whose gradients are not summed with
    another use's."""
    flat, spec = pytree.tree_flatten(inputs)
    fresh: dict[int, torch.Tensor] = {}
    for t in flat:
        if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in fresh:
            fresh[id(t)] = t.detach().requires_grad_(True)
    swapped = [fresh.get(id(t), t) if isinstance(t, torch.Tensor) else t for t in flat]
    return pytree.tree_unflatten(swapped, spec), [fresh[id(t)] for t in flat
                                                   if isinstance(t, torch.Tensor) and id(t) in fresh]


def kernel_timer(node: torch.fx.Node, sharding, mesh_shape: tuple[int, ...], shapes, requires_grad: bool,
                 device: torch.device, wanted: frozenset[str] | None = None) -> NodeTimer | None:
    """The runtime's kernel for `sharding`'s rule kinds (`runtime.lower.kernel_of`: a vocabulary-
    parallel cross-entropy or lookup, a linear whose bias joins on one rank, a loss over a split
    batch), as rank 0 of `mesh_shape` runs it on the shards' `shapes`, in a timing world whose
    kernels leave out their collectives (priced apart, `passes.sharding`); None when the kinds
    make no kernel or it fails."""
    from autopar.plan import NodePlan
    from autopar.runtime.lower import kernel_of
    from autopar.runtime.world import World

    world = World.for_timing(mesh_shape, device)
    plan = NodePlan(op=str(node.target), module="", layer=None, inputs=sharding.inputs, outputs=sharding.outputs,
                    kinds=sharding.kinds)
    kernel = kernel_of(node, plan, world)
    if kernel is None:
        return None
    return node_timer(node, requires_grad, device, wanted, shapes=shapes, call=kernel)


def leading(node: torch.fx.Node) -> int | None:
    """The output's leading dim, when it is even and some input shares it."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or not out.dim() or out.shape[0] < 2 or out.shape[0] % 2:
        return None
    shared = any(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == out.shape[0]
                 for v in (a.meta.get("val") for a in nodes_of(node)))
    return int(out.shape[0]) if shared else None


def time_node(node: torch.fx.Node, requires_grad: bool, device: torch.device, grad_call: float = 0.0,
               wanted: frozenset[str] | None = None) -> tuple[float, float] | None:
    """(forward, backward) seconds of one node timed alone, `ROUNDS` samples each; None when it
    fails on random inputs. `grad_call`: the fixed cost of one `torch.autograd.grad` call, not the
    node's."""
    timer = node_timer(node, requires_grad, device, wanted)
    if timer is None:
        return None
    in_turns(timer.samplers, ROUNDS)
    return timer.seconds(grad_call)


class Reference:
    """The reference matmul and add whose rates here, against the profile's, scale every timing
    (`scales`, the module docstring's r_here / r_profiled), and one `torch.autograd.grad` call's
    fixed cost: both − 2 · forward of x·2, x of 64 elements (`grad_call`). `least`: seconds of
    one sample of the matmul and the add."""

    def __init__(self, profile, device: torch.device, least: float = SAMPLE):
        fp32 = [r for r in profile.matmul if r.dtype == "fp32"]
        if device.type == "cuda":
            self.side, elements = max(fp32, key=lambda r: r.flops), 2 ** 26
        else:
            self.side, elements = min(fp32, key=lambda r: abs(math.log2(r.m / 512))), 2 ** 23
        self.profile = profile
        a = torch.randn(self.side.m, self.side.k, device=device)
        b = torch.randn(self.side.k, self.side.n, device=device)
        x, y, z = (torch.ones(elements, device=device) for _ in range(3))
        self.added = 3 * x.numel() * 4
        self.matmul = Sampler(lambda: torch.mm(a, b), device, least)
        self.add = Sampler(lambda: torch.add(x, y, out=z), device, least)
        self.tiny, self.g = torch.randn(64, device=device, requires_grad=True), torch.randn(64, device=device)
        self.mul = Sampler(lambda: self.tiny.mul(2), device, SAMPLE)
        self.mul_both = Sampler(lambda: torch.autograd.grad(self.tiny.mul(2), self.tiny, self.g), device, SAMPLE)

    @property
    def samplers(self) -> list[Sampler]:
        return [self.matmul, self.add, self.mul, self.mul_both]

    def scales(self) -> tuple[float, float]:
        """(matmul, memory) ratios r_here / r_profiled."""
        here = self.side.flops / self.matmul.seconds()
        return here / self.side.rate, self.added / self.add.seconds() / self.profile.memory_bandwidth

    def grad_call(self) -> float:
        return max(self.mul_both.seconds() - 2 * self.mul.seconds(), 0.0)
