"""`quantize=` on `autopar.plan` and `autopar.compile`: which scheme each linear layer gets.

    quantize="int8"                      every replaceable Linear (`replaced_linears`) in one scheme
    quantize={"layers.0.ffn.fc1": "int4", ...}   per layer ("none" keeps a layer float)
    quantize="auto", quantize_budget=B   HAWQ-V3 (`plan_bits`): 4, 8 or 16 bits per layer, the least
                                         sensitivity-weighted error whose weights fit in B bytes,
                                         sensitivity measured as the loss increase on the example
                                         batch with one layer quantized at a time (no second
                                         derivatives: attention kernels have none on every device);
                                         4 bits is "int4" and 8 is "int8" (per output channel, the
                                         format `plan_bits` prices), 16 keeps the layer float

The chosen layers are recorded in the plan (`Plan.quantized`), so `compile(plan=...)` rebuilds the
same graph.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from autopar.quant.bits import plan_bits
from autopar.quant.modules import SCHEMES, get_scheme, replaced_linears

BITS_TO_SCHEME = {4: "int4", 8: "int8", 16: "none"}


def layer_schemes(model: nn.Module, quantize, *, budget: float | None = None, batches: list | None = None,
                  loss_fn: Callable | None = None) -> dict[str, str]:
    """Layer → scheme for the `quantize` argument (empty: nothing quantized)."""
    if quantize is None or quantize == "none":
        return {}
    layers = [name for name, _ in replaced_linears(model)]
    if isinstance(quantize, dict):
        return {name: scheme for name, scheme in quantize.items() if scheme != "none"}
    if quantize != "auto":
        get_scheme(quantize)
        return {name: quantize for name in layers}
    if budget is None:
        raise ValueError("quantize='auto': found no quantize_budget, required the bytes the linear layers' "
                         "weights may take")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("quantize='auto': found a model on the meta device, required real weights (each layer's "
                         "sensitivity is measured on them); give a scheme by name to plan on meta")
    if loss_fn is None or not batches:
        raise ValueError("quantize='auto': found no loss_fn and target, required both (sensitivity is the "
                         "loss increase on the example batch)")
    chosen = plan_bits(model, batches, loss_fn, budget, layers=layers, choices=tuple(BITS_TO_SCHEME),
                       method="perturbation")
    return {name: BITS_TO_SCHEME[bits] for name, bits in chosen.bits.items() if bits != 16}


__all__ = ["BITS_TO_SCHEME", "SCHEMES", "layer_schemes"]
