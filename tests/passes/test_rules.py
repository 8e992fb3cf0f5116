"""One-axis sharding rules of the ops that offer a choice."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
from autopar.passes.rules import rules
from autopar.passes.strategies import leader_options
from autopar.vocab import P, P_AVG, R, S


def node_of(fn, *inputs, op):
    class M(nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    captured = autopar.capture(M(), inputs)
    return next(n for n in captured.program.graph.nodes if n.op == "call_function" and op in str(n.target))


def placements(node):
    return {(r.ins, r.outs, r.kind) for r in rules(node)}


def test_linear_gives_batch_column_and_row_parallel():
    node = node_of(F.linear, torch.randn(2, 8, 16), torch.randn(32, 16), torch.randn(32), op="linear")
    found = placements(node)
    assert ((R, R, R), (R,), "local") in found
    assert ((S(0), R, R), (S(0),), "local") in found and ((S(1), R, R), (S(1),), "local") in found
    assert ((R, S(0), S(0)), (S(2),), "local") in found          # column parallel (Megatron)
    assert ((S(2), S(1), R), (P,), "partial_bias") in found      # row parallel: bias added once
    assert len(found) == 5


def test_einsum_shards_any_index():
    node = node_of(lambda a, b: torch.einsum("GSEC,GSM->EGCM", a, b), torch.randn(2, 4, 3, 5), torch.randn(2, 4, 6),
                   op="einsum")
    found = {(r.ins, r.outs) for r in rules(node)}
    assert ((S(2), R), (S(0),)) in found        # experts (E)
    assert ((S(0), S(0)), (S(1),)) in found     # groups (G)
    assert ((S(1), S(1)), (P,)) in found        # the contracted tokens (S)


def test_embedding_vocabulary_and_dim_parallel():
    node = node_of(F.embedding, torch.randint(0, 16, (2, 4)), torch.randn(16, 8), op="embedding")
    found = placements(node)
    assert ((S(0), R), (P,), "vocab_embedding") in found
    assert ((S(1), R), (S(2),), "local") in found
    assert ((R, S(0)), (S(0),), "local") in found


def test_norms_keep_the_normalized_dim_whole():
    node = node_of(lambda x: F.layer_norm(x, (8,)), torch.randn(2, 4, 8), op="layer_norm")
    assert {r.ins[0] for r in rules(node)} == {R, S(0), S(1)}


def test_losses():
    ce = node_of(F.cross_entropy, torch.randn(8, 5), torch.randint(0, 5, (8,)), op="cross_entropy")
    assert ((S(0), S(0)), (P,), "batch_mean_loss") in placements(ce)
    assert ((S(1), R), (R,), "vocab_cross_entropy") in placements(ce)
    mse = node_of(F.mse_loss, torch.randn(8, 4), torch.randn(8, 4), op="mse_loss")
    assert ((S(1), S(1)), (P_AVG,), "local") in placements(mse)


def test_reductions_give_partial():
    node = node_of(lambda x: x.sum(1), torch.randn(4, 6, 2), op="sum")
    found = {(r.ins, r.outs) for r in rules(node)}
    assert ((S(1),), (P,)) in found and ((S(2),), (S(1),)) in found and ((S(0),), (S(0),)) in found


def test_attention_batch_and_heads():
    q = torch.randn(2, 4, 8, 16)
    node = node_of(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, q.clone(), q.clone(),
                   op="scaled_dot_product")
    assert {r.outs[0] for r in rules(node)} == {R, S(0), S(1)}


def test_strategies_on_a_2d_mesh_divide_evenly():
    node = node_of(F.linear, torch.randn(2, 6, 16), torch.randn(32, 16), op="linear")
    options = leader_options(node, (2, 2))
    assert all(s.inputs[0][0] != S(1) or s.inputs[0][1] != S(1) for s in options)  # 6 tokens / 4: no
    assert any(s.inputs[0] == (S(0), S(1)) for s in options)
    assert any(s.outputs[0] == (S(2), S(2)) for s in options)  # 32 / 4 columns


def test_routing_index_ops():
    x, idx = torch.randn(8, 6), torch.randint(0, 8, (4,))
    select = node_of(lambda a, i: a.index_select(0, i), x, idx, op="index_select")
    assert ((R, S(0)), (S(0),)) in {(r.ins, r.outs) for r in rules(select)}  # split the picked tokens
    assert ((S(1), R), (S(1),)) in {(r.ins, r.outs) for r in rules(select)}
    gather = node_of(lambda a, i: a.gather(1, i), torch.randn(4, 6), torch.randint(0, 6, (4, 3)), op="gather")
    assert {(r.ins, r.outs) for r in rules(gather)} >= {((S(0), S(0)), (S(0),))}
    scatter = node_of(lambda a, i, s: a.scatter_add(0, i, s), torch.zeros(8, 6), torch.randint(0, 8, (4, 6)),
                      torch.randn(4, 6), op="scatter_add")
    found = {(r.ins, r.outs) for r in rules(scatter)}
    assert ((S(1), S(1), S(1)), (S(1),)) in found and ((P, R, P), (P,)) in found
    index = node_of(lambda a, i: a[i], x, idx, op="index")
    assert ((R, S(0)), (S(0),)) in {(r.ins, r.outs) for r in rules(index)}
