"""K-means (codebook) quantization, seed 000 "Quantization Basics" (Han et al., Deep Compression, 2016).

Weights are clustered into 2^b centroids; storage is a b-bit index per weight plus a
floating-point codebook, r̂ = codebook[index]. Deterministic: the centroids start evenly spaced
between min and max (Deep Compression's linear initialization), then Lloyd's iterations assign
each weight to its nearest centroid and move each centroid to the mean of its weights, until the
assignment stops changing or `iterations` is reached. The codebook is kept sorted.

Seed 000's 4×4 example with a 2-bit codebook gives centroids −1.00, 0.00, 1.50, 2.00 and
    3 0 2 1
    1 1 0 3
    0 3 1 0
    3 1 2 2
as indices; stored, that is 16 × 2 bits + 4 × 32 bits = 20 bytes instead of 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autopar.quant.checks import check_bits, check_float_tensor, check_positive_int
from autopar.quant.packing import pack_bits, unpack_bits


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class KMeansTensor:
    """b-bit indices into a codebook of 2^b centroids."""

    codebook: torch.Tensor
    """(2^bits,), ascending, in the input's dtype."""
    data: torch.Tensor
    """Indices in row-major order of `shape`, packed into uint8."""
    shape: tuple[int, ...]
    bits: int
    iterations: int
    """Lloyd iterations run (fewer than asked when the assignment stopped changing)."""

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    def indices(self) -> torch.Tensor:
        """The index of each element's centroid, int64, in `shape`."""
        return unpack_bits(self.data, self.bits, self.numel, signed=False).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        return self.codebook[self.indices()]

    @property
    def nbytes(self) -> int:
        """Packed indices + the codebook in its dtype."""
        return self.data.numel() + self.codebook.numel() * self.codebook.element_size()

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / self.numel


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each value (centroids ascending); ties go to the lower one."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(x, midpoints)


def kmeans_quantize(t: torch.Tensor, bits: int, *, iterations: int = 100) -> KMeansTensor:
    """Cluster the elements of `t` into 2^bits centroids (bits 1 to 8), as above.

        >>> q = kmeans_quantize(w, 2)              # w: seed 000's 4×4 weights
        >>> q.codebook, q.nbytes
        (tensor([-1.0000,  0.0000,  1.5000,  2.0000]), 20)
    """
    check_float_tensor(t)
    check_bits(bits, low=1, high=8)
    check_positive_int(iterations, "iterations")
    work = torch.promote_types(t.dtype, torch.float32)
    x = t.detach().reshape(-1).to(work)
    k = 2 ** bits
    centroids = torch.linspace(float(x.min()), float(x.max()), k, dtype=work, device=x.device)
    index = _assign(x, centroids)
    ran = 0
    for ran in range(1, iterations + 1):
        counts = torch.bincount(index, minlength=k)
        sums = torch.zeros(k, dtype=work, device=x.device).index_add_(0, index, x)
        # An empty cluster keeps its centroid.
        centroids, _ = torch.sort(torch.where(counts > 0, sums / counts.clamp_min(1), centroids))
        new_index = _assign(x, centroids)
        if torch.equal(new_index, index):
            break
        index = new_index
    return KMeansTensor(codebook=centroids.to(t.dtype), data=pack_bits(index, bits, signed=False),
                        shape=tuple(t.shape), bits=bits, iterations=ran)
