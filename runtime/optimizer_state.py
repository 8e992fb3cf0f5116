"""An optimizer's state before a checkpoint is loaded into it.

Takes a torch optimizer over this rank's parameter leaves and what the checkpoint holds for each
parameter (`optim/<parameter>/<state name>` keys); makes the optimizer hold state of the same names,
so that loading fills it in place, and restores the hyperparameters saved with it.

torch's optimizers create their state lazily, at the first step: a freshly compiled model's
optimizer has nothing to load into. As `torch.distributed.checkpoint.state_dict` does, one step
with zero gradients and learning rate 0 creates the state without moving a parameter (AdamW:
the update and the decoupled weight decay are both scaled by the learning rate); the values are
then overwritten by the load. A parameter the checkpoint has no state for (saved before any step)
gets none, so the next step starts it afresh, as it would have.
"""

from __future__ import annotations

import logging

import torch

from autopar.runtime.checkpoint_format import CheckpointError

logger = logging.getLogger(__name__)
OPTIM = "optim/"


def saved_states(tensors: dict) -> dict[str, set[str]]:
    """Per parameter, the names of the optimizer state saved for it ("exp_avg", "step", ...)."""
    out: dict[str, set[str]] = {}
    for key in tensors:
        if key.startswith(OPTIM):
            name, state = key[len(OPTIM):].rsplit("/", 1)
            out.setdefault(name, set()).add(state)
    return out


def param_of(key: str) -> str:
    """The parameter an `optim/<parameter>/<state>` key belongs to."""
    return key[len(OPTIM):].rsplit("/", 1)[0]


def materialize(optimizer: torch.optim.Optimizer, leaves: dict[str, torch.Tensor], saved: dict[str, set[str]]) -> None:
    """Give every leaf the state names the checkpoint has for it (none where it has none)."""
    if any(name in saved and not optimizer.state.get(leaf) for name, leaf in leaves.items()):
        _zero_step(optimizer)
    for name, leaf in leaves.items():
        if name not in saved:
            optimizer.state.pop(leaf, None)
            continue
        have = set(optimizer.state.get(leaf, {}))
        if have != saved[name]:
            raise CheckpointError(f"{OPTIM}{name}: found optimizer state {sorted(saved[name])} in the checkpoint, "
                                  f"required {sorted(have)} (this optimizer's; another optimizer was saved?)")


def _zero_step(optimizer: torch.optim.Optimizer) -> None:
    """One step with zero gradients at learning rate 0; gradients and learning rates are put back."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params]
    rates = [g.get("lr") for g in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            if "lr" in g:
                g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        with torch.no_grad():
            optimizer.step()
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad
        for g, rate in zip(optimizer.param_groups, rates):
            if rate is not None:
                g["lr"] = rate


def restore_hyperparameters(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    """The saved numbers of each parameter group (learning rate, betas, ...), as `Optimizer.load_state_dict` does."""
    if len(groups) != len(optimizer.param_groups):
        logger.warning("optimizer: the checkpoint has %d parameter group(s), this optimizer %d; its "
                       "hyperparameters are kept", len(groups), len(optimizer.param_groups))
        return
    for group, saved in zip(optimizer.param_groups, groups):
        for key, value in saved.items():
            if key in group and not isinstance(group[key], torch.Tensor):
                group[key] = tuple(value) if isinstance(group[key], tuple) else value
