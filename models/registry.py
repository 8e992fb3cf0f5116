"""The zoo's registry: a name ("gpt3-175b", "llama-tiny", ...) -> a `ModelEntry`.

Takes the `SIZES` table of each family module; gives `names()`, `get(name)` and
`ModelEntry`, which builds the model (seeded, or free on "meta"), makes a matching
random batch, computes the loss and counts parameters:

    entry = get("gpt-tiny")
    model = entry.build(seed=0)                       # nn.Module on the CPU
    inputs, target = entry.example_batch(8)
    loss = entry.loss_fn(model(*inputs), target)
    get("gpt3-175b").num_params()                     # 174_604_259_328, built on meta

A family module gives `build_model(config)` (an nn.Module with
`init_weights(generator)`), `example_batch(config, batch_size, generator, device,
dtype)`, `loss_fn(output, target)` and `SIZES: dict[str, Size]`.
"""

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from . import gpt, hf, llama, mlp, moe, wresnet

_FAMILIES: dict[str, ModuleType] = {
    "gpt": gpt, "llama": llama, "mlp": mlp, "moe": moe, "wresnet": wresnet,
    "hf": hf,  # transformers models from configs; transformers is imported only when one is built
}


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelEntry:
    """One model of the zoo: its config and how to build, feed and score it."""

    name: str  # registry key, e.g. "gpt3-175b"
    family: str  # "gpt", "llama", "mlp", "moe", "wresnet" or "hf": the module that builds it
    description: str  # one line, e.g. "GPT-3 175B (96 layers, ...), seq 2048"
    config: Any  # the family's frozen config dataclass
    nominal_params: float | None  # the size the name claims (175e9); None if it claims none

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise ValueError(f"family of {self.name!r} must be one of {sorted(_FAMILIES)}, "
                             f"found {self.family!r}")

    def resolve_config(self, **overrides: Any) -> Any:
        """The config with `overrides` replacing fields (validation reruns)."""
        valid = {field.name for field in dataclasses.fields(self.config)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown override(s) {unknown} for {self.name!r}; valid fields of "
                             f"{type(self.config).__name__}: {sorted(valid)}")
        return dataclasses.replace(self.config, **overrides)

    def build(self, device: torch.device | str = "cpu", *, dtype: torch.dtype = torch.float32,
              seed: int = 0, **overrides: Any) -> nn.Module:
        """The model, in training mode, with weights drawn from `seed`.

        The module is constructed on "meta" (nothing allocated); for any other device it is
        then materialized there and initialized from a local torch.Generator, so the global
        RNG is untouched and equal seeds give equal weights.
        """
        config = self.resolve_config(**overrides)
        with torch.device("meta"):
            model = _FAMILIES[self.family].build_model(config)
        model = model.to(dtype=dtype)
        if torch.device(device).type == "meta":
            return model
        model = model.to_empty(device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            model.init_weights(generator)
        return model

    def example_batch(self, batch_size: int, *, device: torch.device | str = "cpu",
                      seed: int = 0, dtype: torch.dtype = torch.float32,
                      **overrides: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(inputs, target): a random batch for the (overridden) config, drawn from `seed`.

        Values are drawn on the CPU and moved, so they do not depend on `device`; on "meta"
        only shapes are made. `dtype` is that of floating inputs (token ids stay int64).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, found {batch_size!r}")
        config = self.resolve_config(**overrides)
        generator = torch.Generator().manual_seed(seed)
        return _FAMILIES[self.family].example_batch(config, batch_size, generator, device, dtype)

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of the model's output against the batch's target."""
        return _FAMILIES[self.family].loss_fn(output, target)

    def num_params(self, **overrides: Any) -> int:
        """Exact parameter count (shared parameters once), from a build on meta."""
        model = self.build("meta", **overrides)
        return sum(p.numel() for p in model.parameters())


def _entries() -> dict[str, ModelEntry]:
    entries = {}
    for family, module in _FAMILIES.items():
        for name, size in module.SIZES.items():
            assert name not in entries, f"zoo name {name!r} defined twice"
            entries[name] = ModelEntry(name=name, family=family, description=size.description,
                                       config=size.config, nominal_params=size.nominal_params)
    return entries


_ENTRIES = _entries()


def names() -> list[str]:
    """Every entry's name, sorted."""
    return sorted(_ENTRIES)


def get(name: str) -> ModelEntry:
    """The entry called `name`; ValueError listing the known names if there is none."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}") from None
