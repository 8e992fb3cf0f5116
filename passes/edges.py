"""Edges of the sharding problem: what it costs to move tensors from one unit to another.

Takes the units and their strategies; gives `EdgeTable`s. For a tensor leaving unit V in
placement a and entering unit U in placement b, the cost is the forward reshard a → b plus, when a
gradient flows back, the backward reshard from the gradient's placement at U's op to a with
partial made replicated (`passes.reshard`). Tied parameters are edges too: from the unit that holds
the parameter to each other unit that uses it, priced as the runtime moves it (`runtime.lower`):
forward from the placement its first use takes it in (an FSDP parameter is gathered once, for its
first use), and each use's gradient back to the placement the first use's gradient comes out in
(partial where that op splits the batch), where autograd sums them before the parameter's one
synchronization (`passes.param_pricing`: a bucketed all-reduce, a reduce-scatter), not once per use.
A tensor computed from parameters alone (a position embedding, a weight's bf16 copy) whose
parameters the chosen strategy keeps at DDP level has its partial gradient left partial on the
axes where they are whole (`gradient_target`): the runtime reduces it with their gradients in
the bucket, as DDP does. (The bucket's share of their bytes is not added to those parameters,
whose gradient the price otherwise takes as whole.)

Strategies that present the same placements on an edge are one *class*: the table is priced per
pair of classes, which keeps it (and the ILP's edge variables) small. All the occurrences of an
edge between units that identical layers share are one table with a count.

A tensor read by k units runs its reshard once, not k times: the runtime makes one reshard per
(tensor, placements) and autograd sums the k gradients before its backward (Megatron-LM's f
operator: attention's q, k and v projections share one all-reduce of the input's gradient). Each
of the k edges is priced at 1/k of its reshard, exact when the readers take the tensor in one
placement, as the layers of a tensor-parallel block do (readers that disagree each run their own
reshard, which this prices low).
"""

from __future__ import annotations

from torch.distributed.tensor import Partial, Replicate

from autopar.passes.rules import tensor_args
from autopar.passes.sharding import Context, EdgeTable
from autopar.passes.strategies import Strategy, grads_of, normalized
from autopar.passes.units import Unit, deferrable


def gradient_target(produced, grad, deferrable_axes: frozenset = frozenset()):
    """Where a tensor's gradient goes back to from a reader's op: its producer's placement with
    partial made whole, except on `deferrable_axes` (a parameter-only tensor whose parameters are
    bucketed, `bucketed_axes`), where a partial gradient stays partial."""
    back = normalized(produced)
    return tuple(g if a in deferrable_axes and isinstance(g, Partial) and isinstance(b, Replicate) else b
                 for a, (g, b) in enumerate(zip(grad, back)))


def _descriptors(ctx: Context, units: list[Unit], unit_of: dict[str, int]) -> dict[tuple, list]:
    """(canonical source, canonical target, tensors) → per occurrence, its (source, target) units and
    the instance nodes behind it."""
    found: dict[tuple, list] = {}
    for unit in units:
        per_source: dict[int, list[tuple]] = {}
        for m, name in enumerate(unit.members):
            node = ctx.fx_nodes[name]
            follows = unit.sources.get(name, (None,))[0] if m > 0 else None
            for j, arg in enumerate(tensor_args(node)):
                if arg.name in ctx.roles.activations and arg.name != follows:
                    source = unit_of[arg.name]
                    if source == unit.index:
                        continue
                    position = units[source].members.index(arg.name)
                    per_source.setdefault(source, []).append(("act", position, m, j, _deferred(ctx, arg, source),
                                                              arg.name))
                elif arg.name in ctx.roles.params:
                    owner, mo, jo = ctx.owner[arg.name]
                    if owner != unit.index:
                        per_source.setdefault(owner, []).append(("param", mo, jo, m, j, arg.name))
        for source, tensors in per_source.items():
            key = (units[source].canonical, unit.canonical, tuple(t[:-1] for t in tensors))
            found.setdefault(key, []).append(((source, unit.index), [t[-1] for t in tensors]))
    return found


