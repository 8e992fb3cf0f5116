"""Mixed-precision bit widths per layer, HAWQ-V3 style: takes a model, a few (inputs, target) batches
and a loss; gives each nn.Linear weight a bit width so that the weights fit a memory budget and the
predicted loss increase is least.

Seed 000 ("Mixed-Precision Quantization", "Design Space", "Design Automation"): layers differ in how
much precision they need, so the bit width is chosen per layer. The sensitivity of layer i at b bits
is HAWQ-V2's (Dong et al. 2020)

    Ω_i(b) = Tr(H_i) / n_i · ‖Q_b(W_i) − W_i‖²

with H_i the Hessian of the loss w.r.t. the n_i weights of layer i (its trace by Hutchinson's method)
and Q_b symmetric per-output-channel quantization; or, measured, the loss increase with layer i alone
quantized. The choice is HAWQ-V3's integer program (Yao et al. 2021), x[i, b] ∈ {0, 1}:

    minimize   Σ_i Σ_b Ω_i(b) · x[i, b]
    subject to Σ_b x[i, b] = 1                                   (one bit width per layer)
               Σ_i Σ_b bytes_i(b) · x[i, b] ≤ budget_bytes
               Σ_i Σ_b latency_i(b) · x[i, b] ≤ latency_budget   (optional)

    >>> plan = plan_bits(model, [(x, y)], nn.functional.mse_loss, budget_bytes=600_000)
    >>> plan.bits                 # qualified name → bits, e.g. {'0': 8, '2': 4, '4': 16}
    >>> print(plan.summary())
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from autopar.errors import InfeasibleError
from autopar.passes.ilp import _Model, _run
from autopar.quant.checks import MAX_BITS, MIN_BITS, check_positive_int
from autopar.quant.linear import quantize
from autopar.quant.packing import packed_nbytes
from autopar.units import fmt_bytes

logger = logging.getLogger(__name__)

UNQUANTIZED = 16
"""The bit width that means "kept in fp16/bf16": 2 bytes per weight, no scale, counted as no error."""
SCALE_BYTES = 4
"""One fp32 scale per output channel: the default `scale_dtype` of `quantize`."""
METHODS = ("hessian", "perturbation")
_TIME_LIMIT = 60.0  # seconds; the programs have a few binaries per layer and solve in milliseconds

Batch = tuple[tuple, object]  # (model inputs, target)


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerSensitivity:
    """One layer's row of the integer program."""

    shape: tuple[int, ...]
    """The weight's shape (out_features, in_features): the bytes per bit width follow from it."""
    errors: dict[int, float]
    """Bit width → Ω, the predicted loss increase of quantizing this layer alone (0 at 16 bits)."""
    trace: float | None = None
    """Tr(H_i), the Hutchinson estimate (method "hessian"); None for "perturbation"."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BitPlan:
    """Bits per layer chosen by `plan_bits`, with what they cost and what they are predicted to lose."""

    bits: dict[str, int]
    layer_bytes: dict[str, int]
    """Bytes of each layer's weight at its bit width (`layer_bytes`)."""
    nbytes: int
    """Their sum, at most `budget_bytes`."""
    budget_bytes: float
    error: float
    """Σ Ω_i(bits_i): the predicted loss increase, summed over layers as HAWQ-V3's objective does."""
    method: str
    sensitivity: dict[str, LayerSensitivity]

    def summary(self) -> str:
        full = sum(layer_bytes(s.shape, UNQUANTIZED) for s in self.sensitivity.values())
        lines = [f"mixed precision ({self.method}): {fmt_bytes(self.nbytes)} of a {fmt_bytes(self.budget_bytes)} "
                 f"budget ({full / self.nbytes:.2f}× smaller than 16-bit), predicted loss increase {self.error:.3g}",
                 f"  {'layer':<20} {'shape':>12} {'bits':>4} {'bytes':>10} {'Ω':>10}"]
        for name, bits in self.bits.items():
            shape = "×".join(map(str, self.sensitivity[name].shape))
            lines.append(f"  {name or '(model)':<20} {shape:>12} {bits:>4} {fmt_bytes(self.layer_bytes[name]):>10} "
                         f"{self.sensitivity[name].errors[bits]:>10.3g}")
        return "\n".join(lines)


