"""`autopar bench quant`: what the quantization schemes of `autopar.quant` cost in accuracy and speed.

accuracy: a small GPT of the zoo (4 layers, d_model 128, byte-level vocabulary of 256, 128
positions) trained in fp32 with AdamW on the Python standard library's own source (its top-level
.py files in name order, every tenth file held out), then its held-out perplexity in fp32, in bf16
(weights and activations) and under each scheme of `autopar.quant.SCHEMES` (`quantize_model`;
the embeddings and the tied head stay fp32), with the bytes of the quantized weights. 600 steps of
16 × 128 bytes take about two minutes on one CPU core.
speed: one Linear at a decode shape (1 token, 4096 -> 4096) and a prefill shape (512 tokens), in
float against int8 weight-only and w8a8, taking turns within each round; the median per call.
On CPU the float baseline is fp32; on CUDA, when there is one, bf16.

Nothing here prints or changes global settings: seeds are local generators and the thread count
is the caller's.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autopar.quant.modules import SCHEMES, QuantizedLinear, quantize_model, quantized_bytes, replaced_linears
from autopar.units import fmt_bytes, markdown_table

MODEL = dict(n_layers=4, d_model=128, n_heads=4, d_head=32, vocab_size=256, seq_len=128)
"""Overrides of the zoo's gpt-tiny: every Linear has 128 or 512 inputs, so int4-g128 applies."""
QUICK_MODEL = dict(MODEL, n_layers=1, seq_len=32)


@dataclass(frozen=True, slots=True)
class AccuracyRow:
    format: str
    """"fp32", "bf16" or a scheme of SCHEMES."""
    steps: int
    """Training steps of the weights evaluated; 0 is the untrained model, for reference."""
    weight_bytes: int
    """Bytes of the Linear weights that the schemes replace, in this format (with scales)."""
    bits_per_weight: float
    perplexity: float
    """exp(mean cross-entropy per byte) on the held-out files."""
    ratio: float
    """perplexity / that of the trained fp32 model."""


def stdlib_corpus(max_bytes: int) -> tuple[bytes, bytes]:
    """(train, held out): the standard library's top-level .py files in name order, up to
    `max_bytes` in all; every tenth file (the 10th, 20th, ...) goes to the held-out split."""
    root = Path(os.path.dirname(os.__file__))
    train, held_out, total = [], [], 0
    for i, path in enumerate(sorted(root.glob("*.py")), start=1):
        if total >= max_bytes:
            break
        text = path.read_bytes()[:max_bytes - total]
        (held_out if i % 10 == 0 else train).append(text)
        total += len(text)
    return b"".join(train), b"".join(held_out)


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, both (len(starts), seq_len)."""
    rows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])         # (B, T+1)
    return rows[:, :-1], rows[:, 1:]


def _train(model: nn.Module, data: torch.Tensor, *, steps: int, batch_size: int, seq_len: int,
           lr: float, seed: int) -> None:
    """AdamW (β2 0.95, decay 0.1 on matrices only, as nanoGPT), linear warm-up then cosine to lr/10."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator)
        inputs, target = _windows(data, starts, seq_len)
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), target.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()


