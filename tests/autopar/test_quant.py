"""Linear quantization and bit packing against seed 000/004's worked examples, plus properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from autopar.quant import (integer_range, linear_qparams, pack_bits, packed_nbytes, quantize,
                           unpack_bits)

# Seed 000, "Quantization Basics" and "Per-channel Quantization": the 4×4 weights (rows = oc).
W = torch.tensor([[2.09, -0.98, 1.48, 0.09],
                  [0.05, -0.14, -1.08, 2.12],
                  [-0.91, 1.92, 0.00, -1.03],
                  [1.87, 0.00, 1.53, 1.49]])

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


def test_seed_2bit_signed_table():
    # Seed 000: binary 01 00 11 10 is decimal 1 0 -1 -2.
    assert integer_range(2) == (-2, 1)
    assert integer_range(8) == (-128, 127)
    packed = pack_bits(torch.tensor([1, 0, -1, -2]), 2, signed=True)
    assert packed.tolist() == [0b10_11_00_01]          # element 0 in the lowest two bits


def test_seed_asymmetric_per_tensor_example():
    # S = (2.12 - (-1.08)) / (1 - (-2)) = 1.07, Z = round(-2 - (-1.08 / 1.07)) = -1.
    scale, zero = linear_qparams(-1.08, 2.12, 2, "asymmetric")
    assert float(scale) == pytest.approx(3.2 / 3)
    assert round(float(scale), 2) == 1.07
    assert int(zero) == -1
    q = quantize(W, 2, scheme="asymmetric")
    assert int(q.zero_point) == -1 and float(q.scale) == pytest.approx(3.2 / 3)
    assert q.int_values().tolist() == [[1, -2, 0, -1],
                                       [-1, -1, -2, 1],
                                       [-2, 1, -1, -2],
                                       [1, -1, 0, 0]]
    # Reconstruction (q - (-1)) × 1.07.
    expected = (q.int_values().float() + 1) * (3.2 / 3)
    assert torch.allclose(q.dequantize(), expected)


def test_seed_symmetric_per_tensor_vs_per_channel():
    # Per tensor: |r|max = 2.12, S = 2.12 / (2^(2-1) - 1) = 2.12, ‖W − S q‖ = 2.28.
    tensor = quantize(W, 2, scheme="symmetric", granularity="tensor")
    assert float(tensor.scale) == pytest.approx(2.12)
    assert tensor.int_values().tolist() == [[1, 0, 1, 0], [0, 0, -1, 1], [0, 1, 0, 0], [1, 0, 1, 1]]
    assert round(float((W - tensor.dequantize()).norm()), 2) == 2.28
    # Per channel (one S per output channel, a row): S = 2.09, 2.12, 1.92, 1.87, ‖W − S ⊙ q‖ = 2.08.
    channel = quantize(W, 2, scheme="symmetric", granularity="channel", axis=0)
    assert channel.scale.tolist() == pytest.approx([2.09, 2.12, 1.92, 1.87])
    assert channel.int_values().tolist() == [[1, 0, 1, 0], [0, 0, -1, 1], [0, 1, 0, -1], [1, 0, 1, 1]]
    assert round(float((W - channel.dequantize()).norm()), 2) == 2.08


def test_seed_004_absmax_int8_example():
    # Seed 004: 15, 0.1, 0.02, 1.0, 0.01 -> 127, 1, 0, 8, 0; everything under 0.05 maps to 0.
    q = quantize(torch.tensor([15.0, 0.1, 0.02, 1.0, 0.01, 0.05, -0.05]), 8, scheme="symmetric")
    assert q.int_values().tolist() == [127, 1, 0, 8, 0, 0, 0]
    assert float(q.scale) == pytest.approx(15 / 127)
    assert q.data.dtype == torch.int8 and q.nbytes == 7 + 4


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_round_trip_every_width(bits, signed):
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(low, high + 1, (3, 37), generator=gen)
    values[0, :2] = torch.tensor([low, high])
    packed = pack_bits(values, bits, signed=signed)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(111 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 111, signed=signed).reshape(3, 37), values)


def test_packing_layout_is_lsb_first_and_straddles_bytes():
    assert pack_bits(torch.tensor([1, 2]), 4, signed=False).tolist() == [0x21]
    # 3 bits: 5 = 101, 3 = 011, 6 = 110, laid LSB first: 1 0 1 | 1 1 0 | 0 1 1.
    assert pack_bits(torch.tensor([5, 3, 6]), 3, signed=False).tolist() == [1 + 4 + 8 + 16 + 128, 1]
    assert packed_nbytes(16, 2) == 4 and packed_nbytes(3, 3) == 2 and packed_nbytes(5, 7) == 5


def test_pack_rejects_values_out_of_range():
    with pytest.raises(ValueError, match=r"values: found range \[0, 4\], required \[-2, 1\]"):
        pack_bits(torch.tensor([0, 4]), 2, signed=True)
    with pytest.raises(TypeError, match="required an integer dtype"):
        pack_bits(torch.tensor([0.5]), 2, signed=False)


@st.composite
def quantization_cases(draw):
    bits = draw(st.integers(2, 8))
    scheme = draw(st.sampled_from(["symmetric", "asymmetric"]))
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    group_size = draw(st.sampled_from([1, 2, 4, 8]))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), group_size * draw(st.integers(1, 3)))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    values = draw(arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    axis = draw(st.integers(-3, 2))
    return bits, scheme, granularity, group_size, axis, torch.from_numpy(values * np.float32(magnitude))


def _scale_per_element(q, t):
    if q.granularity == "tensor":
        return q.scale.expand(t.shape)
    if q.granularity == "channel":
        view = [1] * t.dim()
        view[q.axis] = -1
        return q.scale.reshape(view).expand(t.shape)
    return q.scale.repeat_interleave(q.group_size, dim=-1)


@PROPERTY
@given(quantization_cases())
def test_round_trip_error_is_at_most_half_a_step(case):
    bits, scheme, granularity, group_size, axis, t = case
    q = quantize(t, bits, scheme=scheme, granularity=granularity,
                 group_size=group_size if granularity == "group" else None, axis=axis)
    r_hat = q.dequantize()
    assert r_hat.shape == t.shape and r_hat.dtype == t.dtype
    step = _scale_per_element(q, t).double()
    error = (t.double() - r_hat.double()).abs()
    assert bool((error <= step / 2 * (1 + 1e-5) + 1e-6 * float(t.abs().max())).all())
    qmin, qmax = integer_range(bits)
    ints = q.int_values()
    assert int(ints.min()) >= qmin and int(ints.max()) <= qmax
    if scheme == "symmetric":
        assert bool((q.zero_point == 0).all())


def test_channel_and_group_equal_independent_per_tensor_quantization():
    t = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    channel = quantize(t, 3, scheme="asymmetric", granularity="channel", axis=1)
    assert channel.scale.shape == (5,) and channel.axis == 1
    for c in range(5):
        alone = quantize(t[:, c, :].contiguous(), 3, scheme="asymmetric")
        assert torch.equal(channel.int_values()[:, c, :], alone.int_values())
        assert torch.equal(channel.dequantize()[:, c, :], alone.dequantize())
    assert torch.equal(quantize(t, 3, granularity="channel", axis=-2).int_values(),
                       quantize(t, 3, granularity="channel", axis=1).int_values())
    group = quantize(t, 4, granularity="group", group_size=4)
    assert group.scale.shape == (3, 5, 2)
    alone = quantize(t[1, 2, 4:].contiguous(), 4)
    assert torch.equal(group.int_values()[1, 2, 4:], alone.int_values())
    assert float(group.scale[1, 2, 1]) == float(alone.scale)


def test_groups_keep_small_ranges_that_one_channel_scale_loses():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 256, generator=gen) * torch.logspace(-2, 1, 256)      # ranges grow along a row
    channel = quantize(w, 4, granularity="channel")
    group = quantize(w, 4, granularity="group", group_size=32)
    small = slice(0, 128)                                                     # |w| below about 0.3
    assert bool((channel.int_values()[:, :64] == 0).all())                   # one step ≈ |w|max / 7 > 1
    group_error = (w - group.dequantize())[:, small].norm()
    channel_error = (w - channel.dequantize())[:, small].norm()
    assert group_error < 0.2 * channel_error
    assert (w - group.dequantize()).norm() < (w - channel.dequantize()).norm()


def test_bits_per_element_accounting():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(2))
    # int4-g128 with an fp16 scale: 4 + 16/128; with a 4-bit zero point too: + 4/128.
    g128 = quantize(w, 4, granularity="group", group_size=128, scale_dtype=torch.float16)
    assert g128.scale.dtype == torch.float16 and g128.bits_per_element == 4.125
    assert g128.nbytes == 64 * 1024 // 2 + 64 * 8 * 2
    assert quantize(w, 4, scheme="asymmetric", granularity="group", group_size=128,
                    scale_dtype=torch.float16).bits_per_element == 4 + 16 / 128 + 4 / 128
    assert quantize(w, 8).bits_per_element == 8 + 32 / (64 * 1024)
    # 3 bits straddle bytes: 40 values → 15 bytes, plus 4 fp32 scales = 31 bytes = 6.2 bits each.
    three = quantize(torch.randn(4, 10), 3, granularity="channel")
    assert three.nbytes == 15 + 16 and three.bits_per_element == pytest.approx(6.2)


def test_fp16_scales_are_rounded_up_so_nothing_is_clipped():
    t = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    q = quantize(t, 4, granularity="channel", scale_dtype=torch.float16)
    ideal = t.abs().amax(dim=1) / 7
    assert bool((q.scale.float() >= ideal).all())
    assert bool(((t - q.dequantize()).abs() <= q.scale.float()[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_zero_and_constant_tensors(scheme):
    zeros = quantize(torch.zeros(3, 4), 4, scheme=scheme, granularity="channel")
    assert bool(torch.isfinite(zeros.scale).all()) and bool((zeros.scale > 0).all())
    assert torch.equal(zeros.dequantize(), torch.zeros(3, 4))
    for value in (3.0, -0.25):
        const = quantize(torch.full((2, 8), value), 5, scheme=scheme, granularity="group", group_size=4)
        assert torch.allclose(const.dequantize(), torch.full((2, 8), value), rtol=1e-6)
    assert float(quantize(torch.tensor(2.5), 8).dequantize()) == pytest.approx(2.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dequantize_returns_the_input_dtype(dtype):
    t = torch.randn(4, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    r = quantize(t, 8, granularity="group", group_size=8).dequantize()
    assert r.dtype == dtype and r.shape == t.shape
    assert float((r.double() - t.double()).abs().max()) < 0.05


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(bits=1), ValueError, "bits: found 1, required an integer from 2 to 8"),
    (dict(bits=9), ValueError, "bits: found 9, required an integer from 2 to 8"),
    (dict(bits=4.0), ValueError, "bits: found 4.0, required an integer"),
    (dict(scheme="affine"), ValueError, "scheme: found 'affine', required one of 'symmetric', 'asymmetric'"),
    (dict(granularity="row"), ValueError, "granularity: found 'row', required one of 'tensor', 'channel', 'group'"),
    (dict(granularity="group", group_size=3), ValueError,
     "group_size: found 3, which does not divide the last dimension 8 .* required a divisor of 8"),
    (dict(granularity="group"), ValueError, "group_size: found None, required a positive integer"),
    (dict(granularity="group", group_size=0), ValueError, "group_size: found 0, required a positive integer"),
    (dict(granularity="channel", group_size=4), ValueError, "group_size: found 4, required None unless"),
    (dict(granularity="channel", axis=2), ValueError, r"axis: found 2, required an integer in \[-2, 2\)"),
    (dict(granularity="channel", axis=-3), ValueError, r"axis: found -3, required an integer in \[-2, 2\)"),
    (dict(scale_dtype=torch.int32), ValueError, "scale_dtype: found torch.int32, required a floating-point"),
])
def test_bad_arguments_name_found_and_required(kwargs, error, message):
    args = dict(bits=4, scheme="symmetric", granularity="tensor", group_size=None, axis=0) | kwargs
    bits = args.pop("bits")
    with pytest.raises(error, match=message):
        quantize(torch.randn(4, 8), bits, **args)


def test_bad_tensors_name_found_and_required():
    with pytest.raises(TypeError, match="tensor: found dtype torch.int64, required a floating-point dtype"):
        quantize(torch.arange(8), 4)
    with pytest.raises(TypeError, match="tensor: found list, required a torch.Tensor"):
        quantize([1.0, 2.0], 4)
    with pytest.raises(ValueError, match="found non-finite values"):
        quantize(torch.tensor([1.0, float("nan")]), 4)
    with pytest.raises(ValueError, match="found an empty tensor"):
        quantize(torch.zeros(0, 4), 4)
    with pytest.raises(ValueError, match="found 0 dimensions, required at least 1 for granularity='channel'"):
        quantize(torch.tensor(1.0), 4, granularity="channel")
    with pytest.raises(ValueError, match=r"range: found rmin > rmax"):
        linear_qparams(1.0, -1.0, 4, "asymmetric")
