"""Relative multi-head attention of Transformer-XL, over [compressed memory, memory, segment].

Paper: Zihang Dai, Zhilin Yang, Yiming Yang, Jaime Carbonell, Quoc V. Le, Ruslan Salakhutdinov.
"Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context". ACL 2019,
arXiv:1901.02860, section 3.3.

Shapes: B batch, L queries (the current segment), K keys (compressed memory + memory + segment),
H heads, D head dim, d model dim = H * D.

For query i (absolute position K - L + i among the keys) and key j, with relative distance
r = K - L + i - j >= 0 (keys after the query are masked: causal within the segment):

    score(i, j) = (W_q x_i + u) . (W_k m_j)          (a) + (c): content, with the content bias u
                + (W_q x_i + v) . (W_r R_r)          (b) + (d): position, with the position bias v
    attention   = softmax_j(score / sqrt(D)) (W_v m_j)

R_r is the sinusoidal encoding of the distance r (Vaswani et al. 2017, with the order of sine and
cosine halves of Transformer-XL); W_r, u and v are learned; u and v are shared across positions.
The position term is computed once for every distance K-1 ... 0, as (B, H, L, K), and shifted
into place ("relative shift"): row i needs the distances K-L+i, K-L+i-1, ..., which are a window
of that row starting at column L-1-i: a strided view (`_shifted_view`), read in place at inference
and in training (`_AttentionWeights`, whose backward shifts the gradient back in one copy).
Under bf16 autocast, training keeps the table W_r R in fp32 and its gradient summing to zero over
the distances, as the exact one does (`EXACT_POSITION_GRADIENT`).

The compressed memory is treated as more past positions: distances count through the compressed
memory as through the memory (as in Rae et al. and DeepMind's code).

Deviations: none in the attention. labml's implementation learns a table of relative positions
instead of using sinusoids and W_r; we follow the paper.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from still.layers import dropout

FUSED_SCORES = True
"""Training, and bf16 inference over masked slots on the CPU, build the scores heads-major in one
pass per operation (`_AttentionWeights`); False: the explicit path (relative shift, then
`scaled_dot_product_attention` with the position scores as its mask). Tests compare the two.
(Inference without masked slots takes `_causal_attention` in every dtype: in bf16 on the CPU it ran
1.07-1.54x faster than the heads-major path, docs/performance.md, session 18.)"""

FOLDED_NORM = True
"""Training with pre-LN: LN1's affine goes into the query and key-value weights (W diag(gamma) and
W beta) and the memories' keys and values are projected as constants (`_LinearOverConstants`), so
the backward computes no input gradient for the memory rows, only the affine's (through the folded
weights). False: LN1 applied, then one plain product over [context, x]. Tests compare the two."""

NATIVE_SCORES = True
"""bf16 training on a CPU with AVX-512 bf16: the attention's weights from one hand-written pass
(`native_attention.cpp`, built once per machine by `still.compressive.native`): both score products
with fp32 results (on AMX tiles where the processor has them, else AVX-512 bf16's dot products,
`native.attention_products`), their sum, the mask and the softmax in fp32, the weights rounded to
bf16 once. Faster than PyTorch's five passes over the scores in bf16 (each score rounded to bf16),
and nearer fp32 training (docs/performance.md, sessions 23 and 31). Where the kernel cannot run (no
compiler, no AVX-512 bf16, a head dim not a multiple of 32, lengths not multiples of 16), the
PyTorch path below. The
backward's first pass likewise (the softmax's backward and the shift back to the position scores'
order, in one pass instead of three; then the same four products). Tests compare the two."""

FP32_POSITION_SCORES = False
"""bf16 training (`_AttentionWeights`): True computes the position scores (q + v) W_r R as an fp32
product of the bf16 operands, adds the content scores into them in fp32, and takes the softmax in
fp32 (the weights still leave in bf16; the backward is unchanged). At the reference preset that
halves how far a bf16 step's gradient lies from the fp32 step's (about 0.10-0.13 relative to about
0.05, `bench/bf16_gradient_error.py`): rounding these scores to bf16 is most of that distance,
rounding the content scores or any of the backward little. Four bf16 runs at the reference preset
landed +0.0068 bits per character from fp32 on validation with it, +0.0146 without; but it costs
7-9% of bf16 training's speed (its fp32 passes), so it is off by default (docs/performance.md,
session 22). Where `NATIVE_SCORES` runs (CPUs with AVX-512 bf16), that path comes first and computes
every score in fp32 at no cost; this one is for CPUs without it."""

EXACT_POSITION_GRADIENT = True
"""Training under autocast (bf16): the position table r = W_r R in fp32 (the sinusoids R, the
product and W_r's gradient), and the gradient reaching r centred over the distances before it does.

Why: each row of a softmax's gradient sums to zero, so the gradient of r, sum_i (q_i + v) dS[i, j],
sums to zero over the distances j. The lowest-frequency cosine columns of R are nearly constant in j,
so their columns of W_r get almost no gradient: shifting every position score of a row alike leaves
the softmax unchanged. Rounding the softmax's gradient to bf16 breaks that zero sum, and the
leftover, times a column of ones, becomes all of those columns' gradient. Adam divides each entry by
its own RMS, so these nearly flat directions then move at the full learning rate, at random. At the
reference preset, measured in units of Adam's step (each entry divided by the fp32 run's RMS of
its gradient, `bench/bf16_gradient_error.py`), W_r's bf16 gradient lay 1.6-2.3x its own size from
fp32's; with this, 0.035-0.038, like every other part (docs/performance.md, session 24). Centring
removes exactly what the true gradient lacks; the fp32 product then keeps a column of ones from
bringing it back. In fp32 training nothing changes (the table is fp32 already, nothing is centred).
"""

HEADS_MAJOR_PROJECTION = True
"""fp32 training over memories (the keys and values of constants, `FOLDED_NORM`'s path): the keys
and values come out of their projection heads-major, from one batched product over the (key or
value, head) pairs (`_HeadsMajorLinearOverConstants`), instead of one product and then layout
copies, forward and backward. False: one product, then the copies. Tests compare the two. (Not in
bf16: there the batched product took 1.7x as long as one product and the copies, and its weight
gradient 2.4x: docs/performance.md, session 14.)"""


PACKED_KEY_VALUES = True
"""bf16 on a CPU where the kernel takes the whole attention (`NATIVE_SCORES` and `NATIVE_GRADS`, L, K
and the head dim multiples of 32): the kernel reads the keys and values where their projection
wrote them, (B, K, 2d), and writes their gradients there and the output as (B, L, d), instead of
copying keys and values into heads-major (H*B, K, D) tensors, their gradients back (and through a
concatenation), and the output out of (H*B, L, D) (`_PackedAttentionOutputs`). The same products
and the same bits. False: the copies. Tests compare the two."""


def compute_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matrix product of `dtype` inputs on `device` gives here (autocast's, when on):
    caches made under bf16 autocast must not be read by an fp32 forward, nor the reverse."""
    device_type = torch.device(device).type
    if dtype.is_floating_point and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


@functools.lru_cache(maxsize=8)
def _identity_affine(d: int, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Ones and zeros (d,): a layer norm's affine that changes nothing."""
    return torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype)


@functools.lru_cache(maxsize=16)  # every layer and step asks for the same few tables
def sinusoidal_distances(klen: int, d_model: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Encodings of the distances klen-1, ..., 1, 0 (in that order): (klen, d_model).

    Computed once per (klen, d_model, device, dtype): treat the result as read-only, it is shared.
    In float32, but for a float64 table (a probe: float32's angles were 7e-5 off at 5000 distances,
    the floor of a float64 model's agreement with a float64 reference)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    distances = torch.arange(klen - 1, -1, -1, device=device, dtype=work)  # (K,)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_model, 2, device=device, dtype=work) / d_model))
    angles = distances[:, None] * inv_freq[None, :]  # (K, d/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)  # (K, d)


def relative_shift(position_scores: torch.Tensor) -> torch.Tensor:
    """(B, H, L, K) scores for distances K-1..0 in every row -> scores aligned to keys.

    Output[..., i, j] = input[..., i, j + L - 1 - i], the score for distance K - L + i - j. Entries
    with j > K - L + i (future keys) are meaningless and must be masked by the caller.

    Without gradients this is a strided view (no copy). With gradients it is one strided copy, and
    the backward the same shift the other way (`_RelativeShift`): autograd through the overlapping
    strided view itself takes a generic path that costs far more, and Transformer-XL's
    pad-and-reshape makes two copies each way.
    """
    if not position_scores.requires_grad:
        return _shifted_view(position_scores.contiguous())
    return _RelativeShift.apply(position_scores)


def _shifted_view(x: torch.Tensor) -> torch.Tensor:
    """x contiguous (..., L, K) -> the view with [..., i, j] = x[..., i, j + L - 1 - i] (rows
    overlap by one element: the meaningless entries past each row's end read the next row)."""
    l = x.shape[-2]
    *lead, s_l, s_k = x.stride()
    return x.as_strided(x.shape, (*lead, s_l - 1, s_k), x.storage_offset() + l - 1)


class _RelativeShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, position_scores: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - ctx unused
        return _shifted_view(position_scores.contiguous()).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        # input[..., i, c] received output[..., i, c - (L - 1 - i)] (zero where that is < 0): with
        # L - 1 zeros in front of each row of length K + L - 1, that is a row stride of K + L
        b, h, l, k = grad.shape
        padded = F.pad(grad, (l - 1, 0))  # (B, H, L, K + L - 1)
        s_b, s_h, s_l, s_k = padded.stride()
        return padded.as_strided((b, h, l, k), (s_b, s_h, s_l + 1, s_k), padded.storage_offset()).contiguous()


class _LinearOverConstants(torch.autograd.Function):
    """`F.linear(cat([head, tail], dim=1), weight, bias)` where `head` (B, P, d) is a constant
    (the memories, detached) and `tail` (B, L, d) is not: the backward computes the input gradient
    for the tail's rows only, a third of the product autograd would make for the whole
    concatenation at the reference preset (P = 256 memory slots, L = 128 queries). Under autocast
    the product runs in autocast's dtype, and the gradients come back in the inputs' dtypes, as
    autocast's own casts would give them. -> (B, P + L, n)."""

    @staticmethod
    def forward(ctx, head, tail, weight, bias):
        dtype = compute_dtype(tail.device, weight.dtype)  # bf16 under bf16 autocast
        inputs = torch.cat([head.to(dtype), tail.to(dtype)], dim=1)  # (B, K, d)
        weight_c = weight.to(dtype)
        out = F.linear(inputs, weight_c, None if bias is None else bias.to(dtype))  # (B, K, n)
        ctx.save_for_backward(inputs, weight_c)
        ctx.head_len = head.shape[1]
        ctx.dtypes = (tail.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        inputs, weight_c = ctx.saved_tensors
        tail_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad = grad.to(weight_c.dtype)
        grad_tail = grad_weight = grad_bias = None
        b, k_len, n = grad.shape
        # the tail's rows copied together first: a strided batched product was slower in bf16
        if ctx.needs_input_grad[1]:
            grad_tail = (grad[:, ctx.head_len:].reshape(-1, n) @ weight_c).view(b, k_len - ctx.head_len, -1)
            grad_tail = grad_tail.to(tail_dtype)  # (B, L, d)
        flat = grad.reshape(-1, n)  # (B*K, n)
        if ctx.needs_input_grad[2]:
            grad_weight = (flat.t() @ inputs.reshape(-1, inputs.shape[-1])).to(weight_dtype)  # (n, d)
        if bias_dtype is not None and ctx.needs_input_grad[3]:
            # summed in the product's dtype, as autocast's own linear does (a bf16 sum into fp32 took 4x as long)
            grad_bias = flat.sum(0).to(bias_dtype)  # (n,)
        return None, grad_tail, grad_weight, grad_bias


class _HeadsMajorLinearOverConstants(torch.autograd.Function):
    """`_LinearOverConstants` with its output in the attention's heads-major layout: the keys and
    values of [head (B, P, d), a constant; tail (B, L, d)] under `weight` (2d, d) (keys' rows, then
    values', each head's D rows together) and `bias` (2d,), as two (H*B, K, D) tensors (K = P + L),
    views of one (2, H, B, K, D) buffer that a batched product over the 2H (key or value, head)
    pairs writes directly. The backward takes their gradients as they come (heads-major): the
    weight's by one batched product each for keys and values, the tail's input gradient from the
    tail's rows only, gathered into one (B*L, 2d) product. In the weights' dtype (fp32, or float64 in
    tests): not under autocast."""

    @staticmethod
    def forward(ctx, head, tail, weight, bias, heads):
        b, p, d = head.shape
        k_len = p + tail.shape[1]
        inputs = torch.cat([head, tail], dim=1).view(b * k_len, d)  # (B*K, d)
        w = weight.view(2 * heads, -1, d)  # (2H, D, d)
        dh = w.shape[1]
        if bias is None:
            out = torch.bmm(inputs.expand(2 * heads, -1, -1), w.transpose(1, 2))  # (2H, B*K, D)
        else:
            out = torch.baddbmm(bias.view(2 * heads, 1, dh), inputs.expand(2 * heads, -1, -1), w.transpose(1, 2))
        ctx.save_for_backward(inputs, weight)
        ctx.shape = (b, k_len, tail.shape[1], heads, dh)
        ctx.has_bias = bias is not None
        k, v = out.view(2, heads * b, k_len, dh)  # (H*B, K, D) each: heads-major
        return k, v

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        inputs, weight = ctx.saved_tensors
        b, k_len, l, heads, dh = ctx.shape
        d = inputs.shape[1]
        grads = [torch.zeros(heads * b, k_len, dh, dtype=inputs.dtype, device=inputs.device) if g is None
                 else g.contiguous() for g in (grad_k, grad_v)]  # (H*B, K, D) each
        grad_tail = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:  # the tail's rows, in the (B*L, 2d) layout of one product with the weight
            seg = torch.empty(b, l, 2, heads, dh, dtype=inputs.dtype, device=inputs.device)
            for i, g in enumerate(grads):
                seg[:, :, i].copy_(g.view(heads, b, k_len, dh)[:, :, k_len - l :].permute(1, 2, 0, 3))
            grad_tail = (seg.view(b * l, 2 * d) @ weight).view(b, l, d)  # (B, L, d)
        if ctx.needs_input_grad[2]:
            grad_weight = torch.empty_like(weight)  # (2d, d): keys' rows, then values'
            for i, g in enumerate(grads):  # (H, D, B*K) x (B*K, d) -> (H, D, d)
                torch.bmm(g.view(heads, b * k_len, dh).transpose(1, 2), inputs.expand(heads, -1, -1),
                          out=grad_weight[i * d : (i + 1) * d].view(heads, dh, d))
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = torch.cat([g.view(heads, b * k_len, dh).sum(1).view(d) for g in grads])  # (2d,)
        return None, grad_tail, grad_weight, grad_bias, None


class _AttentionWeights(torch.autograd.Function):
    """softmax(mask(content + shifted position scores)) over heads-major (G = H*B) rows.

    Forward: q_content (G, L, D), k (G, K, D), q_position (H, B*L, D), r (H, K, D), and the mask
    as a 0 / -inf bias in the scores' dtype (`mask_bias`), (L, K) or (1, B, L, K); the scale is
    already in the queries. Returns the weights (G, L, K), in the dtype autocast gives a softmax
    (bf16 on CPUs under bf16 autocast, fp32 on GPUs).

    Passes over the (G, L, K) scores: the position product writes them raw, unshifted; the content
    product reads them through the shifted view (`_shifted_view`, copied by `baddbmm` into its
    output) and adds in place; the mask (an added 0 / -inf bias); the softmax. The backward: the
    softmax's, then the shift back in one copy, then the four products. The shift back relies on
    what the softmax guarantees: the gradient at masked scores is exactly 0, so the entries past
    each row's end (which alias the next row's leading entries) may be written with it before the
    valid entries. In bf16 on a CPU with AVX-512 bf16, `native_attention.cpp` makes the forward in one pass
    with the scores in fp32, and the backward's softmax and shift in one (`NATIVE_SCORES`), its four
    products too where the lengths and head dim are multiples of 32 (`NATIVE_GRADS`).
    """

    @staticmethod
    def forward(ctx, q_content, k, q_position, r, bias):
        ctx.r_dtype = r.dtype  # fp32 under bf16 autocast (`EXACT_POSITION_GRADIENT`)
        weights, r, _ = _weights_forward(q_content, k, q_position, r, bias)
        ctx.save_for_backward(q_content, k, q_position, r, weights)
        return weights

    @staticmethod
    def backward(ctx, grad_weights):
        q_content, k, q_position, r, weights = ctx.saved_tensors
        fused = (_native_grads(q_content, k, q_position, r, weights, ctx.r_dtype, grad_weights=grad_weights)
                 if NATIVE_SCORES else None)
        if fused is not None:  # bf16 on a CPU with the kernel: the softmax's backward and the four products at once
            return (*fused[:4], None)
        return (*_weights_backward(q_content, k, q_position, r, weights, ctx.r_dtype, grad_weights), None)


class _AttentionOutputs(torch.autograd.Function):
    """`_AttentionWeights` followed by the product with the values: (weights v) (G, L, D), from
    q_content, k, v (G, K, D), q_position, r and the bias, without attention dropout in between.
    Where the kernel makes the weights, it makes the product too, 16 rows at a time as their
    weights are made (K a multiple of 32). Where the kernel takes the backward (`NATIVE_GRADS`), it
    computes the weights' gradient grad_out v^T itself, 16 rows at a time in fp32, and the values'
    gradient weights^T grad_out, so the (G, L, K) gradient of the weights is never written;
    elsewhere, the two products, then `_AttentionWeights`' backward."""

    @staticmethod
    def forward(ctx, q_content, k, v, q_position, r, bias):
        ctx.r_dtype = r.dtype
        weights, r, out = _weights_forward(q_content, k, q_position, r, bias, v)
        ctx.save_for_backward(q_content, k, v, q_position, r, weights)
        # (on GPUs autocast gives fp32 weights and bf16 values: the product in the values' dtype, as autocast's)
        return out if out is not None else torch.bmm(weights.to(v.dtype), v)  # (G, L, D)

    @staticmethod
    def backward(ctx, grad):
        q_content, k, v, q_position, r, weights = ctx.saved_tensors
        grad_q_content, grad_k, grad_v, grad_q_position, grad_r = _outputs_backward(
            q_content, k, v, q_position, r, weights, ctx.r_dtype, grad)
        return grad_q_content, grad_k, grad_v, grad_q_position, grad_r, None


def _outputs_backward(q_content: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_position: torch.Tensor,
                      r: torch.Tensor, weights: torch.Tensor, r_dtype: torch.dtype, grad: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_AttentionOutputs`' backward from its saved tensors (k and v heads-major) and the output's
    gradient grad (G, L, D): the gradients of q_content, k, v, q_position and r."""
    fused = (_native_grads(q_content, k, q_position, r, weights, r_dtype, grad_out=grad, v=v)
             if NATIVE_SCORES else None)
    if fused is not None:
        grad_q_content, grad_k, grad_q_position, grad_r, grad_v = fused
        return grad_q_content, grad_k, grad_v, grad_q_position, grad_r
    grad = grad.to(v.dtype)
    grad_weights = torch.bmm(grad, v.transpose(1, 2)).to(weights.dtype)  # (G, L, K)
    grad_v = torch.bmm(weights.to(v.dtype).transpose(1, 2), grad)  # (G, K, D)
    grads = _weights_backward(q_content, k, q_position, r, weights, r_dtype, grad_weights)
    return grads[0], grads[1], grad_v, grads[2], grads[3]


def _heads_major_pair(kv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, K, 2d) (any strides) -> each (H*B, K, D), contiguous (copies)."""
    b, k_len, two_d = kv.shape
    dh = two_d // (2 * heads)
    k, v = kv.reshape(b, k_len, 2, heads, dh).permute(2, 3, 0, 1, 4).reshape(2, heads * b, k_len, dh)
    return k, v


class _PackedAttentionOutputs(torch.autograd.Function):
    """`_AttentionOutputs` over keys and values as their projection made them, kv (B, K, 2d) (the keys'
    d columns, then the values', each head's D together), with the output as (B, L, d) (each head's
    D together) and kv's gradient as (B, K, 2d): `PACKED_KEY_VALUES`. The kernel reads and writes them
    in place (`native_attention.cpp`'s `Layout`); the arithmetic is `_AttentionOutputs`' kernels',
    bit for bit. Only where `_packed_kernel_takes` holds; should the backward's kernel refuse
    nonetheless, the heads-major path's backward from copies."""

    @staticmethod
    def forward(ctx, q_content, kv, q_position, r, bias, heads):
        ctx.r_dtype = r.dtype
        r = r.to(q_content.dtype)
        result = _native_packed_weights(q_content, kv, q_position, r, bias, heads)
        if result is None:
            raise RuntimeError("the bf16 attention kernel refused keys and values it was judged to take")
        weights, out = result
        ctx.save_for_backward(q_content, kv, q_position, r, weights)
        ctx.heads = heads
        return out  # (B, L, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q_content, kv, q_position, r, weights = ctx.saved_tensors
        grads = _native_packed_grads(q_content, kv, q_position, r, weights, ctx.r_dtype, grad, ctx.heads)
        if grads is None:  # (not expected: the forward's checks cover the backward's)
            b, l, d = grad.shape
            h, dh = ctx.heads, d // ctx.heads
            k, v = _heads_major_pair(kv, h)
            grad_hm = grad.reshape(b, l, h, dh).permute(2, 0, 1, 3).reshape(h * b, l, dh)
            grad_q_content, grad_k, grad_v, grad_q_position, grad_r = _outputs_backward(
                q_content, k, v, q_position, r, weights, ctx.r_dtype, grad_hm)
            grad_kv = torch.empty_like(kv).view(b, -1, 2, h, dh)
            grad_kv[:, :, 0].copy_(grad_k.view(h, b, -1, dh).permute(1, 2, 0, 3))
            grad_kv[:, :, 1].copy_(grad_v.view(h, b, -1, dh).permute(1, 2, 0, 3))
            grads = grad_q_content, grad_kv.view(kv.shape), grad_q_position, grad_r
        return (*grads, None, None)


def _weights_forward(q_content: torch.Tensor, k: torch.Tensor, q_position: torch.Tensor, r: torch.Tensor,
                     bias: torch.Tensor, v: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`_AttentionWeights`' forward: the weights (G, L, K), r in the queries' dtype (what the
    backward reads), and where `v` is given and the kernel made it, (weights v) (G, L, D), else None."""
    g, l, _ = q_content.shape
    r = r.to(q_content.dtype)  # (H, K, D)
    h, k_len = r.shape[0], r.shape[1]
    native = _native_weights(q_content, k, q_position, r, bias, v) if NATIVE_SCORES else None
    if native is not None:  # bf16 on a CPU with AVX-512 bf16 (the scores in fp32), or fp32 with FMA: one pass
        return native[0], r, native[1]
    fp32_scores = FP32_POSITION_SCORES and q_content.dtype != torch.float32
    if q_content.dtype == torch.bfloat16:
        ROUNDED_USED.set()
    if fp32_scores:  # (bf16) the scores in fp32, the weights in bf16
        with torch.autocast(q_content.device.type, enabled=False):  # (autocast would make it bf16 again)
            raw = torch.bmm(q_position.float(), r.float().transpose(1, 2)).view(g, l, k_len)
        scores = torch.add(_shifted_view(raw), torch.bmm(q_content, k.transpose(1, 2)))  # (G, L, K) fp32
    else:
        raw = torch.bmm(q_position, r.transpose(1, 2)).view(g, l, k_len)  # (H, B*L, K) = (G, L, K)
        scores = torch.baddbmm(_shifted_view(raw), q_content, k.transpose(1, 2))  # (G, L, K)
    del raw
    # the mask as an added 0 / -inf bias: a broadcast `masked_fill_` took 4x as long (1.6 ms
    # against 0.4 for 64 x 128 x 384 scores on one core)
    scores.view(h, g // h, l, k_len).add_(bias)  # bias (L, K) or (1, B, L, K)
    weights = scores.softmax(dim=-1)  # (G, L, K); the autocast policy applies
    if fp32_scores:
        weights = weights.to(q_content.dtype)
    return weights, r, None


def _weights_backward(q_content: torch.Tensor, k: torch.Tensor, q_position: torch.Tensor, r: torch.Tensor,
                      weights: torch.Tensor, r_dtype: torch.dtype, grad_weights: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_AttentionWeights`' backward in two steps: the softmax's backward and the shift (one pass of
    the kernel where it runs, `_native_backward`), then PyTorch's four products. -> the gradients of
    q_content, k, q_position and r (in `r_dtype`, centred over the distances where r came wider)."""
    h, k_len = r.shape[0], weights.shape[-1]
    native = _native_backward(weights, grad_weights, k.dtype) if NATIVE_SCORES else None
    if native is not None:  # bf16 on a CPU with the kernel: both in one pass
        grad_scores, raw = native
    else:
        grad_scores, raw = _scores_backward(weights, grad_weights, k.dtype)
    grad_q_content = torch.bmm(grad_scores, k)  # (G, L, D)
    grad_k = torch.bmm(grad_scores.transpose(1, 2), q_content)  # (G, K, D)
    raw = raw.view(h, -1, k_len)  # (H, B*L, K)
    grad_q_position = torch.bmm(raw, r)  # (H, B*L, D)
    grad_r = torch.bmm(raw.transpose(1, 2), q_position)  # (H, K, D)
    if r_dtype != r.dtype:  # r came in wider (`EXACT_POSITION_GRADIENT`): the gradient centred,
        grad_r = grad_r.to(r_dtype)  # as the exact one is, over the distances
        grad_r = grad_r - grad_r.mean(dim=1, keepdim=True)
    return grad_q_content, grad_k, grad_q_position, grad_r


class _CentredGradient(torch.autograd.Function):
    """r (H, K, D) as it is; its gradient centred over the distances (`EXACT_POSITION_GRADIENT`), for
    the explicit path's position scores, whose product autocast rounds (`_AttentionWeights` centres
    its own)."""

    @staticmethod
    def forward(ctx, r: torch.Tensor) -> torch.Tensor:
        return r.view_as(r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad - grad.mean(dim=1, keepdim=True)


def _scores_backward(weights: torch.Tensor, grad_weights: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax's backward from the weights (G, L, K) and their gradient: the scores' gradient
    (G, L, K) in `dtype`, exactly 0 at masked scores, and the position scores' gradient, the same
    shifted back: raw[i, c] = grad[i, c - (L - 1 - i)], 0 for c < L - 1 - i."""
    g, l, k_len = weights.shape
    grad_scores = torch._softmax_backward_data(grad_weights.to(weights.dtype), weights, -1, weights.dtype)
    grad_scores = grad_scores.to(dtype)  # (G, L, K)
    # Through the shifted view of a fresh buffer: first the band of the last L - 1 columns (whose
    # entries past a row's end carry masked zeros into the next row's leading entries), then the
    # first K - L + 1 columns (valid in every row), then row 0's leading entries, which nothing
    # else writes.
    raw = torch.empty_like(grad_scores)
    view = _shifted_view(raw)
    split = k_len - l + 1
    view[..., split:].copy_(grad_scores[..., split:])
    view[..., :split].copy_(grad_scores[..., :split])
    raw[:, 0, : l - 1] = 0
    return grad_scores, raw


NATIVE_FP32 = True
"""fp32 training on a CPU with fused multiply-adds (AVX-512, AVX2, ARM's NEON): the attention's forward
and backward from `native_attention.cpp`'s fp32 kernels (`still_attention_weights_fp32`,
`still_attention_grads_fp32`), the same passes as the bf16 kernel's with every product on fused
multiply-adds in register blocks (the same bits with or without AVX-512): 16 query rows' scores,
softmax and product with the values while they are in the core's cache, the backward's five products
from the scores' gradient of one (head, row) group kept in L2, and the terms the causal mask makes
zero skipped. Where it cannot run (no compiler or FMA, lengths or head dim not multiples of 16),
PyTorch's products. Under `NATIVE_SCORES` (off inside `kernels_off`). Tests compare the two."""

NATIVE_GRADS = True
"""Where `NATIVE_SCORES` runs the backward's first pass, and the lengths and head dim are multiples
of 32: the four products after it as well, in the same pass of `native_attention.cpp`
(`still_attention_grads`): the scores' gradient never leaves the core's caches, and the position
table's gradient is summed and centred in fp32. False: the first pass, then PyTorch's four
products. Tests compare the two."""


def _native_grads(q_content: torch.Tensor, k: torch.Tensor, q_position: torch.Tensor, r: torch.Tensor,
                  weights: torch.Tensor, r_dtype: torch.dtype, grad_weights: torch.Tensor | None = None,
                  grad_out: torch.Tensor | None = None, v: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """The gradients of q_content, k, q_position and r (and of v) from one call of
    `still_attention_grads`, from the weights' gradient `grad_weights`, or from the gradient of
    (weights v) `grad_out` and `v` (`_AttentionOutputs`, which also gets v's); or None where it
    cannot (not all bf16 on a CPU, L, K or D not multiples of 32, no kernel here; fp32 operands go
    to `_native_grads_fp32`). r's gradient in `r_dtype`, centred over the distances where r came in
    wider (`EXACT_POSITION_GRADIENT`)."""
    if not NATIVE_GRADS or torch.compiler.is_compiling() or weights.device.type != "cpu":
        return None
    if weights.dtype == torch.float32:
        return _native_grads_fp32(q_content, k, q_position, r, weights, r_dtype, grad_weights, grad_out, v)
    g, l, k_len = weights.shape
    h, d = r.shape[0], r.shape[2]
    operands = (q_content, k, q_position, r, weights) + ((v,) if v is not None else ())
    if any(t.dtype != torch.bfloat16 for t in operands) or l % 32 or k_len % 32 or d % 32 or g % h:
        return None
    from still.compressive import native

    lib = native.attention_library()
    if lib is None:
        return None
    bf16 = torch.bfloat16
    inputs = [None if t is None else t.to(bf16).contiguous()
              for t in (weights, grad_weights, grad_out, v, q_content, k, q_position, r)]
    grad_q_content, grad_k, grad_q_position = (torch.empty_like(t) for t in (inputs[4], inputs[5], inputs[6]))
    grad_v = torch.empty_like(inputs[3]) if v is not None else None
    grad_r = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    center = r_dtype != r.dtype
    code = lib.still_attention_grads(*(None if t is None else t.data_ptr() for t in inputs), grad_q_content.data_ptr(),
                                     grad_k.data_ptr(), None if grad_v is None else grad_v.data_ptr(),
                                     grad_q_position.data_ptr(), grad_r.data_ptr(), h, g // h, l, k_len, d, int(center),
                                     None, min(torch.get_num_threads(), native.MAX_THREADS))
    if code != 0:
        return None
    return grad_q_content, grad_k, grad_q_position, grad_r.to(r_dtype), grad_v


def _native_grads_fp32(q_content: torch.Tensor, k: torch.Tensor, q_position: torch.Tensor, r: torch.Tensor,
                       weights: torch.Tensor, r_dtype: torch.dtype, grad_weights: torch.Tensor | None,
                       grad_out: torch.Tensor | None, v: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """`_native_grads` in fp32 (`still_attention_grads_fp32`, `NATIVE_FP32`): every operand fp32 on a
    CPU, L, K and D multiples of 16; else None."""
    g, l, k_len = weights.shape
    h, d = r.shape[0], r.shape[2]
    operands = [t for t in (q_content, k, q_position, r, weights, grad_weights, grad_out, v) if t is not None]
    if (not NATIVE_FP32 or r_dtype != torch.float32 or any(t.dtype != torch.float32 for t in operands)
            or l % 16 or k_len % 16 or d % 16 or g % h):
        return None
    from still.compressive import native

    lib = native.attention_fp32_library()
    if lib is None:
        return None
    inputs = [None if t is None else t.contiguous()
              for t in (weights, grad_weights, grad_out, v, q_content, k, q_position, r)]
    grad_q_content, grad_k, grad_q_position, grad_r = (torch.empty_like(t) for t in inputs[4:])
    grad_v = torch.empty_like(inputs[3]) if v is not None else None
    code = lib.still_attention_grads_fp32(*(None if t is None else t.data_ptr() for t in inputs),
                                          grad_q_content.data_ptr(), grad_k.data_ptr(),
                                          None if grad_v is None else grad_v.data_ptr(), grad_q_position.data_ptr(),
                                          grad_r.data_ptr(), h, g // h, l, k_len, d,
                                          min(torch.get_num_threads(), native.MAX_THREADS))
    if code != 0:
        return None
    return grad_q_content, grad_k, grad_q_position, grad_r, grad_v


def _native_backward(weights: torch.Tensor, grad_weights: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`_scores_backward` in one pass of `native_attention.cpp` (the softmax's backward in fp32, each
    gradient rounded once to bf16), or None where it cannot (not bf16 on a CPU, no kernel here)."""
    if (torch.compiler.is_compiling() or weights.device.type != "cpu" or weights.dtype != torch.bfloat16
            or dtype != torch.bfloat16):
        return None
    from still.compressive import native

    lib = native.attention_library()
    if lib is None:
        return None
    g, l, k_len = weights.shape
    weights, grad_weights = weights.contiguous(), grad_weights.to(torch.bfloat16).contiguous()
    grad_scores, raw = torch.empty_like(weights), torch.empty_like(weights)
    code = lib.still_attention_backward(weights.data_ptr(), grad_weights.data_ptr(), grad_scores.data_ptr(),
                                        raw.data_ptr(), g, l, k_len, min(torch.get_num_threads(), native.MAX_THREADS))
    return (grad_scores, raw) if code == 0 else None


def _packed_kernel_takes(q_content: torch.Tensor, kv: torch.Tensor, q_position: torch.Tensor, r: torch.Tensor,
                         bias: torch.Tensor, heads: int) -> bool:
    """Whether `_PackedAttentionOutputs` runs here: `PACKED_KEY_VALUES` with `NATIVE_SCORES` and
    `NATIVE_GRADS`; bf16 queries (G, L, D) and kv (B, K, 2d) on a CPU, r (H, K, D) bf16 or fp32; L,
    K and D multiples of 32 (and at least one row); the causal mask's bias or a (1, B, L, K) one;
    the kernel built here; not under torch.compile."""
    if not (PACKED_KEY_VALUES and NATIVE_SCORES and NATIVE_GRADS) or torch.compiler.is_compiling():
        return False
    bf16 = torch.bfloat16
    if (q_content.device.type != "cpu" or kv.dim() != 3 or q_content.dtype != bf16 or kv.dtype != bf16
            or q_position.dtype != bf16 or r.dtype not in (bf16, torch.float32) or bias.dtype != bf16):
        return False
    g, l, d = q_content.shape
    b, k_len, two_d = kv.shape
    if (two_d != 2 * heads * d or g != heads * b or r.shape != (heads, k_len, d) or l % 32 or k_len % 32 or d % 32
            or k_len < l or l < 32 or b < 1):
        return False
    if bias.dim() != 2 and bias.shape[:2] != (1, b):
        return False
    from still.compressive import native

    return native.attention_library() is not None


def _bias_layout(bias: torch.Tensor, l: int, k_len: int) -> tuple[int, bool]:
    """The kernels' view of a mask bias (L, K) or (1, B, L, K): the stride between batch rows' (L, K)
    blocks (0: one for all), and whether it is the causal mask's alone (which the kernels apply
    themselves, given no bias)."""
    if bias.dim() == 2:  # (L, K): every batch row's
        return 0, bias is causal_mask_bias(l, k_len, bias.device, bias.dtype)
    return l * k_len, False


def _pointer(t: torch.Tensor, offset: int = 0) -> int:
    """The address of t's element `offset` (in elements)."""
    return t.data_ptr() + offset * t.element_size()


def _packed_layouts(heads: int, b: int, l: int, k_len: int, d: int) -> ctypes.Array:
    """The kernel's `Layout`s (batch, head, row strides) of kv (B, K, 2d) and of an output (B, L, d)."""
    width = heads * d
    return (ctypes.c_int64 * 6)(k_len * 2 * width, d, 2 * width, l * width, d, width)


def _native_packed_weights(q_content: torch.Tensor, kv: torch.Tensor, q_position: torch.Tensor, r: torch.Tensor,
                           bias: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`_native_weights` with v over kv (B, K, 2d) in place: the weights (G, L, K) and their product
    with the values as (B, L, d); None where the kernel refuses."""
    from still.compressive import native

    g, l, d = q_content.shape
    b, k_len, _ = kv.shape
    batch_stride, causal_only = _bias_layout(bias, l, k_len)
    q_content, kv, q_position, r, bias = (t.contiguous() for t in (q_content, kv, q_position, r, bias))
    out = torch.empty(g, l, k_len, dtype=kv.dtype, device=kv.device)  # (G, L, K)
    values = torch.empty(b, l, heads * d, dtype=kv.dtype, device=kv.device)  # (B, L, d)
    layouts = _packed_layouts(heads, b, l, k_len, d)
    code = native.attention_library().still_attention_weights(
        q_content.data_ptr(), kv.data_ptr(), q_position.data_ptr(), r.data_ptr(),
        None if causal_only else bias.data_ptr(), batch_stride, out.data_ptr(), _pointer(kv, heads * d),
        values.data_ptr(), heads, b, l, k_len, d, layouts, min(torch.get_num_threads(), native.MAX_THREADS))
    if code != 0:
        return None
    NATIVE_USED.set()
    return out, values


def _native_packed_grads(q_content: torch.Tensor, kv: torch.Tensor, q_position: torch.Tensor, r: torch.Tensor,
                         weights: torch.Tensor, r_dtype: torch.dtype, grad_out: torch.Tensor, heads: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`_native_grads` from the output's gradient (B, L, d) over kv (B, K, 2d) in place: the gradients
    of q_content, kv (B, K, 2d), q_position and r (in `r_dtype`, centred where r came wider); None
    where the kernel refuses."""
    from still.compressive import native

    g, l, d = q_content.shape
    b, k_len, _ = kv.shape
    q_content, kv, q_position, r, weights = (t.contiguous() for t in (q_content, kv, q_position, r, weights))
    grad_out = grad_out.to(torch.bfloat16).contiguous()  # (B, L, d)
    grad_q_content, grad_q_position = torch.empty_like(q_content), torch.empty_like(q_position)
    grad_kv = torch.empty_like(kv)  # (B, K, 2d), kv contiguous
    grad_r = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    layouts = _packed_layouts(heads, b, l, k_len, d)
    code = native.attention_library().still_attention_grads(
        weights.data_ptr(), None, grad_out.data_ptr(), _pointer(kv, heads * d), q_content.data_ptr(),
        kv.data_ptr(), q_position.data_ptr(), r.data_ptr(), grad_q_content.data_ptr(), grad_kv.data_ptr(),
        _pointer(grad_kv, heads * d), grad_q_position.data_ptr(), grad_r.data_ptr(), heads, b, l, k_len, d,
        int(r_dtype != r.dtype), layouts, min(torch.get_num_threads(), native.MAX_THREADS))
    if code != 0:
        return None
    return grad_q_content, grad_kv, grad_q_position, grad_r.to(r_dtype)


def _native_weights(q_content: torch.Tensor, k: torch.Tensor, q_position: torch.Tensor, r: torch.Tensor,
                    bias: torch.Tensor, v: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`_AttentionWeights`' weights from `native_attention.cpp` (G, L, K), and with the values `v`
    (G, K, D) also (weights v) (G, L, D), made as each 16 rows' weights are (in bf16 None where K is
    not a multiple of 32); or None where it cannot compute the weights (not all bf16, or all fp32
    under `NATIVE_FP32`, on a CPU; shapes it does not take; no kernel on this machine; under
    torch.compile, whose own code fuses the PyTorch path's passes)."""
    if torch.compiler.is_compiling():
        return None
    g, l, d = q_content.shape
    h, k_len = r.shape[0], r.shape[1]
    tensors = (q_content, k, q_position, r, bias)
    dtype = q_content.dtype
    fp32 = dtype == torch.float32
    if (q_content.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32) or (fp32 and not NATIVE_FP32)
            or any(t.dtype != dtype for t in tensors) or d % (16 if fp32 else 32) or l % 16 or k_len % 16 or g % h):
        return None
    if bias.dim() != 2 and bias.shape[:2] != (1, g // h):  # neither (L, K) nor (1, B, L, K)
        return None
    batch_stride, causal_only = _bias_layout(bias, l, k_len)
    from still.compressive import native

    lib = native.attention_fp32_library() if fp32 else native.attention_library()
    if lib is None:
        return None
    q_content, k, q_position, r, bias = (t.contiguous() for t in tensors)
    if v is not None and (v.dtype != dtype or v.shape != k.shape or (not fp32 and k_len % 32)):
        v = None
    v = v.contiguous() if v is not None else None
    out = torch.empty(g, l, k_len, dtype=dtype, device=q_content.device)  # (G, L, K)
    values = torch.empty(g, l, d, dtype=dtype, device=q_content.device) if v is not None else None
    layouts = () if fp32 else (None,)  # (the bf16 kernel's: heads-major)
    call = lib.still_attention_weights_fp32 if fp32 else lib.still_attention_weights
    code = call(q_content.data_ptr(), k.data_ptr(), q_position.data_ptr(), r.data_ptr(),
                None if causal_only else bias.data_ptr(), batch_stride, out.data_ptr(),
                None if v is None else v.data_ptr(), None if v is None else values.data_ptr(),
                h, g // h, l, k_len, d, *layouts, min(torch.get_num_threads(), native.MAX_THREADS))
    if code != 0:
        return None
    if not fp32:
        NATIVE_USED.set()
    return out, values


@contextlib.contextmanager
def kernels_off():
    """Within it, the attention takes PyTorch's paths instead of `native_attention.cpp`'s
    (`NATIVE_SCORES` off): for counting a step's FLOPs with `torch.utils.flop_counter`, which sees
    only PyTorch's operators, where the kernels make the same products out of its sight. Sets a
    module flag: not for a step running on another thread meanwhile."""
    global NATIVE_SCORES
    before = NATIVE_SCORES
    NATIVE_SCORES = False
    try:
        yield
    finally:
        NATIVE_SCORES = before


NATIVE_USED, ROUNDED_USED = threading.Event(), threading.Event()
"""Set once `native_attention.cpp` has computed a bf16 forward's weights (its scores in fp32), and
once the PyTorch path has (its scores rounded to bf16), since they were last cleared: a run's
results say which (`still lm train`'s meta, "attention_scores")."""


def position_gradient_used(precision: str) -> str:
    """How training computes the position table's gradient: "exact" (fp32, or `EXACT_POSITION_GRADIENT`:
    the table in fp32 and its gradient centred) or "rounded" (the table in the products' dtype)."""
    return "exact" if precision == "fp32" or EXACT_POSITION_GRADIENT else "rounded"


def scores_used(precision: str) -> str:
    """How the attention's scores were computed since `NATIVE_USED` and `ROUNDED_USED` were cleared."""
    if precision == "fp32" or (NATIVE_USED.is_set() and not ROUNDED_USED.is_set()):
        return "fp32"
    if NATIVE_USED.is_set():
        return "fp32 where the kernel took the shapes, else bf16"
    return "fp32 position scores" if FP32_POSITION_SCORES else "bf16"


def causal_mask(l: int, k: int, device=None) -> torch.Tensor:
    """(L, K) boolean, True where query i may attend key j (j <= K - L + i)."""
    i = torch.arange(l, device=device)[:, None]
    j = torch.arange(k, device=device)[None, :]
    return j <= (k - l) + i


def mask_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask -> 0 where True, -inf where False, in `dtype` (a bias added to scores)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@functools.lru_cache(maxsize=8)  # a stream's segments see a few key lengths (the memories fill, then stay full)
def causal_mask_bias(l: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(L, K) `mask_bias(causal_mask(l, k))`, computed once per shape (training builds it for every
    layer and step otherwise: five operators). Treat the result as read-only: it is shared."""
    return mask_bias(causal_mask(l, k, device), dtype)


@functools.lru_cache(maxsize=8)  # a stream's segments see a few key lengths (the memories fill, then stay full)
def causal_bias(l: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(L, K + 1): 0, and -inf at the entries that the view x.as_strided((L, K), (K, 1), L) reads
    for future keys (j > K - L + i, `causal_mask`).

    Row i of that view reads entries L - i .. L - i + K - 1 of a row of K + 1 entries: its key j
    holds the entry for distance K - (L - i + j) = K - L + i - j, and its future keys run past the
    row's end into the next row's first L - 1 - i entries, which the next row's view does not read.
    Treat the result as read-only: it is shared."""
    bias = torch.zeros(l, k + 1, device=device, dtype=dtype)
    bias.as_strided((l, k), (k, 1), l).masked_fill_(~causal_mask(l, k, device), float("-inf"))
    return bias


@functools.lru_cache(maxsize=8)
def padded_causal_bias(l: int, k: int, padding: tuple[int, ...], device: torch.device, dtype: torch.dtype
                       ) -> torch.Tensor:
    """(S, 1, L, K + 1): `causal_bias` for each of S segments whose first `padding[s]` keys are padding,
    masked out as well (-inf at the entries the shifted view reads for them: row i reads entries
    L - i .. L - i + K - 1, so its key j at L - i + j, offset L + i K + j of the row-major (L, K + 1)).
    Treat the result as read-only: it is shared."""
    bias = causal_bias(l, k, device, dtype).repeat(len(padding), 1, 1)  # (S, L, K + 1)
    for s, pad in enumerate(padding):
        if pad:
            bias.as_strided((l, pad), (k, 1), s * l * (k + 1) + l).fill_(float("-inf"))
    return bias[:, None]


def content_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """softmax(q k^T) v over (G, L, D) queries (already scaled), (G, n, D) keys and values -> (G, L, D)
    (written into `out` where given): the attention-reconstruction loss's (no positions, no mask).
    Plain products: over views of the training attention's keys and values, PyTorch's CPU
    `scaled_dot_product_attention` took 1.7x (fp32) and 2.8x (bf16) as long at the reference preset
    (docs/performance.md, session 14). In bf16 on a CPU with AVX-512 bf16 (`NATIVE_SCORES`), the forward is
    one pass of `native_attention.cpp` instead: the scores and the softmax in fp32, the weights
    rounded once to bf16 (`_native_content_attention`); with gradients, the backward is the same
    products and softmax backward that autograd runs for the plain path (`_ContentAttention`)."""
    if NATIVE_SCORES and _native_content_shapes(q, k, v):
        if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad or v.requires_grad):
            result = _native_content_attention(q, k, v, out)
            if result is not None:
                return result[0]
        elif out is None:
            from still.compressive import native

            if native.attention_library() is not None:
                return _ContentAttention.apply(q, k, v)
    # `.to(v.dtype)`: CUDA's autocast runs softmax in fp32 (the CPU's keeps bf16), and a product
    # written into `out` bypasses autocast, so its operands must already be of one dtype
    return torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1).to(v.dtype), v, out=out)


def _native_content_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `_native_content_attention` takes these: bf16 on a CPU, (G, L, D) and (G, n, D) with
    L a multiple of 16, n and D of 32, each group's rows contiguous (the groups at any stride, the
    keys' and values' alike); not under torch.compile."""
    if torch.compiler.is_compiling() or q.device.type != "cpu" or q.dim() != 3:
        return False
    (g, l, d), n = q.shape, k.shape[1]
    return (all(t.dtype == torch.bfloat16 for t in (q, k, v)) and k.shape == (g, n, d) and v.shape == k.shape
            and not (l % 16 or n % 32 or d % 32) and k.stride() == v.stride()
            and all(t.stride()[1:] == (d, 1) for t in (q, k)))


def _native_content_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None,
                              weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`content_attention`'s output (G, L, D) by `native_attention.cpp`, and with `weights` its
    weights (G, L, n) too; None where it cannot (`_native_content_shapes` false, `out` not a bf16
    (G, L, D) with contiguous rows, or no kernel here). Reads its operands without autograd."""
    if not _native_content_shapes(q, k, v):
        return None
    (g, l, d), n = q.shape, k.shape[1]
    if out is None:
        out = torch.empty(g, l, d, dtype=torch.bfloat16, device=q.device)
    elif out.dtype != torch.bfloat16 or out.shape != (g, l, d) or out.stride()[1:] != (d, 1) or out.requires_grad:
        return None
    from still.compressive import native

    lib = native.attention_library()
    if lib is None:
        return None
    w = torch.empty(g, l, n, dtype=torch.bfloat16, device=q.device) if weights else None
    code = lib.still_content_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                       None if w is None else w.data_ptr(), g, l, n, d, q.stride(0), k.stride(0),
                                       out.stride(0), min(torch.get_num_threads(), native.MAX_THREADS))
    return (out, w) if code == 0 else None


NATIVE_CONTENT_GRADS = True
"""The reconstruction loss's approximation (`_ContentAttention`, bf16 on a CPU with the kernel, L a
multiple of 32): its backward in one pass of `native_attention.cpp` (`still_content_attention_grads`),
the weights' and the scores' gradients in fp32 and each gradient rounded once, where PyTorch's four
products and softmax backward round every intermediate to bf16 (docs/performance.md, session 42).
False: PyTorch's. Tests compare the two against float64."""


def _native_content_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, grad: torch.Tensor,
                          with_q: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
    """`_ContentAttention`'s gradients of q (where `with_q`), k and v from the kernel, or None where
    it does not take them (L not a multiple of 32, or the kernel refuses)."""
    (g, l, d), n = q.shape, k.shape[1]
    if l % 32 or torch.compiler.is_compiling():
        return None
    from still.compressive import native

    lib = native.attention_library()
    if lib is None:
        return None
    w, grad = w.contiguous(), grad.contiguous()
    grad_q = torch.empty(g, l, d, dtype=q.dtype, device=q.device) if with_q else None
    grad_k, grad_v = torch.empty(g, n, d, dtype=k.dtype, device=k.device), torch.empty(g, n, d, dtype=v.dtype,
                                                                                      device=v.device)
    code = lib.still_content_attention_grads(q.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(), grad.data_ptr(),
                                             None if grad_q is None else grad_q.data_ptr(), grad_k.data_ptr(),
                                             grad_v.data_ptr(), g, l, n, d, q.stride(0), k.stride(0),
                                             min(torch.get_num_threads(), native.MAX_THREADS))
    return (grad_q, grad_k, grad_v) if code == 0 else None


class _ContentAttention(torch.autograd.Function):
    """`content_attention` with gradients, its forward by `native_attention.cpp` (the weights kept
    for the backward), its backward by the kernel too where it takes it (`NATIVE_CONTENT_GRADS`),
    else the products and softmax backward autograd runs for the plain path. Only where
    `_native_content_shapes` holds and the kernel is there."""

    @staticmethod
    def forward(ctx, q, k, v):
        result = _native_content_attention(q, k, v, weights=True)
        if result is None:
            raise RuntimeError("the bf16 attention kernel refused the reconstruction loss's attention")
        out, w = result
        ctx.save_for_backward(q, k, v, w)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, w = ctx.saved_tensors
        grad = grad.to(w.dtype)
        if NATIVE_CONTENT_GRADS and ctx.needs_input_grad[1] and ctx.needs_input_grad[2]:
            grads = _native_content_grads(q, k, v, w, grad, ctx.needs_input_grad[0])
            if grads is not None:
                return grads
        grad_v = torch.bmm(w.transpose(1, 2), grad) if ctx.needs_input_grad[2] else None  # (G, n, D)
        grad_q = grad_k = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_w = torch.bmm(grad, v.transpose(1, 2))  # (G, L, n)
            grad_s = torch._softmax_backward_data(grad_w, w, -1, w.dtype)  # (G, L, n)
            grad_q = torch.bmm(grad_s, k) if ctx.needs_input_grad[0] else None  # (G, L, D)
            grad_k = torch.bmm(grad_s.transpose(1, 2), q) if ctx.needs_input_grad[1] else None  # (G, n, D)
        return grad_q, grad_k, grad_v


class AttentionOutput(NamedTuple):
    out: torch.Tensor  # (B, L, d)
    received: torch.Tensor | None  # (B, K): attention each key received (with need_weights)
    key_values: torch.Tensor | None  # (B, L, 2d): this segment's keys and values, for an inference cache
    # (None where training made them heads-major: `HEADS_MAJOR_PROJECTION`, in training mode only)
    queries: torch.Tensor | None  # (B, L, d): W_q x, before the biases (reused by the reconstruction loss)
    all_key_values: torch.Tensor | None  # (B, K, 2d): keys and values of [context, x] (likewise; None
    # where made heads-major)
    key_values_by_head: tuple[torch.Tensor, torch.Tensor] | None = None  # (H*B, K, D) x 2: the same,
    # heads-major, as training's attention made them (likewise; None on the other paths)


class RelativeMultiHeadAttention(nn.Module):
    """Multi-head attention with Transformer-XL's relative positions.

    `forward(x, context)`: queries from `x` (B, L, d); keys and values from the concatenation of
    `context` (B, P, d: compressed memory then memory, already normalised) and `x`.
    """

    def __init__(self, d_model: int, n_heads: int, dropout_attn: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.key_value = nn.Linear(d_model, 2 * d_model, bias=False)
        self.position = nn.Linear(d_model, d_model, bias=False)  # W_r
        self.content_bias = nn.Parameter(torch.zeros(n_heads, self.d_head))  # u
        self.position_bias = nn.Parameter(torch.zeros(n_heads, self.d_head))  # v
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout_attn = dropout_attn
        self.scale = 1.0 / math.sqrt(self.d_head)
        self._positions: tuple[tuple, torch.Tensor] | None = None  # inference cache of W_r R

    def position_projection(self, k_len: int, device, dtype) -> torch.Tensor:
        """W_r R for the distances k_len-1 .. 0, as (H, K, D).

        At inference (no grad) the projection for the longest length seen is cached, keyed by the
        version of W_r (a weight update or a load invalidates it); shorter lengths are its last
        rows, since rows run from the longest distance down to 0. The cache is stored as (H, D, K),
        contiguous, and returned as a view: the position scores' product reads it transposed, as
        (H, D, K) with unit stride along K, which a batched product takes without a copy (the
        (H, K, D) view of the projection's (K, H*D) output took a copy a call)."""
        if torch.is_grad_enabled() or self.training:
            return self._project_positions(k_len, device, dtype)
        weight = self.position.weight
        key = (device, dtype, compute_dtype(device, dtype), weight._version, id(weight), weight.data_ptr())
        positions = self._positions  # read once: another thread using this model (sharded evaluation) may replace it
        if positions is None or positions[0] != key or positions[1].shape[2] < k_len:
            table = self._project_positions(max(k_len, 2 * k_len if positions else k_len), device, dtype)
            positions = self._positions = (key, table.transpose(1, 2).contiguous())  # (H, D, K)
        return positions[1][:, :, -k_len:].transpose(1, 2)  # (H, K, D)

    def train(self, mode: bool = True) -> RelativeMultiHeadAttention:
        """Also drops the W_r R cache when the mode changes: weights written without a version bump
        (a fused optimizer built without `still.train.optim`'s hook, a write through `.data`) are
        then still seen by an evaluation that follows training. (`eval()` on a model already in
        eval mode, as `generate` calls it, keeps it: rebuilding it took about 1 ms of a 50 ms
        generation at d_model 128.)"""
        if mode != self.training:
            self._positions = None
        return super().train(mode)

    def _project_positions(self, k_len: int, device, dtype) -> torch.Tensor:
        table_dtype = compute_dtype(device, dtype)  # the products' (bf16 under autocast: cast once, not every call)
        exact = EXACT_POSITION_GRADIENT and self.training and torch.is_grad_enabled() and table_dtype != dtype
        if exact:  # under autocast in training: the table in the weights' dtype (fp32), autocast off
            table_dtype = self.position.weight.dtype
        with torch.autocast(torch.device(device).type, enabled=False) if exact else contextlib.nullcontext():
            r = self.position(sinusoidal_distances(k_len, self.d_model, device, table_dtype))  # (K, d)
        return r.view(k_len, self.n_heads, self.d_head).transpose(0, 1)  # (H, K, D)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.d_head).transpose(1, 2)  # (B, n, d) -> (B, H, n, D)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                need_weights: bool = False, context_kv: torch.Tensor | None = None,
                norm: nn.LayerNorm | None = None) -> AttentionOutput:
        """Attend from `x` (B, L, d) over [context, x].

        `context` (B, P, d) is [compressed memory, memory]; or give its keys and values already
        projected as `context_kv` (B, P, 2d) (an inference cache). With `norm` (pre-LN's LN1), `x`
        and `context` are the raw inputs and the attention normalises both; without it, they are
        already normalised. `key_valid` (B, P) masks out context slots (of an earlier document).
        With `need_weights`, also returns the attention each key received, summed over heads and
        queries: (B, K).
        """
        b, l, d = x.shape
        # training with the memories (detached) projected as constants (`FOLDED_NORM`)
        over_constants = (FOLDED_NORM and torch.is_grad_enabled() and context_kv is None
                          and (context is None or not context.requires_grad))
        # ... in fp32, with memories: the keys and values heads-major out of their projection
        heads_major = (over_constants and HEADS_MAJOR_PROJECTION and FUSED_SCORES and not need_weights
                       and self.training and context is not None and context.shape[1] > 0
                       and compute_dtype(x.device, self.key_value.weight.dtype) in (torch.float32, torch.float64))
        by_head = None  # (k, v) (H*B, K, D) each, when made heads-major
        if over_constants and norm is not None and norm.weight is not None and norm.bias is not None:
            queries, kv, x_kv, by_head = self._folded_projections(x, context, norm, heads_major)
        else:
            if norm is not None:
                x = norm(x)
                context = norm(context) if context is not None else None
            if context_kv is not None:
                x_kv = self.key_value(x)  # (B, L, 2d)
                kv = torch.cat([context_kv, x_kv], dim=1) if context_kv.shape[1] else x_kv  # (B, K, 2d)
            elif context is not None and context.shape[1] > 0:
                if heads_major:  # post-LN training
                    by_head = _HeadsMajorLinearOverConstants.apply(context, x, self.key_value.weight, None,
                                                                   self.n_heads)  # (H*B, K, D) x 2
                    kv = None
                elif over_constants:  # post-LN training
                    kv = _LinearOverConstants.apply(context, x, self.key_value.weight, None)  # (B, K, 2d)
                else:
                    kv = self.key_value(torch.cat([context, x], dim=1))  # (B, K, 2d): one product for all keys
                x_kv = kv[:, -l:] if kv is not None else None
            else:
                kv = x_kv = self.key_value(x)
            queries = self.query(x)  # (B, L, d)
        # the heads-major path (`_fused_attention`): training, and CPU inference in bf16 over masked
        # slots, where `scaled_dot_product_attention` with the mask built by `where` took 6.4 ms for
        # (16, 4, 128, 32) queries over 384 keys and this path about 3 (session 6; in session 18
        # 1.03-1.24x faster at 8 and 16 rows). Without masked slots `causal_attention` is faster in
        # bf16 too (1.07-1.54x, batch 1 to 16: docs/performance.md, session 18).
        fused = FUSED_SCORES and not need_weights and (torch.is_grad_enabled() or (
            key_valid is not None and x.device.type == "cpu" and kv.dtype != torch.float32))
        if not fused and not need_weights and key_valid is None and not torch.is_grad_enabled():
            return AttentionOutput(self.out(self.causal_attention(queries, kv)), None, x_kv, queries, kv)
        q = self._heads(queries)  # (B, H, L, D)
        if by_head is None:
            k_len = kv.shape[1]
            k, v = kv.chunk(2, dim=-1)
            k, v = self._heads(k), self._heads(v)  # (B, H, K, D)
        else:  # already heads-major (H*B, K, D); the fused path below reads them as they are
            k_len, k, v = by_head[0].shape[1], None, None

        r = self.position_projection(k_len, x.device, x.dtype)  # (H, K, D)
        allowed = None  # the fused path's causal-only mask: a cached bias (`causal_mask_bias`)
        if not fused or key_valid is not None:
            allowed = causal_mask(l, k_len, x.device)  # (L, K)
        if key_valid is not None:
            valid = torch.cat([key_valid, key_valid.new_ones(b, l)], dim=1)  # (B, K)
            allowed = allowed & valid[:, None, None, :]  # (B, 1, L, K)
        if not fused:
            q_position = q + self.position_bias[:, None]  # (B, H, L, D)
            if torch.is_grad_enabled():  # one product per head over all B * L queries
                if r.dtype != q.dtype:  # (most_used under bf16: a probe found its gradient left uncentred)
                    r = _CentredGradient.apply(r)  # `EXACT_POSITION_GRADIENT`, as `_AttentionWeights` does
                q_position = q_position.transpose(0, 1).reshape(self.n_heads, b * l, self.d_head)  # (H, B*L, D)
                raw = (q_position @ r.transpose(-1, -2)).view(self.n_heads, b, l, k_len).transpose(0, 1)
            else:  # inference: contiguous, so the shift below is a view
                raw = q_position @ r.transpose(-1, -2)  # (B, H, L, K)
            position_scores = relative_shift(raw)  # (B, H, L, K)
            q_content = q + self.content_bias[:, None]  # (B, H, L, D)
        if need_weights:
            scores = (q_content @ k.transpose(-1, -2) + position_scores) * self.scale  # (B, H, L, K)
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            # (B, K), summed in fp32: bf16 sums (autocast on the CPU) tied most of the memories, and
            # most_used's stable ranking then kept the oldest (a probe: half the kept slots differed)
            received = weights.sum(dim=(1, 2), dtype=torch.float32)
            weights = dropout(weights, self.dropout_attn, self.training)
            out = weights @ v  # (B, H, L, D)
        elif fused:
            out, key_values_by_head = self._fused_attention(q, k, v, r, allowed, by_head, kv)  # (B, H, L, D)
            received = None
        else:  # inference with masked slots, or the explicit path with gradients (tests)
            # one pass reads the shifted view and writes the masked bias, one scales it in place
            bias = torch.where(allowed, position_scores, float("-inf")).mul_(self.scale)  # (B, H, L, K)
            out = F.scaled_dot_product_attention(q_content, k, v, attn_mask=bias,
                                                 dropout_p=self.dropout_attn if self.training else 0.0)
            received = None
        out = out.transpose(1, 2).reshape(b, l, d)  # (B, H, L, D) -> (B, L, d)
        return AttentionOutput(self.out(out), received, x_kv, queries, kv, key_values_by_head if fused else None)

    def _folded_projections(self, x: torch.Tensor, context: torch.Tensor | None, norm: nn.LayerNorm,
                            heads_major: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                       tuple[torch.Tensor, torch.Tensor] | None]:
        """Training with pre-LN: the queries W_q LN(x) (B, L, d) and keys and values W_kv LN([context,
        x]) (B, K, 2d), with LN's affine in the weights: W (n_x gamma + beta) = (W diag(gamma)) n_x +
        W beta for the normalised rows n_x. The memories' rows are then constants times weights, and
        the gamma and beta gradients they carry come through the folded weights (products of the
        weights' size) instead of through an input gradient for every memory row
        (docs/performance.md, session 13). Returns (queries, kv, the segment's rows of kv, None); with
        `heads_major` and memories, (queries, None, None, the keys and values heads-major: (H*B, K, D)
        each, `_HeadsMajorLinearOverConstants`)."""
        l = x.shape[1]
        with torch.autocast(x.device.type, enabled=False):  # the folded weights in the weights' dtype
            w_q, w_kv = self.query.weight, self.key_value.weight
            w_q, b_q = w_q * norm.weight, w_q @ norm.bias  # (d, d), (d,)
            w_kv, b_kv = w_kv * norm.weight, w_kv @ norm.bias  # (2d, d), (2d,)
        # LN without its affine, as an identity affine: PyTorch's CPU kernel without one took 1.6x as long
        ones, zeros = _identity_affine(x.shape[-1], x.device, norm.weight.dtype)
        x_n = F.layer_norm(x, norm.normalized_shape, ones, zeros, norm.eps)  # (B, L, d)
        queries = F.linear(x_n, w_q, b_q)  # (B, L, d)
        if context is None or context.shape[1] == 0:
            kv = F.linear(x_n, w_kv, b_kv)  # (B, L, 2d)
            return queries, kv, kv, None
        context_n = F.layer_norm(context, norm.normalized_shape, ones, zeros, norm.eps)  # (B, P, d): constants
        if heads_major:
            return queries, None, None, _HeadsMajorLinearOverConstants.apply(context_n, x_n, w_kv, b_kv, self.n_heads)
        kv = _LinearOverConstants.apply(context_n, x_n, w_kv, b_kv)  # (B, K, 2d)
        return queries, kv, kv[:, -l:], None

    def causal_attention(self, queries: torch.Tensor, kv: torch.Tensor, padding: tuple[int, ...] | None = None
                         ) -> torch.Tensor:
        """Inference without masked slots, from projections: the queries W_q x (B, L, d) of the last
        L of K keys, and the keys and values W_kv [context, x] (B, K, 2d) -> the heads' outputs
        (B, L, d), before W_o. (`forward`'s path at inference, and `still.compressive.prefill`'s.)

        `padding`: the batch holds S segments a row, (B = rows x S), each with keys of its own, of
        which the first `padding[s]` are padding (`still.compressive.prefill` attends for several
        segments in one call): masked out. A segment's keys are the last K - padding[s], so the
        distances are those of its own K - padding[s] keys."""
        b, l, d = queries.shape
        k, v = kv.chunk(2, dim=-1)
        out = self._causal_attention(self._heads(queries), self._heads(k), self._heads(v), padding)  # (B, H, L, D)
        return out.transpose(1, 2).reshape(b, l, d)

    def _causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          padding: tuple[int, ...] | None = None) -> torch.Tensor:
        """Inference without gradients or masked slots (fp32 on the CPU; any dtype elsewhere):
        `scaled_dot_product_attention` with the position scores, masked and scaled, as its float
        mask, built without a pass of their own. q (B, H, L, D), k and v (B, H, K, D) -> (B, H, L, D).

        The position product covers the distances K .. 0 (one more than the keys need), so each row
        of `raw` (B, H, L, K + 1) is one longer than its shifted view's rows (`causal_bias`): the
        rows no longer overlap, the entries a row's masked (future) keys read are entries no other
        row reads, and the causal mask is one in-place add of a cached 0 / -inf table. (The view
        with overlapping rows needed a `where` into a fresh buffer: 0.06-0.36 ms of a layer of about
        1 ms for a 128-token segment at d_model 128, docs/performance.md.) The scale goes into the
        queries."""
        b, h, l, _ = q.shape
        k_len = k.shape[2]
        r = self.position_projection(k_len + 1, q.device, q.dtype)  # (H, K + 1, D): distances K .. 0
        q_position = (q + self.position_bias[:, None]) * self.scale  # (B, H, L, D)
        raw = (q_position @ r.transpose(-1, -2)).contiguous()  # (B, H, L, K + 1); contiguous already
        if padding is None or not any(padding):
            raw.add_(causal_bias(l, k_len, q.device, raw.dtype))
        else:  # (rows, S, H, L, K + 1) + (S, 1, L, K + 1)
            raw.view(-1, len(padding), h, l, k_len + 1).add_(padded_causal_bias(l, k_len, padding, q.device, raw.dtype))
        bias = raw.as_strided(
            (b, h, l, k_len), (h * l * (k_len + 1), l * (k_len + 1), k_len, 1), raw.storage_offset() + l)
        return F.scaled_dot_product_attention(q + self.content_bias[:, None], k, v, attn_mask=bias,
                                              dropout_p=self.dropout_attn if self.training else 0.0)

    def _fused_attention(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, r: torch.Tensor,
                         allowed: torch.Tensor | None, by_head: tuple[torch.Tensor, torch.Tensor] | None = None,
                         kv: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Training (and bf16 CPU inference over masked slots) attention, heads-major: the scores of all B * H
        (head, row) pairs as one (H*B, L, K) tensor, built, masked and normalised by
        `_AttentionWeights` in five passes over it, and differentiated in three
        (`docs/performance.md`). q (B, H, L, D), k and v (B, H, K, D), r (H, K, D), allowed
        (B, 1, L, K), or None for the causal mask alone -> (B, H, L, D), and the keys and values
        heads-major, (H*B, K, D) each, in the compute dtype; or, with `by_head`, k and v None and
        those keys and values given. With `kv` (B, K, 2d), what k and v are views of, where the kernel
        takes them in place (`PACKED_KEY_VALUES`): the output a view of (B, L, d), and None for the
        keys and values (the caller has kv)."""
        b, h, l, dh = q.shape
        dtype = (k if by_head is None else by_head[0]).dtype  # the compute dtype: bf16 under autocast
        k_len = (k if by_head is None else by_head[0]).shape[-2]
        scale = self.scale

        def heads_major(t: torch.Tensor) -> torch.Tensor:  # (B, H, n, D) -> (H*B, n, D)
            return t.transpose(0, 1).reshape(h * b, t.shape[2], dh)

        # the scale goes into the (small) queries, so the scores need no pass of their own for it
        # (q + u) * scale as u * scale + scale * q in one pass, in the compute dtype (bf16 under
        # autocast: an fp32 u would make the sum fp32, then a cast)
        q_content = heads_major(torch.add((self.content_bias * scale).to(dtype)[:, None], q.to(dtype), alpha=scale))
        q_position = torch.add((self.position_bias * scale).to(dtype)[:, None], q.to(dtype), alpha=scale)
        q_position = q_position.transpose(0, 1).reshape(h, b * l, dh)  # (H, B*L, D)
        if allowed is None:
            bias = causal_mask_bias(l, k_len, q.device, dtype)  # (L, K)
        else:  # (B, 1, L, K) -> (1, B, L, K), to broadcast over heads-major scores
            bias = mask_bias(allowed.transpose(0, 1), dtype)
        if (kv is not None and by_head is None and not (self.dropout_attn > 0 and self.training)
                and _packed_kernel_takes(q_content, kv, q_position, r, bias, h)):
            out = _PackedAttentionOutputs.apply(q_content, kv, q_position, r, bias, h)  # (B, L, d)
            return out.view(b, l, h, dh).transpose(1, 2), None  # (B, H, L, D)
        k, v = (heads_major(k), heads_major(v)) if by_head is None else by_head  # (HB, K, D)
        if self.dropout_attn > 0 and self.training:
            weights = _AttentionWeights.apply(q_content, k, q_position, r, bias)  # (HB, L, K)
            out = dropout(weights, self.dropout_attn, self.training) @ v  # (HB, L, D)
        else:  # the weights and their product with the values as one function (its backward fused on the CPU)
            out = _AttentionOutputs.apply(q_content, k, v, q_position, r, bias)  # (HB, L, D)
        return out.view(h, b, l, dh).transpose(0, 1), (k, v)  # (B, H, L, D)

    def heads_major_key_values(self, output: AttentionOutput, slots: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `slots` from this attention's training `output`, heads-major, (H*B,
        n, D) each: views of those the fused attention made, or (on the other paths) rearranged from
        `all_key_values`. Detached (the reconstruction loss's constants)."""
        if output.key_values_by_head is not None:
            k, v = (t[:, slots].detach() for t in output.key_values_by_head)
            return k, v
        return _heads_major_pair(output.all_key_values[:, slots].detach(), self.n_heads)  # from (B, n, 2d)

    def projected_content_attention(self, queries: torch.Tensor, key_values: torch.Tensor) -> torch.Tensor:
        """Content-only attention (no positions, no mask), the attention-reconstruction loss's, from
        queries W_q x (B, L, d) and keys and values (B, n, 2d) already projected (the caller treats
        this layer's weights as constants). Returns (B, L, d), before the output projection."""
        b, l, d = queries.shape
        k, v = key_values.chunk(2, dim=-1)
        q, k, v = self._heads(queries), self._heads(k), self._heads(v)  # (B, H, L, D), (B, H, n, D) x 2
        differentiated = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        if q.device.type == "cpu" and (q.dtype != torch.float32 or differentiated):
            # PyTorch's CPU flash attention is slow at these shapes (n = n_s / c is small) in bf16,
            # and with a backward in fp32 too: forward and backward for L = 128, n = 32, D = 32 took
            # 6.6 ms in bf16 (a third of a bf16 training step) and 1.9 ms in fp32, against 0.8 and
            # 1.1 ms for these three plain operations (docs/performance.md). Without gradients in
            # fp32 it is the faster (1.3 against 2.4 ms over the n_s = 128 old memories).
            weights = (q @ k.transpose(-1, -2)).mul_(self.scale).softmax(dim=-1)  # (B, H, L, n)
            out = weights @ v  # (B, H, L, D)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
        return out.transpose(1, 2).reshape(b, l, d)