def layer_bytes(shape: tuple[int, ...], bits: int) -> int:
    """Bytes of one weight of `shape` at `bits`: ceil(n·b / 8) packed values plus one fp32 scale per
    output channel (shape[0]), which is `quantize(w, b, granularity="channel", axis=0).nbytes`; at 16
    bits the unquantized fp16/bf16 weight, 2n bytes. Biases are not counted.

        >>> layer_bytes((64, 128), 4)     # 64·128·4/8 + 64·4
        4352
    """
    n = math.prod(shape)
    return 2 * n if bits == UNQUANTIZED else packed_nbytes(n, bits) + SCALE_BYTES * shape[0]


def quantization_error(w: torch.Tensor, bits: int) -> float:
    """‖Q_b(W) − W‖² with Q_b symmetric per output channel (axis 0, fp32 scales); 0 at 16 bits."""
    if bits == UNQUANTIZED:
        return 0.0
    w = w.detach()
    q = quantize(w, bits, scheme="symmetric", granularity="channel", axis=0)
    return float((q.dequantize().double() - w.double()).pow(2).sum())


def hessian_trace(model: nn.Module, batches: Iterable, loss_fn: Callable, *, layers=None, samples: int = 32,
                  seed: int = 0) -> dict[str, float]:
    """Tr(H_i) per nn.Linear weight by Hutchinson's method, as HAWQ-V2 (Dong et al. 2020) estimates it:
    Tr(H) = E[vᵀHv] for v with independent ±1 entries, here the mean of vᵀ(Hv) over `samples` draws per
    batch (Hv by double backward) and over the batches, so the Hessian is that of the mean loss. Each
    layer's diagonal block H_i gets its own v and its own product H_i v, so no cross-layer term adds
    noise: one draw has variance 2 Σ_{j≠k} (H_i)_jk², and the estimate is exact when H_i is diagonal.
    The draws come from a CPU generator seeded with `seed`.

        >>> hessian_trace(model, [(x, y)], nn.functional.mse_loss, samples=64)   # {name: Tr(H_i)}
    """
    check_positive_int(samples, "samples")
    weights = {name: m.weight for name, m in _linear_layers(model, layers).items()}
    data = _batches(batches)
    generator = torch.Generator().manual_seed(seed)
    totals = dict.fromkeys(weights, 0.0)
    grad_flags = [w.requires_grad for w in weights.values()]
    try:
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for inputs, target in data:
                loss = loss_fn(model(*inputs), target)
                grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True, allow_unused=True)
                for _ in range(samples):
                    for (name, w), g in zip(weights.items(), grads):
                        totals[name] += _quadratic_form(w, g, generator)
    finally:
        for w, flag in zip(weights.values(), grad_flags):
            w.requires_grad_(flag)
    return {name: total / (samples * len(data)) for name, total in totals.items()}


def _quadratic_form(w: torch.Tensor, g: torch.Tensor | None, generator: torch.Generator) -> float:
    """vᵀ H v for one Rademacher v, H the Hessian block of `w` (g = ∂loss/∂w with its graph)."""
    v = (torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w.dtype).to(w.device)
    if g is None or not g.requires_grad:  # the loss is at most linear in w: H = 0
        return 0.0
    (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True, allow_unused=True)
    return 0.0 if hv is None else float((v.double() * hv.double()).sum())


