"""Llama-3 style decoder (Meta, "The Llama 3 Herd of Models", 2024, table 3).

Takes a `LlamaConfig`; gives a module mapping token ids (B, T) to logits (B, T, V).
Architecture: RMSNorm pre-norm blocks (`F.rms_norm` via nn.RMSNorm), rotary
position embeddings with theta 500000 on real cos/sin tables, grouped-query
attention (n_kv_heads key/value heads shared by n_heads / n_kv_heads query heads
each), SwiGLU FFN `w2(silu(w1 x) * w3 x)`, no biases, untied output head.

Parameters, with L layers, width d, head width h = d / n_heads, kv heads K,
FFN width f and vocabulary V:
    per block = 2·d² + 2·d·K·h + 3·d·f + 2·d      (wq, wo; wk, wv; w1, w2, w3; 2 norms)
    total     = L·block + 2·V·d + d               (embedding and head are separate)
which gives 8.03B, 70.55B and 405.85B for the three published sizes.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import Size, lm_batch, lm_loss, require_multiple, require_positive

loss_fn = lm_loss


@dataclass(frozen=True, kw_only=True, slots=True)
class LlamaConfig:
    """Sizes of a Llama-3 style model (names as in Meta's reference `ModelArgs`)."""

    n_layers: int  # transformer blocks
    dim: int  # residual stream width
    n_heads: int  # query heads; head width is dim / n_heads
    n_kv_heads: int  # key/value heads (GQA); must divide n_heads
    ffn_dim: int  # SwiGLU hidden width (14336 for 8B)
    vocab_size: int = 128256  # Llama-3 tiktoken vocabulary
    seq_len: int = 8192  # context of Llama 3 (before the 3.1 long-context stage)
    rope_theta: float = 500000.0  # RoPE base; Llama 3 raised it from 10000 for long context
    norm_eps: float = 1e-5  # RMSNorm epsilon of the reference code

    def __post_init__(self) -> None:
        require_positive(self, "n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim",
                         "vocab_size", "seq_len")
        require_multiple(self, "dim", of="n_heads")
        require_multiple(self, "n_heads", of="n_kv_heads")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"RoPE rotates pairs: head width dim/n_heads must be even, "
                             f"found {self.dim}/{self.n_heads} = {self.dim // self.n_heads}")
        if self.rope_theta <= 1 or self.norm_eps <= 0:
            raise ValueError(f"LlamaConfig requires rope_theta > 1 and norm_eps > 0, found "
                             f"rope_theta={self.rope_theta}, norm_eps={self.norm_eps}")


