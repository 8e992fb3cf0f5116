"""Wide-ResNet as in Alpa's evaluation (alpa/model/wide_resnet.py; Zagoruyko & Komodakis 2016).

Takes a `WideResNetConfig`; gives a module mapping images (B, 3, H, W) to class
logits (B, num_classes). ResNet-50 layout: stages of bottleneck blocks, where block
j of stage s has F = C·2^s filters and computes
    conv1x1(F) -> norm -> ReLU -> conv3x3(F·W, stride) -> norm -> ReLU -> conv1x1(4F) -> norm
plus a conv1x1(4F, stride) + norm projection on the residual when the shapes differ,
and a ReLU after the add; the first block of every stage but the first has stride 2.
Stem: conv7x7(C, stride 2) -> norm -> ReLU -> maxpool 3x3 stride 2; then global
average pooling and a linear classifier. Convs have no bias.

The blocks of all stages are one flat `layers` list (paths like `layers.7.conv2`),
so that pipeline stages can cut between any two blocks.

Parameters (batch or group norm alike: 2 per channel), per block with input
channels c_in: c_in·F + 9·W·F² + 4·W·F² + 2·(F + W·F + 4F) [+ 4F·c_in + 8F if projected];
stem 147·C + 2·C; classifier (4·C·2^(S-1) + 1)·num_classes.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import Size, random_normal, random_tokens, require_positive

_NORMS = ("batch", "group")


@dataclass(frozen=True, kw_only=True, slots=True)
class WideResNetConfig:
    """Sizes of a Wide-ResNet (Alpa's names: num_filters, width_factor)."""

    base_channels: int  # C: stem channels and filters of stage 0 (Alpa's num_filters)
    width_factor: int  # W: the 3x3 conv of a block has F·W channels
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)  # bottleneck blocks per stage (ResNet-50)
    num_classes: int = 1024  # classifier width in Alpa's benchmark
    image_size: int = 224  # H = W of the input images
    norm: str = "batch"  # "batch": BatchNorm2d (Alpa); "group": GroupNorm, no batch statistics
    gn_groups: int = 32  # groups of GroupNorm (norm="group"); must divide base_channels

    def __post_init__(self) -> None:
        require_positive(self, "base_channels", "width_factor", "num_classes", "image_size",
                         "gn_groups")
        sizes = self.stage_sizes
        if not (isinstance(sizes, tuple) and sizes
                and all(isinstance(n, int) and n >= 1 for n in sizes)):
            raise ValueError(f"stage_sizes must be a non-empty tuple of ints >= 1, found {sizes!r}")
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, found {self.norm!r}")
        if self.norm == "group" and self.base_channels % self.gn_groups != 0:
            raise ValueError(f"norm='group' needs gn_groups={self.gn_groups} to divide "
                             f"base_channels, found {self.base_channels}")


def _norm(config: WideResNetConfig, channels: int) -> nn.Module:
    if config.norm == "group":
        return nn.GroupNorm(config.gn_groups, channels)
    return nn.BatchNorm2d(channels)  # momentum 0.1 and eps 1e-5: flax's 0.9 / 1e-5


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


class Bottleneck(nn.Module):
    """Wide bottleneck block: (B, c_in, H, W) -> (B, 4F, H/stride, W/stride)."""

    def __init__(self, config: WideResNetConfig, c_in: int, filters: int, stride: int) -> None:
        super().__init__()
        wide, c_out = filters * config.width_factor, 4 * filters
        self.conv1, self.norm1 = _conv(c_in, filters, 1), _norm(config, filters)
        self.conv2, self.norm2 = _conv(filters, wide, 3, stride), _norm(config, wide)
        self.conv3, self.norm3 = _conv(wide, c_out, 1), _norm(config, c_out)
        self.projected = c_in != c_out or stride != 1  # Alpa: residual.shape != y.shape
        if self.projected:
            self.proj_conv = _conv(c_in, c_out, 1, stride)
            self.proj_norm = _norm(config, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))  # (B, F, H, W)
        y = F.relu(self.norm2(self.conv2(y)))  # (B, F·W, H/s, W/s)
        y = self.norm3(self.conv3(y))  # (B, 4F, H/s, W/s)
        residual = self.proj_norm(self.proj_conv(x)) if self.projected else x
        return F.relu(residual + y)


