"""Compression functions f_c: n old memories -> n / c compressed memories (Rae et al., section 3.1).

Paper: Jack W. Rae, Anna Potapenko, Siddhant M. Jayakumar, Timothy P. Lillicrap. "Compressive
Transformers for Long-Range Sequence Modelling". ICLR 2020, arXiv:1911.05507.

Shapes: B batch, n old memories (a multiple of c), c compression rate, d model dim.

    conv        1-D convolution, kernel = stride = c, no bias (as DeepMind's code)     (the default)
    dilated     1-D convolution with kernel c and dilation 2, left-padded by c - 1, stride c,
                no bias: each output sees the last c oldest-to-newest pairs two steps apart
    max         max pooling, kernel = stride = c
    mean        mean pooling, kernel = stride = c
    most_used   keep the n / c memories that received the most attention (summed over heads and
                queries in the current segment), in their original order

Only conv and dilated have parameters, so only they are trained (by the attention-reconstruction
or auto-encoding loss); one compressor per layer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

CompressionName = Literal["conv", "dilated", "max", "mean", "most_used"]
COMPRESSIONS: tuple[str, ...] = ("conv", "dilated", "max", "mean", "most_used")


class Compressor(nn.Module):
    """f_c for one layer. `forward(old, scores)`: (B, n, d) -> (B, n / c, d)."""

    def __init__(self, kind: CompressionName, d_model: int, rate: int) -> None:
        super().__init__()
        if kind not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {kind!r}")
        self.kind, self.rate = kind, rate
        self.conv: nn.Conv1d | None = None
        if kind == "conv":
            self.conv = nn.Conv1d(d_model, d_model, kernel_size=rate, stride=rate, bias=False)
        elif kind == "dilated":
            self.conv = nn.Conv1d(d_model, d_model, kernel_size=rate, stride=rate, dilation=2, bias=False)

    @property
    def needs_attention(self) -> bool:
        return self.kind == "most_used"

    def forward(self, old: torch.Tensor, received: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = old.shape
        c = self.rate
        if n % c:
            raise ValueError(f"can only compress a multiple of the rate {c}, got {n} memories")
        if self.kind == "most_used":
            if received is None:
                raise ValueError("most_used compression needs the attention each memory received")
            keep = received.topk(n // c, dim=-1).indices.sort(dim=-1).values  # (B, n/c), in time order
            return old.gather(1, keep[:, :, None].expand(-1, -1, d))  # (B, n/c, d)
        x = old.transpose(1, 2)  # (B, d, n)
        if self.kind == "max":
            out = F.max_pool1d(x, c, c)
        elif self.kind == "mean":
            out = F.avg_pool1d(x, c, c)
        elif self.kind == "dilated":
            out = self.conv(F.pad(x, (c - 1, 0)))  # (B, d, n/c)
        else:
            out = self.conv(x)  # (B, d, n/c)
        return out.transpose(1, 2)  # (B, n/c, d)


class Decoder(nn.Module):
    """The auto-encoding loss's decoder: (B, n / c, d) -> (B, n, d), a transposed convolution."""

    def __init__(self, d_model: int, rate: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose1d(d_model, d_model, kernel_size=rate, stride=rate, bias=False)

    def forward(self, compressed: torch.Tensor) -> torch.Tensor:
        return self.deconv(compressed.transpose(1, 2)).transpose(1, 2)  # (B, n, d)
