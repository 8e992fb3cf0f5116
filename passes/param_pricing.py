"""A unit's parameters in the sharding problem (`passes.sharding`): the storage levels a strategy may
hold them at (0 DDP, 1 ZeRO-1, 2 ZeRO-2, 3 FSDP), and what each level costs: the state it keeps,
the collectives the runtime runs for it (gradient synchronization, gathers), the optimizer's
update. Parameters travel together where the runtime sends them together: a layer's sharded
parameters in one flat collective (`runtime.groups`), data-parallel gradients in buckets
(`runtime.sync`); each pays its part of that message (`_in_flat`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from autopar.passes.rules import tensor_args
from autopar.passes.strategies import ParamSharding, Strategy, param_options, partial_on, split_axes
from autopar.passes.units import Unit
from autopar.runtime.sync import BUCKET_BYTES
from autopar.vocab import shard_count

if TYPE_CHECKING:
    from autopar.passes.sharding import Context


def count_layer_mates(ctx: Context) -> None:
    """`Context.layer_mates`, with the runtime's grouping: by layer of first use, the parameters
    used before the first layer one group and those after the last another."""
    starts = {layer.nodes[0] for layer in ctx.captured.layers}
    where, seen_layer = {}, False
    for name, node in ctx.fx_nodes.items():
        seen_layer = seen_layer or name in starts
        if node.op != "call_function" or name not in ctx.captured.nodes:
            continue
        for arg in tensor_args(node):
            param = ctx.roles.params.get(arg.name)
            if param is None or arg.name in where or not ctx.captured.params[param].requires_grad:
                continue
            layer = ctx.captured.nodes[name].layer
            where[arg.name] = layer if layer is not None else ("after" if seen_layer else "before")
    sizes: dict = {}
    numels: dict = {}
    for placeholder, key in where.items():
        sizes[key] = sizes.get(key, 0) + 1
        numels[key] = numels.get(key, 0) + _numel(ctx, placeholder)
    ctx.layer_mates.update({placeholder: sizes[key] for placeholder, key in where.items()})
    ctx.layer_numel.update({placeholder: numels[key] for placeholder, key in where.items()})
    ctx.trainable_numel = sum(numels.values())


def _numel(ctx: Context, placeholder: str) -> int:
    return ctx.captured.params[ctx.roles.params[placeholder]].meta.numel


def with_params(ctx: Context, unit: Unit, base: Strategy) -> list[Strategy]:
    """The strategy once per storage level of the parameters this unit owns (one level for all)."""
    owned = []
    for m, name in enumerate(unit.members):
        for j, arg in enumerate(tensor_args(ctx.fx_nodes[name])):
            if arg.name in ctx.roles.params and ctx.owner[arg.name][0] == unit.index:
                owned.append((m, j, arg))
    if not owned:
        return [base]
    choices = {}
    for m, j, arg in owned:
        sharding = base.members[m]
        shape = tuple(arg.meta["val"].shape)
        choices[(m, j)] = param_options(sharding.inputs[j], split_axes(sharding), shape, ctx.mesh.shape,
                                        ctx.options.levels)
    levels = sorted({o.level for opts in choices.values() for o in opts})
    out = []
    for level in levels:
        strategy = dataclasses.replace(base, params={}, collectives=list(base.collectives), buckets=dict(base.buckets))
        for (m, j, arg) in owned:
            opts = choices[(m, j)]
            pick = next((o for o in opts if o.level == level), max(opts, key=lambda o: o.level))
            strategy.params[(m, j)] = pick
            _price_param(ctx, strategy, unit.members[m], arg, pick, split_axes(base.members[m]))
        out.append(strategy)
    return out


def _price_param(ctx: Context, strategy: Strategy, name: str, arg, held: ParamSharding,
                 split: tuple[bool, ...]) -> None:
    info = ctx.captured.params[ctx.roles.params[arg.name]]
    numel = info.meta.numel
    w_bytes, g_bytes, state_bytes = ctx.param_bytes()
    shape = ctx.mesh.shape
    update = numel / shard_count(held.grad if held.level else held.use, shape)
    strategy.state += numel * w_bytes / shard_count(held.storage, shape)
    if not info.requires_grad:
        return
    strategy.state += numel * g_bytes / shard_count(held.grad if held.level >= 2 else held.use, shape)
    strategy.state += update * state_bytes
    phases = [("backward", partial_on(held.use, split), held.grad, numel * g_bytes, "sync")]
    if held.level in (1, 2):
        phases.append(("step", held.grad, held.use, numel * w_bytes, "sync"))
    if held.level == 3:  # gathered for forward, freed, gathered again for backward
        phases += [("forward", held.storage, held.use, numel * w_bytes, "gathers"),
                   ("backward", held.storage, held.use, numel * w_bytes, "gathers")]
    for phase, src, dst, nbytes, part in phases:
        if held.level == 0:  # bucketed with the others (runtime.sync): the latency is paid per bucket
            flat, latency_share = min(BUCKET_BYTES, ctx.trainable_numel * g_bytes) / nbytes, nbytes / BUCKET_BYTES
        else:  # one flat collective per layer (runtime.groups): each member pays its share of the latency
            flat, latency_share = ctx.layer_numel.get(arg.name, numel) / numel, 1 / ctx.layer_mates.get(arg.name, 1)
        for c in ctx.resharder.collectives(src, dst, nbytes):
            c = dataclasses.replace(c, time=_in_flat(ctx, c, max(flat, 1.0), latency_share))
            if held.level == 0:
                strategy.buckets[c.axis] = ctx.resharder.comm.time(c.kind, 0.0, ctx.mesh.group(c.axis))
            strategy.comm += c.time
            setattr(strategy, part, getattr(strategy, part) + c.time)
            strategy.collectives.append((name, phase, c))
    if ctx.ops is not None and ctx.ops.update is not None:  # the optimizer's step timed on the device
        strategy.optimizer += update * ctx.ops.update + ctx.ops.per_tensor
        return
    touched = 2 * (w_bytes + state_bytes) + g_bytes  # read and write weights and state, read gradients
    device = ctx.device
    strategy.optimizer += update * touched / (device.memory_bandwidth * device.bandwidth_efficiency)


def _in_flat(ctx: Context, c, flat: float, latency_share: float) -> float:
    """A parameter's part of a collective that carries it with others in one flat message `flat`
    times its size: its bytes at the flat message's time per byte beyond the latency, plus
    `latency_share` of the latency,

        t = n · (T(flat · n) − T(0)) / (flat · n) + share · T(0)

    T the collective's time (`CommModel`); for T = α + nβ this is nβ + share · α. A profiled T
    follows measured points (`cost.profile.CollectiveFit`), flat up to about a MiB on gloo, so a
    small parameter priced alone at T(n) − T(0) would pay nothing for its bytes, and one at T(n)
    the whole latency again."""
    group = ctx.mesh.group(c.axis)
    latency = ctx.resharder.comm.time(c.kind, 0.0, group)
    whole = c.bytes * flat
    if whole <= 0:
        return latency * latency_share
    return c.bytes * (ctx.resharder.comm.time(c.kind, whole, group) - latency) / whole + latency * latency_share
