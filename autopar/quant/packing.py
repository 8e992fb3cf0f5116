"""Bit packing: integers of 1 to 8 bits laid end to end in a uint8 tensor.

Element i occupies bits [i·b, (i+1)·b) of the stream, least significant bit first, and byte j
holds stream bits [8j, 8j+8). So with b = 4 element 0 is the low nibble of byte 0 and element 1
the high nibble; with b = 2 four elements share a byte; 3, 5, 6 and 7 bits straddle bytes.
n values take ceil(n·b / 8) bytes.

Signed values are stored in two's complement, as in seed 000's 2-bit table:

    binary  01  00  11  10
    value    1   0  -1  -2

    >>> unpack_bits(pack_bits(torch.tensor([1, 0, -1, -2]), 2, signed=True), 2, 4, signed=True)
    tensor([ 1,  0, -1, -2])
"""

from __future__ import annotations

import math

import torch

from autopar.quant.checks import check_bits


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take once packed: ceil(count·bits / 8)."""
    return math.ceil(count * bits / 8)


def value_range(bits: int, *, signed: bool) -> tuple[int, int]:
    """[-2^(b-1), 2^(b-1) - 1] when signed, [0, 2^b - 1] otherwise."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def pack_bits(values: torch.Tensor, bits: int, *, signed: bool) -> torch.Tensor:
    """The values (any shape, read in row-major order) packed into a 1-D uint8 tensor."""
    check_bits(bits, low=1, high=8)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"values: found dtype {values.dtype}, required an integer dtype")
    flat = values.reshape(-1).to(torch.int64)
    low, high = value_range(bits, signed=signed)
    if flat.numel() and (int(flat.min()) < low or int(flat.max()) > high):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"values: found range [{int(flat.min())}, {int(flat.max())}], "
                         f"required [{low}, {high}] for {bits}-bit {kind} integers")
    codes = flat & ((1 << bits) - 1)                          # two's complement for negatives
    shifts = torch.arange(bits, device=flat.device)
    stream = ((codes[:, None] >> shifts) & 1).reshape(-1)     # (n·b,) bits, LSB first
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    weights = torch.tensor([1 << k for k in range(8)], device=flat.device)
    return (stream * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, count: int, *, signed: bool) -> torch.Tensor:
    """The first `count` values of `bits` bits from `data` (as `pack_bits` wrote them), as int64."""
    check_bits(bits, low=1, high=8)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError(f"data: found {data.dtype} with {data.dim()} dimensions, required 1-D uint8")
    if data.numel() < packed_nbytes(count, bits):
        raise ValueError(f"data: found {data.numel()} bytes, required {packed_nbytes(count, bits)} "
                         f"for {count} values of {bits} bits")
    shifts = torch.arange(8, device=data.device)
    stream = ((data.to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)[:count * bits]
    weights = torch.tensor([1 << k for k in range(bits)], device=data.device)
    codes = (stream.reshape(count, bits) * weights).sum(dim=1)
    if signed:
        codes = torch.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes)
    return codes
