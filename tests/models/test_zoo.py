"""Tests of the model zoo: registry, parameter counts, tiny models on CPU, export, MoE routing."""

import pytest
import torch
from torch import nn

from autopar import models
from autopar.models.moe import MoEFeedForward, expert_capacity

TINY = ["gpt-tiny", "llama-tiny", "mlp-tiny", "moe-tiny", "wresnet-tiny"]
FULL = [
    "gpt3-125m", "gpt3-350m", "gpt3-760m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b",
    "gpt3-175b", "gpt-39b", "llama3-8b", "llama3-70b", "llama3-405b", "mlp", "moe-690m", "moe-2.4b",
    "moe-70b", "wresnet-254m", "wresnet-500m", "wresnet-1b", "wresnet-1.97b", "wresnet-4b",
    "wresnet-6.7b", "wresnet-13.3b",
]
GPT3 = [name for name in FULL if name.startswith("gpt3-")]
HF = ["hf-bert", "hf-gpt2", "hf-llama"]  # transformers models: tests/models/test_hf.py


# ---- registry ---------------------------------------------------------------------------------

def test_names_lists_every_entry_sorted():
    assert models.names() == sorted(TINY + FULL + HF)


def test_get_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'gpt4'") as info:
        models.get("gpt4")
    assert "gpt3-175b" in str(info.value) and "wresnet-tiny" in str(info.value)


def test_unknown_override_names_it_and_the_valid_fields():
    entry = models.get("gpt-tiny")
    calls = [lambda: entry.build(nonsense=1), lambda: entry.example_batch(2, nonsense=1),
             lambda: entry.num_params(nonsense=1)]
    for call in calls:
        with pytest.raises(ValueError, match="nonsense") as info:
            call()
        assert "d_model" in str(info.value)


def test_invalid_override_value_reruns_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        models.get("llama-tiny").build("meta", n_kv_heads=3)
    with pytest.raises(ValueError, match="norm"):
        models.get("wresnet-tiny").build("meta", norm="layer")


@pytest.mark.parametrize("name", TINY + FULL)
def test_every_entry_builds_on_meta(name):
    model = models.get(name).build("meta")
    assert all(p.is_meta for p in model.parameters())
    if models.get(name).family != "mlp":  # repeated blocks are `layers.<i>` for the compiler
        assert isinstance(model.layers, nn.ModuleList) and len(model.layers) >= 2


# ---- parameter counts -------------------------------------------------------------------------

# The GPT-3 paper rounds these three: the table's own dimensions give 355.8M for "350M",
# 1.316B for "1.3B" and 2.65B for "2.7B" (no key bias: see models/gpt.py). The names follow the
# paper, the dimensions the table.
PAPER_ROUNDED = {"gpt3-350m": 355_847_168, "gpt3-1.3b": 1_315_674_112, "gpt3-2.7b": 2_651_471_360}


@pytest.mark.parametrize("name", [n for n in FULL if models.get(n).nominal_params is not None])
def test_param_count_matches_name(name):
    entry = models.get(name)
    count = entry.num_params()
    if name in PAPER_ROUNDED:
        assert count == PAPER_ROUNDED[name]
        assert count == pytest.approx(entry.nominal_params, rel=0.02)
    else:
        assert count == pytest.approx(entry.nominal_params, rel=0.01)


@pytest.mark.parametrize("name", GPT3)
def test_gpt_param_formula(name):
    c = models.get(name).config
    L, d, i, V, P = c.n_layers, c.d_model, c.n_heads * c.d_head, c.vocab_size, c.seq_len
    count = models.get(name).num_params()
    # General form, attention inner width i = n_heads·d_head (≠ d_model only for 13B).
    assert count == L * (4 * d * i + 2 * i + 8 * d * d + 10 * d) + (V + P) * d + 2 * d
    if d == i:  # no key bias (see models/gpt.py)
        assert count == 12 * L * d * d + 12 * L * d + (V + P) * d + 2 * d


def test_gpt3_13b_keeps_the_table_width_and_head_dim():
    model = models.get("gpt3-13b").build("meta")
    assert model.layers[0].attn.q.weight.shape == (40 * 128, 5140)
    assert model.layers[0].attn.proj.weight.shape == (5140, 5120)


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b", "llama3-405b", "llama-tiny"])
def test_llama_param_formula(name):
    c = models.get(name).config
    d, h = c.dim, c.dim // c.n_heads
    block = 2 * d * d + 2 * d * c.n_kv_heads * h + 3 * d * c.ffn_dim + 2 * d
    assert models.get(name).num_params() == c.n_layers * block + 2 * c.vocab_size * d + d


