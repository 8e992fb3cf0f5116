"""Hugging Face `transformers` models built from configs: GPT-2, Llama and a BERT encoder.

Takes an `HFConfig` (the family, the sizes); gives a module mapping token ids (B, T) to logits
(B, T, V): `transformers`' own `GPT2LMHeadModel`, `LlamaForCausalLM` or `BertForMaskedLM`, built
from a config with random weights (nothing is downloaded) and wrapped so that the forward returns
the plain logits tensor rather than a `ModelOutput`:

    entry = autopar.models.get("hf-llama")
    model = entry.build(seed=0)                        # HFLogits around a LlamaForCausalLM
    inputs, target = entry.example_batch(4)
    compiled = autopar.compile(model, cluster, example_inputs=inputs, loss_fn=entry.loss_fn,
                               target=target, optimizer=...)

Any other `transformers` model is compiled the same way: wrap it so its forward returns the logits.
Dropout is off (probabilities 0) and the key/value cache is not used, so a training step is a pure
function of the weights and the batch. `transformers` is an optional dependency (the `hf` extra):
this module imports it only when a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .common import Size, lm_batch, lm_loss, require_multiple, require_positive

loss_fn = lm_loss
_KINDS = ("gpt2", "llama", "bert")


@dataclass(frozen=True, kw_only=True, slots=True)
class HFConfig:
    """Which `transformers` model, and its sizes (mapped onto that family's config names)."""

    kind: str  # "gpt2" (GPT2LMHeadModel), "llama" (LlamaForCausalLM) or "bert" (BertForMaskedLM)
    n_layers: int = 2  # transformer blocks
    dim: int = 64  # hidden size
    n_heads: int = 4  # attention heads
    n_kv_heads: int = 2  # key/value heads (Llama's grouped-query attention; others use n_heads)
    ffn_dim: int = 128  # MLP hidden width (GPT-2's n_inner, Llama's and BERT's intermediate_size)
    vocab_size: int = 256  # small, so the output head is not most of the model
    seq_len: int = 16  # positions of the batch, and of the learned position table
    attention: str = "sdpa"  # transformers' attn_implementation: "sdpa" or "eager"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"HFConfig.kind: found {self.kind!r}, required one of {_KINDS}")
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"HFConfig.attention: found {self.attention!r}, required 'sdpa' or 'eager'")
        require_positive(self, "n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "seq_len")
        require_multiple(self, "dim", of="n_heads")
        require_multiple(self, "n_heads", of="n_kv_heads")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("Hugging Face models: found no `transformers` package, required it "
                          "(pip install 'autopar[hf]')") from e
    return transformers


def hf_model(config: HFConfig) -> nn.Module:
    """The bare `transformers` model for `config`, in training mode, weights from the global RNG."""
    tf = _transformers()
    common = dict(vocab_size=config.vocab_size, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  attn_implementation=config.attention)
    if config.kind == "gpt2":
        hf_config = tf.GPT2Config(n_layer=config.n_layers, n_embd=config.dim, n_head=config.n_heads,
                                  n_inner=config.ffn_dim, n_positions=config.seq_len, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, **common)
        cls = tf.GPT2LMHeadModel
    elif config.kind == "llama":
        hf_config = tf.LlamaConfig(num_hidden_layers=config.n_layers, hidden_size=config.dim,
                                   num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                                   intermediate_size=config.ffn_dim, max_position_embeddings=config.seq_len,
                                   attention_dropout=0.0, **common)
        cls = tf.LlamaForCausalLM
    else:
        hf_config = tf.BertConfig(num_hidden_layers=config.n_layers, hidden_size=config.dim,
                                  num_attention_heads=config.n_heads, intermediate_size=config.ffn_dim,
                                  max_position_embeddings=config.seq_len, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **common)
        cls = tf.BertForMaskedLM
    return cls(hf_config).train()


class HFLogits(nn.Module):
    """A `transformers` model whose forward takes token ids and returns the logits tensor."""

    def __init__(self, config: HFConfig) -> None:
        super().__init__()
        self.config = config
        self.hf = hf_model(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids).logits  # (B, T, V)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Weights as `transformers` initializes them, drawn from `generator`. Building on meta and
        materializing (`to_empty`) leaves the buffers computed at construction (rotary
        frequencies, position ids) empty and unties shared parameters (GPT-2's and BERT's
        embedding and output head): both are restored from a model built here."""
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = hf_model(self.config)
        _tie_like(self.hf, fresh)
        for mine, theirs in ((self.hf.named_parameters, fresh.named_parameters),
                             (self.hf.named_buffers, fresh.named_buffers)):
            source = dict(theirs(remove_duplicate=False))
            for name, tensor in mine(remove_duplicate=False):
                tensor.copy_(source[name])


def _tie_like(model: nn.Module, reference: nn.Module) -> None:
    """Make the parameters that are one tensor in `reference` one tensor in `model` too."""
    first: dict[int, str] = {}
    for name, param in reference.named_parameters(remove_duplicate=False):
        if id(param) not in first:
            first[id(param)] = name
            continue
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(first[id(param)]))


def build_model(config: HFConfig) -> HFLogits:
    """The wrapped model (the registry builds it on meta, then calls `init_weights`)."""
    return HFLogits(config)


def example_batch(config: HFConfig, batch_size: int, generator: torch.Generator,
                  device: torch.device | str, dtype: torch.dtype) -> tuple[tuple[torch.Tensor], torch.Tensor]:
    """Random token ids (B, T) and the next token at each position (B, T). BERT's masked-LM head
    is scored on every position against the same targets, so every loss is a plain mean."""
    return lm_batch(vocab_size=config.vocab_size, seq_len=config.seq_len, batch_size=batch_size,
                    generator=generator, device=device)


SIZES: dict[str, Size] = {
    "hf-gpt2": Size(HFConfig(kind="gpt2"), None,
                    "transformers GPT2LMHeadModel from a config (2 layers, d 64, 4 heads), seq 16; needs the hf extra"),
    "hf-llama": Size(HFConfig(kind="llama"), None,
                     "transformers LlamaForCausalLM from a config (2 layers, d 64, 4/2 heads), seq 16; "
                     "needs the hf extra"),
    "hf-bert": Size(HFConfig(kind="bert"), None,
                    "transformers BertForMaskedLM from a config (2 layers, d 64, 4 heads), seq 16; needs the hf extra"),
}
