"""The networks of the distillation recipes.

MLP (Hinton et al. 2015, section 3; Srivastava et al. 2014 for the regularisation): fully
connected ReLU nets on flattened 28x28 MNIST digits. The paper's teacher is 784-1200-1200-10
with dropout (inputs 0.2, hidden units 0.5) and a max-norm constraint on each unit's incoming
weight vector; the student is 784-800-800-10 with no regularisation.

VGG-style CNN (labml.ai's CIFAR-10 distillation experiment): blocks of 3x3 convolutions, each
followed by batch norm and ReLU, a 2x2 max-pool after each block (32x32 -> 1x1 after five), then
one linear layer. labml's teacher (`VGG_TEACHER`) has a dropout of 0.1 before every convolution,
the first on the input image (`dropout_at="conv"`); its student (`VGG_STUDENT`) has none.
Deviations from labml: batch norm uses running statistics in eval mode (labml's teacher and
student alike normalised with the statistics of the current batch at evaluation, so the teacher's
soft targets for an image, and either model's prediction, depended on the other images in the
batch); the convolutions have no bias where batch norm follows (its shift subsumes it: labml's
counts, 14,728,266 and 437,034 parameters, are these models' plus 4,224 and 576 biases); the
logits layer reads the 1x1 map's global average (labml: the map flattened, the same at 32x32
input). Its convolutions' weights are kept
channels-last (NHWC) from construction, so that their activations are too: oneDNN's
convolutions run faster on them than on NCHW tensors (on a CPU, the recipe's training steps in
0.78-0.96x the time in fp32, `bench/cifar_step.py`); an NCHW input is converted once, at the first
convolution. `load_state_dict` and `.to(device)` keep the layout.

Shapes: B batch, C classes, D input features (784), H hidden units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from still.config import check_fields, check_sizes
from still.errors import check
from still.layers import Dropout


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 784
    hidden: tuple[int, ...] = (1200, 1200)
    """Widths of the hidden layers."""
    classes: int = 10
    dropout_input: float = 0.0
    """Dropout probability on the inputs."""
    dropout_hidden: float = 0.0
    """Dropout probability on each hidden layer's outputs."""
    max_norm: float | None = None
    """Upper bound on the L2 norm of each unit's incoming weights (None: no constraint)."""

    def __post_init__(self) -> None:
        check_fields(self)  # values of the annotated types; lists given for tuples stored as tuples
        check(self.in_features > 0, f"in_features must be > 0, got {self.in_features}")
        check(len(self.hidden) > 0 and all(h > 0 for h in self.hidden), f"hidden sizes must be > 0, got {self.hidden}")
        check(self.classes > 1, f"classes must be > 1, got {self.classes}")
        check_sizes(self, "in_features", "hidden", "classes")
        check(0 <= self.dropout_input < 1, f"dropout_input must be in [0, 1), got {self.dropout_input}")
        check(0 <= self.dropout_hidden < 1, f"dropout_hidden must be in [0, 1), got {self.dropout_hidden}")
        check(self.max_norm is None or 0 < self.max_norm < math.inf,  # (inf was saved as JSON's non-standard Infinity)
              f"max_norm must be a finite number > 0 or None (no constraint), got {self.max_norm}")


class MLP(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        # still's dropout (`still.layers`): PyTorch's masks (`bernoulli_`) took a fifth of the paper
        # teacher's training step on a CPU; with these it takes 0.77x the time in fp32, 0.72x in bf16
        layers: list[nn.Module] = [Dropout(config.dropout_input)] if config.dropout_input else []
        width = config.in_features
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if config.dropout_hidden:
                layers.append(Dropout(config.dropout_hidden))
            width = h
        layers.append(nn.Linear(width, config.classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # (B, D) -> (B, C)

    @torch.no_grad()
    def apply_max_norm(self) -> None:
        """Project each unit's incoming weight vector back into the ball of radius max_norm."""
        if self.config.max_norm is None:
            return
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                torch.renorm(layer.weight, p=2, dim=0, maxnorm=self.config.max_norm, out=layer.weight)


@dataclass(frozen=True)
class VGGConfig:
    blocks: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
    """Output channels of each 3x3 convolution, grouped in blocks; each block ends in a 2x2 max-pool."""
    classes: int = 10
    in_channels: int = 3
    dropout: float = 0.0
    """Dropout probability, placed by `dropout_at`."""
    dropout_at: Literal["pool", "conv"] = "pool"
    """Where the dropouts are: "pool", one after each block's max-pool; "conv", one before each
    convolution (labml's teacher: 13 in all, the first on the input image)."""
    batch_norm: bool = True

    def __post_init__(self) -> None:
        check_fields(self)  # values of the annotated types; lists given for tuples stored as tuples
        check(len(self.blocks) > 0 and all(len(b) > 0 and all(c > 0 for c in b) for b in self.blocks),
              f"blocks must be non-empty lists of positive channel counts, got {self.blocks}")
        check(self.classes > 1, f"classes must be > 1, got {self.classes}")
        check(self.in_channels > 0, f"in_channels must be > 0, got {self.in_channels}")
        check_sizes(self, "blocks", "classes", "in_channels")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")


VGG_TEACHER = VGGConfig(dropout=0.1, dropout_at="conv")
VGG_STUDENT = VGGConfig(blocks=((32, 32), (64, 64), (128,), (128,), (128,)))


class VGG(nn.Module):
    def __init__(self, config: VGGConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = config.in_channels
        for block in config.blocks:
            for out in block:
                if config.dropout and config.dropout_at == "conv":
                    layers.append(nn.Dropout(config.dropout))
                layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not config.batch_norm))
                if config.batch_norm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU(inplace=True))
                channels = out
            layers.append(nn.MaxPool2d(2))
            if config.dropout and config.dropout_at == "pool":
                layers.append(nn.Dropout(config.dropout))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, config.classes)
        self.to(memory_format=torch.channels_last)  # the convolutions' weights (O, I, 3, 3) stored as (O, 3, 3, I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (B, 3, 32, 32) -> (B, channels, 32 / 2^blocks, ...)
        h = h.flatten(2).mean(-1)  # (B, channels): global average over what is left of the image
        return self.head(h)  # (B, C)
