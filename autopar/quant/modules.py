"""Quantized linear layers and whole-model quantization (seeds 000 and 004).

Takes an `nn.Linear` or a model and the name of a scheme; gives a `QuantizedLinear` that holds its
weight as packed integers and scales (buffers, no float weight), or a copy of the model with every
`nn.Linear` replaced. `quantized_bytes` gives the same layers' bytes from shapes alone, so it works
on the meta device. With W the weight (out, in) and x the activations (tokens, in):

    scheme      weight                                      activations                   bits per weight
    int8        int8, symmetric, one fp32 scale per output  float: dequantize, matmul     8 + 32/in
    int4        int4, symmetric, one fp32 scale per output  float                         4 + 32/in
    int4-g128   int4, symmetric, one fp16 scale per 128     float                         4 + 16/128
    int4-g32    int4, as above, groups of 32 inputs         float                         4 + 16/32
    kmeans4     4-bit index into a 16-centroid codebook     float                         4 + 16·b/(out·in)
    w8a8        int8 per output channel                     int8 per token, dynamic       8 + 32/in
    llm.int8    int8 per output channel                     LLM.int8(): |x| > 6 in float  8 + 32/in

Weight-only formats (seed 000; groups of 128 input features are the int4-g128 layout of weight-only
LLM quantizers) compute in the input's dtype. w8a8 multiplies integers exactly, as seed 004's
vector-wise int8, y = (s_x s_wᵀ) ⊙ (q_x q_wᵀ), and llm.int8 adds the outlier decomposition of
Dettmers et al. (2022) with masks, so that graphs keep static shapes. b is the bits of the codebook's dtype (32 for fp32).

    >>> q = quantize_model(model, "int4-g128")            # a copy; `model` is unchanged
    >>> quantized_bytes(model_on_meta, "int4-g128")       # the same layers' bytes, nothing built
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopar.quant.int8 import int_matmul
from autopar.quant.kmeans import kmeans_quantize
from autopar.quant.linear import quantize

LLM_INT8_THRESHOLD = 6.0
"""Input features with some |x| above this stay in float under llm.int8 (Dettmers et al.'s value)."""

DEFAULT_SKIP = ("lm_head", "output")
"""Output heads, kept in float by default as weight-only LLM quantizers do (matched by name)."""

DEQUANTIZE_BLOCK = 2 ** 22
"""Elements of Ŵ that a weight-only forward makes at a time (16 MB in fp32): a call never holds the
whole float weight, and the allocator reuses one block's memory instead of mapping fresh pages for a
full weight on every call (on CPU, 4× faster at 1 × 4096 → 4096)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Scheme:
    """How one scheme stores a weight and multiplies with it."""

    name: str
    codebook: bool
    """True: b-bit indices into 2^b centroids (k-means); False: linear, symmetric, r = S·q."""
    bits: int
    group_size: int | None
    """Input features per scale; None: one scale per output channel."""
    scale_dtype: torch.dtype
    matmul: str
    """"dequantize" (weight-only), "w8a8" or "llm.int8"."""

    def check(self, in_features: int) -> None:
        if self.group_size and in_features % self.group_size:
            raise ValueError(f"{self.name}: found in_features {in_features}, which groups of {self.group_size} "
                             f"do not divide; required a multiple of {self.group_size}")

    def weight_bytes(self, out_features: int, in_features: int, dtype: torch.dtype) -> int:
        """Packed values + scales (or the codebook, in the weight's `dtype`)."""
        self.check(in_features)
        values = math.ceil(out_features * in_features * self.bits / 8)
        if self.codebook:
            return values + 2 ** self.bits * dtype.itemsize
        scales = out_features * (in_features // self.group_size if self.group_size else 1)
        return values + scales * self.scale_dtype.itemsize


_SCHEMES = {s.name: s for s in (
    Scheme(name="int8", codebook=False, bits=8, group_size=None, scale_dtype=torch.float32, matmul="dequantize"),
    Scheme(name="int4", codebook=False, bits=4, group_size=None, scale_dtype=torch.float32, matmul="dequantize"),
    Scheme(name="int4-g128", codebook=False, bits=4, group_size=128, scale_dtype=torch.float16, matmul="dequantize"),
    Scheme(name="int4-g32", codebook=False, bits=4, group_size=32, scale_dtype=torch.float16, matmul="dequantize"),
    Scheme(name="kmeans4", codebook=True, bits=4, group_size=None, scale_dtype=torch.float32, matmul="dequantize"),
    Scheme(name="w8a8", codebook=False, bits=8, group_size=None, scale_dtype=torch.float32, matmul="w8a8"),
    Scheme(name="llm.int8", codebook=False, bits=8, group_size=None, scale_dtype=torch.float32, matmul="llm.int8"),
)}
SCHEMES = tuple(_SCHEMES)


def get_scheme(name: object) -> Scheme:
    """The `Scheme` called `name`; ValueError naming the valid ones if there is none."""
    if name not in _SCHEMES:
        raise ValueError(f"scheme: found {name!r}, required one of {', '.join(map(repr, SCHEMES))}")
    return _SCHEMES[name]  # type: ignore[index]


def _unpack_int4(packed: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """(rows, n/2) uint8 -> (rows, n): element 2j is the low nibble of byte j (`pack_bits`'s order)."""
    low, high = packed & 0x0F, packed >> 4
    codes = torch.stack((low, high), dim=-1).flatten(-2).to(torch.int8)
    return (codes ^ 8) - 8 if signed else codes                    # two's complement of 4 bits


def _quantize_per_token(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 per row, S = |r|max / 127 (`quantize`'s symmetric per-channel formula, without
    its checks, as it runs on every call): q (tokens, in) int8 and S (tokens, 1) float32."""
    rows = rows.float()
    absmax = rows.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    return torch.round(rows / scale).clamp(-127, 127).to(torch.int8), scale


class QuantizedLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ stored as packed integers; built by `from_linear`.

    Buffers (all in `state_dict`): `qweight`, int8 (out, in) for int8 and llm.int8, int8 (in, out)
    for w8a8 (the (out, in) integers transposed, column-major: the operand `int_matmul` takes
    fastest, with nothing copied per call), uint8 (out, in/2) of
    two 4-bit values per byte for int4 and kmeans4; `scale`, (out,) per channel or (out, in/group)
    per group; `codebook`, (16,), for kmeans4; `bias`, float, frozen like the weight.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, *, qweight: torch.Tensor,
                 scale: torch.Tensor | None, codebook: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = get_scheme(scheme)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("codebook", codebook)
        self.register_buffer("bias", bias)  # frozen with the weight: a buffer, as the weight's integers are

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> QuantizedLinear:
        """Quantize `linear.weight` under `scheme`; the bias is copied (a buffer: the layer is frozen)."""
        spec = get_scheme(scheme)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: found {type(linear).__name__}, required torch.nn.Linear")
        spec.check(linear.in_features)
        w = linear.weight.detach()
        out_features, in_features = w.shape
        scale = codebook = None
        if w.is_meta:  # shapes and dtypes only, for planning a model that was never allocated
            return cls._on_meta(linear, spec)
        if spec.codebook:
            q = kmeans_quantize(w, spec.bits)
            qweight, codebook = q.data.reshape(out_features, -1), q.codebook
        else:
            granularity = "group" if spec.group_size else "channel"
            q = quantize(w, spec.bits, scheme="symmetric", granularity=granularity, group_size=spec.group_size,
                         axis=0, scale_dtype=spec.scale_dtype)
            qweight, scale = q.data.reshape(out_features, -1), q.scale
            if spec.matmul == "w8a8":
                qweight = qweight.t()                                   # (in, out), column-major
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(in_features, out_features, scheme, qweight=qweight, scale=scale, codebook=codebook, bias=bias)

    @classmethod
    def _on_meta(cls, linear: nn.Linear, spec: Scheme) -> QuantizedLinear:
        out_features, in_features = linear.weight.shape
        meta = {"device": "meta"}
        packed = (out_features, in_features * spec.bits // 8)
        if spec.matmul == "w8a8":
            packed = (in_features, out_features)
        qweight = torch.empty(packed, dtype=torch.uint8 if spec.bits < 8 else torch.int8, **meta)
        scale = codebook = None
        if spec.codebook:
            codebook = torch.empty(2 ** spec.bits, dtype=linear.weight.dtype, **meta)
        else:
            groups = in_features // spec.group_size if spec.group_size else None
            scale = torch.empty((out_features, groups) if groups else (out_features,), dtype=spec.scale_dtype, **meta)
        bias = None if linear.bias is None else torch.empty_like(linear.bias, device="meta")
        return cls(in_features, out_features, spec.name, qweight=qweight, scale=scale, codebook=codebook, bias=bias)

    def int_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        """The integers (or codebook indices) of output channels `rows` as int8, (rows, in)."""
        if self.scheme.bits == 4:
            return _unpack_int4(self.qweight[rows], signed=not self.scheme.codebook)
        return self.qweight[:, rows].t() if self.scheme.matmul == "w8a8" else self.qweight[rows]

    def dequantize_weight(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """Ŵ[rows] (rows, in) in `dtype`: codebook[index], S·q per channel, or S·q per group."""
        q = self.int_weight(rows)
        if self.scheme.codebook:
            return self.codebook[q.long()].to(dtype)
        scale = self.scale[rows].to(dtype)
        if self.scheme.group_size is None:
            return q.to(dtype) * scale[:, None]
        groups = q.to(dtype).unflatten(1, (-1, self.scheme.group_size))     # (rows, in/g, g)
        return (groups * scale[..., None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.matmul == "w8a8":
            y = self._w8a8(x)
        elif self.scheme.matmul == "llm.int8":
            y = self._llm_int8(x)
        else:
            block = max(1, DEQUANTIZE_BLOCK // self.in_features)
            parts = [self._weight_only(x, slice(i, i + block)) for i in range(0, self.out_features, block)]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _weight_only(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """x Ŵ[rows]ᵀ, dequantizing in x's dtype."""
        if self.scheme.group_size is None and not self.scheme.codebook and self.scheme.bits == 8:
            # A per-channel scale commutes with the matmul: x (S q)ᵀ = (x qᵀ) S, rows scalings, not rows·in.
            return F.linear(x, self.qweight[rows].to(x.dtype)) * self.scale[rows].to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype, rows))

    def _llm_int8(self, x: torch.Tensor) -> torch.Tensor:
        """LLM.int8() with masks instead of column selection, so the graph's shapes do not depend on
        the values (it captures and plans like any other): the outlier features (|x| > 6 in some
        token) multiply the dequantized weight in float, the rest go through the int8 product of
        `_w8a8`; the two sum to `int8_matmul`'s decomposition with the stored int8 weight."""
        rows = x.reshape(-1, self.in_features)
        mask = (rows.abs() > LLM_INT8_THRESHOLD).any(dim=0).to(rows.dtype)             # (in,) 1 = outlier
        wide = torch.promote_types(x.dtype, torch.float32)
        outliers = F.linear((rows * mask).to(wide), self.dequantize_weight(wide))
        q_x, s_x = _quantize_per_token(rows * (1 - mask))
        regular = int_matmul(q_x, self.qweight.t()).float() * s_x * self.scale[None, :]
        return (outliers + regular).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        q_x, s_x = _quantize_per_token(x.reshape(-1, self.in_features))             # (tokens, in), (tokens, 1)
        acc = int_matmul(q_x, self.qweight)                                         # (tokens, out) int32, exact
        y = acc.float() * s_x * self.scale[None, :]                                 # outer product of scales
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the packed weight and its scales or codebook (not the bias)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.codebook) if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name!r}, "
                f"bias={self.bias is not None}, weight_bytes={self.weight_bytes}")


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A pattern (fnmatch) matches the module's full name or its last component."""
    last = name.rpartition(".")[2]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in skip)


