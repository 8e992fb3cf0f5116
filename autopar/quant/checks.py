"""Argument checks shared by the quantizers. Each error says what was found and what was required."""

from __future__ import annotations

import torch

SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("tensor", "channel", "group")
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: object, *, name: str = "bits", low: int = MIN_BITS, high: int = MAX_BITS) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"{name}: found {bits!r}, required an integer from {low} to {high}")
    return bits


def check_scheme(scheme: object) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: found {scheme!r}, required one of {', '.join(map(repr, SCHEMES))}")
    return scheme  # type: ignore[return-value]


def check_granularity(granularity: object) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: found {granularity!r}, "
                         f"required one of {', '.join(map(repr, GRANULARITIES))}")
    return granularity  # type: ignore[return-value]


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: found {value!r}, required a positive integer")
    return value


def check_float_tensor(t: object, name: str = "tensor", *, min_dims: int = 0) -> torch.Tensor:
    """A floating-point tensor with finite values and at least `min_dims` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: found {type(t).__name__}, required a torch.Tensor")
    if not t.is_floating_point():
        raise TypeError(f"{name}: found dtype {t.dtype}, required a floating-point dtype "
                        "(float32, float16, bfloat16 or float64)")
    if t.dim() < min_dims:
        raise ValueError(f"{name}: found {t.dim()} dimensions (shape {tuple(t.shape)}), "
                         f"required at least {min_dims}")
    if t.numel() == 0:
        raise ValueError(f"{name}: found an empty tensor (shape {tuple(t.shape)}), required at least one element")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: found non-finite values (inf or nan), required finite values")
    return t


def check_axis(axis: object, ndim: int) -> int:
    """A tensor dimension in [-ndim, ndim), returned non-negative."""
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"axis: found {axis!r}, required an integer in [{-ndim}, {ndim}) "
                         f"for a {ndim}-dimensional tensor")
    return axis % ndim
