"""LLM.int8(): vector-wise int8 matrix multiplication with outlier decomposition (seed 004;
Dettmers et al., NeurIPS 2022).

For y = x Wᵀ with x (tokens, in) and W (out, in), as `torch.nn.functional.linear` takes them:

1. Outlier features: the columns of x (input features) whose |value| exceeds `threshold` in any
   row. Seed 004: "keep outlier channels / features in 16-bit, quantize the rest". Their part,
   x[:, O] W[:, O]ᵀ, is multiplied in floating point, in x's dtype.
2. The rest is quantized vector-wise, absmax int8 (S = |r|max / 127, Z = 0): one scale per row of
   x (per token), c_x, and one per row of W (per output channel), c_w.
3. The int8 product is accumulated exactly in int32 and rescaled by the outer product of scales:

       y ≈ x[:, O] W[:, O]ᵀ + (c_x c_wᵀ) ⊙ (q_x q_wᵀ)

`threshold=None` gives plain vector-wise int8 with no decomposition. The int32 product uses
`torch._int_mm` where it takes the shapes (on CPU any; on CUDA inner and outer sizes multiples of
8, with fewer than 17 rows padded with zero rows to 32, which it needs), and otherwise exact integer
arithmetic: int64 on CPU, float64 on other devices, whose 53-bit mantissa holds every partial sum
exactly. The right operand is passed as it lies when it is row- or column-major: a weight kept as
its (out, in) integers and passed transposed is column-major, which `torch._int_mm` runs 5× faster
than row-major on an H100 (512 × 4096 → 4096: 27 µs against 147) and on 2 CPU threads at one
token (0.42 ms against 2.1), and as fast elsewhere.

    >>> y = int8_matmul(x, linear.weight, threshold=6.0)      # ≈ linear(x) without the bias
"""

from __future__ import annotations

import math

import torch

from autopar.quant.checks import check_float_tensor
from autopar.quant.linear import quantize

MAX_INNER = (2 ** 31 - 1) // (128 * 128)
"""Largest inner size for which no int8 · int8 sum can overflow int32: 131071."""


_CUDA_LEAST_ROWS = 17
"""`torch._int_mm` on CUDA takes more than 16 rows (cuBLAS's int8 GEMM)."""


def _int_mm_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    if a.device.type == "cpu":
        return True
    if a.device.type == "cuda":
        return a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0      # cuBLAS int8 GEMM; rows padded (`int_matmul`)
    return False


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t as it lies when row- or column-major, else a row-major copy."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for int8 matrices a (m, k) and b (k, n), exactly, as int32."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            found = f"{t.dtype} with {t.dim()} dimensions" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name}: found {found}, required a 2-D int8 tensor")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner sizes: found {a.shape[1]} and {b.shape[0]}, required equal "
                         f"(a {tuple(a.shape)} @ b {tuple(b.shape)})")
    if a.shape[1] > MAX_INNER:
        raise ValueError(f"inner size: found {a.shape[1]}, required at most {MAX_INNER} so int32 cannot overflow")
    if _int_mm_takes(a, b):
        rows = a.shape[0]
        if a.device.type == "cuda" and rows < _CUDA_LEAST_ROWS:  # zero rows add nothing to the others
            padded = torch.zeros(32, a.shape[1], dtype=a.dtype, device=a.device)
            padded[:rows] = a
            return torch._int_mm(padded, _strided(b))[:rows]
        return torch._int_mm(a.contiguous(), _strided(b))
    if a.device.type == "cpu":
        return (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


def outlier_columns(x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Boolean mask over the last dimension of x: features with |x| > threshold in some row."""
    features = x.reshape(-1, x.shape[-1])
    if threshold is None or math.isinf(threshold):
        return torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    return (features.abs() > threshold).any(dim=0)


def _check_operands(x: torch.Tensor, weight: torch.Tensor, threshold: float | None) -> None:
    check_float_tensor(x, "x", min_dims=1)
    check_float_tensor(weight, "weight", min_dims=2)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: found shape {tuple(weight.shape)}, required (out_features, {x.shape[-1]}) "
                         f"to match x of shape {tuple(x.shape)}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not threshold > 0):
        raise ValueError(f"threshold: found {threshold!r}, required a positive number, inf or None")


def _vectorwise_int8(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(c_x c_wᵀ) ⊙ (q_x q_wᵀ): absmax int8 per row of x and per row of weight, in float32 or wider."""
    work = torch.promote_types(x.dtype, torch.float32)
    qx = quantize(x, 8, scheme="symmetric", granularity="channel", axis=0)        # per token
    qw = quantize(weight, 8, scheme="symmetric", granularity="channel", axis=0)   # per output channel
    acc = int_matmul(qx.int_values(), qw.int_values().t())                        # (tokens, out) int32
    return acc.to(work) * qx.scale.to(work)[:, None] * qw.scale.to(work)[None, :]


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, *, threshold: float | None = 6.0) -> torch.Tensor:
    """LLM.int8() y ≈ x @ weightᵀ, x (..., in), weight (out, in); returns (..., out) in x's dtype."""
    _check_operands(x, weight, threshold)
    rows = x.reshape(-1, x.shape[-1])                                              # (tokens, in)
    outliers = outlier_columns(rows, threshold)
    y = torch.zeros(rows.shape[0], weight.shape[0], dtype=torch.promote_types(x.dtype, torch.float32),
                    device=x.device)
    if bool(outliers.any()):
        y += (rows[:, outliers] @ weight[:, outliers].to(x.dtype).t()).to(y.dtype)  # kept in x's dtype
    regular = ~outliers
    if bool(regular.any()):
        y += _vectorwise_int8(rows[:, regular], weight[:, regular])
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def vectorwise_int8_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Plain vector-wise int8 (no outlier decomposition): `int8_matmul` with threshold=None."""
    return int8_matmul(x, weight, threshold=None)