def replaced_linears(model: nn.Module, *, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    """(name, module) of each `nn.Linear` that `quantize_model` replaces: all but those matching a
    `skip` pattern and those whose weight is shared with another module (a tied output head).
    Subclasses of nn.Linear stay too: their owners may read `.weight` directly (as
    nn.MultiheadAttention does its `out_proj`)."""
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and not _skipped(name, skip) and owners[id(m.weight)] == 1]


def quantize_model(model: nn.Module, scheme: str | dict[str, str], *,
                   skip: tuple[str, ...] = DEFAULT_SKIP) -> nn.Module:
    """A copy of `model` with each Linear of `replaced_linears` a `QuantizedLinear`; `model` is unchanged.
    `scheme`: one name for every layer, or a dict layer → name ("none" or absent keeps it float).

        >>> q = quantize_model(gpt, "int8")
        >>> q.layers[0].ffn.fc1
        QuantizedLinear(in_features=32, out_features=128, scheme='int8', bias=True, weight_bytes=4608)
    """
    layers = dict(replaced_linears(model, skip=skip))
    if isinstance(scheme, dict):  # one scheme per layer ("none" keeps it float), e.g. from `assign_bits`
        unknown = sorted(set(scheme) - set(layers))
        if unknown:
            raise ValueError(f"layers: found {unknown}, required names of replaceable Linear layers "
                             f"({', '.join(sorted(layers)) or 'none'})")
        for s in scheme.values():
            if s != "none":
                get_scheme(s)
    else:
        get_scheme(scheme)
    quantized = copy.deepcopy(model)
    for name, linear in replaced_linears(quantized, skip=skip):
        chosen = scheme.get(name, "none") if isinstance(scheme, dict) else scheme
        if chosen == "none":
            continue
        try:
            replacement = QuantizedLinear.from_linear(linear, chosen)
        except ValueError as e:
            raise ValueError(f"Linear {name!r} ({linear.in_features} -> {linear.out_features}): {e}") from e
        parent, _, attr = name.rpartition(".")
        setattr(quantized.get_submodule(parent), attr, replacement)
    return quantized


