"""GPT-2/3 decoder-only transformer, at the sizes of the GPT-3 table (seed 000).

Takes a `GPTConfig`; gives a module mapping token ids (B, T) to logits (B, T, V).
Architecture (GPT-2 paper §2.3, kept by GPT-3): learned positional embeddings,
pre-LayerNorm blocks `x + attn(ln1(x))`, `x + ffn(ln2(x))`, causal multi-head
attention, GELU MLP of width 4·d, biases everywhere, a final LayerNorm, and an LM
head tied to the token embedding (logits = x · tok_emb.weightᵀ).

Parameters (biases and LayerNorms included), with L layers, width d, attention
inner width i = n_heads·d_head, vocabulary V and P positions:
    per block  = 4·d·i + 2·i + 8·d² + 10·d       (= 12·d² + 12·d when i = d)
    total      = L·block + (V + P)·d + 2·d        (the head shares the embedding)

Two rows of the table are not self-consistent, and are read this way:
- 13B: d_model 5140 but 40 heads × d_head 128 = 5120. The heads keep d_head 128;
  `q`, `k`, `v` project 5140 -> 5120 and `proj` 5120 -> 5140 (12.93B parameters).
- XL 1.3B: 24 heads × d_head 128 = 3072 ≠ d_model 2048; that width would make a
  1.52B model, which the paper would not call 1.3B. d_model 2048 and d_head 128 are
  kept and the heads are 16 = 2048 / 128 (as GPT-Neo 1.3B), giving 1.316B.
The paper rounds some counts: the table's dimensions give 355.9M ("350M"),
1.316B ("1.3B") and 2.65B ("2.7B"); the names follow the paper, the dimensions the table.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import Size, lm_batch, lm_loss, require_positive

loss_fn = lm_loss


@dataclass(frozen=True, kw_only=True, slots=True)
class GPTConfig:
    """Sizes of a GPT model (names as in the GPT-3 table)."""

    n_layers: int  # transformer blocks (n_layers)
    d_model: int  # residual stream width (d_model)
    n_heads: int  # attention heads (n_heads)
    d_head: int  # width of one head (d_head); n_heads·d_head may differ from d_model (13B)
    vocab_size: int = 50257  # GPT-2 BPE vocabulary, used unchanged by GPT-3
    seq_len: int = 2048  # context n_ctx of GPT-3; rows of the position table
    ffn_ratio: int = 4  # MLP hidden width = ffn_ratio·d_model (GPT-2/3 use 4)
    dropout: float = 0.0  # on the embeddings and each residual branch while training (GPT-2: 0.1)

    def __post_init__(self) -> None:
        require_positive(self, "n_layers", "d_model", "n_heads", "d_head", "vocab_size",
                         "seq_len", "ffn_ratio")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: found {self.dropout!r}, required a probability in [0, 1)")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: (B, T, d_model) -> (B, T, d_model).

    The heads span an inner width n_heads·d_head that need not equal d_model. q, k and v are
    three projections rather than GPT-2's fused one: the same parameters and function, but a
    column-sharded fused output cannot be split into per-head q, k, v on each rank, while
    separate projections shard by heads directly (Megatron's layout). The key projection has no
    bias: a key bias shifts every score of a query by the same amount, which softmax ignores, so
    its gradient is exactly zero and only rounding noise reaches it (which Adam would amplify into
    updates that differ with the order of any sum: one device against many, or DDP).
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.q = nn.Linear(d_model, n_heads * d_head)
        self.k = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.v = nn.Linear(d_model, n_heads * d_head)
        self.proj = nn.Linear(n_heads * d_head, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = (self.n_heads, self.d_head)
        q, k, v = (p(x).unflatten(-1, heads).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).flatten(-2))  # (B, T, d_model)

    def init_weights(self, generator: torch.Generator, *, std: float, out_std: float) -> None:
        for p in (self.q, self.k, self.v):
            nn.init.normal_(p.weight, std=std, generator=generator)
            if p.bias is not None:
                nn.init.zeros_(p.bias)
        nn.init.normal_(self.proj.weight, std=out_std, generator=generator)
        nn.init.zeros_(self.proj.bias)


class FeedForward(nn.Module):
    """GELU MLP: (B, T, d) -> fc1 -> (B, T, d_ff) -> GELU (tanh form, GPT-2) -> fc2 -> (B, T, d)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def init_weights(self, generator: torch.Generator, *, std: float, out_std: float) -> None:
        nn.init.normal_(self.fc1.weight, std=std, generator=generator)
        nn.init.normal_(self.fc2.weight, std=out_std, generator=generator)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then + ffn(ln2(x)); (B, T, d) -> (B, T, d). With
    `dropout` > 0 each branch's output is dropped out while training (GPT-2's resid_pdrop)."""

    def __init__(self, d_model: int, attn: nn.Module, ffn: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d_model), attn
        self.ln2, self.ffn = nn.LayerNorm(d_model), ffn
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _dropped(self.attn(self.ln1(x)), self.dropout, self.training)
        return x + _dropped(self.ffn(self.ln2(x)), self.dropout, self.training)


def _dropped(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout only where there is some: at p = 0 the graph keeps no dropout node."""
    return F.dropout(x, p, training) if p else x


