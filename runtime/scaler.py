"""Dynamic loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision Training").

fp16 holds magnitudes down to about 6e-8 (subnormal) and up to 65504: small gradients underflow
unless the loss is scaled up before backward, and a scale too large overflows. The scale adapts:

    start S = 2^16;  backward on S·loss;  gradients divided by S before the optimizer step;
    a non-finite gradient on any rank: skip the step everywhere, S ← S/2;
    2000 finite steps in a row: S ← 2·S.

The skip must be agreed: every rank learns whether any rank saw inf/nan (one all-reduce of a flag
over the world), so that all of them step or none does and the replicas stay equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class LossScaler:
    scale: float = 2.0 ** 16
    growth: float = 2.0
    backoff: float = 0.5
    interval: int = 2000
    good_steps: int = 0
    skipped: int = 0
    """Steps skipped so far (a gradient was inf or nan on some rank)."""

    def unscale(self, leaves: list[torch.Tensor], device: torch.device, group=None) -> bool:
        """Divides the leaves' gradients by the scale; True when they are finite on every rank."""
        finite = True
        for leaf in leaves:
            if leaf.grad is not None:
                leaf.grad.div_(self.scale)
                finite = finite and bool(torch.isfinite(leaf.grad).all())
        flag = torch.tensor([0.0 if finite else 1.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return flag.item() == 0.0

    def update(self, finite: bool) -> None:
        """The scale after a step: halved on overflow, doubled after `interval` good steps."""
        if not finite:
            self.scale *= self.backoff
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps == self.interval:
            self.scale *= self.growth
            self.good_steps = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.good_steps, self.skipped = float(state["scale"]), int(state["good_steps"]), int(state["skipped"])