def build_edges(ctx: Context, units: list[Unit], unit_of: dict[str, int],
                strategies: dict[int, list[Strategy]]) -> list[EdgeTable]:
    described = _descriptors(ctx, units, unit_of)
    readers: dict[str, int] = {}  # activation → units that read it over an edge
    for (_, _, tensors), occurrences in described.items():
        for _, names in occurrences:
            for t, name in zip(tensors, names):
                if t[0] == "act":
                    readers[name] = readers.get(name, 0) + 1
    edges = []
    for (src, dst, tensors), occurrences in described.items():
        names = occurrences[0][1]
        rows, row_keys = _classes([_row_key(s, tensors) for s in strategies[src]])
        cols, col_keys = _classes([_col_key(s, tensors) for s in strategies[dst]])
        # Each tensor's part depends only on its own placements: price those pairs once.
        parts = [{} for _ in tensors]
        cost = []
        for rk in row_keys:
            row = []
            for ck in col_keys:
                total = 0.0
                for k, (t, name, produced, needed) in enumerate(zip(tensors, names, rk, ck)):
                    found = parts[k].get((produced, needed))
                    if found is None:
                        found = parts[k][(produced, needed)] = (_price(ctx, t, name, produced, needed)
                                                                / readers.get(name, 1))
                    total += found
                row.append(total)
            cost.append(row)
        edges.append(EdgeTable(src=src, dst=dst, count=len(occurrences), rows=rows, cols=cols, cost=cost,
                               occurrences=[pair for pair, _ in occurrences]))
    return edges


def _classes(keys: list) -> tuple[list[int], list]:
    index: dict = {}
    classes = [index.setdefault(k, len(index)) for k in keys]
    return classes, list(index)


def _deferred(ctx: Context, arg, source: int) -> tuple | None:
    """Where in the source unit the parameters of a parameter-only tensor are held ((member,
    argument) pairs), when the runtime may leave its gradient partial for their buckets
    (`passes.units.deferrable`) and the unit holds them all; else None."""
    if arg.name not in ctx.deferrable:
        ctx.deferrable[arg.name] = deferrable(ctx.captured, ctx.roles, arg)
    params = ctx.deferrable[arg.name]
    if not params or any(ctx.owner[p][0] != source for p in params):
        return None
    return tuple(sorted(ctx.owner[p][1:] for p in params))


def bucketed_axes(held: list) -> frozenset:
    """The mesh axes on which a deferrable tensor's gradient may stay partial, given how its
    parameters are held (each with a `level` and a `use`; None where unknown): all kept at DDP
    level (bucketed) and used whole there (`runtime.lower`)."""
    if not held or any(h is None or h.level != 0 for h in held):
        return frozenset()
    return frozenset(a for a in range(len(held[0].use)) if all(isinstance(h.use[a], Replicate) for h in held))


def _row_key(strategy: Strategy, tensors: tuple) -> tuple:
    key = []
    for t in tensors:
        if t[0] == "act":
            key.append((strategy.members[t[1]].outputs[0],
                        bucketed_axes([strategy.params[at] for at in t[4]]) if t[4] else frozenset()))
        else:
            held = strategy.params[(t[1], t[2])]
            key.append((held.use, grads_of(strategy.members[t[1]])[t[2]]))
    return tuple(key)


def _col_key(strategy: Strategy, tensors: tuple) -> tuple:
    key = []
    for t in tensors:
        m, j = (t[2], t[3]) if t[0] == "act" else (t[3], t[4])
        sharding = strategy.members[m]
        key.append((sharding.inputs[j], grads_of(sharding)[j]))
    return tuple(key)


def _price(ctx: Context, t: tuple, name: str, produced, needed_and_grad) -> float:
    """One tensor's forward reshard and its gradient's backward reshard."""
    needed, grad = needed_and_grad
    if t[0] == "act":
        produced, deferrable_axes = produced
        nbytes = ctx.nbytes(name)
        total = ctx.resharder.time(produced, needed, nbytes)
        flows = ctx.captured.nodes[name].requires_grad
        back = gradient_target(produced, grad, deferrable_axes) if flows else normalized(produced)
        if flows:
            total += ctx.resharder.time(grad, back, nbytes)
        return total + ctx.reshard_node(produced, needed, grad if flows else None, back)
    w_bytes, g_bytes, _ = ctx.param_bytes()
    use, raw = produced  # as the first use takes it, and its gradient there
    param = ctx.captured.params[ctx.roles.params[name]]
    total = ctx.resharder.time(use, needed, param.meta.numel * w_bytes)
    if param.requires_grad:
        total += ctx.resharder.time(grad, raw, param.meta.numel * g_bytes)
    return total + ctx.reshard_node(use, needed, grad if param.requires_grad else None, raw)