def rope_tables(seq_len: int, d_head: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles t·theta^(-2i/d_head), each (seq_len, d_head/2).

    RoFormer (Su et al. 2021) eq. 15: pair i of a head at position t turns by t·theta^(-2i/d).
    """
    inv_freq = theta ** -(torch.arange(0, d_head, 2, dtype=torch.float64, device=device) / d_head)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()  # (T, Dh/2) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of x (B, H, T, Dh) by the angles of cos/sin (T, Dh/2).

    The pairs are adjacent elements, as in Meta's reference (there via complex numbers).
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, Dh/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Grouped-query causal attention with RoPE: (B, T, dim) -> (B, T, dim)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.d_head = config.dim // config.n_heads
        self.wq = nn.Linear(config.dim, self.n_heads * self.d_head, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.d_head, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.d_head, bias=False)
        self.wo = nn.Linear(self.n_heads * self.d_head, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q_heads, kv_heads = (self.n_heads, self.d_head), (self.n_kv_heads, self.d_head)
        q = self.wq(x).unflatten(-1, q_heads).transpose(1, 2)  # (B, H, T, Dh)
        k = self.wk(x).unflatten(-1, kv_heads).transpose(1, 2)  # (B, K, T, Dh)
        v = self.wv(x).unflatten(-1, kv_heads).transpose(1, 2)  # (B, K, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Repeat each kv head for its H/K query heads with expand+reshape (torchtitan's
        # repeat_kv), so that sdpa sees equal head counts; sdpa's enable_gqa would also export.
        k, v = self._repeat_kv(k), self._repeat_kv(v)  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        return self.wo(y.transpose(1, 2).flatten(-2))  # (B, T, dim)

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        b, k, s, d = t.shape
        group = self.n_heads // self.n_kv_heads
        return t.unsqueeze(2).expand(b, k, group, s, d).reshape(b, k * group, s, d)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020), w2(silu(w1 x) * w3 x): (B, T, dim) -> (B, T, dim)."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """x + attn(attn_norm(x)), then + ffn(ffn_norm(x)); (B, T, dim) -> (B, T, dim)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn = FeedForward(config.dim, config.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    """Embedding, `layers`, final RMSNorm, output head: (B, T) ids -> (B, T, V)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # RoPE tables are derived, not learned: non-persistent, rebuilt by init_weights.
        cos, sin = rope_tables(config.seq_len, config.dim // config.n_heads, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (seq_len, Dh/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (seq_len, Dh/2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.size(1)
        if seq > self.config.seq_len:
            raise ValueError(f"sequence of {seq} tokens is longer than the model's "
                             f"seq_len={self.config.seq_len}")
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]  # (T, Dh/2)
        x = self.tok_emb(tokens)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))  # (B, T, V)

    def init_weights(self, generator: torch.Generator) -> None:
        """As torchtitan's Llama 3: embedding N(0, 1), head N(0, dim^-1/2), other weights
        N(0, 0.02) with the residual outputs (wo, w2) at 0.02/√(2L) (GPT-2 §2.3); norms 1."""
        c = self.config
        std, out_std = 0.02, 0.02 / math.sqrt(2 * c.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=1.0, generator=generator)
        nn.init.normal_(self.output.weight, std=c.dim ** -0.5, generator=generator)
        for layer in self.layers:
            for w in (layer.attn.wq, layer.attn.wk, layer.attn.wv, layer.ffn.w1, layer.ffn.w3):
                nn.init.normal_(w.weight, std=std, generator=generator)
            for w in (layer.attn.wo, layer.ffn.w2):
                nn.init.normal_(w.weight, std=out_std, generator=generator)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                module.reset_parameters()
        cos, sin = rope_tables(c.seq_len, c.dim // c.n_heads, c.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


def build_model(config: LlamaConfig) -> Llama:
    return Llama(config)


def example_batch(config: LlamaConfig, batch_size: int, generator: torch.Generator,
                  device: torch.device | str, dtype: torch.dtype):
    """Inputs ((B, seq_len) ids,), target (B, seq_len) ids; pass seq_len=... for shorter."""
    return lm_batch(vocab_size=config.vocab_size, seq_len=config.seq_len,
                    batch_size=batch_size, generator=generator, device=device)


def _llama3(label: str, n_layers: int, dim: int, n_heads: int, n_kv_heads: int,
            ffn_dim: int, nominal: float) -> Size:
    config = LlamaConfig(n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         ffn_dim=ffn_dim)
    return Size(config, nominal, f"Llama 3 {label} ({n_layers} layers, dim {dim}, {n_heads} heads, "
                                 f"{n_kv_heads} kv heads, ffn {ffn_dim}), seq 8192")


SIZES = {
    "llama3-8b": _llama3("8B", 32, 4096, 32, 8, 14336, 8e9),
    "llama3-70b": _llama3("70B", 80, 8192, 64, 8, 28672, 70e9),
    "llama3-405b": _llama3("405B", 126, 16384, 128, 8, 53248, 405e9),
    # 8 query heads over 4 kv heads: both split 4 ways, and GQA still shares each kv head.
    "llama-tiny": Size(LlamaConfig(n_layers=2, dim=64, n_heads=8, n_kv_heads=4, ffn_dim=128,
                                   vocab_size=128, seq_len=16), None,
                       "tiny Llama for CPU tests (2 layers, dim 64, 8 heads, 4 kv heads, "
                       "ffn 128), vocab 128, seq 16"),
}