class GPT(nn.Module):
    """Token + position embeddings, `layers`, final LayerNorm, tied head: (B, T) ids -> (B, T, V).

    The blocks are given, so that the MoE family can reuse this shell.
    """

    def __init__(self, *, vocab_size: int, seq_len: int, d_model: int,
                 layers: list[nn.Module], dropout: float = 0.0) -> None:
        super().__init__()
        self.seq_len, self.dropout = seq_len, dropout
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.size(1) > self.seq_len:
            raise ValueError(f"sequence of {tokens.size(1)} tokens is longer than the "
                             f"{self.seq_len} positions of the model")
        positions = torch.arange(tokens.size(1), device=tokens.device)  # (T,)
        x = _dropped(self.tok_emb(tokens) + self.pos_emb(positions), self.dropout, self.training)  # (B, T, d)
        for layer in self.layers:
            x = layer(x)
        # Tied head: reuse the embedding matrix (V, d) rather than a second Linear, so the
        # tie survives `to_empty`, device moves and sharding wrappers.
        return F.linear(self.norm(x), self.tok_emb.weight)  # (B, T, V)

    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, residual outputs N(0, 0.02/√(2L)) (§2.3)."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * len(self.layers))
        nn.init.normal_(self.tok_emb.weight, std=std, generator=generator)
        nn.init.normal_(self.pos_emb.weight, std=std, generator=generator)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif module is not self and hasattr(module, "init_weights"):
                module.init_weights(generator, std=std, out_std=out_std)


def build_model(config: GPTConfig) -> GPT:
    d = config.d_model
    layers = [Block(d, CausalSelfAttention(d, config.n_heads, config.d_head),
                    FeedForward(d, config.ffn_ratio * d), config.dropout) for _ in range(config.n_layers)]
    return GPT(vocab_size=config.vocab_size, seq_len=config.seq_len, d_model=d, layers=layers,
               dropout=config.dropout)


def example_batch(config: GPTConfig, batch_size: int, generator: torch.Generator,
                  device: torch.device | str, dtype: torch.dtype):
    """Inputs ((B, seq_len) ids,), target (B, seq_len) ids; `dtype` is unused (ids are int64)."""
    return lm_batch(vocab_size=config.vocab_size, seq_len=config.seq_len,
                    batch_size=batch_size, generator=generator, device=device)


def _gpt3(label: str, n_layers: int, d_model: int, n_heads: int, d_head: int,
          nominal: float, note: str = "") -> Size:
    config = GPTConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head)
    return Size(config, nominal, f"GPT-3 {label} ({n_layers} layers, d_model {d_model}, "
                                 f"{n_heads} heads of {d_head}), seq 2048{note}")


SIZES = {
    "gpt3-125m": _gpt3("Small 125M", 12, 768, 12, 64, 125e6),
    "gpt3-350m": _gpt3("Medium 350M", 24, 1024, 16, 64, 350e6),
    "gpt3-760m": _gpt3("Large 760M", 24, 1536, 16, 96, 760e6),
    "gpt3-1.3b": _gpt3("XL 1.3B", 24, 2048, 16, 128, 1.3e9,
                       "; the table's 24 heads x 128 = 3072 != d_model, so 16 heads"),
    "gpt3-2.7b": _gpt3("2.7B", 32, 2560, 32, 80, 2.7e9),
    "gpt3-6.7b": _gpt3("6.7B", 32, 4096, 32, 128, 6.7e9),
    "gpt3-13b": _gpt3("13B", 40, 5140, 40, 128, 13e9, "; attention width 40 x 128 = 5120"),
    "gpt3-175b": _gpt3("175B", 96, 12288, 96, 128, 175e9),
    "gpt-39b": Size(GPTConfig(n_layers=48, d_model=8192, n_heads=64, d_head=128, vocab_size=51200, seq_len=1024),
                    39e9, "GPT-39B of Alpa's benchmark (Zheng et al. 2022, Table 4: 48 layers, hidden 8192, "
                          "64 heads), seq 1024, vocab 51200"),
    "gpt-tiny": Size(GPTConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, vocab_size=128,
                               seq_len=16), None,
                     "tiny GPT for CPU tests (2 layers, d_model 32, 4 heads), vocab 128, seq 16"),
}
