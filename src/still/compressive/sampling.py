"""Sampling the next token from logits: temperature, top-k, top-p, and the draw itself.

The draw inverts the cumulative distribution at one uniform number per row: the same distribution
as `torch.multinomial(probs, 1)`, in a third of its time at batch 1, and simple enough for
the compiler to run inside the decoding step (`Decoder.step_sample`), where the uniform numbers
are drawn outside the graph from the caller's generator: compiled or not, a seed gives the same
tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Sampling(NamedTuple):
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the top-k logits and/or the smallest set whose probability reaches top_p. (B, V) -> (B, V)."""
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def uniforms(batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One uniform number per row, (B, 1), from `generator` (on its own device) or the global one."""
    return torch.rand(batch, 1, generator=generator,
                      device=generator.device if generator is not None else device).to(device)


def invert(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token of each row whose cumulative probability first exceeds u * total (never one with
    probability 0). probs (B, V), uniform (B, 1) in [0, 1) -> (B,)."""
    cumulative = probs.cumsum(-1)  # (B, V)
    target = uniform * cumulative[:, -1:]
    return (cumulative <= target).sum(-1).clamp(max=probs.shape[-1] - 1)  # searchsorted(right=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` (B, V), drawn with `generator`. (B, V) -> (B,)."""
    return invert(probs, uniforms(probs.shape[0], generator, probs.device))


def next_token(logits: torch.Tensor, uniform: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Sample from logits (B, V) at `sampling`'s temperature and filters, given the uniform numbers
    (B, 1). -> (B,)."""
    logits = logits.float() if sampling.temperature == 1 else logits.float() / sampling.temperature
    return invert(filter_logits(logits, sampling.top_k, sampling.top_p).softmax(-1), uniform)
