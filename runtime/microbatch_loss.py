"""A pipelined step's loss as a sum over microbatches (`runtime.pipeline`): what each microbatch's
loss is weighted by so that their sum is the whole batch's loss."""

from __future__ import annotations

import torch

from autopar.graph import CapturedGraph

aten = torch.ops.aten
_MEANS = {aten.mean.default, aten.mean.dim}
_REDUCTION_ARG = {aten.cross_entropy_loss.default: 3, aten.mse_loss.default: 2, aten.l1_loss.default: 2,
                  aten.nll_loss.default: 3, aten.smooth_l1_loss.default: 2, aten.huber_loss.default: 2,
                  aten.binary_cross_entropy_with_logits.default: 4, aten.binary_cross_entropy.default: 3}


def microbatch_factor(captured: CapturedGraph, m: int) -> float:
    """What each microbatch's loss is weighted by so that their sum is the batch's loss: 1 for a
    sum (or a cross-entropy mean over the whole batch's count, `runtime.lower`), 1/m for a mean."""
    if m == 1:
        return 1.0
    loss = next(n for n in captured.program.graph.nodes if n.name == captured.outputs[0])
    if loss.target is aten.cross_entropy_loss.default and _counted(loss, captured):
        return 1.0
    if loss.target in _MEANS:
        return 1.0 / m
    if loss.target in _REDUCTION_ARG:
        position = _REDUCTION_ARG[loss.target]
        reduction = loss.args[position] if len(loss.args) > position else loss.kwargs.get("reduction", 1)
        return {1: 1.0 / m, 2: 1.0}.get(reduction, 0.0) or _unsupported(loss, m)
    if loss.target is aten.sum.default or loss.target is aten.sum.dim_IntList:
        return 1.0
    return _unsupported(loss, m)


def _counted(loss: torch.fx.Node, captured: CapturedGraph) -> bool:
    """The same conditions under which the lowering divides by the whole batch's target count."""
    from autopar.runtime.lower import _VIEWS

    weight = loss.args[2] if len(loss.args) > 2 else loss.kwargs.get("weight")
    reduction = loss.args[3] if len(loss.args) > 3 else loss.kwargs.get("reduction", 1)
    if weight is not None or reduction != 1:
        return False
    source = loss.args[1]
    while isinstance(source, torch.fx.Node) and source.op == "call_function" and source.target in _VIEWS:
        source = source.args[0]
    return isinstance(source, torch.fx.Node) and source.name in captured.inputs


def _unsupported(loss: torch.fx.Node, m: int) -> float:
    raise ValueError(f"loss: found {loss.target} at the end of the step, required a mean or a sum over the batch "
                     f"to split it into {m} microbatches (plan with one microbatch for other losses)")