@torch.no_grad()
def _perplexity(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, batch_size: int = 16) -> float:
    losses = []
    for x, y in zip(inputs.split(batch_size), target.split(batch_size)):
        logits = model(x).float()                                                 # (B, T, 256)
        losses.append(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
    return math.exp(float(torch.stack(losses).sum()) / target.numel())


def accuracy_benchmark(steps: int = 600, *, batch_size: int = 16, corpus_bytes: int = 2_000_000,
                       eval_windows: int = 64, lr: float = 3e-3, seed: int = 0, quick: bool = False) -> list[AccuracyRow]:
    """Train, then evaluate every format on the same held-out windows. `quick`: one layer, 32
    positions, at most 20 steps on a 200 kB slice, 8 windows (seconds, for tests)."""
    from autopar import models

    config = QUICK_MODEL if quick else MODEL
    if quick:
        steps, batch_size, corpus_bytes, eval_windows = min(steps, 20), min(batch_size, 8), 200_000, 8
    train_bytes, held_out_bytes = stdlib_corpus(corpus_bytes)
    train = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    held_out = torch.frombuffer(bytearray(held_out_bytes), dtype=torch.uint8).long()
    seq_len = config["seq_len"]
    starts = torch.linspace(0, len(held_out) - seq_len - 1, eval_windows).long()      # evenly spread, fixed
    inputs, target = _windows(held_out, starts, seq_len)

    model = models.get("gpt-tiny").build(seed=seed, **config).eval()
    untrained = _perplexity(model, inputs, target)
    _train(model, train, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed)

    linears = [m.weight for _, m in replaced_linears(model)]
    elements = sum(w.numel() for w in linears)
    variants = [("fp32", model, 4 * elements), ("bf16", copy.deepcopy(model).to(torch.bfloat16), 2 * elements)]
    variants += [(s, quantize_model(model, s), quantized_bytes(model, s)) for s in SCHEMES]
    measured = [(name, nbytes, _perplexity(m, inputs, target)) for name, m, nbytes in variants]
    reference = measured[0][2]
    rows = [AccuracyRow(format="fp32", steps=0, weight_bytes=4 * elements, bits_per_weight=32.0,
                        perplexity=untrained, ratio=untrained / reference)]
    rows += [AccuracyRow(format=name, steps=steps, weight_bytes=nbytes, bits_per_weight=8 * nbytes / elements,
                         perplexity=ppl, ratio=ppl / reference) for name, nbytes, ppl in measured]
    return rows


def accuracy_table(rows: list[AccuracyRow]) -> str:
    header = ["format", "training steps", "Linear weights", "bits per weight", "held-out perplexity", "vs fp32"]
    return markdown_table(header, [[r.format, str(r.steps), fmt_bytes(r.weight_bytes), f"{r.bits_per_weight:.3g}",
                                     f"{r.perplexity:.4f}", f"{r.ratio - 1:+.2%}"] for r in rows])


@dataclass(frozen=True, slots=True)
class SpeedShape:
    label: str
    tokens: int
    in_features: int
    out_features: int
    calls: int
    """Calls per timed measurement (more for the short decode calls)."""


SPEED_SHAPES = (SpeedShape("decode", 1, 4096, 4096, calls=5), SpeedShape("prefill", 512, 4096, 4096, calls=1))


@dataclass(frozen=True, slots=True)
class SpeedRow:
    device: str
    shape: SpeedShape
    baseline: str
    """The float dtype: fp32 on CPU, bf16 on CUDA."""
    baseline_seconds: float
    int8_seconds: float
    """int8 weight-only (`QuantizedLinear`, scheme "int8"), computing in the baseline dtype."""
    w8a8_seconds: float


def _median_seconds(runs: dict[str, Callable[[], object]], *, rounds: int, calls: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds per call of each run; the runs take turns, each leading a round in turn."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for run in runs.values():                                                     # warm up
        run()
    sync()
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            for _ in range(calls):
                runs[name]()
            sync()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def speed_benchmark(shapes=SPEED_SHAPES, *, rounds: int = 15, devices: tuple[str, ...] | None = None,
                    seed: int = 0) -> list[SpeedRow]:
    """One row per device and shape; `devices` defaults to the CPU, plus CUDA when available."""
    if devices is None:
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    rows = []
    for device in devices:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        generator = torch.Generator().manual_seed(seed)
        for shape in shapes:
            linear = nn.Linear(shape.in_features, shape.out_features, device="meta").to_empty(device="cpu")
            with torch.no_grad():                                       # drawn here, not from the global RNG
                linear.weight.normal_(std=shape.in_features ** -0.5, generator=generator)
                linear.bias.zero_()
            linear = linear.to(device=device, dtype=dtype)
            x = torch.randn(shape.tokens, shape.in_features, generator=generator).to(device=device, dtype=dtype)
            int8, w8a8 = (QuantizedLinear.from_linear(linear, s) for s in ("int8", "w8a8"))
            seconds = _median_seconds({"float": lambda: linear(x), "int8": lambda: int8(x), "w8a8": lambda: w8a8(x)},
                                      rounds=rounds, calls=shape.calls, sync=sync)
            rows.append(SpeedRow(device=device, shape=shape, baseline="bf16" if device == "cuda" else "fp32",
                                 baseline_seconds=seconds["float"], int8_seconds=seconds["int8"],
                                 w8a8_seconds=seconds["w8a8"]))
    return rows


def speed_table(rows: list[SpeedRow]) -> str:
    lines = ["| device | shape | float | float (ms) | int8 weight-only (ms) | vs float | w8a8 (ms) | vs float |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.shape
        lines.append(f"| {r.device} | {s.label}: {s.tokens} × {s.in_features} → {s.out_features} | {r.baseline} | "
                     f"{r.baseline_seconds * 1e3:.2f} | {r.int8_seconds * 1e3:.2f} | "
                     f"{r.int8_seconds / r.baseline_seconds:.2f}× | {r.w8a8_seconds * 1e3:.2f} | "
                     f"{r.w8a8_seconds / r.baseline_seconds:.2f}× |")
    return "\n".join(lines)
