"""QuantizedLinear per scheme against the float Linear, and whole-model quantization of the zoo's GPT."""

import math

import pytest
import torch
from torch import nn

from autopar import models
from autopar.quant import modules
from autopar.quant import (SCHEMES, QuantizedLinear, bits_per_weight, get_scheme, quantize_model, quantized_bytes,
                           unpack_bits)

IN, OUT, TOKENS = 256, 128, 64


def _linear(seed: int = 0) -> nn.Linear:
    """Standard normal weights and bias, so every block's |W|max is about 3 (2.2 for 32 values)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(IN, OUT)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(OUT, IN, generator=g))
        linear.bias.copy_(torch.randn(OUT, generator=g))
    return linear


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(TOKENS, IN, generator=torch.Generator().manual_seed(seed))


def _relative_error(q: nn.Module, linear: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = linear(x) - linear.bias
        return float((q(x) - linear(x)).norm() / y.norm())


def _rounding_noise(scale: torch.Tensor, elements_per_scale: int, reference: torch.Tensor) -> float:
    """Expected relative error of rounding to a grid of step S: uniform error, E[e²] = S²/12 per
    element, against ‖reference‖. For x with independent unit entries, ‖(W − Ŵ)x‖ / ‖Wx‖ ≈ the same
    ratio for the weight."""
    return math.sqrt(float((scale.double() ** 2).sum()) * elements_per_scale / 12) / float(reference.detach().norm())


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-g128", "int4-g32", "w8a8", "llm.int8"])
def test_linear_schemes_round_to_within_half_a_step(scheme):
    linear = _linear()
    q = QuantizedLinear.from_linear(linear, scheme)
    group = get_scheme(scheme).group_size or IN
    step = q.scale.float().repeat_interleave(group, dim=-1).reshape(OUT, -1)       # S of each element
    error = (q.dequantize_weight() - linear.weight).abs()
    assert bool((error <= step / 2 * (1 + 1e-6)).all())
    assert int(q.int_weight().abs().max()) == 2 ** (get_scheme(scheme).bits - 1) - 1     # symmetric: |q| ≤ qmax


def test_output_error_follows_the_format():
    linear, x = _linear(), _inputs()
    errors, predicted = {}, {}
    for scheme in ("int8", "int4-g32", "int4-g128"):
        q = QuantizedLinear.from_linear(linear, scheme)
        errors[scheme] = _relative_error(q, linear, x)
        predicted[scheme] = _rounding_noise(q.scale, get_scheme(scheme).group_size or IN, linear.weight)
        assert errors[scheme] <= 1.1 * predicted[scheme], scheme
    # Steps of |W|max / 127 per row, |W|max / 7 per 32 values, |W|max / 7 per 128 values (a larger max).
    assert errors["int8"] < 0.01 < errors["int4-g32"] < errors["int4-g128"] < 0.15
    # 16 centroids on normal weights: Lloyd-Max's mean squared error is 0.009497 σ² (Max, 1960), √ ≈ 0.0975.
    assert _relative_error(QuantizedLinear.from_linear(linear, "kmeans4"), linear, x) < 0.11


def test_integer_paths_add_activation_rounding_only():
    linear, x = _linear(), _inputs()
    w8a8 = QuantizedLinear.from_linear(linear, "w8a8")
    assert w8a8.qweight.shape == (IN, OUT) and w8a8.qweight.t().is_contiguous()  # the (out, in) integers, transposed
    weight_only = QuantizedLinear.from_linear(linear, "int8")
    w_noise = _rounding_noise(weight_only.scale, IN, linear.weight)
    x_noise = _rounding_noise(x.abs().amax(dim=1) / 127, IN, x)
    for scheme in ("w8a8", "llm.int8"):              # no |x| > 6 here, so llm.int8 has no outliers
        error = _relative_error(QuantizedLinear.from_linear(linear, scheme), linear, x)
        assert error <= 1.1 * math.hypot(w_noise, x_noise), scheme


def test_llm_int8_keeps_an_outlier_feature_that_ruins_w8a8():
    linear, x = _linear(), _inputs()
    x[:, 7] *= 50                                    # one feature ~50× the others, as in LLM.int8()'s models
    w8a8 = _relative_error(QuantizedLinear.from_linear(linear, "w8a8"), linear, x)
    llm_int8 = _relative_error(QuantizedLinear.from_linear(linear, "llm.int8"), linear, x)
    int8 = _relative_error(QuantizedLinear.from_linear(linear, "int8"), linear, x)
    assert llm_int8 < w8a8 / 4
    assert llm_int8 < 1.5 * int8



@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "kmeans4"])
def test_weight_only_forward_in_blocks_of_rows(scheme, monkeypatch):
    linear, x = _linear(), _inputs()
    q = QuantizedLinear.from_linear(linear, scheme)
    whole = torch.nn.functional.linear(x, q.dequantize_weight(), linear.bias)
    monkeypatch.setattr(modules, "DEQUANTIZE_BLOCK", 48 * IN)       # blocks of 48, 48 and 32 rows
    torch.testing.assert_close(q(x), whole, rtol=1e-5, atol=1e-4)  # int8 scales after the matmul: fp32 rounding

def test_storage_and_dtypes():
    linear = _linear()
    for scheme in SCHEMES:
        q = QuantizedLinear.from_linear(linear, scheme)
        state = q.state_dict()
        assert "weight" not in state and not state["qweight"].is_floating_point()
        assert state["bias"].dtype == torch.float32
        assert q.weight_bytes == get_scheme(scheme).weight_bytes(OUT, IN, torch.float32)
        assert f"scheme='{scheme}'" in repr(q)
        y = q(_inputs().to(torch.bfloat16)[:4].reshape(2, 2, IN))
        assert y.shape == (2, 2, OUT) and y.dtype == torch.bfloat16
    q = QuantizedLinear.from_linear(linear, "int4-g128")
    assert q.weight_bytes == OUT * IN // 2 + OUT * 2 * 2                     # nibbles + 2 fp16 scales per row
    assert torch.equal(q.int_weight().long(), unpack_bits(q.qweight.reshape(-1), 4, OUT * IN, signed=True)
                       .reshape(OUT, IN))
    assert bits_per_weight("int4-g128") == 4.125 and bits_per_weight("int4-g32") == 4.5
    assert bits_per_weight("int8", shape=(OUT, IN)) == 8 + 32 / IN


def _gpt(**overrides):
    entry = models.get("gpt-tiny")
    return entry, entry.build(seed=0, **overrides)


def test_quantize_model_int8_keeps_the_loss_and_the_input():
    entry, model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (inputs,), target = entry.example_batch(8)
    quantized = quantize_model(model, "int8")
    with torch.no_grad():
        loss, q_loss = (float(entry.loss_fn(m(inputs), target)) for m in (model, quantized))
    assert abs(q_loss - loss) < 1e-3 * loss
    names = [n for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(names) == 6 * 2                      # q, k, v, proj, fc1, fc2 per block
    state = quantized.state_dict()
    assert all(f"{n}.weight" not in state and state[f"{n}.qweight"].dtype == torch.int8 for n in names)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantized_bytes_on_meta_matches_the_built_modules():
    overrides = dict(n_layers=1, d_model=128, d_head=32)    # 128 and 512 inputs: every scheme's groups divide them
    _, model = _gpt(**overrides)
    meta = models.get("gpt-tiny").build("meta", **overrides)
    for scheme in SCHEMES:
        built = sum(m.weight_bytes for m in quantize_model(model, scheme).modules()
                    if isinstance(m, QuantizedLinear))
        assert quantized_bytes(meta, scheme) == built, scheme


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight           # tied: one parameter object

    def forward(self, tokens):
        return self.head(self.body(self.emb(tokens)))


def test_tied_and_named_heads_are_skipped():
    model = TiedHead()
    quantized = quantize_model(model, "int8")
    assert isinstance(quantized.body, QuantizedLinear) and type(quantized.head) is nn.Linear
    assert quantized.head.weight is quantized.emb.weight
    assert quantized_bytes(model, "int8") == quantized.body.weight_bytes
    assert type(quantize_model(model, "int8", skip=("bo*",)).body) is nn.Linear
    assert isinstance(quantize_model(nn.Sequential(nn.Linear(4, 4)), "int8", skip=())[0], QuantizedLinear)


def test_a_model_on_meta_quantizes_to_shapes_for_planning():
    meta = models.get("gpt-tiny").build("meta")
    quantized = quantize_model(meta, "int4-g32")
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.qweight.is_meta for m in layers)
    assert sum(m.weight_bytes for m in layers) == quantized_bytes(meta, "int4-g32")


def test_errors_say_what_was_found_and_required():
    _, model = _gpt()
    with pytest.raises(ValueError, match=r"found 'int3'.*'int8', 'int4', 'int4-g128'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match=r"found 'fp4'"):
        quantized_bytes(model, "fp4")
    with pytest.raises(ValueError, match=r"'layers.0.attn.q' \(32 -> 32\).*in_features 32.*multiple of 128"):
        quantize_model(model, "int4-g128")
    with pytest.raises(ValueError, match=r"in_features 32.*multiple of 128"):
        quantized_bytes(models.get("gpt-tiny").build("meta"), "int4-g128")
    with pytest.raises(TypeError, match="found Embedding"):
        QuantizedLinear.from_linear(nn.Embedding(4, 4), "int8")
