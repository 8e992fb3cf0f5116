"""Smoke test of `autopar bench quant`: the accuracy benchmark in quick mode, the speed table's form."""

import math

from autopar.bench_quant import (SpeedShape, accuracy_benchmark, accuracy_table, speed_benchmark, speed_table,
                                 stdlib_corpus)
from autopar.quant import SCHEMES


def test_accuracy_benchmark_quick():
    rows = accuracy_benchmark(quick=True)
    assert [r.format for r in rows] == ["fp32", "fp32", "bf16", *SCHEMES]
    untrained, fp32 = rows[0], rows[1]
    assert untrained.steps == 0 and all(r.steps > 0 for r in rows[1:])
    assert all(math.isfinite(r.perplexity) and r.perplexity > 1 and math.isfinite(r.ratio) for r in rows)
    assert fp32.perplexity < untrained.perplexity / 2 and fp32.ratio == 1.0
    assert all(0 < r.weight_bytes < fp32.weight_bytes for r in rows[2:])
    assert all(r.ratio < 1.5 for r in rows[1:])
    table = accuracy_table(rows)
    assert table.count("\n") == len(rows) + 1 and "int4-g128" in table


def test_corpus_is_deterministic_with_a_held_out_split():
    train, held_out = stdlib_corpus(300_000)
    assert len(train) + len(held_out) == 300_000 and 0 < len(held_out) < len(train)
    assert (train, held_out) == stdlib_corpus(300_000)


def test_speed_table_form():
    rows = speed_benchmark([SpeedShape("tiny", 2, 64, 32, calls=1)], rounds=1, devices=("cpu",))
    assert len(rows) == 1 and rows[0].baseline == "fp32"
    assert all(s > 0 for s in (rows[0].baseline_seconds, rows[0].int8_seconds, rows[0].w8a8_seconds))
    assert "| cpu | tiny: 2 × 64 → 32 | fp32 |" in speed_table(rows)
