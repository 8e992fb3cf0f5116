"""Placements carried through views and element-wise ops."""

import pytest
import torch
import torch.nn as nn

import autopar
from autopar.passes.follow import _reshape_map, broadcast_to, follow
from autopar.vocab import P, R, S


def graph_of(fn, *shapes):
    class M(nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    captured = autopar.capture(M(), tuple(torch.randn(*s) for s in shapes))
    nodes = {n.name: n for n in captured.program.graph.nodes}
    calls = [n for n in captured.program.graph.nodes if n.op == "call_function"]
    return nodes, calls


@pytest.mark.parametrize("src, dst, expected", [
    ((4, 6, 8), (24, 8), {0: 0, 1: None, 2: 1}),          # merge: only the outer dim keeps its sharding
    ((4, 32), (4, 4, 8), {0: 0, 1: 1}),                   # split a dim: the outer part carries it
    ((2, 1, 8), (2, 8), {0: 0, 1: None, 2: 1}),
    ((6,), (2, 3), {0: 0}),
])
def test_reshape_map(src, dst, expected):
    assert _reshape_map(src, dst) == expected


def test_transpose_permute_and_unsqueeze():
    nodes, calls = graph_of(lambda x: x.transpose(1, 2).permute(2, 0, 1).unsqueeze(0), (2, 4, 6))
    t, p, u = calls
    assert follow(t, t.args[0], (S(1),), (2,)).outputs == ((S(2),),)
    assert follow(p, p.args[0], (S(2),), (2,)).outputs == ((S(0),),)  # permute(2, 0, 1): dim 2 is now 0
    assert follow(p, p.args[0], (S(0),), (2,)).outputs == ((S(1),),)
    assert follow(u, u.args[0], (S(0), S(2)), (2, 2)).outputs == ((S(1), S(3)),)


def test_views_that_cannot_keep_a_sharding_gather_it():
    nodes, calls = graph_of(lambda x: x.reshape(8, 6)[:, :3], (2, 4, 6))
    reshape, sliced = calls
    f = follow(reshape, reshape.args[0], (S(1),), (2,))  # T is the inner dim of B·T
    assert f.needs == (R,) and f.outputs == ((R,),)
    f = follow(sliced, sliced.args[0], (S(1),), (2,))  # slicing along the sharded dim
    assert f.needs == (R,)
    assert follow(sliced, sliced.args[0], (S(0),), (2,)).outputs == ((S(0),),)


def test_slices_cut_the_dim_they_name():
    nodes, calls = graph_of(lambda x: (x[..., 4:], x.narrow(1, 0, 2), x.split(4, dim=2)), (2, 4, 8))
    sliced, narrowed, split = calls[:3]
    assert follow(sliced, sliced.args[0], (S(2),), (2,)).needs == (R,)  # the last dim is cut
    assert follow(sliced, sliced.args[0], (S(1),), (2,)).outputs == ((S(1),),)
    assert follow(narrowed, narrowed.args[0], (S(1),), (2,)).needs == (R,)
    assert follow(narrowed, narrowed.args[0], (S(2),), (2,)).outputs == ((S(2),),)
    assert follow(split, split.args[0], (S(2),), (2,)).needs == (R,)
    assert follow(split, split.args[0], (S(0),), (2,)).outputs == ((S(0),),) * 2


def test_uneven_carry_is_gathered():
    nodes, calls = graph_of(lambda x: x.unflatten(-1, (3, 4)), (2, 12))
    (unflatten,) = calls
    assert follow(unflatten, unflatten.args[0], (S(1),), (3,)).outputs == ((S(1),),)  # 3 heads / 3
    assert follow(unflatten, unflatten.args[0], (S(1),), (2,)).needs == (R,)         # 3 heads / 2: no


def test_partial_survives_linear_ops_only():
    nodes, calls = graph_of(lambda x: torch.relu(x * 2.0).view(-1), (2, 4))
    mul, relu, view = calls
    assert follow(mul, mul.args[0], (P,), (2,)).outputs == ((P,),)
    assert follow(relu, relu.args[0], (P,), (2,)).needs == (R,)
    assert follow(view, view.args[0], (P,), (2,)).outputs == ((P,),)


def test_broadcast_operands():
    assert broadcast_to((S(2), S(0)), (2, 4, 8), (8,)) == (S(0), R)
    assert broadcast_to((S(1), P), (2, 4, 8), (1, 4, 8)) == (S(1), R)
