"""The seeds' two-layer MLP: L = MSE(w2 · ReLU(w1 x), y), θ = {w1, w2} (seed 003).

Takes an `MLPConfig`; gives a module mapping x (B, d_in) to (B, d_out); no biases.
The full-size entry uses the shape of the GPT-3 175B FFN (12288 -> 49152 -> 12288),
the classic example for tensor parallelism (w1 split by columns, w2 by rows).
Parameters: d_in·d_hidden + d_hidden·d_out.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import Size, random_normal, require_positive


@dataclass(frozen=True, kw_only=True, slots=True)
class MLPConfig:
    """Widths of the two-layer MLP."""

    d_in: int  # width of x
    d_hidden: int  # width after w1 (4·d_in in a transformer FFN)
    d_out: int  # width of the prediction and of y

    def __post_init__(self) -> None:
        require_positive(self, "d_in", "d_hidden", "d_out")


class MLP(nn.Module):
    """w2 · ReLU(w1 x): (B, d_in) -> (B, d_hidden) -> (B, d_out)."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.d_in, config.d_hidden, bias=False)
        self.w2 = nn.Linear(config.d_hidden, config.d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)))

    def init_weights(self, generator: torch.Generator) -> None:
        """He normal w1 (it feeds a ReLU), LeCun normal w2: std √(2/fan_in), √(1/fan_in)."""
        nn.init.normal_(self.w1.weight, std=math.sqrt(2 / self.w1.in_features), generator=generator)
        nn.init.normal_(self.w2.weight, std=math.sqrt(1 / self.w2.in_features), generator=generator)


def build_model(config: MLPConfig) -> MLP:
    return MLP(config)


def example_batch(config: MLPConfig, batch_size: int, generator: torch.Generator,
                  device: torch.device | str, dtype: torch.dtype):
    """Inputs (x (B, d_in),), target y (B, d_out), both standard normal."""
    x = random_normal((batch_size, config.d_in), generator, device, dtype)
    y = random_normal((batch_size, config.d_out), generator, device, dtype)
    return (x,), y


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (seed 003)."""
    return F.mse_loss(output, target)


SIZES = {
    "mlp": Size(MLPConfig(d_in=12288, d_hidden=49152, d_out=12288), None,
                "MLP w2·ReLU(w1 x) with the GPT-3 175B FFN shape (12288 -> 49152 -> 12288)"),
    "mlp-tiny": Size(MLPConfig(d_in=16, d_hidden=64, d_out=16), None,
                     "tiny MLP for CPU tests (16 -> 64 -> 16)"),
}