def sensitivity(model: nn.Module, batches: Iterable, loss_fn: Callable, *, layers=None,
                bits: Iterable[int] = (4, 8), method: str = "hessian", samples: int = 32,
                seed: int = 0) -> dict[str, LayerSensitivity]:
    """Ω_i(b) for each nn.Linear i (by qualified name) and each b in `bits`.

    `batches` holds (inputs, target) pairs, inputs a tensor or a tuple of them; the loss of one is
    `loss_fn(model(*inputs), target)`, and Ω refers to their mean. `layers` is None (every nn.Linear),
    a list of names, or a predicate `(name, module) -> bool`. Methods:

    - "hessian": Ω = Tr(H_i)/n_i · ‖Q_b(W_i) − W_i‖² (HAWQ-V2, Dong et al. 2020; HAWQ-V3, Yao et al.
      2021), Tr(H_i) from `hessian_trace(samples=, seed=)`.
    - "perturbation": Ω = L(W with layer i at b bits) − L(W), measured one layer at a time: exact for
      the per-layer objective, one forward pass over the batches per layer and bit width.

    Negative values (a trace estimate below zero, a loss that quantizing lowered on these batches) count
    as 0: the objective adds layers' Ω up, and a gain that is noise would buy fewer bits.
    """
    bits = _check_choices(bits, "bits")
    if method not in METHODS:
        raise ValueError(f"method: found {method!r}, required one of {', '.join(map(repr, METHODS))}")
    chosen = _linear_layers(model, layers)
    data = _batches(batches)
    if method == "perturbation":
        return _perturbation(model, chosen, data, loss_fn, bits)
    traces = hessian_trace(model, data, loss_fn, layers=list(chosen), samples=samples, seed=seed)
    result = {}
    for name, m in chosen.items():
        per_weight = max(traces[name], 0.0) / m.weight.numel()
        errors = {b: per_weight * quantization_error(m.weight, b) for b in bits}
        result[name] = LayerSensitivity(shape=tuple(m.weight.shape), errors=errors, trace=traces[name])
        logger.info("%s: Tr(H) ≈ %.4g, Ω = %s", name, traces[name], errors)
    return result


def _perturbation(model: nn.Module, chosen: dict[str, nn.Linear], data: list[Batch], loss_fn: Callable,
                  bits: tuple[int, ...]) -> dict[str, LayerSensitivity]:
    result = {}
    with torch.no_grad():
        base = _mean_loss(model, data, loss_fn)
        for name, m in chosen.items():
            original = m.weight.detach().clone()
            errors = dict.fromkeys(bits, 0.0)                                   # 16 bits: unchanged
            try:
                for b in (b for b in bits if b != UNQUANTIZED):
                    m.weight.copy_(quantize(original, b, scheme="symmetric", granularity="channel",
                                            axis=0).dequantize())
                    errors[b] = max(_mean_loss(model, data, loss_fn) - base, 0.0)
            finally:  # the model comes back as it came, whatever loss_fn raised
                m.weight.copy_(original)
            result[name] = LayerSensitivity(shape=tuple(m.weight.shape), errors=errors)
            logger.info("%s: loss increase %s", name, errors)
    return result


