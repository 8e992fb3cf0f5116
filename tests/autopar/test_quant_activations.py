"""Activation range observers (seed 000) and LLM.int8() matrix multiplication (seed 004)."""

import pytest
import torch

from autopar.quant import (MAX_INNER, CalibrationObserver, MinMaxObserver, MovingAverageObserver, int8_matmul,
                           int_matmul, linear_qparams, outlier_columns, vectorwise_int8_matmul)


def batch(lo, hi):
    return torch.tensor([lo, (lo + hi) / 2, hi])


def _fake_quant(x, scale, zero, bits):
    """r̂ = S(clamp(round(r/S) + Z) − Z), the quantize–dequantize an activation goes through."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return ((torch.round(x / scale) + zero).clamp(qmin, qmax) - zero) * scale


def test_min_max_observer():
    obs = MinMaxObserver()
    for x in (batch(-1, 2), batch(-3, 0.5), batch(0, 1)):
        obs = obs.observe(x)
    assert obs.range() == (-3, 2) and obs.count == 3
    scale, zero = obs.qparams(8, "asymmetric")
    expected = linear_qparams(-3.0, 2.0, 8, "asymmetric")
    assert float(scale) == float(expected[0]) == pytest.approx(5 / 255) and int(zero) == int(expected[1])


def test_moving_average_by_hand():
    # Seed 000: r̂(t) = α r(t) + (1 − α) r̂(t−1), α = 0.25, r̂(1) = r(1).
    obs = MovingAverageObserver(alpha=0.25)
    ranges = []
    for x in (batch(-1, 2), batch(-3, 4), batch(0, 1)):
        obs = obs.observe(x)
        ranges.append(obs.range())
    assert ranges[0] == (-1, 2)
    assert ranges[1] == pytest.approx((0.25 * -3 + 0.75 * -1, 0.25 * 4 + 0.75 * 2))      # (-1.5, 2.5)
    assert ranges[2] == pytest.approx((0.25 * 0 + 0.75 * -1.5, 0.25 * 1 + 0.75 * 2.5))   # (-1.125, 2.125)
    assert MovingAverageObserver(alpha=1.0).observe(batch(-1, 2)).observe(batch(-5, 7)).range() == (-5, 7)
    scale, zero = obs.qparams(4, "symmetric")
    assert float(scale) == pytest.approx(2.125 / 7) and int(zero) == 0


def test_percentile_calibration_clips_an_injected_outlier():
    gen = torch.Generator().manual_seed(0)
    bulk = torch.rand(9999, generator=gen) * 2 - 1                            # in [-1, 1)
    outlier = torch.tensor([1000.0])
    batches = (bulk[:5000], torch.cat([bulk[5000:], outlier]))
    minmax, calibrated = MinMaxObserver(), CalibrationObserver(method="percentile", percentile=99.9)
    for x in batches:
        minmax, calibrated = minmax.observe(x), calibrated.observe(x)
    assert minmax.range()[1] == 1000.0
    lo, hi = calibrated.range()
    assert -1 <= lo < -0.99 and 0.99 < hi <= 1
    error = {name: (bulk - _fake_quant(bulk, *obs.qparams(8, "asymmetric"), 8)).abs().max()
             for name, obs in (("minmax", minmax), ("percentile", calibrated))}
    assert error["percentile"] < 0.01 * error["minmax"]


def test_percentile_is_nearest_rank():
    values = torch.randperm(10000, generator=torch.Generator().manual_seed(1)).float() + 1    # 1 … 10000
    obs = CalibrationObserver(percentile=99.99).observe(values)
    assert obs.range() == (1.0, 9999.0)
    assert CalibrationObserver(percentile=99).observe(values).range() == (100.0, 9900.0)
    assert CalibrationObserver(percentile=100).observe(values).range() == (1.0, 10000.0)


def test_mse_calibration_clips_a_heavy_tail():
    gen = torch.Generator().manual_seed(2)
    u = torch.rand(100000, generator=gen).clamp(1e-7, 1 - 1e-7) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())                           # Laplace(0, 1)
    minmax = MinMaxObserver().observe(x)
    mse = CalibrationObserver(method="mse").observe(x)
    for bits, scheme in ((4, "asymmetric"), (4, "symmetric"), (8, "asymmetric")):
        lo, hi = mse.range(bits, scheme)
        assert hi < float(x.max())
        if bits == 4:
            assert hi < 0.5 * float(x.max()) and lo > 0.6 * float(x.min())      # about ±4.8 of −9.2 … 12.2
        error = (x - _fake_quant(x, *mse.qparams(bits, scheme), bits)).pow(2).mean()
        baseline = (x - _fake_quant(x, *minmax.qparams(bits, scheme), bits)).pow(2).mean()
        assert error < 0.9 * baseline
    assert mse.range(4, "asymmetric")[1] < mse.range(8, "asymmetric")[1]      # fewer bits, tighter clip


def test_bad_observer_arguments():
    with pytest.raises(ValueError, match="observer: found 0 observed batches, required at least 1"):
        MinMaxObserver().range()
    with pytest.raises(ValueError, match="observer: found 0 observed batches"):
        CalibrationObserver().qparams(8)
    with pytest.raises(ValueError, match=r"alpha: found 0, required a number in \(0, 1\]"):
        MovingAverageObserver(alpha=0)
    with pytest.raises(ValueError, match="method: found 'kl', required one of 'percentile', 'mse'"):
        CalibrationObserver(method="kl")
    with pytest.raises(ValueError, match=r"percentile: found 40, required a number in \(50, 100\]"):
        CalibrationObserver(percentile=40)
    with pytest.raises(TypeError, match="x: found dtype torch.int64, required a floating-point dtype"):
        MinMaxObserver().observe(torch.arange(3))
    with pytest.raises(ValueError, match="bits: found 1"):
        MinMaxObserver().observe(batch(0, 1)).qparams(1)


def test_int_matmul_is_exact():
    a = torch.tensor([[127, -128]], dtype=torch.int8)
    b = torch.tensor([[127], [-128]], dtype=torch.int8)
    assert int_matmul(a, b).tolist() == [[127 * 127 + 128 * 128]]
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(-128, 128, (24, 8192), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (8192, 40), generator=gen, dtype=torch.int8)
    c = int_matmul(a, b)
    assert c.dtype == torch.int32
    assert torch.equal(c.to(torch.float64), a.to(torch.float64) @ b.to(torch.float64))   # exact in fp64 too
    with pytest.raises(ValueError, match=f"inner size: found {MAX_INNER + 1}, required at most {MAX_INNER}"):
        int_matmul(torch.zeros(1, MAX_INNER + 1, dtype=torch.int8), torch.zeros(MAX_INNER + 1, 1, dtype=torch.int8))
    with pytest.raises(TypeError, match="a: found torch.int32 with 2 dimensions, required a 2-D int8 tensor"):
        int_matmul(torch.zeros(2, 2, dtype=torch.int32), b[:2])


def test_int_matmul_takes_a_column_major_operand_as_it_lies(monkeypatch):
    """A weight kept as its (out, in) integers is passed transposed, column-major: `torch._int_mm`
    gets it as it lies (several times faster than a row-major copy made per call); an operand that
    is neither row- nor column-major is copied row-major."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(-128, 128, (3, 64), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (40, 64), generator=gen, dtype=torch.int8)       # (out, in)
    seen, real = [], torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda x, y: seen.append(y.stride()) or real(x, y))
    assert torch.equal(int_matmul(a, w.t()).long(), a.long() @ w.long().t())
    assert seen == [(1, 64)]
    wide = torch.randint(-128, 128, (64, 80), generator=gen, dtype=torch.int8)[:, ::2]  # strided: neither
    assert torch.equal(int_matmul(a, wide).long(), a.long() @ wide.long())
    assert seen[-1] == (40, 1)