@pytest.mark.parametrize("name", ["moe-690m", "moe-2.4b", "moe-70b", "moe-tiny"])
def test_moe_param_formula(name):
    c = models.get(name).config
    d, f, E, L = c.d_model, c.d_ff, c.n_experts, c.n_layers
    dense = 4 * d * d + 2 * d * f + 8 * d + f  # no key bias (models/gpt.py)
    moe = 4 * d * d + 2 * E * d * f + 7 * d + d * E
    embed = (c.vocab_size + c.seq_len) * d + 2 * d
    assert models.get(name).num_params() == (L - L // 2) * dense + (L // 2) * moe + embed


@pytest.mark.parametrize("name", ["wresnet-254m", "wresnet-13.3b", "wresnet-tiny"])
def test_wresnet_param_formula(name):
    c = models.get(name).config
    C, W = c.base_channels, c.width_factor
    count, c_in = 147 * C + 2 * C, C  # stem conv7x7 and its norm
    for stage, n_blocks in enumerate(c.stage_sizes):
        F = C * 2**stage
        for j in range(n_blocks):
            count += c_in * F + 9 * W * F * F + 4 * W * F * F + 2 * (F + W * F + 4 * F)
            if c_in != 4 * F or (stage > 0 and j == 0):
                count += 4 * F * c_in + 8 * F  # projection conv1x1 and its norm
            c_in = 4 * F
    count += (c_in + 1) * c.num_classes
    assert models.get(name).num_params() == count


def test_mlp_is_the_gpt3_175b_ffn():
    assert models.get("mlp").num_params() == 2 * 12288 * 49152


# ---- tiny models on the CPU -------------------------------------------------------------------

def _train_step(name, seed=0, batch=8):
    entry = models.get(name)
    model = entry.build(seed=seed)
    inputs, target = entry.example_batch(batch, seed=seed)
    loss = entry.loss_fn(model(*inputs), target)
    loss.backward()
    return model, inputs, target, loss


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    model, inputs, target, loss = _train_step(name)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert inputs[0].shape[0] == 8 and target.shape[0] == 8
    for path, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), path
        assert p.grad.abs().sum() > 0, f"{path} got an all-zero gradient"


def test_tiny_batch_shapes():
    cfg = {n: models.get(n).config for n in TINY}
    shapes = {n: [t.shape for t in (*models.get(n).example_batch(8)[0],
                                    models.get(n).example_batch(8)[1])] for n in TINY}
    assert shapes["gpt-tiny"] == [(8, cfg["gpt-tiny"].seq_len)] * 2
    assert shapes["llama-tiny"] == [(8, 16), (8, 16)]
    assert shapes["moe-tiny"] == [(8, 16), (8, 16)]
    assert shapes["mlp-tiny"] == [(8, 16), (8, 16)]
    assert shapes["wresnet-tiny"] == [(8, 3, 16, 16), (8,)]
    (tokens,), _ = models.get("llama3-8b").example_batch(2, device="meta", seq_len=128)
    assert tokens.shape == (2, 128)


@pytest.mark.parametrize("name", TINY)
def test_seed_determinism(name):
    entry = models.get(name)
    rng_before = torch.get_rng_state()
    a, b, c = entry.build(seed=1), entry.build(seed=1), entry.build(seed=2)
    assert torch.equal(torch.get_rng_state(), rng_before), "build touched the global RNG"
    for (path, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), path
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    (xa, *_), ya = entry.example_batch(4, seed=1)
    (xb, *_), yb = entry.example_batch(4, seed=1)
    (xc, *_), yc = entry.example_batch(4, seed=2)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc) and not torch.equal(ya, yc)


