"""The memory rule (16N), ZeRO sharding, and activations measured against real autograd."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
from autopar.cost.memory import activation_memory, state_bytes_per_param, training_state


def test_sixteen_n_rule():
    # Seeds 000/004: (4 + 2 + 2 + 4 + 4) N = 16N for mixed-precision Adam.
    mixed = state_bytes_per_param("mixed", "adam")
    assert (mixed.master, mixed.gradients, mixed.weights, mixed.optimizer) == (4, 2, 2, 8)
    assert mixed.total == 16
    assert state_bytes_per_param("fp32", "adamw").total == 16
    assert state_bytes_per_param("fp32", "sgd").total == 8
    assert state_bytes_per_param("bf16", "momentum").total == 12


def test_gpt3_175b_state_matches_the_seeds():
    s = training_state(175e9, precision="mixed", optimizer="adam")
    assert (s.weights, s.gradients, s.master, s.optimizer) == (350e9, 350e9, 700e9, 1400e9)
    assert s.total == 16 * 175e9


@pytest.mark.parametrize("zero, expected", [
    (0, (2, 2, 4, 8)), (1, (2, 2, 1, 2)), (2, (2, 0.5, 1, 2)), (3, (0.5, 0.5, 1, 2)),
])
def test_zero_stages_shard_what_they_claim(zero, expected):
    s = training_state(1, precision="bf16", optimizer="adam", zero=zero, dp=4)
    assert (s.weights, s.gradients, s.master, s.optimizer) == expected


def test_bad_memory_arguments():
    with pytest.raises(ValueError, match="precision: found 'fp8'"):
        state_bytes_per_param("fp8", "adam")
    with pytest.raises(ValueError, match="optimizer: found 'lion'"):
        state_bytes_per_param("fp32", "lion")
    with pytest.raises(ValueError, match="zero: found 4"):
        training_state(1, precision="fp32", optimizer="adam", zero=4)


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.h = h

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=64, d=32, layers=3, heads=4, seq=16):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def lm_loss(logits, target):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def saved_by_autograd(model, idx, target):
    """Bytes autograd really keeps on CPU (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model(idx), target)
    return sum(storages.values())


def test_saved_activations_equal_what_autograd_keeps():
    torch.manual_seed(0)
    model = TinyGPT()
    idx, target = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    graph = autopar.capture(model, (idx,), loss_fn=lm_loss, target=target)
    # CPU runs SDPA through its flash kernel, which keeps what the analysis models.
    assert graph.saved_bytes == saved_by_autograd(model, idx, target)


def test_checkpointing_at_layer_boundaries():
    model = TinyGPT(layers=3).to("meta")
    idx = torch.zeros(4, 16, dtype=torch.long, device="meta")
    graph = autopar.capture(model, (idx,), loss_fn=lm_loss, target=idx.clone())
    none = activation_memory(graph, checkpoint="none")
    layers = activation_memory(graph, checkpoint="layers", scale=10)
    # Seeds 000/001: N layers × tokens × d_model × bytes per element.
    assert layers.boundaries == 10 * 3 * (4 * 16) * 32 * 4
    assert layers.recompute_peak * 3 == pytest.approx(10 * (none.saved - none.outside_layers), rel=1e-9)
    assert layers.total < 10 * none.total


def test_backward_workspace_is_the_loss_gradients_of_a_language_model():
    """gpt-tiny on one device: the largest backward working set is log-softmax's, the gradient of
    its output and of its input, each the size of the logits (batch 8 × 16 tokens × 128 words, fp32);
    the plan's peak adds it to the state and saved activations."""
    import autopar
    from autopar import models
    from autopar.assemble import backward_workspace
    from autopar.capture import capture

    entry = models.get("gpt-tiny")
    model = entry.build(device="meta")
    inputs, target = entry.example_batch(8, device="meta")
    graph = capture(model, inputs, loss_fn=entry.loss_fn, target=target)
    plan = autopar.plan(model, autopar.Cluster.preset("cpu", gpus_per_node=1), example_inputs=inputs,
                        loss_fn=entry.loss_fn, target=target, strategy="dp")
    logits = 8 * 16 * 128 * 4
    assert backward_workspace(graph, plan.stages[0].nodes, plan.stages[0].mesh.shape) == 2 * logits
    assert plan.cost.peak_memory >= plan.cost.parameter_state + 2 * logits
