"""Pieces the zoo's families share: config checks, random batches, the LM loss.

Takes plain values (a config, a shape, a torch.Generator) and gives:
- `Size`: one registry row of a family (config, the size its name claims, a line of text);
- `require_positive` / `require_multiple`: config checks that raise ValueError
  saying what was found and what was required;
- `random_tokens` / `random_normal`: seeded batches, generated on the CPU and moved,
  so the values do not depend on the device (on "meta" nothing is generated);
- `lm_batch` / `lm_loss`: next-token batches and cross-entropy for the LM families.
"""

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class Size(NamedTuple):
    """One registry row of a family."""

    config: Any  # the family's frozen config dataclass
    nominal_params: float | None  # the size the name claims (175e9 for "gpt3-175b"); None if none
    description: str  # one line, e.g. "GPT-3 175B (96 layers, d_model 12288, 96 heads), seq 2048"


def require_positive(config: Any, *names: str) -> None:
    """Raise ValueError unless every named integer field of `config` is >= 1."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{type(config).__name__}.{name} must be an integer >= 1, found {value!r}")


def require_multiple(config: Any, name: str, of: str) -> None:
    """Raise ValueError unless field `name` of `config` is a multiple of field `of`."""
    value, divisor = getattr(config, name), getattr(config, of)
    if value % divisor != 0:
        raise ValueError(
            f"{type(config).__name__}.{name} must be a multiple of {of}={divisor}, found {value}")


def _is_meta(device: torch.device | str) -> bool:
    return torch.device(device).type == "meta"


def random_tokens(shape: tuple[int, ...], vocab_size: int, generator: torch.Generator,
                  device: torch.device | str) -> torch.Tensor:
    """Uniform token ids in [0, vocab_size), int64, of `shape`."""
    if _is_meta(device):
        return torch.empty(shape, dtype=torch.long, device="meta")
    return torch.randint(vocab_size, shape, generator=generator).to(device)


def random_normal(shape: tuple[int, ...], generator: torch.Generator,
                  device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal values of `shape` and `dtype`."""
    if _is_meta(device):
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def lm_batch(*, vocab_size: int, seq_len: int, batch_size: int, generator: torch.Generator,
             device: torch.device | str) -> tuple[tuple[torch.Tensor], torch.Tensor]:
    """Next-token prediction batch: inputs ((B, T) ids,), target (B, T) ids.

    The target is the input shifted by one token of a random (B, T + 1) sequence.
    Both are cloned so that they are distinct tensors (torch.export merges aliases).
    """
    sequence = random_tokens((batch_size, seq_len + 1), vocab_size, generator, device)  # (B, T+1)
    return (sequence[:, :-1].clone(),), sequence[:, 1:].clone()


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy: logits (B, T, V), target (B, T) -> scalar."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))
