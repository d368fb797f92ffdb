"""Sampling the next token from logits: temperature, top-k, top-p, and the draw itself.

The draw inverts the cumulative distribution at one uniform number per row: the same distribution
as `torch.multinomial(probs, 1)`, in a third of its time at batch 1, and simple enough for
the compiler to run inside the decoding step (`Decoder.step_sample`), where the uniform numbers
are drawn outside the graph from the caller's generator: compiled or not, a seed gives the same
tokens in fp32 (under bf16 the compiled steps read bf16 weights and keys, the eager ones fp32: the
logits, and in time the tokens, differ). Compiled, the cumulative sums are products with
triangular masks (`cumulative`, `fused`): the compiler has no scan of its own on the CPU, and a
library call in the step would keep its temporaries off the stack (`still.train.aot`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

TINY = torch.finfo(torch.float32).tiny  # float32's smallest normal number (1.2e-38)


class Sampling(NamedTuple):
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    exclude: tuple[int, ...] = ()
    """Tokens never drawn (a vocabulary's padding and document start, never training targets): their
    logits are -inf before the temperature and the filters see them."""


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the top-k logits and/or the smallest set whose probability reaches top_p. (B, V) -> (B, V)."""
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # keep the token that crosses top_p; a top_p below float32's smallest normal number (which
        # would round to 0 and drop every token, the first too) keeps the first alone
        top_p = max(top_p, TINY)
        drop = cumulative(sorted_probs) - sorted_probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def uniforms(batch: int, generator: torch.Generator | None, device: torch.device,
             steps: int | None = None) -> torch.Tensor:
    """One uniform number per row, (B, 1), from `generator` (on its own device) or the global one;
    with `steps`, those of that many draws at once, (steps, B, 1) (on the CPU the same numbers as
    `steps` calls in turn)."""
    shape = (batch, 1) if steps is None else (steps, batch, 1)
    return torch.rand(shape, generator=generator,
                      device=generator.device if generator is not None else device).to(device)


FUSED_CUMULATIVE_UP_TO = 4096  # vocabulary sizes whose fused cumulative sums stay cheap (V x sqrt(V) products)


def _scan_not_allowed(probs: torch.Tensor) -> bool:
    """Whether `cumsum` would raise here: PyTorch has no deterministic floating-point `cumsum` on
    CUDA, so under `torch.use_deterministic_algorithms(True)` (`--deterministic`,
    `seed_everything(deterministic=True)`) it refuses to run one."""
    return probs.is_cuda and torch.are_deterministic_algorithms_enabled()


def cumulative(probs: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Cumulative sums along the last dimension, (B, V) -> (B, V). `fused` (for the compiler,
    V <= FUSED_CUMULATIVE_UP_TO): in blocks of S, each block's sums as a product with a triangular
    mask, then the totals of the blocks before it added (about V x S + (V / S)^2 products)."""
    b, v = probs.shape
    if (not fused or v > FUSED_CUMULATIVE_UP_TO) and not _scan_not_allowed(probs):
        return probs.cumsum(-1)  # (else the block products: sums of products, deterministic everywhere)
    size = 16 * -(-(math.isqrt(v - 1) + 1) // 16)  # S: ceil(sqrt(V)) up to a multiple of 16
    blocks = -(-v // size)
    within = torch.arange(size, device=probs.device)
    upto = (within[:, None] <= within).to(probs.dtype)  # (S, S): [k, i] = k <= i
    padded = F.pad(probs, (0, blocks * size - v)).view(b, blocks, size, 1)
    inner = (padded * upto).sum(-2)  # (B, blocks, S): the sums within each block
    order = torch.arange(blocks, device=probs.device)
    before = (order[:, None] < order).to(probs.dtype)  # (blocks, blocks): [j, i] = j < i
    offsets = (inner[..., -1:] * before).sum(-2)  # (B, blocks): the totals of the blocks before
    return (inner + offsets[..., None]).view(b, blocks * size)[:, :v]


def invert(probs: torch.Tensor, uniform: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The first token of each row whose cumulative probability exceeds u * total and whose own
    probability is not 0 (rounding in the sums cannot pick an impossible token; if none qualifies,
    the last possible one). probs (B, V), uniform (B, 1) in [0, 1) -> (B,). `fused`: `cumulative`'s."""
    running = cumulative(probs, fused)  # (B, V)
    possible = probs > 0
    past = (running > uniform * running[:, -1:]) & possible  # (B, V)
    order = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(possible, order, 0).amax(-1)  # (B,)
    return torch.where(past.any(-1), past.int().argmax(-1), last)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` (B, V), drawn with `generator`. (B, V) -> (B,)."""
    return invert(probs, uniforms(probs.shape[0], generator, probs.device))


def next_token(logits: torch.Tensor, uniform: torch.Tensor, sampling: Sampling, fused: bool = False) -> torch.Tensor:
    """Sample from logits (B, V) at `sampling`'s temperature and filters, given the uniform numbers
    (B, 1). -> (B,). `fused`: for the compiler (`cumulative`). Other than 1, the temperature divides
    the logits less their largest (the same distribution; with a tiny T, 1e-40 say, dividing the
    logits themselves made them infinite and the softmax NaN, and the draw fell to token 0). A T
    below float32's smallest normal number, which would round to 0 (0 / 0: NaN), divides as that
    number: the largest logits alone are drawn, as from any T small beside their gaps."""
    logits = logits.float()
    if sampling.exclude:
        logits = logits.index_fill(-1, torch.tensor(sampling.exclude, device=logits.device), float("-inf"))
    if sampling.temperature != 1:
        logits = (logits - logits.amax(-1, keepdim=True)) / max(sampling.temperature, TINY)
    return invert(filter_logits(logits, sampling.top_k, sampling.top_p).softmax(-1), uniform, fused)