def quantized_bytes(model: nn.Module, scheme: str | dict[str, str], *, skip: tuple[str, ...] = DEFAULT_SKIP) -> int:
    """Bytes that the weights `quantize_model` replaces take under `scheme` (one name, or a dict
    layer → name, "none" or absent counted as nothing), from shapes alone (the model may be on meta):
    the sum of the `weight_bytes` of the QuantizedLinears it would build."""
    total = 0
    for name, linear in replaced_linears(model, skip=skip):
        chosen = scheme.get(name, "none") if isinstance(scheme, dict) else scheme
        if chosen == "none":
            continue
        spec = get_scheme(chosen)
        try:
            total += spec.weight_bytes(linear.out_features, linear.in_features, linear.weight.dtype)
        except ValueError as e:
            raise ValueError(f"Linear {name!r} ({linear.in_features} -> {linear.out_features}): {e}") from e
    return total


def bits_per_weight(scheme: str, *, shape: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32) -> float:
    """Stored bits per weight element. With `shape` (out, in), exactly 8·bytes / (out·in); without,
    the value for large layers, where per-channel scales and the codebook cost nothing per element:

        >>> bits_per_weight("int4-g128"), bits_per_weight("int4-g32"), bits_per_weight("int8")
        (4.125, 4.5, 8.0)
    """
    spec = get_scheme(scheme)
    if shape is not None:
        out_features, in_features = shape
        return 8 * spec.weight_bytes(out_features, in_features, dtype) / (out_features * in_features)
    scale_bits = 8 * spec.scale_dtype.itemsize / spec.group_size if spec.group_size else 0.0
    return spec.bits + scale_bits