class WideResNet(nn.Module):
    """Stem, `layers` (all blocks, flat), average pool, `fc`: (B, 3, H, W) -> (B, num_classes)."""

    def __init__(self, config: WideResNetConfig) -> None:
        super().__init__()
        c = config.base_channels
        self.stem_conv, self.stem_norm = _conv(3, c, 7, stride=2), _norm(config, c)
        blocks, c_in = [], c
        for stage, n_blocks in enumerate(config.stage_sizes):
            for j in range(n_blocks):
                stride = 2 if stage > 0 and j == 0 else 1
                blocks.append(Bottleneck(config, c_in, c * 2**stage, stride))
                c_in = 4 * c * 2**stage
        self.layers = nn.ModuleList(blocks)
        self.fc = nn.Linear(c_in, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_norm(self.stem_conv(images)))  # (B, C, H/2, W/2)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)  # (B, C, H/4, W/4)
        for layer in self.layers:
            x = layer(x)
        return self.fc(x.mean(dim=(2, 3)))  # (B, 4·C·2^(S-1)) -> (B, num_classes)

    def init_weights(self, generator: torch.Generator) -> None:
        """He normal (fan_out) convs as torchvision; norms weight 1, bias 0, fresh running stats;
        classifier N(0, 0.01), bias 0. (Alpa zero-inits each block's last norm; here it is 1,
        so that every parameter gets a gradient at initialization.)"""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu",
                                        generator=generator)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                module.reset_parameters()  # BatchNorm also resets running mean/var and count
        nn.init.normal_(self.fc.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.fc.bias)


def build_model(config: WideResNetConfig) -> WideResNet:
    return WideResNet(config)


def example_batch(config: WideResNetConfig, batch_size: int, generator: torch.Generator,
                  device: torch.device | str, dtype: torch.dtype):
    """Inputs (images (B, 3, H, W) standard normal,), target (B,) class ids."""
    shape = (batch_size, 3, config.image_size, config.image_size)
    images = random_normal(shape, generator, device, dtype)
    return (images,), random_tokens((batch_size,), config.num_classes, generator, device)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, num_classes) against class ids (B,)."""
    return F.cross_entropy(output, target)


def _alpa(label: str, base_channels: int, width_factor: int, nominal: float) -> Size:
    config = WideResNetConfig(base_channels=base_channels, width_factor=width_factor)
    return Size(config, nominal, f"Wide-ResNet-50 (C {base_channels}, W {width_factor}), Alpa's "
                                 f"{label} spec, 1024 classes, 224x224")


# Named by the true count: Alpa's labels 250M, 2B, 6.8B and 13B are 1-2% off this count
# (254.1M, 1.965B, 6.73B, 13.27B); 500M, 1B and 4B are within 1%.
SIZES = {
    "wresnet-254m": _alpa("250M", 160, 2, 254e6),
    "wresnet-500m": _alpa("500M", 224, 2, 500e6),
    "wresnet-1b": _alpa("1B", 320, 2, 1e9),
    "wresnet-1.97b": _alpa("2B", 448, 2, 1.97e9),
    "wresnet-4b": _alpa("4B", 640, 2, 4e9),
    "wresnet-6.7b": _alpa("6.8B", 320, 16, 6.7e9),
    "wresnet-13.3b": _alpa("13B", 320, 32, 13.3e9),
    "wresnet-tiny": Size(WideResNetConfig(base_channels=8, width_factor=2, stage_sizes=(2, 2),
                                          num_classes=8, image_size=16, gn_groups=4), None,
                         "tiny Wide-ResNet for CPU tests (2 stages of 2 blocks, C 8, W 2), "
                         "8 classes, 16x16"),
}
