"""Pipelined plans: each rank runs its stages' SPMD programs over microbatches in the schedule's order.

Takes the captured step (whole batch and one microbatch), a plan with stages, and the model's
state; gives `PipelineModel`, with `CompiledModel`'s interface (step, forward calls, state dicts,
dumps). Stage j runs on device group j mod p (interleaved: several chunks per group); its program is
lowered from the stage's ops alone (`runtime.lower` with a `Boundary`), on a world of its own mesh.

A step: the batch is cut into m microbatches along dim 0; each group works through
`passes.schedules.actions` (GPipe, 1F1B, interleaved 1F1B, zero-bubble). A value one stage computes
and a later one reads is sent whole point-to-point, and its gradient comes back the same way
(`runtime.stage_links`). Sends are non-blocking and receives blocking: the orders pass
`schedules.check_order`, so no group waits on one that waits on it. A stage's
data-parallel gradients are reduced once, in its last backward (as `no_sync` does for the others);
a parameter held by several stages (a tied embedding) has its gradients summed across them before
the optimizer step, so every copy stays equal.

The loss is a sum over microbatches: a cross-entropy mean divides each microbatch's sum by the whole
batch's target count, other means are divided by m (`runtime.microbatch_loss`). The executor is
autopar's own rather than `torch.distributed.pipelining`, whose stages are one rank each: here a
stage is an SPMD program over a submesh, and stages may differ in mesh and placement. Zero-bubble runs each backward as an
input-gradient pass then a weight-gradient pass; the second recomputes the activation gradients
(autograd keeps no split), so the order is ZB-H1's but its saving is not realized here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Partial, Replicate
from torch.utils import _pytree as pytree

from autopar.graph import CapturedGraph
from autopar.plan import Plan, Stage
from autopar.passes import schedules
from autopar.runtime.collectives import transform
from autopar.runtime.compiled import _LossValue, check_step
from autopar.runtime.microbatch_loss import microbatch_factor
from autopar.runtime.params import Holder, regather
from autopar.runtime.stage_links import Crossing, Messages
from autopar.runtime.sync import GradientSync, bucketed
from autopar.runtime.world import World


@dataclass(eq=False)
class Chunk:
    """One stage this rank runs: its program, parameters and what it exchanges."""

    index: int
    stage: Stage
    world: World
    holders: dict[str, Holder]
    groups: list
    program: torch.fx.GraphModule
    layout: object
    buffers: dict[str, torch.Tensor]
    buffer_placements: dict[str, tuple]
    sync: GradientSync | None
    saved: dict[int, tuple[list, list]] = field(default_factory=dict)
    """Per microbatch in flight: its received leaves and its outputs."""
    seeds: dict[int, list] = field(default_factory=dict)
    """Per microbatch between its I and W passes: the outputs and the gradients they were given."""


class PipelineModel:
    def __init__(self, *, captured: CapturedGraph, micro: CapturedGraph, plan: Plan, chunks: list[Chunk],
                 links: list[Crossing], state_keys: list[str], optimizer_factory=None, masks=None) -> None:
        self.captured, self.micro, self.plan, self.chunks, self.links = captured, micro, plan, chunks, links
        self.masks = masks
        """The step's dropout masks (`runtime.dropout.Masks`), drawn at its start; None without dropout."""
        self._state_keys = state_keys
        self.p = len(plan.stages) // plan.schedule.virtual
        self.m = plan.schedule.microbatches
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = chunks[0].index % self.p
        kind = plan.schedule.kind if plan.schedule.kind != "none" else "gpipe"
        self.order = schedules.actions(kind, self.p, self.m, plan.schedule.virtual)[self.group]
        self.mine = {c.index: c for c in chunks}
        self.last_backward = {}
        for position, (action, c, _) in enumerate(self.order):
            if action in ("B", "W"):
                self.last_backward[c * self.p + self.group] = position
        leaves = [h.leaf for c in chunks for n in sorted(c.holders) for h in [c.holders[n]] if h.leaf.requires_grad]
        self.optimizer = optimizer_factory(leaves) if optimizer_factory is not None else None
        self._inputs = [captured.program.graph.find_nodes(op="placeholder", target=n)[0].meta["val"]
                        for n in captured.inputs]
        self._loss_chunk = len(plan.stages) - 1
        self._factor = microbatch_factor(captured, self.m) if captured.has_loss else 1.0
        self._tied = _tied_groups(plan, captured)
        self.messages = Messages(plan, micro, links, chunks[0].world, self.m)
        self.step_count = 0
        """Training steps taken (restored by `load`)."""

    @property
    def world(self) -> World:
        return self.chunks[0].world

    def parameters(self) -> list[nn.Parameter]:
        return [c.holders[n].leaf for c in self.chunks for n in sorted(c.holders)]

    # -- running ----------------------------------------------------------------------------------

    def _microbatches(self, flat: list) -> list[list[torch.Tensor]]:
        if len(flat) != len(self._inputs):
            raise ValueError(f"inputs: found {len(flat)} tensor(s), required {len(self._inputs)} as traced "
                             f"(the model's inputs{', then the target' if self.captured.has_loss else ''})")
        for i, (x, traced) in enumerate(zip(flat, self._inputs)):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(traced.shape) or x.dtype != traced.dtype:
                found = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"input {i}: found {found}, required {tuple(traced.shape)} {traced.dtype} "
                                 f"(the shape the plan was made for; plan again for other shapes)")
        pieces = [x.to(self.world.device).chunk(self.m, dim=0) for x in flat]
        return [[p[k] for p in pieces] for k in range(self.m)]

    def _args(self, chunk: Chunk, received: list, micro: list, whole: list) -> list:
        layout = chunk.layout
        args = list(received) + [chunk.holders[n].leaf for n in layout.params] + [chunk.buffers[n] for n in layout.buffers]
        names = list(self.captured.inputs)
        for name, placed in layout.inputs:
            x = micro[names.index(name)]
            args.append(transform(x, tuple(Replicate() for _ in placed), placed, chunk.world))
        for source, ignore in layout.counts:
            args.append((whole[names.index(source)] != ignore).sum().to(torch.float64).to(chunk.world.device))
        return args

    def _forward(self, chunk: Chunk, k: int, micro: list, whole: list, grad: bool) -> list:
        received = [self.messages.receive_forward(self.messages.link(n), chunk.index, k) for n in chunk.layout.received]
        if self.masks is not None:
            self.masks.current = k
        with torch.set_grad_enabled(grad), regather():
            try:
                outputs = list(chunk.program(*self._args(chunk, received, micro[k], whole)))
            except RuntimeError as e:
                if "autopar" in type(e).__module__:
                    raise
                raise chunk.world.failure(f"running stage {chunk.index} forward", e) from e
        for (name, _), value in zip(chunk.layout.outputs, outputs):
            link = self.messages.link(name)
            if link is not None and link.producer == chunk.index:
                self.messages.send_forward(link, value.detach(), k)
        if grad:
            chunk.saved[k] = (received, outputs)
        return outputs

    def _backward(self, chunk: Chunk, k: int, part: str, position: int) -> None:
        """B: the whole backward of microbatch k; I then W: its input-gradient and weight-gradient passes."""
        received, outputs = chunk.saved[k]
        if part != "W":  # the gradients of what this stage sent, and the loss's seed
            pairs = []
            for (name, _), value in zip(chunk.layout.outputs, outputs):
                link = self.messages.link(name)
                if link is not None and link.producer == chunk.index and link.grad:
                    pairs.append((value, self.messages.receive_backward(link, k)))
            if chunk.index == self._loss_chunk and self.captured.has_loss:
                placed = chunk.layout.outputs[0][1]
                scale = math.prod(1 / chunk.world.axis_size(a) for a, p in enumerate(placed)
                                  if isinstance(p, Partial) and p.reduce_op == "avg")
                pairs.append((outputs[0], torch.full_like(outputs[0], scale * self._factor)))
            chunk.seeds[k] = pairs
        pairs = chunk.seeds[k]
        last = self.last_backward[chunk.index] == position
        if last and chunk.sync is not None:
            chunk.sync.start()
        leaves = [r for r in received if r.requires_grad]
        params = [h.leaf for h in chunk.holders.values() if h.leaf.requires_grad]
        tensors, grads = [t for t, _ in pairs], [g for _, g in pairs]
        try:
            if pairs and part == "B":
                torch.autograd.backward(tensors, grads)
            elif pairs and part == "I" and leaves:
                torch.autograd.backward(tensors, grads, inputs=leaves, retain_graph=True)
            elif pairs and part == "W" and params:
                torch.autograd.backward(tensors, grads, inputs=params)
        except RuntimeError as e:
            if "autopar" in type(e).__module__:
                raise
            raise chunk.world.failure(f"running stage {chunk.index} backward", e) from e
        if part != "W":
            for name, leaf in zip(chunk.layout.received, received):
                link = self.messages.link(name)
                if link.grad:
                    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                    self.messages.send_backward(link, chunk.index, grad, k)
        if part != "I":
            del chunk.saved[k], chunk.seeds[k]
        if last and chunk.sync is not None:
            chunk.sync.finish()

    def step(self, *inputs, target=None) -> torch.Tensor:
        """One training step on the whole batch (every rank passes the same batch); returns the loss."""
        check_step(self.captured, target, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        whole = [x.to(self.world.device) for x in pytree.tree_leaves((inputs, target))]
        micro = self._microbatches(whole)
        if self.masks is not None:
            self.masks.draw(self.world.device)
        losses = {}
        for position, (action, c, k) in enumerate(self.order):
            chunk = self.mine[c * self.p + self.group]
            if action == "F":
                outputs = self._forward(chunk, k, micro, whole, grad=True)
                if chunk.index == self._loss_chunk:
                    losses[k] = outputs[0].detach()
            else:
                self._backward(chunk, k, action, position)
        self.messages.wait_sends()
        self._sum_tied()
        self.step_count += 1
        self.optimizer.step()
        for chunk in self.chunks:
            for holder in chunk.holders.values():
                if holder.group is None:
                    holder.refresh()
            for group in chunk.groups:
                group.refresh()
        return self._loss(losses)

    def _loss(self, losses: dict[int, torch.Tensor]) -> torch.Tensor:
        """The step's loss on every rank: summed over microbatches on the last stage, then broadcast."""
        value = torch.zeros((), dtype=torch.float64, device=self.world.device)
        last = self.plan.stages[self._loss_chunk]
        if self._loss_chunk in self.mine:
            chunk = self.mine[self._loss_chunk]
            placed = chunk.layout.outputs[0][1]
            for k in range(self.m):
                value = value + _LossValue(losses[k], placed, chunk.world).wait().to(torch.float64)
            value = value * self._factor
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(value, src=last.mesh.devices[0])
        dtype = self.micro.nodes[self.captured.outputs[0]].outputs[0].dtype
        return value.to(dtype)

    def _sum_tied(self) -> None:
        """A parameter several stages hold: each copy's gradient becomes the sum over the stages."""
        for name, (stages, group, ranks) in self._tied.items():
            if self.rank not in ranks:
                continue
            holders = [(self.mine[j], self.mine[j].holders[name]) for j in stages if j in self.mine]
            share = None
            for chunk, h in holders:
                whole = _whole_grad(h)
                part = whole / chunk.world.size
                share = part if share is None else share + part
            dist.all_reduce(share, group=group)
            for chunk, h in holders:
                h.leaf.grad = transform(share, tuple(Replicate() for _ in h.plan.use), h.leaf_placement,
                                        chunk.world).clone()

    def __call__(self, *inputs):
        """Forward only: the model's output, whole on every rank."""
        flat = [x.to(self.world.device) for x in pytree.tree_leaves(inputs)]
        if self.captured.has_loss:
            flat += [torch.zeros(t.shape, dtype=t.dtype, device=self.world.device) for t in self._inputs[len(flat):]]
        micro = self._microbatches(flat)
        if self.masks is not None:
            self.masks.draw(self.world.device)
        produced: dict[str, list] = defaultdict(list)
        for c in range(self.plan.schedule.virtual):
            chunk = self.mine[c * self.p + self.group]
            for k in range(self.m):
                outputs = self._forward(chunk, k, micro, flat, grad=False)
                for (name, placed), value in zip(chunk.layout.outputs, outputs):
                    if name in self.captured.outputs:
                        produced[name].append(transform(value, placed, tuple(Replicate() for _ in placed),
                                                        chunk.world))
        self.messages.wait_sends()
        start = 1 if self.captured.has_loss else 0
        whole = []
        for name in self.captured.outputs[start:]:
            owner = next(j for j, s in enumerate(self.plan.stages) if name in s.nodes)
            meta = self.captured.nodes[name].outputs[0]
            value = torch.cat(produced[name], dim=0) if produced[name] else torch.empty(
                meta.shape, dtype=meta.dtype, device=self.world.device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast(value, src=self.plan.stages[owner].mesh.devices[0])
            whole.append(value)
        spec = self.captured.program.call_spec.out_spec
        if self.captured.has_loss:
            return pytree.tree_unflatten([None] + whole, spec)[1]
        return pytree.tree_unflatten(whole, spec)

    # -- state --------------------------------------------------------------------------------------

    def save(self, path):
        """As `CompiledModel.save`: each stage's ranks write the parts they hold (a tied parameter from
        the first stage holding it)."""
        from autopar.runtime import checkpoint

        return checkpoint.save(self, path)

    def load(self, path) -> int:
        """As `CompiledModel.load`: any plan's checkpoint, each stage filling the parts it holds."""
        from autopar.runtime import checkpoint

        return checkpoint.load(self, path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors, on every rank, with the keys of the model's own state_dict: each from the
        first stage that holds it."""
        out = {}
        for key in self._state_keys:
            owner, value = self._owner(key), None
            if owner is None:
                continue
            j, fetch, meta = owner
            if j in self.mine:
                value = fetch(self.mine[j]).to(self.world.device).contiguous()
            else:
                value = torch.empty(meta.shape, dtype=meta.dtype, device=self.world.device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast(value, src=self.plan.stages[j].mesh.devices[0])
            out[key] = value.cpu().clone()
        return out

    def _owner(self, key: str):
        info = self.captured.params.get(key)
        if info is not None:
            names = (key, *info.tied)
            for j, stage in enumerate(self.plan.stages):
                name = next((n for n in names if n in stage.params), None)
                if name is not None:
                    return j, lambda chunk, name=name: chunk.holders[name].full(), info.meta
            return None
        placeholder = _buffer_keys(self.captured).get(key)
        if placeholder is None:
            return None
        j = next((j for j, s in enumerate(self.plan.stages) if _reads(self.captured, s, placeholder)), 0)
        meta = self.captured.program.graph.find_nodes(op="placeholder", target=placeholder)[0].meta["val"]

        def fetch(chunk: Chunk) -> torch.Tensor:
            value = chunk.buffers[placeholder]
            placed = chunk.buffer_placements.get(key)
            if placed is None:
                return value
            mine = transform(value, tuple(Replicate() for _ in placed), placed, chunk.world)
            return transform(mine, placed, tuple(Replicate() for _ in placed), chunk.world)

        return j, fetch, meta

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self._state_keys if k not in state]
        if missing:
            raise ValueError(f"state_dict: missing key(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
        buffers = _buffer_keys(self.captured)
        for key in self._state_keys:
            info = self.captured.params.get(key)
            for chunk in self.chunks:
                if info is not None:
                    name = next((n for n in (key, *info.tied) if n in chunk.holders), None)
                    if name is not None:
                        chunk.holders[name].load(state[key])
                elif key in buffers:
                    with torch.no_grad():
                        chunk.buffers[buffers[key]].copy_(state[key])

    def dump(self, directory):
        from pathlib import Path

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        lines = [f"# rank {self.rank}: device group {self.group} of {self.p}, "
                 f"{self.plan.schedule.kind} over {self.m} microbatches",
                 "# order: " + " ".join(f"{a}{c * self.p + self.group}.{k}" for a, c, k in self.order)]
        for chunk in self.chunks:
            lines.append(f"# stage {chunk.index}: layers {chunk.stage.layers}, mesh {chunk.world.mesh.describe()}, "
                         f"receives {chunk.layout.received}, sends "
                         f"{[n for n, _ in chunk.layout.outputs if self.messages.link(n) is not None]}")
            lines += [f"#   {name}: {type(m).__name__}({m.extra_repr()})" for name, m in chunk.program.named_children()]
            lines.append(chunk.program.print_readable(print_output=False))
        out = path / f"rank{self.rank}.txt"
        out.write_text("\n".join(lines) + "\n")
        return out

    def close(self) -> None:
        for chunk in self.chunks:
            chunk.world.close()


def _whole_grad(h: Holder) -> torch.Tensor:
    grad = h.leaf.grad if h.leaf.grad is not None else torch.zeros_like(h.leaf)
    return transform(grad.contiguous(), h.leaf_placement, tuple(Replicate() for _ in h.plan.use), h.world).clone()


def _buffer_keys(captured: CapturedGraph) -> dict[str, str]:
    spec = captured.program.graph_signature
    return {fqn.removeprefix("model."): name for name, fqn in spec.inputs_to_buffers.items()}


def _reads(captured: CapturedGraph, stage: Stage, placeholder: str) -> bool:
    node = captured.program.graph.find_nodes(op="placeholder", target=placeholder)
    return bool(node) and any(u.name in stage.nodes for u in node[0].users)


def _tied_groups(plan: Plan, captured: CapturedGraph) -> dict[str, tuple[list[int], object, set[int]]]:
    """Parameters held by more than one stage: the stages, and a process group over their ranks
    (created on every rank, in one order)."""
    held: dict[str, list[int]] = defaultdict(list)
    for j, stage in enumerate(plan.stages):
        for name in stage.params:
            held[name].append(j)
    out = {}
    for name, stages in held.items():
        if len(stages) < 2:
            continue
        ranks = sorted({d for j in stages for d in plan.stages[j].mesh.devices})
        group = dist.new_group(ranks) if dist.is_initialized() and len(ranks) > 1 else None
        out[name] = (stages, group, set(ranks))
    return out