def assign_bits(sizes: Mapping[str, tuple[int, ...]], errors: Mapping[str, Mapping[int, float]],
                budget_bytes: float, *, choices: Iterable[int] = (4, 8, 16),
                latency: Mapping[str, Mapping[int, float]] | None = None,
                latency_budget: float | None = None) -> dict[str, int]:
    """Bits per layer minimizing Σ errors[layer][bits] with Σ layer_bytes(sizes[layer], bits) ≤
    budget_bytes (and Σ latency[layer][bits] ≤ latency_budget when given): HAWQ-V3's integer program
    (Yao et al. 2021), one binary per layer and choice, solved by HiGHS (one thread, fixed seed).

    `sizes` maps layer → weight shape; `errors` layer → bit width → Ω (a missing 16 counts as 0).
    Raises InfeasibleError with the least bytes (or latency) possible when the budget is below it.

        >>> assign_bits({"a": (8, 8), "b": (8, 8)}, {"a": {4: 9.0, 8: 1.0}, "b": {4: 2.0, 8: 1.0}},
        ...             budget_bytes=160, choices=(4, 8))      # 4 bits: 32 + 8·4 = 64 B, 8 bits: 96 B
        {'a': 8, 'b': 4}
    """
    choices = _check_choices(choices, "choices")
    names = _check_layers(sizes, errors, latency, latency_budget)
    budget = _check_budget(budget_bytes, "budget_bytes")
    nbytes = {n: {b: layer_bytes(_check_shape(n, sizes[n]), b) for b in choices} for n in names}
    omega = {n: {b: _table_value(errors, "errors", n, b) for b in choices} for n in names}
    _check_floor(nbytes, budget, "bytes", "budget_bytes")
    time = None
    if latency is not None:
        time = {n: {b: _table_value(latency, "latency", n, b) for b in choices} for n in names}
        latency_budget = _check_budget(latency_budget, "latency_budget")
        _check_floor(time, latency_budget, "latency", "latency_budget")

    model = _Model()
    x = {n: {b: model.column(integer=True) for b in choices} for n in names}
    scale = max((abs(e) for row in omega.values() for e in row.values()), default=0.0) or 1.0
    for n in names:
        model.row([(var, 1.0) for var in x[n].values()], 1.0, 1.0)      # one bit width per layer
        for b, var in x[n].items():
            model.cost[var] = omega[n][b] / scale                      # objective of order 1 for HiGHS
    model.row([(x[n][b], float(nbytes[n][b])) for n in names for b in choices], -math.inf, budget)
    if time is not None:
        model.row([(x[n][b], time[n][b]) for n in names for b in choices], -math.inf, latency_budget)
    try:
        values, _, _, _ = _run(model, _TIME_LIMIT, None)
    except InfeasibleError:  # each limit was checked alone above
        limits = f"budget_bytes={budget:g}" + ("" if time is None else f" and latency_budget={latency_budget:g}")
        raise InfeasibleError(f"no bit assignment fits {limits}, although each fits alone") from None
    if values is None:
        raise RuntimeError(f"the bit-width program found no assignment within {_TIME_LIMIT:g} s")
    picked = {n: max(x[n], key=lambda b: values[x[n][b]]) for n in names}
    used = sum(nbytes[n][b] for n, b in picked.items())
    if used > budget:  # only solver tolerances could get here
        raise RuntimeError(f"the solver's assignment takes {used} bytes, over budget_bytes={budget:g}")
    return picked


def plan_bits(model: nn.Module, batches: Iterable, loss_fn: Callable, budget_bytes: float, *, layers=None,
              choices: Iterable[int] = (4, 8, 16), method: str = "hessian", samples: int = 32, seed: int = 0,
              latency: Mapping[str, Mapping[int, float]] | None = None,
              latency_budget: float | None = None) -> BitPlan:
    """`sensitivity` then `assign_bits`: the bit width per nn.Linear weight within `budget_bytes`.

        >>> print(plan_bits(model, [(x, y)], nn.functional.mse_loss, 6_000).summary())
    """
    data = _batches(batches)
    choices = _check_choices(choices, "choices")
    # 1. Ω per layer and candidate bit width, from the batches
    table = sensitivity(model, data, loss_fn, layers=layers, bits=choices, method=method, samples=samples,
                        seed=seed)
    # 2. the integer program over those tables
    bits = assign_bits({n: s.shape for n, s in table.items()}, {n: s.errors for n, s in table.items()},
                       budget_bytes, choices=choices, latency=latency, latency_budget=latency_budget)
    sizes = {n: layer_bytes(table[n].shape, b) for n, b in bits.items()}
    return BitPlan(bits=bits, layer_bytes=sizes, nbytes=sum(sizes.values()), budget_bytes=budget_bytes,
                   error=sum(table[n].errors[b] for n, b in bits.items()), method=method, sensitivity=table)