def test_vectorwise_int8_by_hand():
    # c_x = 1/127, q_x = (127, round(-38.1) = -38); c_w = 0.5/127, q_w = (127, round(50.8) = 51);
    # y = c_x c_w (127·127 − 38·51) = 0.5 · 14191 / 127², where float gives 0.44.
    y = vectorwise_int8_matmul(torch.tensor([[1.0, -0.3]]), torch.tensor([[0.5, 0.2]]))
    assert float(y) == pytest.approx(0.5 * 14191 / 127 ** 2, rel=1e-6)
    assert float(y) != pytest.approx(0.44, rel=1e-4)


def _outlier_input(seed=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 256, generator=gen)
    x[:, 7] *= 40                                                              # one outlier feature dimension
    w = torch.randn(128, 256, generator=gen) * 0.05
    return x, w


def test_llm_int8_matches_float_and_decomposes_outliers():
    x, w = _outlier_input()
    reference = x @ w.t()
    mask = outlier_columns(x, 6.0)
    assert mask.nonzero().flatten().tolist() == [7]
    y = int8_matmul(x, w, threshold=6.0)
    plain = int8_matmul(x, w, threshold=None)
    error, plain_error = (y - reference).norm() / reference.norm(), (plain - reference).norm() / reference.norm()
    assert error < 0.01
    assert error < 0.2 * plain_error
    # The decomposition: outlier features multiplied in float, the rest through int8.
    regular = ~mask
    parts = x[:, mask] @ w[:, mask].t() + vectorwise_int8_matmul(x[:, regular], w[:, regular])
    assert torch.allclose(y, parts, atol=1e-5)
    assert torch.equal(int8_matmul(x, w, threshold=float("inf")), plain)


def test_llm_int8_without_outliers_is_close_and_keeps_shape_and_dtype():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 3, 64, generator=gen), torch.randn(16, 64, generator=gen)
    y = int8_matmul(x, w)
    assert y.shape == (2, 3, 16)
    assert (y - x @ w.t()).norm() / (x @ w.t()).norm() < 0.02
    for dtype in (torch.float16, torch.bfloat16):
        x16, w16 = x.to(dtype), w.to(dtype)
        y16 = int8_matmul(x16, w16)
        assert y16.dtype == dtype
        reference = x16.float() @ w16.float().t()
        assert (y16.float() - reference).norm() / reference.norm() < 0.02


def test_bad_int8_matmul_arguments():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"weight: found shape \(3, 5\), required \(out_features, 8\)"):
        int8_matmul(x, torch.randn(3, 5))
    with pytest.raises(TypeError, match="x: found dtype torch.int8, required a floating-point dtype"):
        int8_matmul(x.to(torch.int8), w)
    with pytest.raises(ValueError, match="threshold: found -1.0, required a positive number, inf or None"):
        int8_matmul(x, w, threshold=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_llm_int8_on_cuda_matches_cpu():
    x, w = _outlier_input()
    y_cpu = int8_matmul(x, w)
    y_gpu = int8_matmul(x.cuda(), w.cuda())
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-4)
    a = torch.randint(-128, 128, (5, 12), dtype=torch.int8)                  # shapes _int_mm does not take
    b = torch.randint(-128, 128, (12, 3), dtype=torch.int8)
    assert torch.equal(int_matmul(a.cuda(), b.cuda()).cpu(), int_matmul(a, b))
