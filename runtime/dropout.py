"""Random numbers in a parallel step: dropout draws the mask one device draws, on every plan.

A step that draws random numbers trains like one device only when every rank draws what the one
device would: the whole tensor, from the same generator state, each rank keeping its part.
- `Dropout`: `aten.dropout` on a placed tensor (the lowered program's kernel for it).
- `Masks`: a pipeline's whole step of masks, drawn at its start in one device's order
  (`step_masks` lists them from the two captures).
- `check_random`: the ranks' generators agree, or an error names those that do not; a warning
  where a plan can match one device only in distribution.
"""

from __future__ import annotations

import base64
import hashlib
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Replicate

from autopar.errors import AutoparError
from autopar.graph import CapturedGraph
from autopar.runtime.collectives import transform
from autopar.runtime.world import World, this_device
from autopar.vocab import Placements, shard_count

aten = torch.ops.aten


class Dropout(nn.Module):
    """`aten.dropout` on a placed tensor, drawing the mask one device draws. ATen's dropout (CPU;
    `_dropout_impl` in aten/src/ATen/native/Dropout.cpp) is

        noise = empty_like(x).bernoulli_(1 − p) / (1 − p);   y = x · noise

    Here `noise` is drawn for the whole tensor, in the memory order one device's tensor has (its
    strides' order, as `empty_like` keeps it), from the default generator, and this rank keeps its
    part of it. So every plan draws the same mask, the one-device mask, as long as every rank's
    generator holds the same state as the one device's (`check_random`). Each rank draws
    the whole tensor, what a replicated tensor costs. On a GPU one device runs the fused kernel
    (`native_dropout`), whose mask comes from another stream: plans there agree with each other
    and train like one device in distribution, not bit for bit."""

    def __init__(self, world: World, placements: Placements, order: tuple[int, ...], masks: Masks | None = None,
                 name: str = "") -> None:
        """`order`: the dims from the outermost in memory to the innermost. `masks`: the step's masks
        drawn ahead (a pipeline's microbatches), this node's under `name`."""
        super().__init__()
        self.world, self.placements, self.order, self.masks, self.name = world, placements, order, masks, name

    def forward(self, x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        if p == 0 or not train or x.numel() == 0:
            return x
        if p == 1:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        if self.masks is not None and self.name in self.masks.noise:
            noise = self.masks.part(self.name)
        else:
            mesh = [self.world.axis_size(a) for a in range(len(self.placements))]
            noise = _noise([n * shard_count(self.placements, mesh, d) for d, n in enumerate(x.shape)], self.order,
                           p, x.dtype, x.device)
        local = transform(noise, tuple(Replicate() for _ in self.placements), self.placements, self.world)
        if local.untyped_storage().nbytes() > local.nbytes:  # keep (for backward) only this rank's part
            local = local.clone()
        return x * local

    def extra_repr(self) -> str:
        return f"placements={self.placements}"


def _noise(shape: list[int], order: tuple[int, ...], p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """bernoulli(1 − p) / (1 − p) of `shape`, laid out in memory in `order` (outermost first)."""
    noise = torch.empty([shape[d] for d in order], dtype=dtype, device=device)
    noise = noise.permute([order.index(d) for d in range(len(shape))])
    return noise.bernoulli_(1 - p).div_(1 - p)


@dataclass(frozen=True, slots=True)
class Drawn:
    """One dropout of the step: its node, the whole batch's shape and memory order, p, and the dim
    the microbatches cut (None when its tensor does not follow the batch)."""

    name: str
    shape: tuple[int, ...]
    order: tuple[int, ...]
    p: float
    dtype: torch.dtype
    batch_dim: int | None


class Masks:
    """A pipelined step's dropout masks, drawn as one device draws them. One device draws each
    dropout's mask for the whole batch, in the order of the forward; a pipeline runs each stage on
    its own ranks, microbatch by microbatch. So every rank draws the whole step's masks at its start,
    in the one device's order from the same generator state (`draw`: every rank's generator then
    advances as the one device's does), and each `Dropout` keeps its microbatch's part (`current`,
    set by the pipeline) of its node's mask. The price: every rank holds the step's masks, what one
    device holds."""

    def __init__(self, drawn: list[Drawn], microbatches: int) -> None:
        self.drawn, self.m = {d.name: d for d in drawn}, microbatches
        self.noise: dict[str, torch.Tensor] = {}
        self.current = 0

    def draw(self, device) -> None:
        self.noise = {d.name: _noise(list(d.shape), d.order, d.p, d.dtype, device) for d in self.drawn.values()}
        self.current = 0

    def part(self, name: str) -> torch.Tensor:
        drawn = self.drawn[name]
        noise = self.noise[name]
        return noise if drawn.batch_dim is None else noise.chunk(self.m, drawn.batch_dim)[self.current]


def memory_order(like: torch.Tensor) -> tuple[int, ...]:
    """`like`'s dims from the outermost in memory to the innermost (its strides, largest first)."""
    return tuple(sorted(range(like.dim()), key=lambda d: (-like.stride(d), d)))


def draws(node: torch.fx.Node) -> bool:
    """Whether the node draws random numbers when it runs: an op tagged as seeded by the generator,
    except dropout at p = 0 or outside training, and attention without dropout."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    schema = {a.name: a.default_value if a.has_default_value() else None for a in target._schema.arguments}
    arguments = schema | dict(zip(schema, node.args)) | dict(node.kwargs)
    if "dropout_p" in schema:  # scaled_dot_product_attention and its kernels
        return (arguments["dropout_p"] or 0.0) > 0
    if "train" in schema and "p" in schema:  # dropout, native_dropout, feature and alpha dropout
        return arguments["p"] > 0 and arguments["train"] is not False
    return True


def check_random(captured: CapturedGraph, *, pipelined: bool) -> None:
    """When the step draws random numbers, on every rank at once: an error when the ranks' default
    generators are in different states. Ranks seeded apart (`torch.manual_seed(seed + rank)`, common
    in data-parallel scripts) would drop different units of the same replicated activation on each
    rank, and their copies would part silently. A warning names the ops whose draws match one device
    only in distribution: random ops other than `aten.dropout` (each rank draws for its own part),
    and under a pipelined plan on GPUs, dropout too (each stage draws per microbatch)."""
    drawn = sorted({str(n.target) for n in captured.program.graph.nodes if draws(n)})
    if not drawn or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    exact = str(aten.dropout.default) if not pipelined or this_device().type == "cpu" else None
    inexact = [op for op in drawn if op != exact]
    if inexact:
        warnings.warn(f"random ops in the step ({', '.join(inexact)}): each rank{' and stage' if pipelined else ''} "
                      f"draws for its own part of the tensor, so the plan trains like one device in "
                      f"distribution, not bit for bit (dropout modules, `aten.dropout`, draw the one-device "
                      f"mask{'s on CPU ranks' if pipelined else ''})", stacklevel=3)
    found = [None] * dist.get_world_size()
    state = "".join(generator_states().values())
    dist.all_gather_object(found, hashlib.sha256(state.encode()).hexdigest())
    apart = [rank for rank, d in enumerate(found) if d != found[0]]
    if apart:
        raise AutoparError(f"random ops in the step ({', '.join(drawn)}): found the default random generator in "
                           f"another state on rank(s) {apart} than on rank 0, required the same state on every "
                           f"rank (one torch.manual_seed(s) everywhere before compiling and stepping), so that "
                           f"each rank keeps its part of the mask one device would draw")


def step_masks(captured: CapturedGraph, micro: CapturedGraph, m: int) -> Masks | None:
    """The step's dropouts for `Masks`, in the order one device draws them; None when there are
    none. A dropout's batch dim is the one its microbatch capture is smaller in."""
    small = {n.name: n for n in micro.program.graph.nodes}
    drawn = []
    for node in captured.program.graph.nodes:
        if node.target is aten.dropout.default and draws(node):
            like, part = node.args[0].meta["val"], small[node.name].args[0].meta["val"]
            cut = [d for d in range(like.dim()) if like.shape[d] != part.shape[d]]
            drawn.append(Drawn(name=node.name, shape=tuple(like.shape), order=memory_order(like), p=float(node.args[1]),
                               dtype=like.dtype, batch_dim=cut[0] if cut else None))
    return Masks(drawn, m) if drawn else None


def generator_states() -> dict[str, str]:
    """The default generators' states, base64: "cpu", and "cuda" (this rank's device) once CUDA is
    in use. A checkpoint keeps them (every rank's agree whenever the step draws, `check_random`),
    so that a run resumed from it draws the masks the uninterrupted run would have."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return {name: base64.b64encode(s.numpy().tobytes()).decode("ascii") for name, s in states.items()}


def decode_generator_states(states) -> dict[str, torch.Tensor]:
    """`generator_states()`'s, checked and decoded: a dict of "cpu" and "cuda" to base64 of as many
    bytes as this machine's generator state holds. ValueError naming what was found otherwise."""
    if not isinstance(states, dict) or not set(states) <= {"cpu", "cuda"}:
        raise ValueError(f"random generator states: found {states!r:.80}, required an object of "
                         f"'cpu' (and 'cuda') to base64 strings")
    current = {"cpu": torch.get_rng_state}
    if torch.cuda.is_available():
        current["cuda"] = torch.cuda.get_rng_state
    decoded = {}
    for name, text in states.items():
        try:
            raw = base64.b64decode(text, validate=True)
        except (TypeError, ValueError):
            raise ValueError(f"random generator state {name!r}: found {text!r:.40}, required base64") from None
        if name in current and len(raw) != current[name]().numel():
            raise ValueError(f"random generator state {name!r}: found {len(raw)} bytes, required "
                             f"{current[name]().numel()} (this torch's generator)")
        decoded[name] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return decoded


def set_generator_states(states: dict[str, torch.Tensor]) -> None:
    """Put `decode_generator_states`'s back, on this rank; a "cuda" state only where CUDA is in use."""
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])
