"""Layers shared by the models.

`dropout` / `Dropout`: inverted dropout (Srivastava et al. 2014) whose mask is cheaper to draw on
the CPU. PyTorch's CPU dropout draws one random number per element (`bernoulli_`), about 6 ns an
element here: at the `reference` preset the masks took a fifth of a bf16 training step. Here one
64-bit draw gives the keep-or-drop decisions of four elements (four 16-bit lanes, each compared
with a threshold), about a quarter of the cost. The drop probability is p rounded to a multiple of
2^-16 (at most 7.7e-6 away), and kept elements are scaled by the inverse of the exact keep
probability, so the expectation of every output is its input. On other devices: `F.dropout`.

`thread_generator`: the generator `dropout` draws from in this thread when given none (the shards
of a training step, each in its own thread, draw from their own: `still.train.shards`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

LANES = 65536  # 16-bit lanes
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # 1.0 as an int16 bit pattern
_local = threading.local()


@contextlib.contextmanager
def thread_generator(generator: torch.Generator | None) -> Iterator[None]:
    """Within the block, `dropout` in this thread draws from `generator` when given none (None: the
    global generator). Other threads are not affected."""
    previous = getattr(_local, "generator", None)
    _local.generator = generator
    try:
        yield
    finally:
        _local.generator = previous


def dropout(x: torch.Tensor, p: float, training: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero each element of `x` with probability p (rounded to a multiple of 2^-16 on the CPU) and
    scale the others by 1 / (1 - p); the identity when not `training` or p = 0."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0:
        return x
    if torch.compiler.is_compiling():  # inside torch.compile: run eagerly (a graph break), so that the
        return _masked_eagerly(x, p, generator)  # masks come from this thread's generator, as without it
    return _masked(x, p, generator)


def _masked(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """`dropout` in training, 0 < p <= 1."""
    if p == 1:
        return torch.zeros_like(x)
    if generator is None:
        generator = getattr(_local, "generator", None)
    if x.device.type != "cpu" or generator is not None and generator.device.type != "cpu":
        return F.dropout(x, p, True)
    dropped = round(p * LANES)  # lanes below this value are dropped
    if dropped == 0:  # p < 2^-17: nothing is dropped
        return x.clone()
    if dropped == LANES:  # p > 1 - 2^-17: everything is
        return torch.zeros_like(x)
    scale = LANES / (LANES - dropped)
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64)
    draws.random_(-(2**63), 2**63 - 1, generator=generator)  # uniform 64-bit words
    lanes = draws.view(torch.int16)[:n].view(x.shape)  # uniform in [-2^15, 2^15)
    # the mask as numbers, in int16 passes: a boolean mask and `where` (or a bool-to-float cast) took
    # 5-7x as long as a product per element (docs/performance.md, session 12)
    threshold = dropped - LANES // 2  # lanes >= threshold are kept
    kept = lanes.clamp_(threshold - 1, threshold).sub_(threshold - 1)  # 1 kept, 0 dropped (int16)
    if x.dtype in _ONE_BITS:  # the bits of 1.0 in x's 16-bit dtype: kept * those bits, read as that dtype
        mask = kept.mul_(_ONE_BITS[x.dtype]).view(x.dtype)  # 1. or 0.
    else:
        mask = kept.to(x.dtype)
    return _MaskedScale.apply(x, mask, scale)


# (PyTorch's flag behind `is_compiling` is global while a thread compiles, so another shard thread
# may come here too: this runs eagerly either way)
_masked_eagerly = torch.compiler.disable(_masked)


class _MaskedScale(torch.autograd.Function):
    """x * mask * scale for a mask of ones and zeros in x's dtype, in one pass each way: `addcmul`
    onto a zero computes x * 1 * scale in float32 (or wider) and rounds once, so the result is
    round(x * scale) or +0, what where(mask, x * scale, 0) gives, bit for bit, also in bf16 and fp16
    (where a product by the mask, then by the scale, took two passes: docs/performance.md, session 14).
    The gradient likewise: round(grad * scale) or +0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.addcmul(x.new_zeros(()), x, mask, value=scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, mask, value=ctx.scale), None, None


class Dropout(nn.Module):
    """`nn.Dropout` with `dropout`'s mask."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
