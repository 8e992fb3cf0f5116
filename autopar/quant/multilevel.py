"""Two-level (VS-Quant) and multi-level scales, seed 000 "Sweetspot: Two-level Quantization".

    two-level:    r = γ · S_q · (q − Z)
    multi-level:  r = S_l0 · S_l1 · · · (q − Z)

γ is a floating-point coarse scale (one per output channel, i.e. per row of the last dimension),
S_q a small unsigned integer scale per vector of elements. Levels are listed coarsest first: level
0 is floating point (16 or 32 bits), every later level holds integers of 1 to 8 bits, each vector
nested inside the previous level's. Values are symmetric (Z = 0), q ∈ [−qmax, qmax],
qmax = 2^(b−1) − 1.

Cost in bits per element, scales included:

    b + Σ_levels bits_l / vector_l        (vector = the row length when a level has none)

Seed 000's case, 4-bit values with a 4-bit scale every 16 elements, costs 4 + 4/16 = 4.25 bits,
plus 16/row_length for an fp16 γ per channel (4.25390625 for rows of 4096).

Scales are chosen top-down: each level's integer is the ideal scale of its vector divided by the
product of the coarser scales above, rounded up, so no element is clipped and
|r − r̂| ≤ (γ · Π S) / 2 for every element.

    >>> q = quantize_two_level(w, bits=4, scale_bits=4, vector_size=16)
    >>> q.bits_per_element        # w of shape (out, 4096)
    4.25390625
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from autopar.quant.checks import check_bits, check_float_tensor, check_positive_int
from autopar.quant.linear import store_scale
from autopar.quant.packing import pack_bits, unpack_bits

FLOAT_SCALE_DTYPES = {16: torch.float16, 32: torch.float32}


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleLevel:
    """One level of scales."""

    bits: int
    """Bits of each scale: 16 or 32 (floating point) for level 0, 1 to 8 (unsigned integer) below it."""
    vector_size: int | None = None
    """Elements sharing one scale; None means the whole row (one scale per output channel)."""


def check_levels(levels: Sequence[ScaleLevel], row_length: int | None = None) -> tuple[ScaleLevel, ...]:
    """The levels as a tuple, or ValueError naming the first level that breaks a rule."""
    levels = tuple(levels)
    if not levels or not all(isinstance(level, ScaleLevel) for level in levels):
        raise ValueError(f"levels: found {levels!r}, required a non-empty sequence of ScaleLevel")
    if levels[0].bits not in FLOAT_SCALE_DTYPES:
        raise ValueError(f"levels[0].bits: found {levels[0].bits!r}, required 16 or 32 (a floating-point scale)")
    for i, level in enumerate(levels[1:], start=1):
        check_bits(level.bits, name=f"levels[{i}].bits", low=1, high=8)
        if level.vector_size is None:
            raise ValueError(f"levels[{i}].vector_size: found None, required a positive integer "
                             "(only level 0 may span the whole row)")
    outer, outer_name = row_length, "the row length"
    for i, level in enumerate(levels):
        size = level.vector_size
        if size is None:
            continue
        check_positive_int(size, f"levels[{i}].vector_size")
        if outer is not None and outer % size:
            raise ValueError(f"levels[{i}].vector_size: found {size}, required a divisor of {outer_name} {outer}")
        outer, outer_name = size, f"levels[{i}].vector_size"
    return levels


def multilevel_bits_per_element(bits: int, levels: Sequence[ScaleLevel], row_length: int) -> float:
    """b + Σ bits_l / vector_l; seed 000's 4-bit values + 4-bit scale per 16 + fp16 per row of 4096:
    4 + 4/16 + 16/4096 = 4.25390625."""
    check_bits(bits)
    check_positive_int(row_length, "row_length")
    levels = check_levels(levels, row_length)
    return bits + sum(level.bits / (level.vector_size or row_length) for level in levels)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class MultiLevelTensor:
    """q with its scales: r̂ = S_l0 · S_l1 · · · q, each scale broadcast over its vector."""

    data: torch.Tensor
    """q in row-major order: int8 when bits = 8, else packed into uint8."""
    scales: tuple[torch.Tensor, ...]
    """Level 0: floating point, (rows, row_length / vector_0). Later levels: packed uint8."""
    levels: tuple[ScaleLevel, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()

    def _sizes(self) -> list[int]:
        return [level.vector_size or self.shape[-1] for level in self.levels]

    def level_scales(self) -> tuple[torch.Tensor, ...]:
        """Every level's scales, unpacked: level l has shape (rows, row_length / vector_l)."""
        rows = self.numel // self.shape[-1]
        out = [self.scales[0]]
        for level, size, packed in zip(self.levels[1:], self._sizes()[1:], self.scales[1:]):
            count = rows * (self.shape[-1] // size)
            out.append(unpack_bits(packed, level.bits, count, signed=False).reshape(rows, -1))
        return tuple(out)

    def effective_scale(self) -> torch.Tensor:
        """S_l0 · S_l1 · · · per finest vector, (rows, row_length / vector_last), float32 or wider."""
        work = torch.promote_types(self.dtype, torch.float32)
        sizes = self._sizes()
        scales = self.level_scales()
        eff = scales[0].to(work)
        for k in range(1, len(scales)):
            eff = eff.repeat_interleave(sizes[k - 1] // sizes[k], dim=1) * scales[k].to(work)
        return eff

    def int_values(self) -> torch.Tensor:
        if self.bits == 8:
            return self.data.reshape(self.shape)
        return unpack_bits(self.data, self.bits, self.numel, signed=True).to(torch.int8).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        eff = self.effective_scale()
        step = eff.repeat_interleave(self._sizes()[-1], dim=1)          # (rows, row_length)
        q = self.int_values().reshape(step.shape).to(step.dtype)
        return (q * step).reshape(self.shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, *self.scales))

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / self.numel


def quantize_multilevel(t: torch.Tensor, bits: int, levels: Sequence[ScaleLevel]) -> MultiLevelTensor:
    """Symmetric `bits`-bit values under the scale `levels`, rows along the last dimension."""
    check_float_tensor(t, min_dims=1)
    check_bits(bits)
    row_length = t.shape[-1]
    levels = check_levels(levels, row_length)
    sizes = [level.vector_size or row_length for level in levels]
    work = torch.promote_types(t.dtype, torch.float32)
    x = t.detach().reshape(-1, row_length).to(work)                   # (rows, row_length)
    qmax = 2 ** (bits - 1) - 1
    ranges = [2 ** level.bits - 1 for level in levels[1:]]            # largest integer scale per level

    def ideal(k: int) -> torch.Tensor:
        """The level-k scale that would let the levels below use their whole range."""
        absmax = x.abs().reshape(x.shape[0], -1, sizes[k]).amax(dim=-1)
        return absmax / (qmax * math.prod(ranges[k:]))

    gamma = ideal(0)
    gamma = store_scale(torch.where(gamma > 0, gamma, torch.ones_like(gamma)), FLOAT_SCALE_DTYPES[levels[0].bits])
    eff, packed = gamma.to(work), []
    for k in range(1, len(levels)):
        eff = eff.repeat_interleave(sizes[k - 1] // sizes[k], dim=1)
        s = torch.ceil(ideal(k) / eff).clamp(1, ranges[k - 1])
        packed.append(pack_bits(s.to(torch.int64), levels[k].bits, signed=False))
        eff = eff * s
    step = eff.repeat_interleave(sizes[-1], dim=1)
    q = torch.round(x / step).clamp(-qmax, qmax).to(torch.int8).reshape(t.shape)
    data = q.reshape(-1) if bits == 8 else pack_bits(q, bits, signed=True)
    return MultiLevelTensor(data=data, scales=(gamma, *packed), levels=levels, shape=tuple(t.shape),
                            dtype=t.dtype, bits=bits)


def quantize_two_level(t: torch.Tensor, bits: int = 4, *, scale_bits: int = 4, vector_size: int = 16,
                       coarse_bits: int = 16) -> MultiLevelTensor:
    """VS-Quant: r = γ · S_q · q, γ a `coarse_bits` float per row, S_q a `scale_bits` integer per vector."""
    return quantize_multilevel(t, bits, [ScaleLevel(bits=coarse_bits),
                                         ScaleLevel(bits=scale_bits, vector_size=vector_size)])
