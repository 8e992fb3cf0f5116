"""A compiled model: the lowered program on this rank, its parameters, optimizer and I/O.

Takes what `autopar.compile` prepared; gives `step` (forward, loss, backward, gradient
synchronization and the optimizer step, as the plan says), forward-only calls, whole-tensor state
dicts with the model's own keys, and per-rank dumps of the lowered program.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Partial, Replicate
from torch.utils import _pytree as pytree

from autopar.graph import CapturedGraph
from autopar.plan import Plan
from autopar.runtime.collectives import transform
from autopar.runtime.params import Holder, regather
from autopar.runtime.scaler import LossScaler
from autopar.runtime.sync import GradientSync, bucketed
from autopar.runtime.world import World


class CompiledModel:
    def __init__(self, *, captured: CapturedGraph, plan: Plan, world: World, holders: dict[str, Holder],
                 groups: list, program: torch.fx.GraphModule, layout, buffers: dict[str, torch.Tensor],
                 buffer_placements: dict[str, tuple], state_keys: list[str], optimizer_factory=None) -> None:
        self.captured, self.plan, self.world, self.holders, self.groups = captured, plan, world, holders, groups
        self.program, self.layout = program, layout
        self._buffers, self._buffer_placements, self._state_keys = buffers, buffer_placements, state_keys
        leaves = [holders[n].leaf for n in sorted(holders) if holders[n].leaf.requires_grad]
        self.optimizer = optimizer_factory(leaves) if optimizer_factory is not None else None
        order = [holders[n] for n in layout.params]  # first use first: buckets fill in reverse
        self.sync = GradientSync([h for h in order if bucketed(h)], world) if world.size > 1 else None
        self._inputs = [captured.program.graph.find_nodes(op="placeholder", target=n)[0].meta["val"]
                        for n, _ in layout.inputs]
        self.scaler = LossScaler() if plan.precision == "fp16" else None
        """fp16: dynamic loss scaling (`runtime.scaler`); bf16 has fp32's range and needs none."""
        self.step_count = 0
        """Training steps taken (restored by `load`)."""

    # -- running ----------------------------------------------------------------------------------

    def optimizer_leaves(self) -> list[torch.Tensor]:
        return [leaf for group in self.optimizer.param_groups for leaf in group["params"]]

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameter leaves (what the optimizer updates)."""
        return [self.holders[n].leaf for n in sorted(self.holders)]

    def _locals(self, flat: list) -> list[torch.Tensor]:
        if len(flat) != len(self._inputs):
            others = sorted({type(x).__name__ for x in flat if not isinstance(x, torch.Tensor)})
            found = f"{len(flat)} value(s)" + (f", not all tensors ({', '.join(others)})" if others else " (tensors)")
            raise ValueError(f"inputs: found {found}, required {len(self._inputs)} tensor(s) as traced "
                             f"(the model's inputs{', then the target' if self.captured.has_loss else ''})")
        local = []
        for i, (x, traced, (_, placed)) in enumerate(zip(flat, self._inputs, self.layout.inputs)):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(traced.shape) or x.dtype != traced.dtype:
                found = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"input {i}: found {found}, required {tuple(traced.shape)} {traced.dtype} "
                                 f"(the shape the plan was made for; plan again for other shapes)")
            local.append(transform(x.to(self.world.device), tuple(Replicate() for _ in placed), placed, self.world))
        return local

    def program_args(self, flat: list) -> list[torch.Tensor]:
        """The lowered program's arguments for the whole inputs `flat`: parameter leaves, buffers,
        this rank's input shards, then the whole batch's target counts (`Layout.counts`)."""
        args = [self.holders[n].leaf for n in self.layout.params] + [self._buffers[n] for n in self.layout.buffers]
        args += self._locals(flat)
        names = [name for name, _ in self.layout.inputs]
        for source, ignore in self.layout.counts:
            whole = flat[names.index(source)]
            args.append((whole != ignore).sum().to(torch.float64).to(self.world.device))
        return args

    def _run(self, flat: list, grad: bool):
        args = self.program_args(flat)
        with torch.set_grad_enabled(grad), regather():
            try:
                return self.program(*args)
            except RuntimeError as e:
                if "autopar" in type(e).__module__:
                    raise
                raise self.world.failure("running the forward pass", e) from e

    def step(self, *inputs, target=None) -> torch.Tensor:
        """One training step on the whole batch (every rank passes the same batch); returns the loss."""
        check_step(self.captured, target, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self._run(pytree.tree_leaves((inputs, target)), grad=True)
        loss, placed = outputs[0], self.layout.outputs[0][1]
        scale = math.prod(1 / self.world.axis_size(a) for a, p in enumerate(placed)
                          if isinstance(p, Partial) and p.reduce_op == "avg")
        value = _LossValue(loss.detach(), placed, self.world)  # reduced while backward runs
        if self.sync is not None:
            self.sync.start()
        try:
            loss.backward(torch.full_like(loss, scale * (self.scaler.scale if self.scaler else 1.0)))
        except RuntimeError as e:
            raise self.world.failure("running the backward pass", e) from e
        if self.sync is not None:
            self.sync.finish()
        self.step_count += 1
        if self.scaler is not None:
            finite = self.scaler.unscale(self.optimizer_leaves(), self.world.device)
            self.scaler.update(finite)
            if not finite:  # every rank skips: the gradients overflowed somewhere
                return value.wait()
        self.optimizer.step()
        for holder in self.holders.values():
            if holder.group is None:
                holder.refresh()
        for group in self.groups:
            group.refresh()
        return value.wait()

    def __call__(self, *inputs):
        """Forward only: the model's output, whole on every rank."""
        flat = pytree.tree_leaves(inputs)
        if self.captured.has_loss:  # the loss is part of the program: feed it a placeholder target
            traced = self._inputs[len(flat):]
            flat += [torch.zeros(t.shape, dtype=t.dtype) for t in traced]
        outputs = self._run(flat, grad=False)
        start = 1 if self.captured.has_loss else 0
        whole = [transform(v, placed, tuple(Replicate() for _ in placed), self.world)
                 for v, (_, placed) in zip(outputs[start:], self.layout.outputs[start:])]
        spec = self.captured.program.call_spec.out_spec
        if self.captured.has_loss:
            return pytree.tree_unflatten([None] + whole, spec)[1]
        return pytree.tree_unflatten(whole, spec)

    # -- state --------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """A checkpoint of parameters, optimizer state, step count and plan, as this plan shards them
        (`runtime.checkpoint`); every rank calls. Atomic: a crash mid-save keeps the previous one."""
        from autopar.runtime import checkpoint

        return checkpoint.save(self, path)

    def load(self, path: str | os.PathLike) -> int:
        """Fill this model from a checkpoint saved under any plan and world size; returns its step count."""
        from autopar.runtime import checkpoint

        return checkpoint.load(self, path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors, on every rank, with the keys of the model's own state_dict."""
        out = {}
        for key in self._state_keys:
            holder = self._holder(key)
            if holder is not None:
                out[key] = holder.full().cpu()
            elif key in self._buffer_placements:
                placed = self._buffer_placements[key]
                mine = transform(self._buffers[self._buffer_name(key)], _whole(placed), placed, self.world)
                out[key] = transform(mine, placed, _whole(placed), self.world).cpu().clone()
            elif self._buffer_name(key) is not None:
                out[key] = self._buffers[self._buffer_name(key)].cpu().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self._state_keys if k not in state]
        if missing:
            raise ValueError(f"state_dict: missing key(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
        for key in self._state_keys:
            holder = self._holder(key)
            if holder is not None:
                holder.load(state[key])
            elif self._buffer_name(key) is not None:
                with torch.no_grad():
                    self._buffers[self._buffer_name(key)].copy_(state[key])

    def _holder(self, key: str) -> Holder | None:
        if key in self.holders:
            return self.holders[key]
        info = self.captured.params.get(key)
        return next((self.holders[t] for t in info.tied if t in self.holders), None) if info else None

    def _buffer_name(self, key: str) -> str | None:
        return self._buffer_keys().get(key)

    def _buffer_keys(self) -> dict[str, str]:
        spec = self.captured.program.graph_signature
        return {fqn.removeprefix("model."): name for name, fqn in spec.inputs_to_buffers.items()}

    # -- inspection ---------------------------------------------------------------------------------

    def dump(self, directory: str | os.PathLike) -> Path:
        """This rank's lowered program, as text: every collective an explicit module call."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        lines = [f"# rank {self.world.rank} of {self.world.size}, mesh coordinate {self.world.coordinate}",
                 "# modules (collectives and kernels):"]
        lines += [f"#   {name}: {type(m).__name__}({m.extra_repr()})" for name, m in self.program.named_children()]
        lines.append(self.program.print_readable(print_output=False))
        out = path / f"rank{self.world.rank}.txt"
        out.write_text("\n".join(lines) + "\n")
        return out

    def close(self) -> None:
        self.world.close()


class _LossValue:
    """The step's loss made whole on every rank: the first axis's all-reduce starts at once and is
    waited for last (it runs while backward does); further axes follow it, one at a time, since
    collectives on one buffer must not overlap."""

    def __init__(self, loss: torch.Tensor, placed: tuple, world: World) -> None:
        self.value, self.world, self.work = loss.clone(), world, None
        self.axes = [a for a, p in enumerate(placed) if isinstance(p, Partial) and world.axis_size(a) > 1]
        self.scale = math.prod(1 / world.axis_size(a) for a in self.axes if placed[a].reduce_op == "avg")
        if self.axes:
            self.work = dist.all_reduce(self.value, group=world.groups[self.axes[0]], async_op=True)

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        for a in self.axes[1:]:
            dist.all_reduce(self.value, group=self.world.groups[a])
        return self.value * self.scale if self.scale != 1.0 else self.value


def _whole(placed: tuple) -> tuple:
    return tuple(Replicate() for _ in placed)


def check_step(captured, target, optimizer) -> None:
    """What `step` needs: a loss, the batch's targets and an optimizer; ValueError naming the missing one."""
    if not captured.has_loss:
        raise ValueError("step: found a model compiled without loss_fn, required one (compile with loss_fn=)")
    if target is None:
        raise ValueError("step: found no target, required target=<the batch's targets>")
    if optimizer is None:
        raise ValueError("step: found no optimizer, required compile(..., optimizer=lambda ps: ...)")
