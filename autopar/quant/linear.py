"""Linear (integer) quantization, r = S(q − Z), per tensor, per channel or per group (seeds 000 and 004).

Integers are signed, q ∈ [qmin, qmax] = [−2^(b−1), 2^(b−1) − 1], two's complement, for both
schemes, as seed 000's 2-bit table (01 = 1, 00 = 0, 11 = −1, 10 = −2) and worked examples use.

    asymmetric:  S = (rmax − rmin) / (qmax − qmin),   Z = round(qmin − rmin / S)
    symmetric:   S = |r|max / qmax,                   Z = 0

Symmetric is the "restricted range" of seed 000 (qmax = 2^(b−1) − 1, so 2-bit S = |r|max / 1);
seed 004's 8-bit example 15, 0.1, 0.02, 1.0, 0.01 → 127, 1, 0, 8, 0 uses it too. For the
asymmetric scheme the range is first widened to contain 0 (Jacob et al. 2018: real zero must be
exactly representable), which also keeps Z inside [qmin, qmax]. Then q = clamp(round(r/S) + Z)
and, for every r in the range, |r − S(q − Z)| ≤ S/2.

Granularity (seed 000): "tensor" one (S, Z); "channel" one per slice along `axis`; "group" one per
`group_size` contiguous elements of the last (input) dimension of each row, the layout of
weight-only int4-g128 LLM quantizers.

    >>> q = quantize(w, 4, scheme="symmetric", granularity="group", group_size=128, scale_dtype=torch.float16)
    >>> q.bits_per_element        # 4 + 16/128
    4.125
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autopar.quant.checks import (check_axis, check_bits, check_float_tensor, check_granularity,
                                  check_positive_int, check_scheme)
from autopar.quant.packing import pack_bits, packed_nbytes, unpack_bits, value_range


def integer_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) = (−2^(b−1), 2^(b−1) − 1): seed 000's signed range; 2 bits give (−2, 1)."""
    return value_range(check_bits(bits), signed=True)


