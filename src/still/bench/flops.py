"""Counting a step's FLOPs from shapes (`torch.utils.flop_counter`), PyTorch's CPU attention included.

On the CPU `F.scaled_dot_product_attention` runs `aten._scaled_dot_product_flash_attention_for_cpu`,
which the counter has no formula for: it counted 0 FLOPs for the products QK^T and AV that our
inference attention (`RelativeMultiHeadAttention.causal_attention`) makes there, about a quarter of an
evaluation's. `flop_counter` counts them as the counter counts its other attention operators: two
products, 2 B H L_q L_k D FLOP each (4 B H L_q L_k D in all; the causal mask's zeroed terms counted,
as in every product).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """(B, H, L_q, D), (B, H, L_k, D), (B, H, L_k, D_v) shapes -> the FLOPs of QK^T and AV."""
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The backward's five products (the scores recomputed, and the gradients of Q, K, V and the weights)."""
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def flop_counter() -> FlopCounterMode:
    """A `FlopCounterMode` (no display) that also counts PyTorch's CPU attention (`CPU_ATTENTION`)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
