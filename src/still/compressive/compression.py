"""Compression functions f_c: n old memories -> n / c compressed memories (Rae et al., section 3.1).

Paper: Jack W. Rae, Anna Potapenko, Siddhant M. Jayakumar, Timothy P. Lillicrap. "Compressive
Transformers for Long-Range Sequence Modelling". ICLR 2020, arXiv:1911.05507.

Shapes: B batch, n old memories (a multiple of c), c compression rate, d model dim.

    conv        1-D convolution, kernel = stride = c, no bias (as DeepMind's code)     (the default)
    dilated     1-D convolution with kernel c and dilation 2, stride c, over each group of c memories
                left-padded by c - 1 zeros, no bias: output t sees the memories t*c - (c-1) + 2k,
                k = 0..c-1, of its own group (those before t*c read zeros). Each window reads only
                its own group, as conv, max and mean do, so a memory is compressed alike however the
                memories come (a segment at a time in training, a group at a time when generating).
                The floor(c/2) taps that reach before the group read zeros (their weights learn
                nothing), and not every memory is seen: for an even c the 1st, 3rd, ... of each group
                (half of them) reach no compressed slot; for an odd c the 2nd, 4th, ... ((c-1)/2 of
                each group; at c = 3 the middle one)
    max         max pooling, kernel = stride = c
    mean        mean pooling, kernel = stride = c
    most_used   keep the n / c memories that received the most attention (summed over heads and
                queries in the current segment: the paper's "usage"; a memory attended over several
                segments counts the last alone), in their original order. Of V memories of the
                current document among the n (a reset row: the rest are masked, and ranked -1 by
                the model), V // c are kept so, and the oldest masked ones fill the other slots, as
                a fresh stream would keep V / c of V

Only conv and dilated have parameters, so only they are trained (by the attention-reconstruction
or auto-encoding loss); one compressor per layer.

The convolutions keep `nn.Conv1d`'s weight (d_out, d_in, c) but run as one matrix product over
windows of c memories: with kernel = stride the windows do not overlap, so this is the same
function, and it avoids the convolution kernels' slow bf16 backward on CPU (about 50x slower than
the matrix product here). The decoder does the same for its transposed convolution.
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
            return old.gather(1, most_used(received, c)[:, :, None].expand(-1, -1, d))  # (B, n/c, d)
        if self.kind == "max":
            return old.view(b, n // c, c, d).amax(dim=2)  # (B, n/c, d)
        if self.kind == "mean":
            return old.view(b, n // c, c, d).mean(dim=2)
        return self._product(self.windows(old))  # (B, n/c, d)

    def _product(self, windows: torch.Tensor) -> torch.Tensor:
        """The convolution as one product over its windows (B, n/c, d*c) -> (B, n/c, d)."""
        weight = self._inference_weight(windows.device)
        return F.linear(windows, self.weight_matrix() if weight is None else weight)

    def _inference_weight(self, device: torch.device) -> torch.Tensor | None:
        """Without gradients under autocast: `weight_matrix` in autocast's dtype, cast once and kept
        while the weight is unchanged (its version, storage and dtype), as autocast's own cache keeps
        only leaf tensors' casts and the matrix is a view; a prompt or an evaluation compresses a few
        times a segment in every layer. Else None."""
        if torch.is_grad_enabled() or not torch.is_autocast_enabled(device.type):
            return None
        weight, dtype = self.conv.weight, torch.get_autocast_dtype(device.type)
        key = (weight._version, weight.data_ptr(), weight.dtype, dtype)
        if getattr(self, "_cast_key", None) != key:
            self._cast, self._cast_key = weight.detach().flatten(1).to(dtype), key
        return self._cast

    def weight_matrix(self) -> torch.Tensor:
        """The convolution's weight (d_out, d_in, c) viewed as (d_out, d_in*c), not copied."""
        assert self.conv is not None, "only conv and dilated have weights"
        return self.conv.weight.flatten(1)

    def one_window(self) -> tuple[list[int], torch.Tensor]:
        """The compression of exactly c memories (B, c, d) -> (B, 1, d) as a sum over the taps that
        see them: `rows` (T,) and `weights` (T, d_out, d_in), compressed = sum_j weights[j] old[rows[j]].
        A copy, in the layout a one-token decoder reads fastest."""
        assert self.conv is not None, "only conv and dilated have weights"
        c = self.rate
        # tap k reads input k (conv), or input 2k - (c - 1) of the zero-padded window (dilated)
        rows = list(range(c)) if self.kind == "conv" else [2 * k - (c - 1) for k in range(c)]
        first = next(k for k, row in enumerate(rows) if row >= 0)  # the taps before it read padding
        weights = self.conv.weight.detach()[:, :, first:].permute(2, 0, 1).contiguous()  # (T, d_out, d_in)
        return rows[first:], weights

    def windows(self, old: torch.Tensor) -> torch.Tensor:
        """The convolution's input windows, one row each, in the order of `weight_matrix`:
        (B, n, d) -> (B, n/c, d*c), window t as (channel i, position k)."""
        b, n, d = old.shape
        c = self.rate
        if self.kind == "dilated":  # output t sees inputs t*c - (c-1) + 2k, k = 0..c-1, of its group (zeros before it)
            groups = F.pad(old.reshape(b, n // c, c, d), (0, 0, c - 1, 0))[:, :, ::2]  # (B, n/c, c, d)
            return groups.transpose(2, 3).reshape(b, n // c, d * c)  # (B, n/c, d*c)
        return old.reshape(b, n // c, c, d).transpose(2, 3).reshape(b, n // c, d * c)  # (B, n/c, d*c)


def most_used(received: torch.Tensor, rate: int) -> torch.Tensor:
    """Which n / c of n memories most_used keeps, in time order (B, n / c), from the attention each
    received (B, n), < 0 where masked: the V // c most attended of the V unmasked ones, and the
    oldest masked ones in the other slots (no row waits on another: every row keeps n / c)."""
    b, n = received.shape
    kept = n // rate
    valid = received >= 0  # (B, n)
    by_attention = received.argsort(dim=1, descending=True, stable=True)  # (B, n)
    positions = torch.arange(n, device=received.device).expand(b, n)
    rank = torch.empty_like(by_attention).scatter_(1, by_attention, positions)  # each memory's place by attention
    chosen = valid & (rank < valid.sum(1, keepdim=True) // rate)  # the masked rank below every valid one
    fill = kept - chosen.sum(1, keepdim=True)  # (B, 1) slots left for masked memories, oldest first
    chosen |= ~valid & ((~valid).cumsum(1) <= fill)
    return (~chosen).to(torch.uint8).sort(dim=1, stable=True).indices[:, :kept]  # chosen first, in time order


class Decoder(nn.Module):
    """The auto-encoding loss's decoder: (B, n / c, d) -> (B, n, d), a transposed convolution."""

    def __init__(self, d_model: int, rate: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose1d(d_model, d_model, kernel_size=rate, stride=rate, bias=False)

    def forward(self, compressed: torch.Tensor) -> torch.Tensor:
        b, m, d = compressed.shape
        c = self.deconv.kernel_size[0]
        weight = self.deconv.weight.permute(2, 1, 0).reshape(c * d, d)  # (c*d_out, d_in): position k, channel o
        return F.linear(compressed, weight).view(b, m * c, d)  # (B, n, d): output t*c + k
