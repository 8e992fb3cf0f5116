"""Two-level (VS-Quant) and multi-level scales, and k-means codebooks (seed 000)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from autopar.quant import (ScaleLevel, kmeans_quantize, multilevel_bits_per_element, quantize,
                           quantize_multilevel, quantize_two_level)

W = torch.tensor([[2.09, -0.98, 1.48, 0.09],
                  [0.05, -0.14, -1.08, 2.12],
                  [-0.91, 1.92, 0.00, -1.03],
                  [1.87, 0.00, 1.53, 1.49]])

VS_QUANT = [ScaleLevel(bits=16), ScaleLevel(bits=4, vector_size=16)]


def test_seed_two_level_cost():
    # Seed 000: 4-bit values, a 4-bit scale every 16 elements: 4 + 4/16 = 4.25 bits, plus fp16 γ per channel.
    assert multilevel_bits_per_element(4, VS_QUANT, 4096) == 4.25 + 16 / 4096
    assert multilevel_bits_per_element(4, [ScaleLevel(bits=16, vector_size=16)], 4096) == 5.0
    w = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0))
    q = quantize_two_level(w, 4, scale_bits=4, vector_size=16)
    assert q.bits_per_element == 4.25390625
    assert q.nbytes == 8 * 4096 // 2 + 8 * 256 // 2 + 8 * 2      # values, 4-bit S_q, fp16 γ
    # Single-level formats are the same formula: int4-g128 with fp16 scales is 4 + 16/128.
    assert multilevel_bits_per_element(4, [ScaleLevel(bits=16, vector_size=128)], 4096) == 4.125


def test_two_level_by_hand():
    # One row, vectors of 2, 4-bit values (qmax 7) and 4-bit S_q (up to 15), fp32 γ:
    # γ = |r|max / (7 · 15) = 1/15; S_q = ceil((|v|max / 7) / γ) = ceil(15, 3.75) = (15, 4);
    # q = round(r / (γ S_q)) = (7, -4, round(6.56), round(3.28)); r̂ = γ S_q q.
    q = quantize_multilevel(torch.tensor([[7.0, -3.5, 1.75, 0.875]]), 4,
                            [ScaleLevel(bits=32), ScaleLevel(bits=4, vector_size=2)])
    gamma, s_q = q.level_scales()
    assert float(gamma) == pytest.approx(1 / 15)
    assert s_q.tolist() == [[15, 4]]
    assert q.int_values().tolist() == [[7, -4, 7, 3]]
    assert q.dequantize()[0].tolist() == pytest.approx([7.0, -4.0, 7 * 4 / 15, 3 * 4 / 15], rel=1e-6)
    assert q.nbytes == 2 + 4 + 1


@st.composite
def multilevel_cases(draw):
    bits = draw(st.integers(2, 8))
    inner = draw(st.sampled_from([1, 2, 4]))
    middle = inner * draw(st.sampled_from([1, 2, 4]))
    row = middle * draw(st.integers(1, 3))
    levels = [ScaleLevel(bits=draw(st.sampled_from([16, 32])), vector_size=draw(st.sampled_from([None, row]))),
              ScaleLevel(bits=draw(st.integers(1, 8)), vector_size=middle)]
    if draw(st.booleans()):
        levels.append(ScaleLevel(bits=draw(st.integers(1, 8)), vector_size=inner))
    values = draw(arrays(np.float32, (draw(st.integers(1, 3)), row), elements=st.floats(-100, 100, width=32)))
    return bits, levels, torch.from_numpy(values)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(multilevel_cases())
def test_multilevel_error_is_at_most_half_the_effective_step(case):
    bits, levels, t = case
    q = quantize_multilevel(t, bits, levels)
    step = q.effective_scale().repeat_interleave(levels[-1].vector_size, dim=1).double()
    error = (t.double() - q.dequantize().double()).abs()
    assert bool((error <= step / 2 * (1 + 1e-5) + 1e-6 * float(t.abs().max())).all())
    for level, scales in zip(levels[1:], q.level_scales()[1:]):
        assert int(scales.min()) >= 1 and int(scales.max()) <= 2 ** level.bits - 1
    assert q.bits_per_element >= multilevel_bits_per_element(bits, levels, t.shape[-1])


def test_two_level_uses_the_scale_range_and_beats_per_channel():
    gen = torch.Generator().manual_seed(1)
    magnitude = torch.logspace(-1, 1, 16).repeat_interleave(16)              # vectors of different range
    w = torch.randn(32, 256, generator=gen) * magnitude
    q = quantize_two_level(w, 4, scale_bits=4, vector_size=16)
    s_q = q.level_scales()[1]
    assert bool((s_q.amax(dim=1) == 15).all())                                # the largest vector gets 2^4 - 1
    channel = quantize(w, 4, granularity="channel")
    assert (w - q.dequantize()).norm() < 0.5 * (w - channel.dequantize()).norm()


def test_three_levels_and_dtypes():
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    levels = [ScaleLevel(bits=32), ScaleLevel(bits=8, vector_size=64), ScaleLevel(bits=2, vector_size=8)]
    q = quantize_multilevel(w, 4, levels)
    assert q.bits_per_element == 4 + 32 / 256 + 8 / 64 + 2 / 8
    r = q.dequantize()
    assert r.dtype == torch.bfloat16 and r.shape == w.shape
    assert torch.equal(quantize_multilevel(torch.zeros(2, 16), 4, VS_QUANT).dequantize(), torch.zeros(2, 16))


@pytest.mark.parametrize("levels, row, message", [
    ([], 16, r"levels: found \(\), required a non-empty sequence of ScaleLevel"),
    ([ScaleLevel(bits=8)], 16, r"levels\[0\].bits: found 8, required 16 or 32"),
    ([ScaleLevel(bits=16), ScaleLevel(bits=4)], 16, r"levels\[1\].vector_size: found None, required a positive"),
    ([ScaleLevel(bits=16), ScaleLevel(bits=9, vector_size=4)], 16,
     r"levels\[1\].bits: found 9, required an integer from 1 to 8"),
    ([ScaleLevel(bits=16), ScaleLevel(bits=4, vector_size=5)], 16,
     r"levels\[1\].vector_size: found 5, required a divisor of the row length 16"),
    ([ScaleLevel(bits=16, vector_size=8), ScaleLevel(bits=4, vector_size=16)], 16,
     r"levels\[1\].vector_size: found 16, required a divisor of levels\[0\].vector_size 8"),
])
def test_bad_levels(levels, row, message):
    with pytest.raises(ValueError, match=message):
        quantize_multilevel(torch.randn(2, row), 4, levels)


def test_bad_multilevel_tensors():
    with pytest.raises(ValueError, match="bits: found 1, required an integer from 2 to 8"):
        quantize_two_level(torch.randn(2, 16), 1)
    with pytest.raises(TypeError, match="found dtype torch.int32, required a floating-point dtype"):
        quantize_two_level(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="found 0 dimensions .*required at least 1"):
        quantize_two_level(torch.tensor(1.0))


def test_seed_kmeans_example():
    # Seed 000, "Quantization Basics": 2-bit cluster indices and the codebook 3: 2.00, 2: 1.50, 1: 0.00, 0: -1.00.
    q = kmeans_quantize(W, 2)
    assert q.codebook.tolist() == pytest.approx([-1.00, 0.00, 1.50, 2.00], abs=1e-6)
    assert q.indices().tolist() == [[3, 0, 2, 1],
                                    [1, 1, 0, 3],
                                    [0, 3, 1, 0],
                                    [3, 1, 2, 2]]
    assert torch.allclose(q.dequantize(), q.codebook[q.indices()])
    # 16 × 2-bit indices (4 bytes) + 4 fp32 centroids (16 bytes) = 20 bytes, against 64 for fp32 weights.
    assert q.nbytes == 20 and q.bits_per_element == 10.0
    assert q.iterations == 1                                                   # converged at once


def test_kmeans_is_deterministic_and_assigns_the_nearest_centroid():
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(3))
    a, b = kmeans_quantize(x, 3, iterations=50), kmeans_quantize(x, 3, iterations=50)
    assert torch.equal(a.codebook, b.codebook) and torch.equal(a.data, b.data)
    assert a.codebook.numel() == 8 and bool((a.codebook[1:] >= a.codebook[:-1]).all())
    nearest = (x[..., None] - a.codebook).abs().amin(dim=-1)
    assert torch.allclose((x - a.dequantize()).abs(), nearest)
    assert (x - a.dequantize()).pow(2).mean() < (x - quantize(x, 3).dequantize()).pow(2).mean()
    assert a.bits_per_element == 8 * (math.ceil(1500 * 3 / 8) + 8 * 4) / 1500


def test_kmeans_edge_cases_and_errors():
    const = kmeans_quantize(torch.full((2, 3), 0.5, dtype=torch.float16), 4)
    assert const.dequantize().dtype == torch.float16 and bool((const.dequantize() == 0.5).all())
    with pytest.raises(ValueError, match="bits: found 9, required an integer from 1 to 8"):
        kmeans_quantize(W, 9)
    with pytest.raises(ValueError, match="iterations: found 0, required a positive integer"):
        kmeans_quantize(W, 2, iterations=0)
    with pytest.raises(TypeError, match="found dtype torch.int64"):
        kmeans_quantize(torch.arange(4), 2)