def _mean_loss(model: nn.Module, data: list[Batch], loss_fn: Callable) -> float:
    return sum(float(loss_fn(model(*inputs), target)) for inputs, target in data) / len(data)


def _linear_layers(model: nn.Module, layers) -> dict[str, nn.Linear]:
    """The nn.Linear modules `layers` selects (None: all; names; or a predicate on (name, module))."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layers is None:
        chosen = found
    elif callable(layers):
        chosen = {name: m for name, m in found.items() if layers(name, m)}
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        unknown = [name for name in names if name not in found]
        if unknown:
            raise ValueError(f"layers: found {unknown}, which are not nn.Linear modules of the model; "
                             f"required names among {sorted(found)}")
        chosen = {name: found[name] for name in names}
    if not chosen:
        raise ValueError(f"layers: found no nn.Linear module to quantize (the model has {len(found)}), "
                         "required at least one")
    return chosen


def _batches(batches: Iterable) -> list[Batch]:
    data = []
    for k, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"batches[{k}]: found {type(batch).__name__}, required an (inputs, target) pair")
        inputs, target = batch
        data.append((tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), target))
    if not data:
        raise ValueError("batches: found none, required at least one (inputs, target) pair")
    return data


def _check_choices(choices: Iterable[int], name: str) -> tuple[int, ...]:
    choices = tuple(choices)
    for b in choices:
        if isinstance(b, bool) or not isinstance(b, int) or not (MIN_BITS <= b <= MAX_BITS or b == UNQUANTIZED):
            raise ValueError(f"{name}: found {b!r}, required integers from {MIN_BITS} to {MAX_BITS}, "
                             f"or {UNQUANTIZED} (unquantized)")
    if not choices:
        raise ValueError(f"{name}: found none, required at least one bit width")
    return tuple(sorted(set(choices)))


def _check_layers(sizes: Mapping, errors: Mapping, latency: Mapping | None, latency_budget) -> list[str]:
    if not sizes:
        raise ValueError("sizes: found no layers, required at least one layer name → weight shape")
    if (latency is None) != (latency_budget is None):
        given = "latency" if latency is not None else "latency_budget"
        raise ValueError(f"latency and latency_budget: found only {given}, required both or neither")
    names = list(sizes)
    for label, table in (("errors", errors), ("latency", latency)):
        if table is None:
            continue
        unknown = [n for n in table if n not in sizes]
        missing = [n for n in names if n not in table]
        if unknown or missing:
            raise ValueError(f"{label}: found layers {list(table)}, required the layers of sizes {names} "
                             f"(unknown: {unknown}, missing: {missing})")
    return names


def _check_shape(name: str, shape) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"sizes[{name!r}]: found {shape!r}, required a weight shape of positive integers "
                         "(out_features, in_features)")
    return tuple(shape)


def _check_budget(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: found {value!r}, required a finite number ≥ 0")
    return float(value)


def _table_value(table: Mapping, label: str, name: str, bits: int) -> float:
    row = table[name]
    value = row.get(bits, 0.0 if bits == UNQUANTIZED and label == "errors" else None)
    if value is None:
        raise ValueError(f"{label}[{name!r}]: found bit widths {sorted(row)}, required an entry for {bits}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label}[{name!r}][{bits}]: found {value!r}, required a finite number")
    return float(value)


def _check_floor(table: dict[str, dict[int, float]], budget: float, what: str, name: str) -> None:
    """InfeasibleError when even every layer at its least `what` exceeds the budget."""
    floor = sum(min(row.values()) for row in table.values())
    if floor > budget:
        shown = f"{floor:g} bytes ({fmt_bytes(floor)})" if what == "bytes" else f"{floor:g}"
        raise InfeasibleError(f"the {len(table)} layers need at least {shown} of {what}, each at its "
                              f"cheapest bit width; {name} given is {budget:g}",
                              required_bytes=floor if what == "bytes" else None,
                              available_bytes=budget if what == "bytes" else None)
