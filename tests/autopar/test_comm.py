"""The alpha-beta collective costs against seed 002's formulas, term by term."""

import math

import pytest
import sympy as sp

from autopar import Cluster
from autopar.cost.comm import CommModel, flat_cost, mst_time, ring_time

alpha, beta, gamma, n = sp.symbols("alpha beta gamma n", positive=True)


def seed_mst(kind, p):
    """Seed 002, "Recap" of the minimum-spanning-tree algorithms, written out independently."""
    L = math.ceil(math.log2(p))
    f = sp.Rational(p - 1, p)
    return {
        "broadcast": L * (alpha + n * beta),
        "reduce": L * (alpha + n * beta + n * gamma),
        "scatter": L * alpha + f * n * beta,
        "gather": L * alpha + f * n * beta,
        "all_gather": 2 * L * alpha + L * n * beta + f * n * beta,
        "reduce_scatter": 2 * L * alpha + L * n * (beta + gamma) + f * n * beta,
        "all_reduce": 2 * L * alpha + L * n * (2 * beta + gamma),
    }[kind]


def seed_ring(kind, p):
    """Seed 002, "Some Transformations": ring reduce-scatter/all-gather and their compositions."""
    L = math.ceil(math.log2(p))
    f = sp.Rational(p - 1, p)
    scatter = L * alpha + f * n * beta
    all_gather = (p - 1) * alpha + f * n * beta
    reduce_scatter = (p - 1) * alpha + f * n * (beta + gamma)
    return {
        "broadcast": scatter + all_gather,
        "reduce": reduce_scatter + scatter,  # gather costs what scatter costs
        "scatter": scatter,
        "gather": scatter,
        "all_gather": all_gather,
        "reduce_scatter": reduce_scatter,
        "all_reduce": reduce_scatter + all_gather,
    }[kind]


KINDS = ["broadcast", "reduce", "scatter", "gather", "all_gather", "reduce_scatter", "all_reduce"]


def terms(expr):
    """Coefficients of α, nβ and nγ: the terms the seed's formulas are made of."""
    e = sp.expand(expr)
    coefficients = (e.coeff(alpha), sp.expand(e.coeff(n)).coeff(beta), sp.expand(e.coeff(n)).coeff(gamma))
    assert sp.expand(e - coefficients[0] * alpha - coefficients[1] * n * beta - coefficients[2] * n * gamma) == 0
    return pytest.approx(tuple(float(c) for c in coefficients), rel=1e-12)


@pytest.mark.parametrize("p", [2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_mst_formulas_term_by_term(kind, p):
    got = mst_time(kind, p, n, alpha=alpha, beta=beta, gamma=gamma)
    assert terms(seed_mst(kind, p)) == terms(got).expected


@pytest.mark.parametrize("p", [2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_ring_formulas_term_by_term(kind, p):
    got = ring_time(kind, p, n, alpha=alpha, beta=beta, gamma=gamma)
    assert terms(seed_ring(kind, p)) == terms(got).expected


def test_seed_worked_values():
    # p = 8, n = 1 MB, α = 1 µs, B = 100 GB/s, γ = 0: ring all-reduce is 2·7·α + 7/8·2·n/B.
    t = ring_time("all_reduce", 8, 1e6, alpha=1e-6, beta=1e-11)
    assert t == pytest.approx(14e-6 + 7 / 8 * 2e6 * 1e-11)
    assert mst_time("broadcast", 8, 1e6, alpha=1e-6, beta=1e-11) == pytest.approx(3 * (1e-6 + 1e-5))


def test_one_rank_costs_nothing():
    for kind in KINDS:
        assert mst_time(kind, 1, 1e9, alpha=1, beta=1) == 0 == ring_time(kind, 1, 1e9, alpha=1, beta=1)


def test_cheaper_family_is_chosen():
    link = Cluster.preset("h100").intra_node
    small = flat_cost("all_reduce", 8, 64, link, gamma=0.0)
    large = flat_cost("all_reduce", 8, 1e9, link, gamma=0.0)
    assert small.algorithm == "mst" and large.algorithm == "ring"
    for cost, size in ((small, 64), (large, 1e9)):
        assert cost.time == min(mst_time("all_reduce", 8, size, alpha=link.latency, beta=link.beta),
                                ring_time("all_reduce", 8, size, alpha=link.latency, beta=link.beta))


def test_all_to_all_and_send_recv():
    link = Cluster.preset("a100").intra_node
    assert flat_cost("all_to_all", 4, 4e6, link, 0).time == pytest.approx(3 * (link.latency + 1e6 * link.beta))
    assert flat_cost("send_recv", 2, 4e6, link, 0).time == pytest.approx(link.latency + 4e6 * link.beta)


def test_groups_use_the_links_they_cross():
    cluster = Cluster.preset("h100", nodes=2, gpus_per_node=8)
    model = CommModel(cluster)
    intra, inter = cluster.intra_node, cluster.inter_node
    size = 1e8
    inside = model.cost("all_reduce", size, range(8))
    assert inside.time == flat_cost("all_reduce", 8, size, intra, model.gamma).time
    across = model.cost("all_reduce", size, [0, 8])  # one device per node: the inter-node link alone
    assert across.time == flat_cost("all_reduce", 2, size, inter, model.gamma).time
    assert model.cost("send_recv", size, [3, 11]).time == pytest.approx(inter.latency + size * inter.beta)


def test_hierarchical_all_reduce_spanning_nodes():
    cluster = Cluster.preset("h100", nodes=2, gpus_per_node=8)
    model = CommModel(cluster)
    intra, inter, g = cluster.intra_node, cluster.inter_node, model.gamma
    size = 1e9
    expected = (flat_cost("reduce_scatter", 8, size, intra, g).time + flat_cost("all_reduce", 2, size / 8, inter, g).time
                + flat_cost("all_gather", 8, size, intra, g).time)
    cost = model.cost("all_reduce", size, range(16))
    assert cost.algorithm == "hierarchical" and cost.time == pytest.approx(expected)
    assert cost.time < flat_cost("all_reduce", 16, size, inter, g).time


def test_bad_arguments():
    with pytest.raises(ValueError, match="collective: found 'allreduce'"):
        mst_time("allreduce", 4, 1.0, alpha=1, beta=1)
    with pytest.raises(ValueError, match="required >= 0"):
        ring_time("all_gather", 4, -1.0, alpha=1, beta=1)
    with pytest.raises(ValueError, match="no MST/ring form"):
        mst_time("all_to_all", 4, 1.0, alpha=1, beta=1)
    model = CommModel(Cluster.preset("h100"))
    with pytest.raises(ValueError, match="repeated devices"):
        model.cost("all_reduce", 1e6, [0, 0, 1])
    with pytest.raises(ValueError, match="required 0 <= device < 8"):
        model.cost("all_reduce", 1e6, [0, 9])
