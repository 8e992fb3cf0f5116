"""GShard-style mixture-of-experts transformer (Lepikhin et al. 2021), on Alpa's MoE shapes.

Takes a `MoEConfig`; gives a module mapping token ids (B, T) to logits (B, T, V).
The shell is the GPT one (learned positions, pre-LN, causal attention, tied head);
the FFN of every odd block (1, 3, 5, ...) is a mixture of E experts with top-2 gating.

Routing (GShard Algorithm 1, with its "GSEC" einsums): the B·T tokens are split
into G groups of S tokens (S = min(group_size, B·T)); each group is routed on its
own, with per-expert capacity
    C = min(S, ceil(capacity_factor · 2 · S / E))      (GShard: 2S/E, capacity_factor 1)
A token goes to its two highest-gated experts, with gates renormalized over the two
(g1 + g2 = 1). Buffers fill in token order, first choices before second choices;
an assignment past C is dropped: its FFN output is zero and the residual carries
the token. Every shape is static (masks from comparisons, positions from cumsum),
so the layer traces, and the expert dim E of `wi`/`wo` can be sharded (expert
parallelism: the "GSEC,GSM->EGCM" dispatch becomes an all-to-all).

Parameters, with L layers (L/2 of them MoE), width d, FFN width f, E experts:
    dense block = 4·d² + 2·d·f + 8·d + f          (attention 4d²+3d, FFN 2df+f+d, 2 LNs 4d)
    MoE block   = 4·d² + 2·E·d·f + 7·d + d·E       (experts have no biases; router d·E)
    total       = ceil(L/2)·dense + floor(L/2)·MoE + (V + P)·d + 2·d
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import Size, lm_batch, lm_loss, require_multiple, require_positive
from .gpt import GPT, Block, CausalSelfAttention, FeedForward

loss_fn = lm_loss


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    """Sizes of a GShard-style MoE transformer (Alpa's `MoEModelConfig` names in comments)."""

    n_layers: int  # blocks (L); the odd ones have a mixture-of-experts FFN
    d_model: int  # residual width (H)
    n_heads: int  # attention heads (#head); head width d_model / n_heads
    d_ff: int  # hidden width of the dense FFN and of each expert (Alpa uses 8·d_model)
    n_experts: int  # experts per MoE layer (E); top-2 routing needs at least 2
    capacity_factor: float = 1.0  # scales the capacity 2S/E; 1.0 is GShard's and Alpa's
    group_size: int = 2048  # tokens routed together (S; Alpa's expert_group_size)
    vocab_size: int = 32000  # V of Alpa's MoE benchmark
    seq_len: int = 1024  # context, rows of the position table (Alpa's S)

    def __post_init__(self) -> None:
        require_positive(self, "n_layers", "d_model", "n_heads", "d_ff", "n_experts",
                         "group_size", "vocab_size", "seq_len")
        require_multiple(self, "d_model", of="n_heads")
        if self.n_experts < 2:
            raise ValueError(f"top-2 gating needs n_experts >= 2, found {self.n_experts}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, found {self.capacity_factor}")


def expert_capacity(tokens_per_group: int, n_experts: int, capacity_factor: float) -> int:
    """C = min(S, ceil(capacity_factor · 2 · S / E)): slots per expert and group (GShard)."""
    return min(tokens_per_group, math.ceil(capacity_factor * 2 * tokens_per_group / n_experts))


def _one_hot(index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(...,) ints -> (..., n) one-hot, by comparison (F.one_hot's CPU kernel checks values)."""
    return (index.unsqueeze(-1) == torch.arange(n, device=index.device)).to(dtype)


def top2_gating(gates: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate probabilities (G, S, E) -> combine weights and dispatch mask, both (G, S, E, C).

    dispatch[g, s, e, c] = 1 when token s of group g sits in slot c of expert e;
    combine is dispatch times the token's renormalized gate for that expert.
    """
    n_experts = gates.size(-1)
    first = _one_hot(gates.argmax(-1), n_experts, torch.long)  # (G, S, E)
    second = _one_hot((gates * (1 - first)).argmax(-1), n_experts, torch.long)  # (G, S, E)
    gate1, gate2 = (gates * first).sum(-1), (gates * second).sum(-1)  # (G, S)
    total = gate1 + gate2  # renormalize over the two chosen experts (GShard Algorithm 1)
    gate1, gate2 = gate1 / total, gate2 / total

    # Slot of each assignment: earlier tokens' first choices, then all first choices
    # kept, then earlier tokens' second choices. Past `capacity`: dropped.
    pos1 = torch.cumsum(first, dim=1) - first  # (G, S, E)
    first = first * (pos1 < capacity)
    pos2 = torch.cumsum(second, dim=1) - second + first.sum(dim=1, keepdim=True)  # (G, S, E)
    second = second * (pos2 < capacity)
    slot1, slot2 = (pos1 * first).sum(-1), (pos2 * second).sum(-1)  # (G, S)

    dtype = gates.dtype
    dispatch1 = first.to(dtype).unsqueeze(-1) * _one_hot(slot1, capacity, dtype).unsqueeze(2)
    dispatch2 = second.to(dtype).unsqueeze(-1) * _one_hot(slot2, capacity, dtype).unsqueeze(2)
    combine = gate1[..., None, None] * dispatch1 + gate2[..., None, None] * dispatch2
    return combine, dispatch1 + dispatch2  # (G, S, E, C) each


class MoEFeedForward(nn.Module):
    """Top-2 mixture of ReLU experts (GShard's expert FFN): (B, T, d) -> (B, T, d)."""

    def __init__(self, *, d_model: int, d_ff: int, n_experts: int, capacity_factor: float,
                 group_size: int) -> None:
        super().__init__()
        self.capacity_factor, self.group_size = capacity_factor, group_size
        self.wg = nn.Parameter(torch.empty(d_model, n_experts))  # router (d, E)
        self.wi = nn.Parameter(torch.empty(n_experts, d_model, d_ff))  # (E, d, d_ff)
        self.wo = nn.Parameter(torch.empty(n_experts, d_ff, d_model))  # (E, d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_tokens = x.size(0) * x.size(1)
        group = min(self.group_size, n_tokens)
        if n_tokens % group != 0:
            raise ValueError(f"MoE routes groups of {group} tokens; the batch has {n_tokens} "
                             f"(B·T), not a multiple of it: change batch, seq_len or group_size")
        xs = x.reshape(-1, group, x.size(-1))  # (G, S, M)
        # The router runs in at least float32 (as GShard): cumsum positions and softmax stay exact in bf16.
        router = torch.promote_types(x.dtype, torch.float32)
        gates = torch.softmax(torch.einsum("GSM,ME->GSE", xs.to(router), self.wg.to(router)), dim=-1)
        capacity = expert_capacity(group, self.wg.size(1), self.capacity_factor)
        combine, dispatch = top2_gating(gates, capacity)  # (G, S, E, C) each
        expert_in = torch.einsum("GSEC,GSM->EGCM", dispatch.to(x.dtype), xs)  # (E, G, C, M)
        h = F.relu(torch.einsum("EGCM,EMH->EGCH", expert_in, self.wi))  # (E, G, C, d_ff)
        expert_out = torch.einsum("EGCH,EHM->EGCM", h, self.wo)  # (E, G, C, M)
        y = torch.einsum("GSEC,EGCM->GSM", combine.to(x.dtype), expert_out)  # (G, S, M)
        return y.reshape(x.shape)  # (B, T, M)

    def init_weights(self, generator: torch.Generator, *, std: float, out_std: float) -> None:
        nn.init.normal_(self.wg, std=std, generator=generator)
        nn.init.normal_(self.wi, std=std, generator=generator)
        nn.init.normal_(self.wo, std=out_std, generator=generator)


def build_model(config: MoEConfig) -> GPT:
    d = config.d_model
    layers = []
    for i in range(config.n_layers):
        if i % 2 == 1:
            ffn = MoEFeedForward(d_model=d, d_ff=config.d_ff, n_experts=config.n_experts,
                                 capacity_factor=config.capacity_factor,
                                 group_size=config.group_size)
        else:
            ffn = FeedForward(d, config.d_ff)
        layers.append(Block(d, CausalSelfAttention(d, config.n_heads, d // config.n_heads), ffn))
    return GPT(vocab_size=config.vocab_size, seq_len=config.seq_len, d_model=d, layers=layers)


def example_batch(config: MoEConfig, batch_size: int, generator: torch.Generator,
                  device: torch.device | str, dtype: torch.dtype):
    """Inputs ((B, seq_len) ids,), target (B, seq_len) ids."""
    return lm_batch(vocab_size=config.vocab_size, seq_len=config.seq_len,
                    batch_size=batch_size, generator=generator, device=device)


def _alpa(label: str, n_layers: int, d_model: int, n_experts: int, nominal: float) -> Size:
    config = MoEConfig(n_layers=n_layers, d_model=d_model, n_heads=16, d_ff=8 * d_model,
                       n_experts=n_experts)
    return Size(config, nominal, f"GShard MoE, Alpa's {label} spec ({n_layers} layers, d_model "
                                 f"{d_model}, 16 heads, {n_experts} experts every other layer, "
                                 f"d_ff {8 * d_model}), seq 1024")


SIZES = {
    "moe-690m": _alpa("690M", 8, 768, 16, 690e6),
    "moe-2.4b": _alpa("2.4B", 16, 1024, 16, 2.4e9),
    "moe-70b": _alpa("70B", 32, 2048, 64, 70e9),
    "moe-tiny": Size(MoEConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, n_experts=4,
                               group_size=32, vocab_size=128, seq_len=16), None,
                     "tiny MoE for CPU tests (2 layers, d_model 32, 4 heads, 4 experts, "
                     "d_ff 64, groups of 32 tokens), vocab 128, seq 16"),
}
