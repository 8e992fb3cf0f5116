"""Mixed-precision bit widths (HAWQ-V3): the integer program against exhaustive search, budgets at the
extremes, Hutchinson's trace against exact Hessians, and sensitivities against measured loss increases."""

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autopar.errors import InfeasibleError
from autopar.quant import (assign_bits, hessian_trace, layer_bytes, plan_bits, quantization_error, quantize,
                           sensitivity)

CHOICES = (4, 8, 16)
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


def half_sum_of_squares(out, target):
    return 0.5 * out.pow(2).sum()


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: with more threads than idle cores, OpenMP waits dominate the run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Branches(nn.Module):
    """y = 10·a(x) + 3·b(x) + c(x): a's weights matter 100 times as much as c's, b's 9 times."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(32, 8, bias=False) for _ in range(3))

    def forward(self, x):
        return 10 * self.a(x) + 3 * self.b(x) + self.c(x)


@pytest.fixture
def branches():
    torch.manual_seed(0)
    model = Branches()
    x = torch.randn(64, 32)
    with torch.no_grad():
        target = model(x)          # the loss is at its minimum, 0: ΔL is exactly quadratic in each layer
    return model, [(x, target)]


# --- the integer program ---------------------------------------------------------------------------

@st.composite
def instances(draw):
    n = draw(st.integers(3, 6))
    names = [f"layer{i}" for i in range(n)]
    sizes = {name: (draw(st.integers(1, 16)), draw(st.integers(1, 48))) for name in names}
    errors = {name: {b: draw(st.floats(0, 100)) for b in CHOICES} for name in names}
    low = sum(layer_bytes(sizes[name], 4) for name in names)
    high = sum(layer_bytes(sizes[name], 16) for name in names)
    budget = low + draw(st.floats(0, 1)) * (high - low)
    latency = latency_budget = None
    if draw(st.booleans()):
        latency = {name: {b: draw(st.integers(1, 10)) for b in CHOICES} for name in names}
        latency_budget = draw(st.integers(sum(min(row.values()) for row in latency.values()),
                                          sum(max(row.values()) for row in latency.values())))
    return sizes, errors, budget, latency, latency_budget


def exhaustive(sizes, errors, budget, latency, latency_budget):
    """The least Σ errors over every assignment that fits (inf when none does)."""
    best = math.inf
    for combo in itertools.product(CHOICES, repeat=len(sizes)):
        pick = dict(zip(sizes, combo))
        if sum(layer_bytes(sizes[n], b) for n, b in pick.items()) > budget:
            continue
        if latency is not None and sum(latency[n][b] for n, b in pick.items()) > latency_budget:
            continue
        best = min(best, sum(errors[n][b] for n, b in pick.items()))
    return best


@PROPERTY
@given(instances())
def test_assign_bits_matches_exhaustive_search(instance):
    sizes, errors, budget, latency, latency_budget = instance
    best = exhaustive(*instance)
    if best == math.inf:           # memory and latency each fit alone, but not together
        with pytest.raises(InfeasibleError, match="latency_budget"):
            assign_bits(sizes, errors, budget, latency=latency, latency_budget=latency_budget)
        return
    bits = assign_bits(sizes, errors, budget, choices=CHOICES, latency=latency, latency_budget=latency_budget)
    assert sorted(bits) == sorted(sizes) and set(bits.values()) <= set(CHOICES)
    assert sum(layer_bytes(sizes[n], b) for n, b in bits.items()) <= budget
    if latency is not None:
        assert sum(latency[n][b] for n, b in bits.items()) <= latency_budget
    assert sum(errors[n][b] for n, b in bits.items()) == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_assign_bits_hand_example():
    # 8×8 weights: 4 bits = 32 B + 8 fp32 scales = 64 B, 8 bits = 96 B. With 160 B only one layer gets
    # 8 bits, and a gains 8 from it, b only 1.
    assert layer_bytes((8, 8), 4) == 64 and layer_bytes((8, 8), 8) == 96 and layer_bytes((8, 8), 16) == 128
    errors = {"a": {4: 9.0, 8: 1.0}, "b": {4: 2.0, 8: 1.0}}
    assert assign_bits({"a": (8, 8), "b": (8, 8)}, errors, 160, choices=(4, 8)) == {"a": 8, "b": 4}
    assert assign_bits({"a": (8, 8), "b": (8, 8)}, errors, 192, choices=(4, 8)) == {"a": 8, "b": 8}
    assert assign_bits({"a": (8, 8), "b": (8, 8)}, errors, 159, choices=(4, 8)) == {"a": 4, "b": 4}


def test_latency_budget_changes_the_choice():
    # Memory is ample (all 16 bits fit); a latency budget of 6 allows one 16-bit layer with one 8-bit one.
    sizes = {"a": (8, 8), "b": (8, 8)}
    errors = {"a": {4: 10.0, 8: 1.0, 16: 0.0}, "b": {4: 10.0, 8: 2.0, 16: 0.0}}
    latency = {name: {4: 1.0, 8: 2.0, 16: 4.0} for name in sizes}
    assert assign_bits(sizes, errors, 1000) == {"a": 16, "b": 16}
    assert assign_bits(sizes, errors, 1000, latency=latency, latency_budget=6) == {"a": 8, "b": 16}
    with pytest.raises(InfeasibleError, match=r"at least 2 of latency.*latency_budget given is 1"):
        assign_bits(sizes, errors, 1000, latency=latency, latency_budget=1)


def test_layer_bytes_is_what_quantize_stores():
    w = torch.randn(12, 20)
    for bits in (3, 4, 8):
        assert layer_bytes((12, 20), bits) == quantize(w, bits, granularity="channel", axis=0).nbytes
    assert layer_bytes((12, 20), 16) == 12 * 20 * 2


def test_assign_bits_rejects_bad_input():
    sizes = {"a": (4, 4)}
    with pytest.raises(ValueError, match="sizes: found no layers"):
        assign_bits({}, {}, 100)
    with pytest.raises(ValueError, match=r"unknown: \['z'\]"):
        assign_bits(sizes, {"a": {4: 1.0, 8: 0.5}, "z": {4: 1.0, 8: 0.5}}, 100)
    with pytest.raises(ValueError, match=r"missing: \['a'\]"):
        assign_bits(sizes, {}, 100)
    with pytest.raises(ValueError, match=r"errors\['a'\]: found bit widths \[4\], required an entry for 8"):
        assign_bits(sizes, {"a": {4: 1.0}}, 100)
    with pytest.raises(ValueError, match="choices: found 5.5"):
        assign_bits(sizes, {"a": {4: 1.0}}, 100, choices=(4, 5.5))
    with pytest.raises(ValueError, match="found only latency_budget"):
        assign_bits(sizes, {"a": {4: 1.0, 8: 0.5}}, 100, latency_budget=3)
    with pytest.raises(ValueError, match=r"sizes\['a'\]: found 16"):
        assign_bits({"a": 16}, {"a": {4: 1.0, 8: 0.5}}, 100)


# --- budgets on a model with one sensitive layer ----------------------------------------------------

LAYER_4, LAYER_8, LAYER_16 = layer_bytes((8, 32), 4), layer_bytes((8, 32), 8), layer_bytes((8, 32), 16)


@pytest.mark.parametrize("method", ["hessian", "perturbation"])
def test_budget_between_extremes_keeps_bits_where_sensitive(branches, method):
    model, batches = branches
    table = sensitivity(model, batches, nn.functional.mse_loss, bits=CHOICES, method=method)
    assert table["a"].errors[4] > table["b"].errors[4] > table["c"].errors[4] > 0
    # All at 4 bits plus the step to 8 for exactly one layer: that layer should be a, the sensitive one.
    budget = 3 * LAYER_4 + (LAYER_8 - LAYER_4)
    plan = plan_bits(model, batches, nn.functional.mse_loss, budget, method=method)
    assert plan.bits == {"a": 8, "b": 4, "c": 4}
    assert 3 * LAYER_4 < plan.nbytes <= budget < 3 * LAYER_8
    assert plan.nbytes == sum(plan.layer_bytes.values()) == LAYER_8 + 2 * LAYER_4
    assert plan.error == pytest.approx(sum(plan.sensitivity[n].errors[b] for n, b in plan.bits.items()))
    # One more 4→8 step: b, the next most sensitive, takes it.
    plan = plan_bits(model, batches, nn.functional.mse_loss, budget + (LAYER_8 - LAYER_4), method=method)
    assert plan.bits == {"a": 8, "b": 8, "c": 4}
    summary = plan.summary()
    assert f"mixed precision ({method})" in summary and "8×32" in summary


def test_budget_at_the_extremes(branches):
    model, batches = branches
    loss = nn.functional.mse_loss
    assert set(plan_bits(model, batches, loss, 3 * LAYER_16).bits.values()) == {16}
    assert set(plan_bits(model, batches, loss, 10 * LAYER_16).bits.values()) == {16}
    exact = plan_bits(model, batches, loss, 3 * LAYER_4)
    assert exact.bits == {"a": 4, "b": 4, "c": 4} and exact.nbytes == 3 * LAYER_4 == 480
    with pytest.raises(InfeasibleError, match=r"at least 480 bytes.*budget_bytes given is 479") as caught:
        plan_bits(model, batches, loss, 3 * LAYER_4 - 1)
    assert caught.value.required_bytes == 480 and caught.value.available_bytes == 479


# --- Hutchinson's trace -----------------------------------------------------------------------------

def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # loss = ½ Σ_r ‖W x_r‖² with x_r = d_r e_r: H = I_out ⊗ diag(d²), and vᵀHv = Tr(H) for every ±1 v.
    model = nn.Linear(5, 3, bias=False)
    d1, d2 = torch.tensor([1.0, 2.0, 0.5, 3.0, 0.1]), torch.tensor([0.3, 1.0, 1.0, 2.0, 4.0])
    batches = [(torch.diag(d1), None), (torch.diag(d2), None)]
    traces = hessian_trace(model, batches, half_sum_of_squares, samples=3)
    expected = 3 * (d1.pow(2).sum() + d2.pow(2).sum()) / 2          # the mean loss's Hessian
    assert traces == {"": pytest.approx(float(expected), rel=1e-6)}


def test_hutchinson_matches_the_exact_trace_within_its_standard_error():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    samples = 200
    traces = hessian_trace(model, [(x, y)], nn.functional.mse_loss, samples=samples, seed=7)
    for name in ("0", "2"):
        w = model.get_submodule(name).weight

        def loss_of(weight, name=name):
            params = {f"{name}.weight": weight}
            return nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

        h = torch.autograd.functional.hessian(loss_of, w.detach()).reshape(w.numel(), w.numel()).double()
        off_diagonal = h - torch.diag(torch.diagonal(h))
        sigma = math.sqrt(2 * float(off_diagonal.pow(2).sum()) / samples)   # Var vᵀHv = 2 Σ_{j≠k} H_jk²
        assert sigma > 0
        assert abs(traces[name] - float(torch.trace(h))) <= 4 * sigma
    assert all(w.requires_grad for w in model.parameters())


def test_hutchinson_is_deterministic_and_restores_grad_flags():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)
    batches = [(torch.randn(8, 4), torch.randn(8, 1))]
    first = hessian_trace(model, batches, nn.functional.mse_loss, samples=4, seed=3)
    assert first == hessian_trace(model, batches, nn.functional.mse_loss, samples=4, seed=3)
    assert first != hessian_trace(model, batches, nn.functional.mse_loss, samples=4, seed=4)
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad


def test_hessian_sensitivity_is_trace_per_weight_times_quantization_error(branches):
    model, batches = branches
    table = sensitivity(model, batches, nn.functional.mse_loss, layers=["a", "c"], samples=8)
    assert list(table) == ["a", "c"]
    for name, row in table.items():
        w = model.get_submodule(name).weight
        assert row.shape == (8, 32) and row.trace > 0
        assert row.errors[8] == pytest.approx(row.trace / w.numel() * quantization_error(w, 8))
        assert row.errors[4] > row.errors[8] > 0


# --- perturbation against measured loss ------------------------------------------------------------

def measured_increase(model, batches, name, bits):
    copied = copy.deepcopy(model)
    layer = copied.get_submodule(name)
    with torch.no_grad():
        base = sum(float(nn.functional.mse_loss(model(x), y)) for x, y in batches) / len(batches)
        layer.weight.copy_(quantize(layer.weight, bits, granularity="channel", axis=0).dequantize())
        return sum(float(nn.functional.mse_loss(copied(x), y)) for x, y in batches) / len(batches) - base


def test_perturbation_ordering_agrees_with_measured_loss_increase():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[2].weight.mul_(4.0)                        # a layer whose error the next ones amplify
    x = torch.randn(32, 8)
    with torch.no_grad():
        batches = [(x[:16], model(x[:16]) + 0.01), (x[16:], model(x[16:]))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = sensitivity(model, batches, nn.functional.mse_loss, bits=(3, 4, 8), method="perturbation")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # weights restored
    measured = {name: measured_increase(model, batches, name, 3) for name in ("0", "2", "4")}
    assert {name: row.errors[3] for name, row in table.items()} == pytest.approx(measured, rel=1e-5)
    assert sorted(table, key=lambda n: table[n].errors[3]) == sorted(measured, key=measured.get)
    assert all(row.errors[3] > row.errors[8] >= 0 and row.trace is None for row in table.values())


def test_hessian_ordering_agrees_with_measured_loss_increase(branches):
    model, batches = branches
    table = sensitivity(model, batches, nn.functional.mse_loss, bits=(4,))
    measured = {name: measured_increase(model, batches, name, 4) for name in ("a", "b", "c")}
    assert sorted(table, key=lambda n: table[n].errors[4]) == sorted(measured, key=measured.get) == ["c", "b", "a"]


def test_sensitivity_rejects_bad_input(branches):
    model, batches = branches
    with pytest.raises(ValueError, match=r"layers: found \['nope'\]"):
        sensitivity(model, batches, nn.functional.mse_loss, layers=["nope"])
    with pytest.raises(ValueError, match="method: found 'exact'"):
        sensitivity(model, batches, nn.functional.mse_loss, method="exact")
    with pytest.raises(ValueError, match="batches: found none"):
        sensitivity(model, [], nn.functional.mse_loss)
    with pytest.raises(ValueError, match="found no nn.Linear"):
        sensitivity(model, batches, nn.functional.mse_loss, layers=lambda name, module: False)