def store_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` in `dtype`, rounded up where the cast rounded down (so no element gets clipped) and
    never below the smallest normal number of `dtype` (so nothing is divided by zero)."""
    stored = scale.to(dtype).clamp_min(torch.finfo(dtype).tiny)
    below = stored.to(scale.dtype) < scale
    return torch.where(below, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)


def linear_qparams(rmin: torch.Tensor | float, rmax: torch.Tensor | float, bits: int, scheme: str, *,
                   scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, Z) for the range [rmin, rmax] (tensors give one pair per element), seed 000's formulas.

    An all-zero range gets S = 1 (any positive S represents it exactly). Z is int32.

        >>> linear_qparams(-1.08, 2.12, 2, "asymmetric")    # seed 000: S = 3.2/3 ≈ 1.07, Z = −1
        (tensor(1.0667), tensor(-1, dtype=torch.int32))
    """
    check_bits(bits)
    check_scheme(scheme)
    rmin = torch.as_tensor(rmin, dtype=torch.float64)
    rmax = torch.as_tensor(rmax, dtype=torch.float64)
    if bool((rmin > rmax).any()):
        raise ValueError(f"range: found rmin > rmax ({rmin.tolist()} > {rmax.tolist()}), required rmin <= rmax")
    qmin, qmax = integer_range(bits)
    if scheme == "symmetric":
        scale = torch.maximum(rmin.abs(), rmax.abs()) / qmax
    else:
        scale = (rmax.clamp_min(0) - rmin.clamp_max(0)) / (qmax - qmin)
    scale = store_scale(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
    if scheme == "symmetric":
        return scale, torch.zeros(scale.shape, dtype=torch.int32)
    zero = torch.round(qmin - rmin.clamp_max(0) / scale.to(torch.float64)).clamp(qmin, qmax)
    return scale, zero.to(torch.int32)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Which elements share a scale: `to_blocks` gives (blocks, elements per block), one scale each."""

    shape: tuple[int, ...]
    granularity: str
    group_size: int | None
    axis: int | None

    def scale_shape(self) -> tuple[int, ...]:
        if self.granularity == "tensor":
            return ()
        if self.granularity == "channel":
            return (self.shape[self.axis],)
        return (*self.shape[:-1], self.shape[-1] // self.group_size)

    def to_blocks(self, t: torch.Tensor) -> torch.Tensor:
        if self.granularity == "tensor":
            return t.reshape(1, -1)
        if self.granularity == "channel":
            return t.movedim(self.axis, 0).reshape(self.shape[self.axis], -1)
        return t.reshape(-1, self.group_size)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.granularity != "channel":
            return blocks.reshape(self.shape)
        moved = (self.shape[self.axis], *self.shape[:self.axis], *self.shape[self.axis + 1:])
        return blocks.reshape(moved).movedim(0, self.axis)


def _layout(t: torch.Tensor, granularity: str, group_size: int | None, axis: int) -> _Layout:
    shape = tuple(t.shape)
    if granularity != "group" and group_size is not None:
        raise ValueError(f"group_size: found {group_size!r}, required None unless granularity='group' "
                         f"(found granularity={granularity!r})")
    if granularity == "tensor":
        return _Layout(shape, granularity, None, None)
    if t.dim() == 0:
        raise ValueError(f"tensor: found 0 dimensions, required at least 1 for granularity={granularity!r}")
    if granularity == "channel":
        return _Layout(shape, granularity, None, check_axis(axis, t.dim()))
    if group_size is None:
        raise ValueError("group_size: found None, required a positive integer for granularity='group'")
    check_positive_int(group_size, "group_size")
    if shape[-1] % group_size:
        raise ValueError(f"group_size: found {group_size}, which does not divide the last dimension "
                         f"{shape[-1]} of shape {shape}; required a divisor of {shape[-1]}")
    return _Layout(shape, granularity, group_size, t.dim() - 1)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class QuantizedTensor:
    """Integers, packed, with their scales and zero points: r = S(q − Z) per block of elements."""

    data: torch.Tensor
    """The integers q in row-major order of `shape`: int8 when bits = 8, else packed into uint8."""
    scale: torch.Tensor
    """S: shape () per tensor, (C,) per channel, (*shape[:-1], shape[-1] // group_size) per group."""
    zero_point: torch.Tensor
    """Z, int32, the shape of `scale`; all zeros when symmetric."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    """The dtype `dequantize` returns: the input's."""
    bits: int
    scheme: str
    granularity: str
    group_size: int | None
    axis: int | None
    """The dimension `scale` runs along: `axis` per channel, the last per group, None per tensor."""

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()

    def _layout(self) -> _Layout:
        return _Layout(self.shape, self.granularity, self.group_size, self.axis)

    def int_values(self) -> torch.Tensor:
        """q as int8, in `shape`."""
        if self.bits == 8:
            return self.data.reshape(self.shape)
        return unpack_bits(self.data, self.bits, self.numel, signed=True).to(torch.int8).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """r̂ = S(q − Z), in the original shape and dtype."""
        layout = self._layout()
        work = torch.promote_types(self.dtype, torch.float32)
        q = layout.to_blocks(self.int_values().to(work))
        zero = self.zero_point.reshape(-1, 1).to(work)
        r = (q - zero) * self.scale.reshape(-1, 1).to(work)
        return layout.from_blocks(r).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Packed values + scales (in their dtype) + zero points (`bits` each, asymmetric only)."""
        scales = self.scale.numel() * self.scale.element_size()
        zeros = packed_nbytes(self.zero_point.numel(), self.bits) if self.scheme == "asymmetric" else 0
        return self.data.numel() * self.data.element_size() + scales + zeros

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / self.numel


def quantize(t: torch.Tensor, bits: int, *, scheme: str = "symmetric", granularity: str = "tensor",
             group_size: int | None = None, axis: int = 0,
             scale_dtype: torch.dtype = torch.float32) -> QuantizedTensor:
    """Linear quantization of a floating-point tensor to `bits` (2 to 8) bits, r = S(q − Z).

        >>> w = torch.tensor([[2.09, -0.98, 1.48, 0.09], [0.05, -0.14, -1.08, 2.12],
        ...                   [-0.91, 1.92, 0.0, -1.03], [1.87, 0.0, 1.53, 1.49]])
        >>> quantize(w, 2, scheme="asymmetric").int_values()     # seed 000, S ≈ 1.07, Z = −1
        tensor([[ 1, -2,  0, -1], [-1, -1, -2,  1], [-2,  1, -1, -2], [ 1, -1,  0,  0]], dtype=torch.int8)
    """
    check_float_tensor(t)
    check_bits(bits)
    check_scheme(scheme)
    check_granularity(granularity)
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise ValueError(f"scale_dtype: found {scale_dtype!r}, required a floating-point torch.dtype")
    layout = _layout(t, granularity, group_size, axis)
    work = torch.promote_types(t.dtype, torch.float32)
    blocks = layout.to_blocks(t.detach().to(work))                  # (blocks, elements per block)
    scale, zero = linear_qparams(blocks.amin(dim=1).cpu(), blocks.amax(dim=1).cpu(), bits, scheme,
                                 scale_dtype=scale_dtype)
    scale, zero = scale.to(t.device), zero.to(t.device)
    qmin, qmax = integer_range(bits)
    q = torch.round(blocks / scale.to(work)[:, None]) + zero[:, None]
    values = layout.from_blocks(q.clamp(qmin, qmax).to(torch.int8))
    data = values.reshape(-1) if bits == 8 else pack_bits(values, bits, signed=True)
    return QuantizedTensor(data=data, scale=scale.reshape(layout.scale_shape()),
                           zero_point=zero.reshape(layout.scale_shape()), shape=layout.shape, dtype=t.dtype,
                           bits=bits, scheme=scheme, granularity=granularity, group_size=layout.group_size,
                           axis=layout.axis)
