"""Edges of the sharding problem: what it costs to move tensors from one unit to another.

Takes the units and their strategies; gives `EdgeTable`s. For a tensor leaving unit V in
placement a and entering unit U in placement b, the cost is the forward reshard a → b plus, when a
gradient flows back, the backward reshard from the gradient's placement at U's op to a with
partial made replicated (`passes.reshard`). Tied parameters are edges too: from the unit that holds
the parameter (storage, gradient placement) to each other unit that uses it.

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

from autopar.passes.rules import tensor_args
from autopar.passes.sharding import Context, EdgeTable
from autopar.passes.strategies import Strategy, grads_of, normalized
from autopar.passes.units import Unit


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
                    per_source.setdefault(source, []).append(("act", position, m, j, arg.name))
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


def _row_key(strategy: Strategy, tensors: tuple) -> tuple:
    key = []
    for t in tensors:
        if t[0] == "act":
            key.append(strategy.members[t[1]].outputs[0])
        else:
            held = strategy.params[(t[1], t[2])]
            key.append((held.storage, held.grad))
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
        nbytes = ctx.nbytes(name)
        total = ctx.resharder.time(produced, needed, nbytes)
        flows = ctx.captured.nodes[name].requires_grad
        if flows:
            total += ctx.resharder.time(grad, normalized(produced), nbytes)
        return total + ctx.reshard_node(produced, needed, grad if flows else None, normalized(produced))
    w_bytes, g_bytes, _ = ctx.param_bytes()
    storage, grad_target = produced
    param = ctx.captured.params[ctx.roles.params[name]]
    total = ctx.resharder.time(storage, needed, param.meta.numel * w_bytes)
    if param.requires_grad:
        total += ctx.resharder.time(grad, grad_target, param.meta.numel * g_bytes)
    return total