def test_build_dtype_and_batch_dtype():
    entry = models.get("wresnet-tiny")
    model = entry.build(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    (images,), target = entry.example_batch(2, dtype=torch.bfloat16)
    assert images.dtype == torch.bfloat16 and target.dtype == torch.long
    assert entry.loss_fn(model(images), target).dtype == torch.bfloat16


# ---- export -----------------------------------------------------------------------------------

class _LossOf(nn.Module):
    """forward(*inputs, target) = loss_fn(model(*inputs), target): the step autopar captures."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *args):
        return self.loss_fn(self.model(*args[:-1]), args[-1])


def _export_on_meta(name, batch, **overrides):
    entry = models.get(name)
    inputs, target = entry.example_batch(batch, device="meta", **overrides)
    wrapper = _LossOf(entry.build("meta", **overrides), entry.loss_fn)
    program = torch.export.export(wrapper, (*inputs, target), strict=False)
    output = next(node for node in program.graph.nodes if node.op == "output")
    assert output.args[0][-1].meta["val"].shape == ()  # the loss, after any buffer updates
    return program


@pytest.mark.parametrize("name", TINY)
def test_tiny_exports(name):
    _export_on_meta(name, batch=8)


@pytest.mark.parametrize("name, overrides", [
    ("gpt3-125m", {}), ("llama3-8b", {"seq_len": 128}), ("moe-690m", {}), ("wresnet-254m", {}),
])
def test_full_size_exports(name, overrides):
    program = _export_on_meta(name, batch=1, **overrides)
    paths = {p for p, _ in program.named_parameters()}
    assert any(p.startswith("model.layers.0.") for p in paths)


# ---- MoE routing ------------------------------------------------------------------------------

def _reference_moe(layer, x):
    """Token-by-token top-2 routing: buffers fill in token order, first choices first."""
    d = x.size(-1)
    groups = x.reshape(-1, min(layer.group_size, x.size(0) * x.size(1)), d)  # (G, S, d)
    n_experts = layer.wg.size(1)
    capacity = expert_capacity(groups.size(1), n_experts, layer.capacity_factor)
    out, kept = torch.zeros_like(groups), {}
    for g, xs in enumerate(groups):
        gates = torch.softmax(xs @ layer.wg, dim=-1)  # (S, E)
        top = [torch.topk(row, 2) for row in gates]
        used = [0] * n_experts
        for rank in (0, 1):  # all first choices take slots before any second choice
            for s, (_, experts) in enumerate(top):
                e = int(experts[rank])
                kept[g, s, rank] = used[e] < capacity
                used[e] += kept[g, s, rank]
        for s, (values, experts) in enumerate(top):
            weights = values / values.sum()  # renormalized over the two chosen experts
            for rank in (0, 1):
                if kept[g, s, rank]:
                    e = int(experts[rank])
                    expert = torch.relu(xs[s] @ layer.wi[e]) @ layer.wo[e]
                    out[g, s] += weights[rank] * expert
    return out.reshape(x.shape), kept


def _moe_layer(capacity_factor, seed=0):
    torch.manual_seed(seed)
    layer = MoEFeedForward(d_model=8, d_ff=12, n_experts=4, capacity_factor=capacity_factor,
                           group_size=16)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer, torch.randn(2, 16, 8)  # (B, T, d): two groups of 16 tokens


def test_moe_without_drops_matches_token_loop():
    layer, x = _moe_layer(capacity_factor=4 / 2)  # C = 2·cf·S/E = S: nothing can be dropped
    expected, kept = _reference_moe(layer, x)
    assert all(kept.values())
    torch.testing.assert_close(layer(x), expected)


def test_moe_dropped_tokens_get_zero_output():
    layer, x = _moe_layer(capacity_factor=0.25)  # C = ceil(0.25·2·16/4) = 2 slots per expert
    assert expert_capacity(16, 4, 0.25) == 2
    expected, kept = _reference_moe(layer, x)
    y = layer(x)
    torch.testing.assert_close(y, expected)
    dropped = [(g, s) for g in range(2) for s in range(16)
               if not kept[g, s, 0] and not kept[g, s, 1]]
    assert dropped, "the test needs tokens dropped by both of their experts"
    groups = y.reshape(2, 16, 8)
    for g, s in dropped:
        assert torch.equal(groups[g, s], torch.zeros(8))


def test_expert_capacity_formula():
    # C = min(S, ceil(capacity_factor · 2 · S / E)); GShard's 2S/E at capacity_factor 1.
    assert expert_capacity(2048, 16, 1.0) == 256
    assert expert_capacity(2048, 64, 1.25) == 80
    assert expert_capacity(16, 2, 4.0) == 16
