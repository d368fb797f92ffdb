import contextlib
import math

import pytest
import torch

from helpers import BUILDS, use_build
from still.compressive.attention import (
    RelativeMultiHeadAttention,
    causal_bias,
    causal_mask,
    causal_mask_bias,
    mask_bias,
    padded_causal_bias,
    relative_shift,
    sinusoidal_distances,
)


@pytest.mark.parametrize("grad", [False, True])
def test_relative_shift_aligns_distances(grad):
    b, h, l, k = 2, 3, 4, 7
    raw = torch.randn(b, h, l, k).requires_grad_(grad)  # column m holds the score for distance k - 1 - m
    shifted = relative_shift(raw).detach()
    raw = raw.detach()
    for i in range(l):
        for j in range(k):
            distance = k - l + i - j
            if distance >= 0:
                assert shifted[:, :, i, j].equal(raw[:, :, i, k - 1 - distance])


def test_relative_shift_view_and_copy_agree():
    raw = torch.randn(2, 2, 5, 9)
    mask = causal_mask(5, 9)
    view = relative_shift(raw)  # no grad: the strided view
    copied = relative_shift(raw.clone().requires_grad_())  # grad: a strided copy
    assert torch.equal(view[..., mask], copied.detach()[..., mask])


@pytest.mark.parametrize("shape", [(2, 3, 4, 7), (1, 2, 5, 5), (2, 1, 1, 6)])
def test_relative_shift_gradient(shape):
    """The backward sends each kept entry's gradient to the distance it read (the meaningless
    entries are masked by every caller, so their gradients are zero)."""
    b, h, l, k = shape
    raw = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*shape, dtype=torch.float64) * causal_mask(l, k)  # zero where masked
    (grad,) = torch.autograd.grad(relative_shift(raw), raw, upstream)
    expected = torch.zeros_like(grad)
    for i in range(l):
        for j in range(k - l + i + 1):  # distance k - l + i - j >= 0 sits in column l - 1 - i + j
            expected[:, :, i, l - 1 - i + j] = upstream[:, :, i, j]
    assert torch.equal(grad, expected)


def test_causal_mask():
    mask = causal_mask(3, 5)
    assert mask.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]


def reference_attention(attn: RelativeMultiHeadAttention, x, context):
    """score(i, j) = (q_i + u).k_j + (q_i + v).W_r R_{i-j}, written out position by position."""
    keys_in = torch.cat([context, x], 1)
    b, l, d = x.shape
    k_len = keys_in.shape[1]
    hd, nh = attn.d_head, attn.n_heads
    q = attn.query(x).view(b, l, nh, hd)
    k, v = attn.key_value(keys_in).view(b, k_len, 2, nh, hd).unbind(2)
    distances = torch.arange(k_len, dtype=torch.float32)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = distances[:, None] * inv_freq
    enc = torch.cat([angles.sin(), angles.cos()], -1)  # encoding of distance r at row r
    r = attn.position(enc).view(k_len, nh, hd)
    out = torch.zeros(b, l, nh, hd)
    for i in range(l):
        scores = torch.full((b, nh, k_len), float("-inf"))
        for j in range(k_len):
            dist = k_len - l + i - j
            if dist < 0:
                continue
            scores[:, :, j] = ((q[:, i] + attn.content_bias) * k[:, j]).sum(-1) + \
                ((q[:, i] + attn.position_bias) * r[dist]).sum(-1)
        w = (scores / math.sqrt(hd)).softmax(-1)  # (b, nh, K)
        out[:, i] = torch.einsum("bhk,bkhd->bhd", w, v)
    return attn.out(out.reshape(b, l, d))


@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_the_position_by_position_reference(need_weights):
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(16, 4).eval()
    with torch.no_grad():
        attn.content_bias.normal_()
        attn.position_bias.normal_()
    x, context = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    out, received = attn(x, context, need_weights=need_weights)[:2]
    assert torch.allclose(out, reference_attention(attn, x, context), atol=1e-5)
    if need_weights:
        assert received.shape == (2, 11)
        assert torch.allclose(received.sum(-1), torch.full((2,), 4.0 * 5), atol=1e-4)  # heads x queries


@pytest.mark.parametrize(("b", "l", "p"), [(2, 5, 6), (1, 1, 7), (3, 4, 0), (2, 6, 1), (1, 8, 20)])
def test_inference_matches_the_position_by_position_reference(b, l, p):
    """Without gradients and masked slots: the mask added in place to position scores one column
    wider than the keys (`_causal_attention`), for a segment longer and shorter than its context,
    a single token, and no context."""
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(16, 4).eval()
    with torch.no_grad():
        attn.content_bias.normal_()
        attn.position_bias.normal_()
        x, context = torch.randn(b, l, 16), torch.randn(b, p, 16)
        out = attn(x, context).out
        again = attn(x, context).out  # the cached mask and position projection
    torch.testing.assert_close(out, reference_attention(attn, x, context), atol=1e-6, rtol=1e-5)
    assert torch.equal(out, again)


def test_causal_bias_masks_what_the_view_reads_for_future_keys():
    l, k = 4, 7
    bias = causal_bias(l, k, torch.device("cpu"), torch.float32)
    distances = torch.arange(k, -1, -1.0).expand(l, k + 1).contiguous()  # column c: distance k - c
    read = (distances + bias).as_strided((l, k), (k, 1), l)
    for i in range(l):
        for j in range(k):
            expected = k - l + i - j if j <= k - l + i else float("-inf")
            assert read[i, j] == expected
    assert causal_bias(l, k, torch.device("cpu"), torch.float32) is bias  # cached


def test_padded_causal_bias_also_masks_each_segments_padding():
    l, k, padding = 3, 7, (4, 0, 2)
    bias = padded_causal_bias(l, k, padding, torch.device("cpu"), torch.float32)
    assert bias.shape == (3, 1, l, k + 1)
    for s, pad in enumerate(padding):
        read = bias[s, 0].clone().as_strided((l, k), (k, 1), l)  # what the shifted view reads
        allowed = causal_mask(l, k) & (torch.arange(k) >= pad)
        assert torch.equal(read, mask_bias(allowed, torch.float32)), s
    assert padded_causal_bias(l, k, padding, torch.device("cpu"), torch.float32) is bias  # cached


@pytest.mark.parametrize("b", [1, 2])
def test_segments_stacked_in_the_batch_with_padded_keys_attend_as_each_alone(b):
    """`causal_attention` with `padding`: S segments a row, each over keys of its own padded at the
    front to the longest, give each segment's attention over its own keys alone."""
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(16, 4).eval()
    l, lengths = 3, (3, 8, 5)  # keys per segment: its own 3 after 0, 5 and 2 memories
    k = max(lengths)
    with torch.no_grad():
        attn.content_bias.normal_()
        attn.position_bias.normal_()
        queries = torch.randn(b, len(lengths), l, 16)
        kvs = [torch.randn(b, n, 32) for n in lengths]
        alone = torch.stack([attn.causal_attention(queries[:, s], kv) for s, kv in enumerate(kvs)], 1)
        padded = torch.stack([torch.cat([torch.full((b, k - n, 32), 1e3), kv], 1) for n, kv in zip(lengths, kvs)], 1)
        padding = tuple(k - n for n in lengths)
        stacked = attn.causal_attention(queries.flatten(0, 1), padded.flatten(0, 1), padding)
    torch.testing.assert_close(stacked.view(b, len(lengths), l, 16), alone, atol=1e-6, rtol=1e-5)


def test_fused_and_explicit_paths_agree_with_gradients():
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(16, 2)
    x, context = torch.randn(3, 4, 16, requires_grad=True), torch.randn(3, 8, 16)
    grads = []
    for need_weights in (False, True):
        out = attn(x, context, need_weights=need_weights).out
        x.grad = None
        attn.zero_grad()
        out.square().sum().backward()
        grads.append((out.detach(), x.grad.clone(), attn.position_bias.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_invalid_context_is_masked_out():
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(16, 4).eval()
    x, context = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    out, received = attn(x, context, valid, need_weights=True)[:2]
    garbage = context.clone()
    garbage[1, :2] = 100.0
    out2 = attn(x, garbage, valid).out
    assert torch.allclose(out, out2, atol=1e-5)
    assert received[1, :2].abs().max() == 0


def test_sinusoids_count_down_to_zero():
    enc = sinusoidal_distances(5, 8)
    assert enc.shape == (5, 8)
    assert torch.allclose(enc[-1], torch.tensor([0.0] * 4 + [1.0] * 4))  # distance 0


def test_constant_tables_are_computed_once_and_right():
    """The sinusoids and the training's causal mask bias are cached per shape (every layer and step
    asks for them); the cached values are the definitions."""
    assert sinusoidal_distances(7, 8) is sinusoidal_distances(7, 8)
    # a float64 table computed in float64 (a probe: float32's angles, 7e-5 off at 5000 distances)
    frequencies = 10000 ** -(torch.arange(0, 16, 2.0, dtype=torch.float64) / 16)
    a = torch.arange(4999, -1, -1, dtype=torch.float64)[:, None] * frequencies
    exact = torch.cat([a.sin(), a.cos()], -1)
    assert (sinusoidal_distances(5000, 16, None, torch.float64) - exact).abs().max() < 1e-12
    assert (sinusoidal_distances(5000, 16) - exact).abs().max() > 1e-6  # (float32's own, as before)
    bf16 = sinusoidal_distances(7, 8, None, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.equal(sinusoidal_distances(7, 8).to(torch.bfloat16))
    bias = causal_mask_bias(3, 5, torch.device("cpu"), torch.float32)
    assert bias is causal_mask_bias(3, 5, torch.device("cpu"), torch.float32)
    expected = torch.zeros(3, 5).masked_fill(~causal_mask(3, 5), float("-inf"))
    assert bias.equal(expected) and mask_bias(causal_mask(3, 5), torch.float32).equal(expected)


@pytest.mark.parametrize("exact", [False, True])
def test_position_projection_under_autocast_equals_autocast_of_the_fp32_table(monkeypatch, exact):
    """Under bf16 autocast the sinusoid table goes to W_r already in bf16 (cached): the same
    numbers as autocast casting the fp32 table at every call. Training with
    `EXACT_POSITION_GRADIENT` makes the whole table in fp32 instead; inference keeps bf16."""
    from still.compressive import attention as module

    monkeypatch.setattr(module, "EXACT_POSITION_GRADIENT", exact)
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(16, 4).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = attn.position_projection(9, torch.device("cpu"), torch.float32)
        expected = attn.position(sinusoidal_distances(9, 16)).view(9, 4, 4).transpose(0, 1)
        with torch.no_grad():
            r_eval = attn.eval().position_projection(9, torch.device("cpu"), torch.float32)
    assert r_eval.dtype == torch.bfloat16 and r_eval.equal(expected)
    if exact:
        fp32 = attn.position(sinusoidal_distances(9, 16)).view(9, 4, 4).transpose(0, 1)
        assert r.dtype == torch.float32 and r.equal(fp32) and r.requires_grad
    else:
        assert r.dtype == torch.bfloat16 and r.equal(expected)


def test_projected_context_and_position_cache_match():
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(16, 4).eval()
    x, context = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    reference = attn(x, context)
    with torch.no_grad():
        cached = attn(x, None, context_kv=attn.key_value(context))
        again = attn(x, None, context_kv=attn.key_value(context))  # the position projection, cached
        assert torch.allclose(reference.out, cached.out, atol=1e-6) and torch.equal(cached.out, again.out)
        assert torch.allclose(reference.key_values, cached.key_values)
        attn.position.weight.mul_(2)  # a weight change invalidates the cached position projection
        changed = attn(x, None, context_kv=attn.key_value(context))
    assert not torch.allclose(changed.out, cached.out)


def test_training_scores_in_one_product_match_scaled_dot_product_attention(monkeypatch):
    """The training path (one baddbmm for content + position) against the SDPA path: outputs and
    every gradient, with masked memory slots."""
    from still.compressive import attention as module

    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(32, 4).train()
    x = torch.randn(2, 8, 32, requires_grad=True)
    context = torch.randn(2, 12, 32)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :5] = False
    results = []
    for fused in (False, True):
        monkeypatch.setattr(module, "FUSED_SCORES", fused)
        attn.zero_grad()
        x.grad = None
        out = attn(x, context, valid).out
        (out**2).sum().backward()
        results.append([out.detach(), x.grad.clone(), *(p.grad.clone() for p in attn.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("l,k_len,per_row_mask", [(3, 5, False), (1, 4, False), (4, 4, False), (3, 7, True)])
def test_training_attention_weights_gradients(l, k_len, per_row_mask):
    """The fused training function's hand-written backward (softmax, shift back, four products)
    against numerical gradients, in float64, with and without a per-row mask of memory slots."""
    from still.compressive.attention import _AttentionWeights, mask_bias

    torch.manual_seed(0)
    h, b, d = 2, 3, 4
    q_content = torch.randn(h * b, l, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(h * b, k_len, d, dtype=torch.float64, requires_grad=True)
    q_position = torch.randn(h, b * l, d, dtype=torch.float64, requires_grad=True)
    r = torch.randn(h, k_len, d, dtype=torch.float64, requires_grad=True)
    allowed = causal_mask(l, k_len)
    if per_row_mask:
        valid = torch.ones(b, k_len, dtype=torch.bool)
        valid[1, :2] = False
        allowed = (allowed & valid[:, None, :])[None]  # (1, B, L, K)
    bias = mask_bias(allowed, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: _AttentionWeights.apply(*t, bias), (q_content, k, q_position, r))
    # and the forward is the definition: softmax over (content + shifted position) scores
    weights = _AttentionWeights.apply(q_content, k, q_position, r, bias)
    position = (q_position @ r.transpose(1, 2)).view(h * b, l, k_len)
    for i in range(l):
        for j in range(k_len):
            if j > k_len - l + i:
                position[:, i, j] = float("-inf")
            else:
                position[:, i, j] = (q_position.view(h * b, l, d)[:, i]
                                     * r.repeat_interleave(b, 0)[:, k_len - 1 - (k_len - l + i - j)]).sum(-1)
    scores = (q_content @ k.transpose(1, 2) + position).view(h, b, l, k_len).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(weights, scores.view(h * b, l, k_len).softmax(-1))


@pytest.mark.parametrize("under_autocast", [False, True])
def test_fp32_position_scores_round_only_the_content_scores_and_the_weights_in_bf16(monkeypatch, under_autocast):
    """With FP32_POSITION_SCORES a bf16 forward's weights are softmax(fp32 position scores + the bf16
    content product + mask) rounded once to bf16: the position scores are not rounded, and the
    weights come out nearer the fp32 computation's than without it. fp32 inputs give the same
    weights bit for bit either way."""
    from still.compressive import attention as module
    from still.compressive.attention import _AttentionWeights, _shifted_view

    torch.manual_seed(0)
    h, b, l, k_len, d = 2, 3, 16, 40, 8
    bf16 = torch.bfloat16
    q_content, k, q_position, r = (t.to(bf16) for t in (
        torch.randn(h * b, l, d), torch.randn(h * b, k_len, d), 4 * torch.randn(h, b * l, d), torch.randn(h, k_len, d)))
    bias = causal_mask_bias(l, k_len, torch.device("cpu"), bf16)  # position scores of about +-10, content +-3
    operands = (q_content, k, q_position, r)
    exact = _AttentionWeights.apply(*(t.float() for t in operands), bias.float())  # fp32 from the same operands
    position = torch.bmm(q_position.float(), r.float().transpose(1, 2)).view(h * b, l, k_len)
    content = torch.bmm(q_content, k.transpose(1, 2)).float()  # a bf16 product: rounded
    scores = (_shifted_view(position) + content).view(h, b, l, k_len) + bias.float()
    want = scores.view(h * b, l, k_len).softmax(-1).to(bf16)

    def weights(fp32: bool) -> torch.Tensor:
        monkeypatch.setattr(module, "FP32_POSITION_SCORES", fp32)
        with torch.autocast("cpu", dtype=bf16, enabled=under_autocast):
            out = _AttentionWeights.apply(*operands, bias)
        assert out.dtype == bf16
        return out.float()

    torch.testing.assert_close(weights(True), want.float(), atol=2e-3, rtol=0)  # one bf16 rounding apart at most
    assert (weights(True) - exact).abs().max() < 0.5 * (weights(False) - exact).abs().max()
    for fp32 in (False, True):
        monkeypatch.setattr(module, "FP32_POSITION_SCORES", fp32)
        assert torch.equal(_AttentionWeights.apply(*(t.float() for t in operands), bias.float()), exact)


def test_content_attention_under_cpu_bf16_autocast_matches_fp32():
    """The reconstruction loss's content attention: under bf16 autocast on the CPU it is written as
    plain products (not PyTorch's flash kernel); its output and gradients match fp32 to bf16 precision."""
    torch.manual_seed(0)
    attention = RelativeMultiHeadAttention(d_model=32, n_heads=4)
    queries = torch.randn(2, 12, 32)  # (B, L, d)
    key_values = torch.randn(2, 5, 64, requires_grad=True)  # (B, n, 2d)
    out32 = attention.projected_content_attention(queries, key_values)
    (grad32,) = torch.autograd.grad(out32.square().sum(), key_values)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = attention.projected_content_attention(queries.bfloat16(), key_values.bfloat16())
    assert out16.dtype == torch.bfloat16 and out16.shape == (2, 12, 32)
    (grad16,) = torch.autograd.grad(out16.float().square().sum(), key_values)
    assert torch.allclose(out16.float(), out32, atol=3e-2, rtol=3e-2)
    assert (grad16 - grad32).norm() < 0.03 * grad32.norm()
    # the fp32 reference itself: softmax(q k^T / sqrt(D)) v per head
    q, k, v = queries.view(2, 12, 4, 8).transpose(1, 2), *key_values.detach().view(2, 5, 2, 4, 8).permute(2, 0, 3, 1, 4)
    expected = ((q @ k.transpose(-1, -2)) / math.sqrt(8)).softmax(-1) @ v  # (B, H, L, D)
    assert torch.allclose(out32, expected.transpose(1, 2).reshape(2, 12, 32), atol=1e-5)


@pytest.mark.parametrize("cached", [False, True])
def test_inference_scores_match_scaled_dot_product_attention(monkeypatch, cached):
    """CPU inference in a dtype other than fp32 (bf16 in use; float64 here, to compare tightly)
    builds the scores heads-major too: the same outputs as the SDPA path, with masked memory
    slots, from the context or from its cached keys and values."""
    from still.compressive import attention as module

    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(32, 4).eval().double()
    with torch.no_grad():
        attn.content_bias.normal_()
        attn.position_bias.normal_()
    x, context = torch.randn(2, 8, 32, dtype=torch.float64), torch.randn(2, 12, 32, dtype=torch.float64)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :5] = False
    context_kv = attn.key_value(context).detach() if cached else None
    outs = []
    with torch.no_grad():
        for fused in (False, True):
            monkeypatch.setattr(module, "FUSED_SCORES", fused)
            for mask in (None, valid):
                outs.append(attn(x, None if cached else context, mask, context_kv=context_kv).out)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(outs[3], outs[1], atol=1e-10, rtol=1e-9)  # (the SDPA path: tested above)


def test_inference_takes_the_causal_path_in_bf16_as_in_fp32(monkeypatch):
    """Inference without masked slots runs `_causal_attention` in every dtype (the heads-major path
    was slower there for bf16 inference, docs/performance.md, session 18); over masked slots bf16
    inference on the CPU runs the heads-major path (faster there at 8 and 16 rows), as training does."""
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(32, 4).eval()
    x, context = torch.randn(2, 8, 32), torch.randn(2, 12, 32)
    calls = []
    fused, causal = attn._fused_attention, attn._causal_attention
    monkeypatch.setattr(attn, "_fused_attention", lambda *a: calls.append("fused") or fused(*a))
    monkeypatch.setattr(attn, "_causal_attention", lambda *a: calls.append("causal") or causal(*a))
    with torch.no_grad():
        expected = attn(x, context).out
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, context).out
    assert calls == ["causal", "causal"] and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.03, rtol=0.03)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :5] = False  # masked slots: the heads-major path in bf16 on the CPU, the explicit one in fp32
    with torch.no_grad():
        expected = attn(x, context, valid).out
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, context, valid).out
    assert calls == ["causal", "causal", "fused"]
    assert torch.allclose(out.float(), expected, atol=0.03, rtol=0.03)
    attn.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, context)
    assert calls[-1] == "fused"  # training


def test_content_attention_with_and_without_gradients_agree():
    """fp32 on the CPU: plain products when the keys and values need a gradient (the compressed
    memories), PyTorch's fused kernel when not (the old memories); both give the same values, and the
    plain path's gradients are those of the fused kernel."""
    torch.manual_seed(1)
    attention = RelativeMultiHeadAttention(d_model=32, n_heads=4)
    queries = torch.randn(2, 12, 32)
    key_values = torch.randn(2, 5, 64, requires_grad=True)
    plain = attention.projected_content_attention(queries, key_values)  # differentiated: plain products
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), key_values)
    with torch.no_grad():
        fused = attention.projected_content_attention(queries, key_values)
    torch.testing.assert_close(plain.detach(), fused)
    k, v = key_values.view(2, 5, 2, 4, 8).permute(2, 0, 3, 1, 4)  # (B, H, n, D) each
    reference = torch.nn.functional.scaled_dot_product_attention(queries.view(2, 12, 4, 8).transpose(1, 2), k, v)
    (grad_reference,) = torch.autograd.grad(reference.square().sum(), key_values)
    torch.testing.assert_close(grad_plain, grad_reference)


def test_training_attention_under_cpu_bf16_autocast_matches_fp32():
    """With gradients, the heads-major path: under bf16 autocast (the biases u and v added in bf16)
    its output and the gradients of u, v and the input match fp32 to bf16 precision."""
    torch.manual_seed(2)
    attention = RelativeMultiHeadAttention(d_model=32, n_heads=4)
    with torch.no_grad():
        attention.content_bias.normal_()
        attention.position_bias.normal_()
    x = torch.randn(2, 6, 32, requires_grad=True)
    context = torch.randn(2, 9, 32)
    params = [x, attention.content_bias, attention.position_bias]

    def run(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = attention(x, context).out
        return [out.float(), *torch.autograd.grad(out.float().square().sum(), params)]

    for a, b in zip(run(True), run(False)):
        assert (a - b).norm() < 0.03 * b.norm()


def test_switching_to_eval_drops_the_position_cache():
    """A weight written without a version bump (as PyTorch's fused optimizers write) is seen by the
    next evaluation, since model.eval() drops the cached W_r R."""
    torch.manual_seed(3)
    attention = RelativeMultiHeadAttention(d_model=16, n_heads=2).eval()
    x, context = torch.randn(1, 4, 16), torch.randn(1, 3, 16)
    with torch.no_grad():
        before = attention(x, context).out
        attention.position.weight.data.mul_(2.0)  # no version bump
        attention.train().eval()
        after = attention(x, context).out
        attention._positions = None
        fresh = attention(x, context).out
        cache = attention._positions
        attention.eval()  # already in eval mode: the cache is kept
        assert attention._positions is cache
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
    assert not torch.equal(before, after)


def test_linear_over_constants_matches_linear_over_the_concatenation():
    """`_LinearOverConstants` against `F.linear` of the concatenation, in float64: the output, and the
    gradients of the tail, the weight and the bias (its backward makes none for the constant head)."""
    from still.compressive.attention import _LinearOverConstants

    torch.manual_seed(0)
    head = torch.randn(2, 5, 6, dtype=torch.float64)
    tail = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(_LinearOverConstants.apply, (head, tail, weight, bias))
    torch.autograd.gradcheck(_LinearOverConstants.apply, (head, tail, weight, None))
    out = _LinearOverConstants.apply(head, tail, weight, bias)
    torch.testing.assert_close(out, torch.nn.functional.linear(torch.cat([head, tail], 1), weight, bias))
    assert out.shape == (2, 8, 4)


def test_linear_over_constants_under_cpu_bf16_autocast():
    """Under autocast: the product in bf16, the gradients in the inputs' own dtypes (fp32), equal to
    what autocast's linear gives for the same product."""
    from still.compressive.attention import _LinearOverConstants

    torch.manual_seed(0)
    head, tail = torch.randn(2, 5, 16), torch.randn(2, 3, 16, requires_grad=True)
    weight, bias = torch.randn(8, 16, requires_grad=True), torch.randn(8, requires_grad=True)
    grads = []
    for ours in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = (_LinearOverConstants.apply(head, tail, weight, bias) if ours
                   else torch.nn.functional.linear(torch.cat([head, tail], 1), weight, bias))
        assert out.dtype == torch.bfloat16
        grads.append((out, *torch.autograd.grad(out.float().square().sum(), (tail, weight, bias))))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("with_bias", [True, False])
def test_heads_major_projection_over_constants_is_the_linear_map_laid_out_by_head(with_bias):
    """`_HeadsMajorLinearOverConstants`: F.linear over [head, tail] with its (B, K, [k, v], H, D)
    output rearranged to (H*B, K, D) keys and values; gradients for the tail, the weight and the
    bias by gradcheck, and none for the head (the memories, a constant)."""
    from still.compressive.attention import _HeadsMajorLinearOverConstants

    torch.manual_seed(0)
    b, p, l, heads, dh = 2, 5, 3, 2, 3
    d = heads * dh
    head = torch.randn(b, p, d, dtype=torch.float64)
    tail = torch.randn(b, l, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2 * d, d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2 * d, dtype=torch.float64, requires_grad=True) if with_bias else None
    k, v = _HeadsMajorLinearOverConstants.apply(head, tail, weight, bias, heads)
    kv = torch.nn.functional.linear(torch.cat([head, tail], 1), weight, bias)  # (B, K, 2d)
    expected = kv.view(b, p + l, 2, heads, dh).permute(2, 3, 0, 1, 4).reshape(2, heads * b, p + l, dh)
    torch.testing.assert_close(k, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, expected[1], rtol=1e-12, atol=1e-12)
    inputs = (tail, weight) + ((bias,) if with_bias else ())
    fn = (lambda t, w, c: _HeadsMajorLinearOverConstants.apply(head, t, w, c, heads)) if with_bias else (
        lambda t, w: _HeadsMajorLinearOverConstants.apply(head, t, w, None, heads))
    assert torch.autograd.gradcheck(fn, inputs)
    (only_keys,) = torch.autograd.grad(k.sum(), weight)  # a value gradient left out: the values' rows get zeros
    assert only_keys[:d].abs().sum() > 0 and torch.equal(only_keys[d:], torch.zeros_like(only_keys[d:]))


@pytest.mark.parametrize("heads_major", [True, False])
@pytest.mark.parametrize("with_context", [True, False])
def test_pre_norm_folded_into_the_projections_matches_applying_it(monkeypatch, with_context, heads_major):
    """Training with pre-LN: LN1's affine folded into W_q and W_kv, the memories projected as
    constants (their keys and values heads-major out of the product, or laid out after it), against
    LN1 applied and one product over [context, x]: outputs, the projections the reconstruction loss
    reuses, and the gradients of x, LN1's affine and every weight."""
    from still.compressive import attention as module

    monkeypatch.setattr(module, "HEADS_MAJOR_PROJECTION", heads_major)

    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(32, 4).train().double()
    norm = torch.nn.LayerNorm(32).double()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.5)
        attn.content_bias.normal_()
        attn.position_bias.normal_()
    x = torch.randn(2, 8, 32, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 12, 32, dtype=torch.float64) if with_context else None
    parameters = [*attn.parameters(), *norm.parameters()]
    results = []
    for folded in (False, True):
        monkeypatch.setattr(module, "FOLDED_NORM", folded)
        out = attn(x, context, norm=norm)
        k, v = out.key_values_by_head  # (H*B, K, D) each, on every training path
        loss = out.out.square().sum() + out.queries.sin().sum() + k.cos().sum() + v.sin().sum()
        results.append([out.out, out.queries, k, v, *torch.autograd.grad(loss, [x, *parameters])])
        made_heads_major = out.all_key_values is None
    assert made_heads_major == (heads_major and with_context)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_pre_norm_folding_leaves_a_context_that_needs_gradients_to_autograd(monkeypatch):
    """A context that needs a gradient (not the model's detached memories) gets one, as with LN1
    applied."""
    from still.compressive import attention as module

    torch.manual_seed(0)
    attn, norm = RelativeMultiHeadAttention(16, 2).train().double(), torch.nn.LayerNorm(16).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    context = torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)
    grads = []
    for folded in (False, True):
        monkeypatch.setattr(module, "FOLDED_NORM", folded)
        (grad,) = torch.autograd.grad(attn(x, context, norm=norm).out.sum(), context)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def _native_kernel_or_skip():
    from still.compressive import native

    if native.attention_library() is None:
        pytest.skip("the bf16 attention kernel cannot run here (no compiler or no AVX-512 bf16)")


@pytest.mark.parametrize("h,b,l,k_len,d,per_row_mask", [(2, 3, 16, 48, 32, False), (4, 2, 32, 32, 64, False),
                                                        (2, 3, 32, 96, 64, True), (1, 1, 16, 16, 96, True)])
def test_native_weights_are_the_fp32_scores_softmax_rounded_once(monkeypatch, h, b, l, k_len, d, per_row_mask,
                                                                  bf16_products):
    """The bf16 kernel (`NATIVE_SCORES`, bf16 on the CPU): its weights are the softmax of the fp32
    scores of the bf16 operands (content + shifted position + mask), each rounded once to bf16, with
    exact zeros at masked keys; nearer the exact weights than the PyTorch bf16 path; the same bits on
    one thread or several; and the backward the same function of them as the PyTorch path's."""
    from still.compressive import attention as module
    from still.compressive.attention import _AttentionWeights, _shifted_view, mask_bias

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    q_content, k, q_position, r = (t.to(bf16) for t in (
        torch.randn(h * b, l, d), torch.randn(h * b, k_len, d), 0.5 * torch.randn(h, b * l, d),
        torch.randn(h, k_len, d)))
    allowed = causal_mask(l, k_len)
    if per_row_mask:
        valid = torch.ones(b, k_len, dtype=torch.bool)
        valid[-1, : k_len - l] = False  # the last row's memory slots empty (keys of its own segment stay)
        valid[0, 3] = False
        allowed = (allowed & valid[:, None, :])[None]  # (1, B, L, K)
    bias = mask_bias(allowed, bf16)
    operands = (q_content, k, q_position, r)
    position = torch.bmm(q_position.double(), r.double().transpose(1, 2)).view(h * b, l, k_len)
    scores = _shifted_view(position) + torch.bmm(q_content.double(), k.double().transpose(1, 2))
    exact = (scores.view(h, b, l, k_len) + bias.double()).view(h * b, l, k_len).softmax(-1)

    def weights(native: bool, threads: int = 1) -> torch.Tensor:
        monkeypatch.setattr(module, "NATIVE_SCORES", native)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return _AttentionWeights.apply(*operands, bias)
        finally:
            torch.set_num_threads(before)

    out = weights(True)
    assert out.dtype == bf16 and out.shape == (h * b, l, k_len)
    masked = ~allowed.expand(1, b, l, k_len).expand(h, b, l, k_len).reshape(h * b, l, k_len)
    assert torch.equal(out[masked], torch.zeros_like(out[masked]))
    # at most the one rounding to bf16 (8 significant bits) from the exact weights, and the sum's error
    assert ((out.double() - exact).abs() <= exact * 2**-8 + 1e-6).all()
    assert (out.double() - exact).abs().max() < 0.5 * (weights(False).double() - exact).abs().max()
    assert torch.equal(weights(True, threads=3), out)
    if not per_row_mask:  # the cached causal bias: the kernel applies the mask itself, the same weights
        bias = causal_mask_bias(l, k_len, torch.device("cpu"), bf16)
        assert torch.equal(weights(True), out)

    # the backward (the PyTorch path's, from the saved weights) near the exact one
    grad = torch.randn(h * b, l, k_len, dtype=torch.float64)
    exact_inputs = [t.double().requires_grad_() for t in operands]
    exact_position = torch.bmm(exact_inputs[2], exact_inputs[3].transpose(1, 2)).view(h * b, l, k_len)
    exact_scores = _shifted_view(exact_position) + torch.bmm(exact_inputs[0], exact_inputs[1].transpose(1, 2))
    ((exact_scores.view(h, b, l, k_len) + bias.double()).view(h * b, l, k_len).softmax(-1) * grad).sum().backward()
    inputs = [t.clone().requires_grad_() for t in operands]
    monkeypatch.setattr(module, "NATIVE_SCORES", True)
    _AttentionWeights.apply(*inputs, bias).backward(grad.to(bf16))
    for got, want in zip(inputs, exact_inputs):
        assert (got.grad.double() - want.grad).norm() < 0.03 * want.grad.norm()


@pytest.mark.parametrize("g,l,k_len", [(6, 16, 48), (3, 5, 5), (2, 7, 40)])
def test_native_backward_is_the_softmax_backward_and_its_shift(g, l, k_len):
    """The backward's first pass in `native_attention.cpp`: the scores' gradient as PyTorch's bf16
    softmax backward computes it (to one bf16 rounding: the sums run in another order), exactly 0 at
    masked scores, and the position scores' gradient the same shifted back, zeros before; any
    lengths; the same bits on one thread or several."""
    _native_kernel_or_skip()
    from still.compressive.attention import _native_backward, _scores_backward

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    allowed = causal_mask(l, k_len).clone()
    allowed[:, 1] = False  # an empty memory slot
    allowed[:, -1] = True if l == k_len else allowed[:, -1]
    scores = torch.randn(g, l, k_len).masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(-1).to(bf16)
    grad = torch.randn(g, l, k_len).to(bf16)
    grad_scores, raw = _native_backward(weights, grad, bf16)
    want_scores, want_raw = _scores_backward(weights, grad, bf16)
    assert grad_scores.dtype == raw.dtype == bf16
    assert torch.equal(grad_scores[:, ~allowed], torch.zeros_like(grad_scores[:, ~allowed]))
    exact = weights.double() * (grad.double() - (weights.double() * grad.double()).sum(-1, keepdim=True))
    assert ((grad_scores.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-12).all()
    assert ((grad_scores.double() - want_scores.double()).abs() <= exact.abs() * 2**-7 + 1e-12).all()
    for i in range(l):  # raw[i, c] = grad_scores[i, c - (L - 1 - i)]
        shift = l - 1 - i
        assert torch.equal(raw[:, i, :shift], torch.zeros_like(raw[:, i, :shift]))
        assert torch.equal(raw[:, i, shift:], grad_scores[:, i, : k_len - shift])
    torch.testing.assert_close(raw.float(), want_raw.float(), rtol=2**-7, atol=1e-12)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert all(torch.equal(a, b) for a, b in zip(_native_backward(weights, grad, bf16), (grad_scores, raw)))
    finally:
        torch.set_num_threads(before)


def _allowed(b: int, l: int, k_len: int, per_row_mask: bool) -> torch.Tensor:
    """The causal mask (L, K); with `per_row_mask`, also empty memory slots: all of the last row's
    and one of the first's, (1, B, L, K)."""
    allowed = causal_mask(l, k_len)
    if per_row_mask:
        valid = torch.ones(b, k_len, dtype=torch.bool)
        valid[-1, : k_len - l] = False
        valid[0, 5] = False
        allowed = (allowed & valid[:, None, :])[None]  # (1, B, L, K)
    return allowed


@pytest.mark.parametrize("h,b,l,k_len,d,per_row_mask,r_dtype", [
    (2, 3, 32, 96, 32, False, torch.float32), (1, 2, 64, 64, 64, True, torch.float32),
    (2, 2, 32, 128, 96, True, torch.bfloat16), (4, 8, 128, 384, 32, False, torch.float32)])
def test_native_grads_are_the_first_pass_then_the_four_products(monkeypatch, h, b, l, k_len, d, per_row_mask,
                                                                r_dtype, bf16_products):
    """`NATIVE_GRADS`: the backward's first pass and its four products in one call of the kernel give
    the gradients of the content and position queries and of the keys as the first pass followed by
    PyTorch's bf16 products do (to one bf16 rounding: the sums may run in another order); r's
    gradient summed in fp32 before any rounding, so nearer the exact one (float64, from the same
    weights' gradient), and centred over the distances where r came in fp32; the same bits on one
    thread or several; and lengths not multiples of 32 left to the two-step path."""
    from still.compressive import attention as module
    from still.compressive.attention import _AttentionWeights, mask_bias

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    operands = [(0.3 * torch.randn(h * b, l, d)).to(bf16), torch.randn(h * b, k_len, d).to(bf16),
                (0.3 * torch.randn(h, b * l, d)).to(bf16), torch.randn(h, k_len, d).to(r_dtype)]
    allowed = _allowed(b, l, k_len, per_row_mask)
    bias = mask_bias(allowed, bf16)
    grad = torch.randn(h * b, l, k_len).to(bf16)

    def grads(fused: bool, threads: int = 1) -> list[torch.Tensor]:
        monkeypatch.setattr(module, "NATIVE_GRADS", fused)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            inputs = [t.clone().requires_grad_() for t in operands]
            _AttentionWeights.apply(*inputs, bias).backward(grad)
            return [t.grad for t in inputs]
        finally:
            torch.set_num_threads(before)

    fused, plain = grads(True), grads(False)
    for got, want in zip(fused[:3], plain[:3]):
        assert got.dtype == bf16
        scale = want.double().abs()
        assert ((got.double() - want.double()).abs() <= 2**-7 * scale + 1e-3 * scale.max()).all()
    assert fused[3].dtype == r_dtype
    # r's exact gradient from the same weights' gradient: sum over rows of raw^T q_position, in float64
    with torch.no_grad():
        weights = _AttentionWeights.apply(*operands, bias).double()
    ds = weights * (grad.double() - (weights * grad.double()).sum(-1, keepdim=True))  # (G, L, K)
    raw = torch.zeros(h * b, l, k_len, dtype=torch.float64)
    for i in range(l):
        raw[:, i, l - 1 - i :] = ds[:, i, : k_len - (l - 1 - i)]
    exact_r = torch.bmm(raw.view(h, b * l, k_len).transpose(1, 2), operands[2].double())  # (H, K, D)
    if r_dtype == torch.float32:
        exact_r = exact_r - exact_r.mean(dim=1, keepdim=True)
        assert fused[3].double().sum(dim=1).abs().max() < 1e-4 * fused[3].double().abs().max() * k_len
    assert (fused[3].double() - exact_r).norm() <= (plain[3].double() - exact_r).norm() + 1e-6 * exact_r.norm()
    assert (fused[3].double() - exact_r).norm() < 2**-7 * exact_r.norm()
    assert all(torch.equal(a, c) for a, c in zip(grads(True, threads=3), fused))



def _outputs_and_grads(h, b, l, k_len, d, per_row_mask):
    """run(dtype, combined, threads): `_AttentionOutputs` (combined) or `_AttentionWeights` and a
    product, forward and backward on the same random operands -> [out, grads of q_content, k, v,
    q_position, r]."""
    from still.compressive.attention import _AttentionOutputs, _AttentionWeights, mask_bias

    torch.manual_seed(0)
    operands = [0.3 * torch.randn(h * b, l, d), torch.randn(h * b, k_len, d), torch.randn(h * b, k_len, d),
                0.3 * torch.randn(h, b * l, d), torch.randn(h, k_len, d)]
    allowed = _allowed(b, l, k_len, per_row_mask)
    grad = torch.randn(h * b, l, d)

    def run(dtype, combined: bool, threads: int = 1):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            inputs = [t.to(dtype).requires_grad_() for t in operands]
            if dtype == torch.bfloat16:  # r stays fp32, as under autocast
                inputs[4] = operands[4].clone().requires_grad_()
            bias = mask_bias(allowed, dtype)
            q_content, k, v, q_position, r = inputs
            if combined:
                out = _AttentionOutputs.apply(q_content, k, v, q_position, r, bias)
            else:
                out = torch.bmm(_AttentionWeights.apply(q_content, k, q_position, r, bias), v)
            out.backward(grad.to(dtype))
            return [out.detach()] + [t.grad for t in inputs]
        finally:
            torch.set_num_threads(before)

    return run


OUTPUT_SHAPES = [(2, 3, 32, 96, 32, False), (1, 2, 64, 64, 64, True), (4, 8, 128, 384, 32, False)]


@pytest.mark.parametrize("h,b,l,k_len,d,per_row_mask", OUTPUT_SHAPES)
def test_attention_outputs_in_float64_are_the_weights_times_the_values(h, b, l, k_len, d, per_row_mask):
    """`_AttentionOutputs` (the weights and their product with the values as one function): in
    float64 the same output and gradients as `_AttentionWeights` followed by a product."""
    run = _outputs_and_grads(h, b, l, k_len, d, per_row_mask)
    for a, c in zip(run(torch.float64, True), run(torch.float64, False)):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("h,b,l,k_len,d,per_row_mask", OUTPUT_SHAPES)
def test_attention_outputs_are_the_weights_times_the_values(monkeypatch, h, b, l, k_len, d, per_row_mask,
                                                            bf16_products):
    """`_AttentionOutputs` in bf16 through the kernel: its product with the values as PyTorch's of
    the same weights (to a bf16 rounding); with the kernel's backward (`NATIVE_GRADS`), the weights'
    gradient computed inside from the output's in fp32, every input's gradient at least as near the
    exact one (float64 from the same bf16 operands) as the two-step path's, within 2% of it; the
    same bits on one thread or several."""
    from still.compressive import attention as module

    run = _outputs_and_grads(h, b, l, k_len, d, per_row_mask)
    exact = run(torch.float64, True)
    fused = run(torch.bfloat16, True)
    monkeypatch.setattr(module, "NATIVE_GRADS", False)
    two_step = run(torch.bfloat16, True)
    monkeypatch.setattr(module, "NATIVE_GRADS", True)
    assert torch.equal(fused[0], two_step[0])  # the same forward
    # the kernel's product with the values (made as the weights are) against PyTorch's of the same weights
    separate = run(torch.bfloat16, False)
    torch.testing.assert_close(fused[0].float(), separate[0].float(), rtol=2**-7, atol=1e-3)
    assert (fused[0].double() - exact[0]).norm() < 0.01 * exact[0].norm()
    for got, other, want in zip(fused[1:], two_step[1:], exact[1:]):
        error = (got.double() - want).norm()
        assert error < 0.02 * want.norm()
        assert error <= 1.05 * (other.double() - want).norm()
    assert all(torch.equal(a, c) for a, c in zip(run(torch.bfloat16, True, threads=3), fused))


def test_attention_outputs_with_fp32_weights_and_bf16_values():
    """As CUDA's autocast gives them (the softmax in fp32, the values' projection in bf16): the
    product in the values' dtype, and the gradients those of the same steps differentiated by
    autograd (the weights cast to bf16 for the product), in each input's dtype."""
    from still.compressive.attention import _AttentionOutputs, _AttentionWeights, causal_mask_bias

    torch.manual_seed(0)
    h, b, l, k_len, d = 2, 2, 8, 24, 16
    operands = [torch.randn(h * b, l, d), torch.randn(h * b, k_len, d), torch.randn(h * b, k_len, d).bfloat16(),
                torch.randn(h, b * l, d), torch.randn(h, k_len, d)]
    bias = causal_mask_bias(l, k_len, torch.device("cpu"), torch.float32)
    grad = torch.randn(h * b, l, d).bfloat16()
    results = []
    for combined in (True, False):
        inputs = [t.clone().requires_grad_() for t in operands]
        q_content, k, v, q_position, r = inputs
        if combined:
            out = _AttentionOutputs.apply(q_content, k, v, q_position, r, bias)
        else:
            out = torch.bmm(_AttentionWeights.apply(q_content, k, q_position, r, bias).bfloat16(), v)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in inputs])
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


def _packed_run(attn, norm, x0, context, key_valid, threads=1):
    """The attention under bf16 autocast in training, forward and backward with a fixed output
    gradient: [output, grads of x and every parameter] and the AttentionOutput."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            out = attn(x, context, key_valid, norm=norm)
        grad = torch.randn(out.out.shape, generator=torch.Generator().manual_seed(5))
        params = [x, *attn.parameters(), *norm.parameters()]
        grads = torch.autograd.grad((out.out.float() * grad).sum(), params)
        return [out.out.detach(), *grads], out
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("d_model,heads,l,p,masked", [(128, 4, 64, 64, False), (128, 2, 32, 96, True),
                                                      (64, 2, 32, 0, False)])
def test_packed_key_values_give_the_heads_major_paths_bits(monkeypatch, bf16_products, d_model, heads, l, p,
                                                           masked):
    """`PACKED_KEY_VALUES`: the kernel reading the keys and values where their projection wrote them
    (B, K, 2d), writing their gradients there and the output as (B, L, d), gives bit for bit what
    the heads-major copies give (output, the gradients of the input and of every weight), on one
    thread or several; over memories, without, and with masked memory slots; and it did run."""
    from still.compressive import attention as module

    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(d_model, heads).train()
    norm = torch.nn.LayerNorm(d_model)
    with torch.no_grad():
        attn.content_bias.normal_()
        attn.position_bias.normal_()
        norm.weight.normal_(1.0, 0.2)
    x = torch.randn(2, l, d_model)
    context = torch.randn(2, p, d_model) if p else None
    key_valid = None
    if masked:
        key_valid = torch.ones(2, p, dtype=torch.bool)
        key_valid[1, : p // 2] = False
    calls = []
    packed = module._PackedAttentionOutputs.apply
    monkeypatch.setattr(module._PackedAttentionOutputs, "apply", lambda *a: calls.append(1) or packed(*a))
    monkeypatch.setattr(module, "PACKED_KEY_VALUES", False)
    want, _ = _packed_run(attn, norm, x, context, key_valid)
    assert not calls
    monkeypatch.setattr(module, "PACKED_KEY_VALUES", True)
    got, out = _packed_run(attn, norm, x, context, key_valid)
    assert calls  # the packed path ran ...
    assert out.key_values_by_head is None and out.all_key_values.shape == (2, p + l, 2 * d_model)  # ... in place
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    threaded, _ = _packed_run(attn, norm, x, context, key_valid, threads=3)
    assert all(torch.equal(a, b) for a, b in zip(threaded, want))


def test_packed_key_values_in_inference_over_masked_slots(monkeypatch, bf16_products):
    """bf16 inference over masked memory slots (evaluation after a reset row) takes the packed path
    too, from the memories or from their cached keys and values: the copies' bits."""
    from still.compressive import attention as module

    torch.manual_seed(0)
    attn, norm = RelativeMultiHeadAttention(64, 2).eval(), torch.nn.LayerNorm(64)
    x, context = torch.randn(2, 32, 64), torch.randn(2, 64, 64)
    key_valid = torch.ones(2, 64, dtype=torch.bool)
    key_valid[0, :40] = False
    calls = []
    packed = module._PackedAttentionOutputs.apply
    monkeypatch.setattr(module._PackedAttentionOutputs, "apply", lambda *a: calls.append(1) or packed(*a))
    outs = {}
    for flag in (False, True):
        monkeypatch.setattr(module, "PACKED_KEY_VALUES", flag)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            from_memories = attn(x, context, key_valid, norm=norm).out
            from_cache = attn(norm(x), None, key_valid, context_kv=attn.key_value(norm(context))).out
        outs[flag] = (from_memories, from_cache)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))


def test_packed_attention_declines_an_empty_batch_or_segment(bf16_products):
    """No rows, or no queries: the packed path declines (the kernel would refuse them)."""
    from still.compressive import attention as module

    bf16 = torch.bfloat16
    r, bias = torch.zeros(2, 64, 32), module.causal_mask_bias(32, 64, torch.device("cpu"), bf16)
    assert module._packed_kernel_takes(torch.zeros(2, 32, 32, dtype=bf16), torch.zeros(1, 64, 128, dtype=bf16),
                                       torch.zeros(2, 32, 32, dtype=bf16), r, bias, 2)
    assert not module._packed_kernel_takes(torch.zeros(0, 32, 32, dtype=bf16), torch.zeros(0, 64, 128, dtype=bf16),
                                           torch.zeros(2, 0, 32, dtype=bf16), r, bias, 2)
    empty_bias = module.causal_mask_bias(0, 64, torch.device("cpu"), bf16)
    assert not module._packed_kernel_takes(torch.zeros(2, 0, 32, dtype=bf16), torch.zeros(1, 64, 128, dtype=bf16),
                                           torch.zeros(2, 0, 32, dtype=bf16), r, empty_bias, 2)


def test_packed_key_values_backward_falls_back_to_copies(monkeypatch, bf16_products):
    """Should the kernel refuse the packed backward, `_PackedAttentionOutputs` takes the heads-major
    path's backward from copies of kv: the same bits."""
    from still.compressive import attention as module

    torch.manual_seed(0)
    attn, norm = RelativeMultiHeadAttention(64, 2).train(), torch.nn.LayerNorm(64)
    x, context = torch.randn(2, 32, 64), torch.randn(2, 32, 64)
    want, _ = _packed_run(attn, norm, x, context, None)
    monkeypatch.setattr(module, "_native_packed_grads", lambda *a: None)
    got, _ = _packed_run(attn, norm, x, context, None)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_packed_key_values_only_where_the_kernel_takes_everything(monkeypatch, bf16_products):
    """The packed path declines (and the heads-major one runs) for lengths or head dims not multiples
    of 32, fp32, attention dropout in training, and with `NATIVE_GRADS` off; the kernel refuses a
    layout whose row stride is odd or shorter than a row."""
    import ctypes

    from still.compressive import attention as module, native

    calls = []
    packed = module._PackedAttentionOutputs.apply
    monkeypatch.setattr(module._PackedAttentionOutputs, "apply", lambda *a: calls.append(1) or packed(*a))
    torch.manual_seed(0)

    def ran(d_model=64, heads=2, l=32, dropout_attn=0.0, autocast=True) -> bool:
        calls.clear()
        attn, norm = RelativeMultiHeadAttention(d_model, heads, dropout_attn).train(), torch.nn.LayerNorm(d_model)
        x = torch.randn(2, l, d_model, requires_grad=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = attn(x, torch.randn(2, 32, d_model), norm=norm).out
        out.float().sum().backward()
        assert x.grad is not None
        return bool(calls)

    assert ran()
    assert not ran(l=16)  # L
    assert not ran(d_model=32)  # D = 16
    assert not ran(autocast=False)  # fp32
    assert not ran(dropout_attn=0.1)
    monkeypatch.setattr(module, "NATIVE_GRADS", False)
    assert not ran()
    monkeypatch.setattr(module, "NATIVE_GRADS", True)

    lib = native.attention_library()
    h, b, l, k_len, d = 1, 1, 32, 32, 32
    q = torch.zeros(h * b, l, d, dtype=torch.bfloat16)
    kv = torch.zeros(b, k_len, 2 * h * d + 2, dtype=torch.bfloat16)
    out, values = torch.empty(h * b, l, k_len, dtype=torch.bfloat16), torch.empty(b, l, h * d, dtype=torch.bfloat16)
    r = torch.zeros(h, k_len, d, dtype=torch.bfloat16)

    def code(kv_row: int, out_row: int) -> int:
        layouts = (ctypes.c_int64 * 6)(k_len * kv_row, d, kv_row, l * out_row, d, out_row)
        return lib.still_attention_weights(q.data_ptr(), kv.data_ptr(), q.data_ptr(), r.data_ptr(), None, 0,
                                           out.data_ptr(), kv.data_ptr() + 2 * d, values.data_ptr(), h, b, l,
                                           k_len, d, layouts, 1)

    assert code(2 * d + 2, d) == 0
    assert code(2 * d + 1, d) == 3  # odd: rows read as pairs
    assert code(d - 2, d) == 3  # shorter than a row
    assert code(2 * d, d - 2) == 3


def test_packed_key_values_train_the_model_to_the_same_bits(monkeypatch, bf16_products):
    """Whole bf16 training steps of the model, memories filling and compressed (the reconstruction
    loss then reads the old memories' keys and values out of kv): the same losses and gradients
    with `PACKED_KEY_VALUES` as without."""
    import torch.nn.functional as F

    from still.compressive import CompressiveConfig, CompressiveTransformer, attention as module

    config = CompressiveConfig(vocab_size=32, d_model=64, n_layers=2, n_heads=2, d_ff=128, mem_len=32, c_mem_len=32,
                               compression_rate=4, dropout=0.0)
    torch.manual_seed(0)
    model = CompressiveTransformer(config).train()
    tokens = torch.randint(0, 32, (2, 4 * 32 + 1))
    results = []
    for packed in (False, True):
        monkeypatch.setattr(module, "PACKED_KEY_VALUES", packed)
        state, steps, compressed = None, [], False
        for s in range(4):
            x = tokens[:, s * 32 : (s + 1) * 32 + 1]
            with torch.autocast("cpu", torch.bfloat16):
                out = model(x[:, :-1], state)
                loss = F.cross_entropy(out.logits.flatten(0, 1).float(), x[:, 1:].flatten())
            state = out.state
            if out.compression_loss is not None:
                loss, compressed = loss + out.compression_loss.float(), True
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            steps.append([loss.detach(), *(g for g in grads if g is not None)])
        results.append(steps)
        assert compressed  # the reconstruction loss ran
    for a, b in zip(*results):
        assert len(a) == len(b)
        assert all(torch.equal(u, w) for u, w in zip(a, b))


def test_native_grads_leave_lengths_not_multiples_of_32_to_the_two_step_path(monkeypatch, bf16_products):
    """16 queries (the weights' kernel takes them, the gradients' does not): `_native_grads` declines
    and the first pass then PyTorch's products give the gradients; fp32 is not its either."""
    from still.compressive import attention as module
    from still.compressive.attention import _AttentionWeights

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    h, b, l, k_len, d = 2, 2, 16, 64, 32
    operands = [torch.randn(h * b, l, d).to(bf16), torch.randn(h * b, k_len, d).to(bf16),
                torch.randn(h, b * l, d).to(bf16), torch.randn(h, k_len, d)]
    calls = []
    original = module._native_grads

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(module, "_native_grads", spy)
    inputs = [t.clone().requires_grad_() for t in operands]
    bias = causal_mask_bias(l, k_len, torch.device("cpu"), bf16)
    _AttentionWeights.apply(*inputs, bias).backward(torch.randn(h * b, l, k_len).to(bf16))
    assert calls == [None] and all(torch.isfinite(t.grad).all() for t in inputs)
    monkeypatch.setattr(module, "NATIVE_FP32", False)  # fp32 is the fp32 kernel's (tested below), not this one's
    assert module._native_grads(*(t.float() for t in operands), torch.randn(h * b, l, k_len), torch.float32,
                                grad_weights=torch.randn(h * b, l, k_len)) is None


def _fp32_kernel_or_skip():
    from still.compressive import native

    if native.attention_fp32_library() is None:
        pytest.skip("the fp32 attention kernel cannot run here (no compiler, or neither AVX-512 nor FMA)")


@pytest.fixture
def fp32_build(request, monkeypatch):
    """`native_attention.cpp` built with `BUILDS[request.param]` (parametrize indirectly): built for
    x86-64-v3, its fp32 kernels take the portable code (16 lanes in AVX2 parts) that an AVX-512
    machine would otherwise never run."""
    use_build(request.param, monkeypatch, "_ATTENTION")
    _fp32_kernel_or_skip()


FP32_BUILDS = [name for name in BUILDS if name != "untuned"]  # (untuned: no fused multiply-adds, no kernel)


@pytest.mark.parametrize("h,b,l,k_len,d,mask", [(2, 3, 32, 96, 32, "causal"), (1, 2, 16, 16, 16, "bias"),
                                                 (3, 2, 48, 80, 48, "slots"), (4, 8, 128, 384, 64, "causal")])
@pytest.mark.parametrize("outputs", [True, False])
@pytest.mark.parametrize("fp32_build", FP32_BUILDS, indirect=True)
def test_native_fp32_attention_is_the_exact_one_to_fp32_rounding(monkeypatch, fp32_build, h, b, l, k_len, d, mask,
                                                                  outputs):
    """`NATIVE_FP32`: the fp32 kernels' weights (or their product with the values, `_AttentionOutputs`)
    and every gradient (from the output's gradient, or from the weights', `_AttentionWeights`) lie as
    near the float64 computation from the same operands as PyTorch's fp32 path does; masked weights
    are exactly 0; one thread and three give the same bits. Masks: the causal one alone (which the
    kernel applies itself), the same as a bias, and empty memory slots per batch row."""
    from still.compressive import attention as module
    from still.compressive.attention import _AttentionOutputs, _AttentionWeights, mask_bias

    torch.manual_seed(0)
    operands = [0.5 * torch.randn(h * b, l, d), torch.randn(h * b, k_len, d), torch.randn(h * b, k_len, d),
                0.5 * torch.randn(h, b * l, d), torch.randn(h, k_len, d)]  # q_content, k, v, q_position, r
    allowed = _allowed(b, l, k_len, mask == "slots")
    grad = torch.randn(h * b, l, d) if outputs else torch.randn(h * b, l, k_len)

    def run(native: bool, dtype: torch.dtype = torch.float32, threads: int = 1) -> list[torch.Tensor]:
        monkeypatch.setattr(module, "NATIVE_FP32", native)
        bias = (causal_mask_bias(l, k_len, torch.device("cpu"), dtype) if mask == "causal"
                else mask_bias(allowed, dtype))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            qc, k, v, qp, r = (t.to(dtype, copy=True).requires_grad_() for t in operands)
            if outputs:
                result = _AttentionOutputs.apply(qc, k, v, qp, r, bias)
            else:
                result = _AttentionWeights.apply(qc, k, qp, r, bias)
            result.backward(grad.to(dtype))
            return [result.detach()] + [t.grad for t in (qc, k, v, qp, r) if t.grad is not None]
        finally:
            torch.set_num_threads(before)

    bias32 = causal_mask_bias(l, k_len, torch.device("cpu"), torch.float32)
    assert module._native_weights(*operands[:2], *operands[3:], bias32) is not None  # the kernel takes these
    exact, plain, kernel = run(False, torch.float64), run(False), run(True)
    assert len(kernel) == (6 if outputs else 5)
    for got, torch_fp32, want in zip(kernel, plain, exact):
        assert got.dtype == torch.float32 and got.shape == want.shape
        scale = want.abs().max()
        err, err_plain = ((t.double() - want).abs().max() / scale for t in (got, torch_fp32))
        assert err <= max(4 * err_plain, 4e-6), (err, err_plain)
    if not outputs:
        assert (kernel[0].view(h, b, l, k_len)[~allowed.expand(1, b, l, k_len)[0].expand(h, b, l, k_len)] == 0).all()
    for got, again in zip(kernel, run(True, threads=3)):
        assert torch.equal(got, again)


@pytest.mark.parametrize("fp32_build", FP32_BUILDS, indirect=True)
def test_native_fp32_training_step_is_pytorchs(fp32_build):
    """A whole fp32 training step of the model (memories, the compressed memory, the reconstruction
    loss) gives every parameter the gradient PyTorch's fp32 attention gives it, to fp32 rounding."""
    from still.compressive import CompressiveConfig, CompressiveTransformer, attention as module

    torch.manual_seed(0)
    net = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=64, n_layers=2, n_heads=2, d_ff=64,
                                                   mem_len=32, c_mem_len=32, compression_rate=2, dropout=0.0)).train()
    seq = torch.randint(0, 11, (2, 128))
    state = None
    for start in (0, 32, 64):  # the memories fill (the first steps mask empty slots)
        state = net(seq[:, start : start + 32], state).state

    def grads(native: bool) -> dict[str, torch.Tensor]:
        before = module.NATIVE_FP32
        module.NATIVE_FP32 = native
        try:
            net.zero_grad(set_to_none=True)
            out = net(seq[:, 96:128], state)
            (out.logits.square().mean() + out.compression_loss).backward()
            return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
        finally:
            module.NATIVE_FP32 = before

    kernel, plain = grads(True), grads(False)
    assert kernel.keys() == plain.keys() and len(kernel) > 10
    for name, want in plain.items():
        torch.testing.assert_close(kernel[name], want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)


@pytest.mark.parametrize("h,b,l,k_len,d,mask,scale", [
    (2, 3, 32, 96, 32, "causal", 1.0), (1, 2, 16, 16, 16, "bias", 1.0), (3, 2, 48, 80, 48, "slots", 1.0),
    (2, 2, 32, 64, 16, "slots", 12.0)])
@pytest.mark.parametrize("outputs", [True, False])
def test_native_fp32_attention_has_the_same_bits_in_every_build(monkeypatch, h, b, l, k_len, d, mask, scale, outputs):
    """The fp32 kernels built for x86-64-v3 (16 lanes in AVX2 parts, tails lane by lane) give the
    weights, the outputs and every gradient the bits of this machine's build (AVX-512 where it has
    it): the same fused multiply-adds in the same order, the same exponential, GCC's order of
    `_mm512_reduce_add_ps`. At `scale` 12 many scores lie more than 87 below their row's largest
    (exactly 0 in both), and the rows' sums and maxima come from few lanes."""
    from still.compressive import attention as module, native
    from still.compressive.attention import _AttentionOutputs, _AttentionWeights, mask_bias

    _fp32_kernel_or_skip()
    torch.manual_seed(1)
    operands = [scale * torch.randn(h * b, l, d), torch.randn(h * b, k_len, d), torch.randn(h * b, k_len, d),
                scale * torch.randn(h, b * l, d), torch.randn(h, k_len, d)]  # q_content, k, v, q_position, r
    bias = causal_mask_bias(l, k_len, torch.device("cpu"), torch.float32) if mask == "causal" else mask_bias(
        _allowed(b, l, k_len, mask == "slots"), torch.float32)
    grad = torch.randn(h * b, l, d) if outputs else torch.randn(h * b, l, k_len)
    monkeypatch.setattr(module, "NATIVE_FP32", True)
    calls = []

    def spied(original):
        def spy(*args, **kwargs):
            calls.append(original(*args, **kwargs))
            return calls[-1]

        return spy

    for name in ("_native_weights", "_native_grads"):
        monkeypatch.setattr(module, name, spied(getattr(module, name)))

    def run(threads: int) -> list[torch.Tensor]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            qc, k, v, qp, r = (t.clone().requires_grad_() for t in operands)
            result = (_AttentionOutputs.apply(qc, k, v, qp, r, bias) if outputs
                      else _AttentionWeights.apply(qc, k, qp, r, bias))
            result.backward(grad)
            return [result.detach()] + [t.grad for t in (qc, k, v, qp, r) if t.grad is not None]
        finally:
            torch.set_num_threads(before)

    here = run(2)
    use_build("x86-64-v3", monkeypatch, "_ATTENTION")
    assert native.attention_fp32_library() is not None and native.attention_library() is None  # (no AVX-512 bf16)
    portable = run(1)
    assert len(calls) == 4 and all(call is not None for call in calls)  # both runs took the kernels
    if scale > 1 and not outputs:
        assert (here[0] == 0).float().mean() > 0.6  # mostly masked or below e^-87
    for got, want in zip(portable, here):
        assert got.shape == want.shape and torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_fp32_attention_without_fused_multiply_adds_takes_pytorchs_path(monkeypatch):
    """Built without FMA (untuned x86-64: SSE2), the library says its fp32 kernels cannot run, and fp32
    attention takes PyTorch's path, as it does without a compiler."""
    from still.compressive import attention as module, native

    if native.compiler() is None:
        pytest.skip("no C++ compiler")
    use_build("untuned", monkeypatch, "_ATTENTION")
    monkeypatch.setattr(module, "NATIVE_FP32", True)
    if native.attention_fp32_library() is not None:
        pytest.skip("this compiler's default target has fused multiply-adds")
    operands = (torch.randn(2, 16, 16), torch.randn(2, 32, 16), torch.randn(1, 32, 16), torch.randn(1, 32, 16))
    assert module._native_weights(*operands, causal_mask_bias(16, 32, torch.device("cpu"), torch.float32)) is None


def test_kernels_off_lets_the_flop_counter_see_every_product():
    """`kernels_off` (for the benchmarks' FLOP counts): a bf16 training step of the model counted
    inside it has the fp32 step's FLOPs (the same products); outside it, where the kernels run (bf16
    and fp32), the counter misses theirs; the flag comes back after."""
    from torch.utils.flop_counter import FlopCounterMode

    from still.compressive import CompressiveConfig, CompressiveTransformer, attention as module, native

    if native.attention_library() is None:
        pytest.skip("the bf16 attention kernel cannot run here (no compiler or no AVX-512 bf16)")
    torch.manual_seed(0)
    net = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=64, n_layers=2, n_heads=2, d_ff=64,
                                                   mem_len=32, c_mem_len=32, compression_rate=1, dropout=0.0)).train()
    seq = torch.randint(0, 11, (2, 96))
    state = None
    for start in (0, 32):
        with torch.autocast("cpu", torch.bfloat16):
            state = net(seq[:, start : start + 32], state).state

    def flops(bf16: bool, off: bool) -> int:
        with (module.kernels_off() if off else contextlib.nullcontext()), FlopCounterMode(display=False) as counter:
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = net(seq[:, 64:96], state)
            (out.logits.float().square().mean() + out.compression_loss.float()).backward()
        return counter.get_total_flops()

    assert flops(True, off=True) == flops(False, off=True)
    assert module.NATIVE_SCORES
    assert flops(True, off=False) < flops(True, off=True)
    if native.attention_fp32_library() is not None:
        assert flops(False, off=False) < flops(False, off=True)


def test_native_weights_refuse_what_the_kernel_cannot_take(monkeypatch):
    """fp32 without `NATIVE_FP32`, head dims not multiples of 32 (bf16; 16 in fp32) and lengths not
    multiples of 16 take the PyTorch path; and without the kernel, bf16 training still runs (the
    PyTorch bf16 path)."""
    from still.compressive import attention as module, native

    bf16 = torch.bfloat16
    bias = causal_mask_bias(16, 32, torch.device("cpu"), bf16)
    operands = (torch.randn(2, 16, 32), torch.randn(2, 32, 32), torch.randn(1, 32, 32), torch.randn(1, 32, 32))
    with monkeypatch.context() as patch:
        patch.setattr(module, "NATIVE_FP32", False)
        assert module._native_weights(*operands, bias.float()) is None  # fp32
    fp32_odd = (torch.randn(2, 16, 24), torch.randn(2, 32, 24), torch.randn(1, 32, 24), torch.randn(1, 32, 24))
    assert module._native_weights(*fp32_odd, bias.float()) is None  # fp32, head dim 24
    odd = (torch.randn(2, 16, 16), torch.randn(2, 32, 16), torch.randn(1, 32, 16), torch.randn(1, 32, 16))
    assert module._native_weights(*(t.to(bf16) for t in odd), bias) is None  # head dim 16
    short = causal_mask_bias(12, 32, torch.device("cpu"), bf16)
    assert module._native_weights(*(t[..., :12, :].to(bf16) if i == 0 else t.to(bf16)
                                    for i, t in enumerate(operands)), short) is None  # 12 queries
    assert module._native_weights(*(t[..., :12, :] if i == 0 else t for i, t in enumerate(operands)),
                                  short.float()) is None  # 12 queries, fp32
    monkeypatch.setattr(native, "_ATTENTION", [None, None, None])  # no kernel on this machine
    assert module._native_weights(*(t.to(bf16) for t in operands), bias) is None
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(64, 2).train()
    x = torch.randn(2, 16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=bf16):
        out = attn(x, torch.randn(2, 16, 64)).out
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("g,l,n,d", [(6, 16, 32, 32), (3, 48, 96, 64), (2, 32, 64, 96)])
def test_native_content_attention_is_the_fp32_softmax_rounded_once(g, l, n, d, bf16_products):
    """`content_attention` without gradients in bf16 (the reconstruction loss's targets) by the bf16
    kernel: the weights are the softmax of the fp32 scores, rounded once, so the output lies within
    the roundings of the weights and of the output from the exact one, nearer than PyTorch's bf16
    path; keys and values read in place from a longer (G, K, D) buffer (the training attention's
    own) and the output written into a slice; the same bits on one thread or several."""
    from still.compressive import attention as module

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    q = (0.3 * torch.randn(g, l, d)).to(bf16)
    kv = torch.randn(2, g, n + 16, d).to(bf16)  # 16 more slots than read: the groups at a stride
    k, v = kv[0, :, 8 : 8 + n], kv[1, :, 8 : 8 + n]
    out = torch.zeros(2 * g, l, d, dtype=bf16)
    with torch.no_grad():
        got = module.content_attention(q, k, v, out=out[g:])
        plain = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1), v)
    assert got.data_ptr() == out[g:].data_ptr() and torch.equal(out[:g], torch.zeros_like(out[:g]))
    weights = torch.bmm(q.double(), k.double().transpose(1, 2)).softmax(-1)
    exact = torch.bmm(weights, v.double())
    # each weight within one bf16 rounding of its exact value, the output within one more
    bound = 2**-8 * (torch.bmm(weights, v.double().abs()) + exact.abs()) + 1e-6
    assert ((got.double() - exact).abs() <= bound).all()
    assert (got.double() - exact).norm() < 0.7 * (plain.double() - exact).norm()
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch.no_grad():
            assert torch.equal(module.content_attention(q, k, v), got)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("g,l,n,d", [(6, 16, 32, 32), (3, 48, 96, 64), (32, 128, 128, 32)])
def test_content_attention_by_columns_is_by_rows_to_a_rounding(g, l, n, d, bf16_products):
    """The dot products' content attention with the scores transposed (`content_of_columns`, the
    default) against the row-major one (`still_content_by_columns(0)`): the same scores and
    maximum, the sum over the keys in another order, so the weights within a bf16 rounding of each
    other and the outputs within one more; each as near the exact one as the other."""
    from still.compressive import attention as module, native

    lib = native.attention_library()
    if lib.still_attention_tiles() == 1:
        pytest.skip("on AMX tiles the content attention runs by rows either way")
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    q = (0.5 * torch.randn(g, l, d)).to(bf16)
    k, v = torch.randn(g, n, d).to(bf16), torch.randn(g, n, d).to(bf16)
    results = {}
    try:
        assert lib.still_content_by_columns(1) in (0, 1)
        results[1] = module._native_content_attention(q, k, v, weights=True)
        assert lib.still_content_by_columns(0) == 1
        results[0] = module._native_content_attention(q, k, v, weights=True)
    finally:
        assert lib.still_content_by_columns(1) == 0
    (out_c, w_c), (out_r, w_r) = results[1], results[0]
    weights = torch.bmm(q.double(), k.double().transpose(1, 2)).softmax(-1)
    exact = torch.bmm(weights, v.double())
    assert ((w_c.double() - w_r.double()).abs() <= 2**-7 * weights + 1e-7).all()  # one bf16 unit at most
    assert ((w_c.double() - weights).abs() <= 2**-8 * weights + 1e-7).all()
    bound = 2**-7 * (torch.bmm(weights, v.double().abs()) + exact.abs()) + 1e-6
    assert ((out_c.double() - out_r.double()).abs() <= bound).all()
    assert (out_c.double() - exact).norm() <= 1.05 * (out_r.double() - exact).norm()
    if g * l * n >= 2**19:  # (smaller ones round the two sums' last bits away, often everywhere)
        assert not torch.equal(w_c, w_r)  # two paths ran


def test_native_content_attention_gradients_are_the_plain_paths(monkeypatch, bf16_products):
    """With gradients (the reconstruction loss's approximation), the kernel's forward keeps its
    weights and the backward runs the plain path's products and softmax backward on them: the
    gradients of the keys, the values and the queries lie nearer the exact ones (float64) than
    the PyTorch bf16 path's, and that path is what `NATIVE_SCORES` off gives."""
    from still.compressive import attention as module

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    g, l, n, d = 8, 32, 32, 32
    operands = [(0.3 * torch.randn(g, l, d)).to(bf16), torch.randn(g, n, d).to(bf16), torch.randn(g, n, d).to(bf16)]
    grad = torch.randn(g, l, d).to(bf16)
    exact = [t.double().requires_grad_() for t in operands]
    torch.bmm(torch.bmm(exact[0], exact[1].transpose(1, 2)).softmax(-1), exact[2]).backward(grad.double())
    results = {}
    for native in (True, False):
        monkeypatch.setattr(module, "NATIVE_SCORES", native)
        inputs = [t.clone().requires_grad_() for t in operands]
        out = module.content_attention(*inputs)
        assert (type(out.grad_fn).__name__ == "_ContentAttentionBackward") == native
        out.backward(grad)
        results[native] = [t.grad.double() for t in inputs]
    for i, want in enumerate(exact):
        error = (results[True][i] - want.grad).norm()
        assert error < 0.01 * want.grad.norm()
        assert error < (results[False][i] - want.grad).norm()


@pytest.mark.parametrize("g,l,n,d,with_q", [(8, 32, 32, 32, True), (6, 64, 96, 64, False), (4, 16, 32, 32, True)])
def test_native_content_attention_backward_in_one_pass(monkeypatch, g, l, n, d, with_q, bf16_products):
    """`NATIVE_CONTENT_GRADS`: the approximation's backward from the kernel (the weights' and scores'
    gradients in fp32, each gradient rounded once) lies at least as near the exact gradients
    (float64) as PyTorch's backward of the same forward, within 1% of them; the same bits on one
    thread or three; without the queries' gradient where they need none; PyTorch's where L is not a
    multiple of 32."""
    from still.compressive import attention as module

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    operands = [(0.3 * torch.randn(g, l, d)).to(bf16), torch.randn(g, n, d).to(bf16), torch.randn(g, n, d).to(bf16)]
    grad = torch.randn(g, l, d).to(bf16)
    exact = [t.double().requires_grad_() for t in operands]
    torch.bmm(torch.bmm(exact[0], exact[1].transpose(1, 2)).softmax(-1), exact[2]).backward(grad.double())
    calls = []
    native = module._native_content_grads
    monkeypatch.setattr(module, "_native_content_grads", lambda *a: calls.append(1) or native(*a))

    def run(flag: bool, threads: int = 1) -> list:
        monkeypatch.setattr(module, "NATIVE_CONTENT_GRADS", flag)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            inputs = [t.clone().requires_grad_(i > 0 or with_q) for i, t in enumerate(operands)]
            module.content_attention(*inputs).backward(grad)
            return [t.grad for t in inputs]
        finally:
            torch.set_num_threads(before)

    kernel, plain = run(True), run(False)
    assert len(calls) == 1
    assert (kernel[0] is not None) == with_q
    for got, other, want in zip(kernel, plain, exact):
        if got is None:
            continue
        error = (got.double() - want.grad).norm()
        assert error < 0.01 * want.grad.norm()
        assert error <= (other.double() - want.grad).norm() * 1.0001
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(run(True, threads=3), kernel))
    if l % 32:  # the kernel declined: PyTorch's backward, the same bits
        assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(kernel, plain))


def test_native_content_attention_refuses_what_it_cannot_take(monkeypatch):
    """fp32, lengths that are not multiples of 16 (queries) and 32 (keys), head dims not multiples
    of 32, rows that are not contiguous, and a machine without the kernel: the plain path, whose
    result is the same bits."""
    from still.compressive import attention as module, native

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    cases = [(torch.randn(2, 16, 32), torch.randn(2, 32, 32)),  # fp32
             (torch.randn(2, 12, 32).to(bf16), torch.randn(2, 32, 32).to(bf16)),  # 12 queries
             (torch.randn(2, 16, 32).to(bf16), torch.randn(2, 24, 32).to(bf16)),  # 24 keys
             (torch.randn(2, 16, 16).to(bf16), torch.randn(2, 32, 16).to(bf16)),  # head dim 16
             (torch.randn(2, 32, 16).to(bf16).transpose(1, 2), torch.randn(2, 32, 32).to(bf16))]  # strided rows

    def plain(q, k):
        return torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), k)

    with torch.no_grad():
        for q, k in cases:
            assert module._native_content_attention(q, k, k) is None
            assert torch.equal(module.content_attention(q, k, k), plain(q, k))
        q, k = (torch.randn(2, 16, 32).to(bf16), torch.randn(2, 32, 32).to(bf16))
        monkeypatch.setattr(native, "_ATTENTION", [None, None, None])  # no kernel on this machine
        assert module._native_content_attention(q, k, k) is None
        assert torch.equal(module.content_attention(q, k, k), plain(q, k))
    k.requires_grad_()
    assert module.content_attention(q, k, k).grad_fn is not None  # the plain path, differentiated


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("per_row_mask", [False, True])
def test_exact_position_gradient_sums_to_zero_over_distances(monkeypatch, native, per_row_mask):
    """The exact gradient of the position table r sums to zero over the distances (each row of a
    softmax's gradient does, and the shift only moves a row's entries). With bf16 operands and an
    fp32 r (`EXACT_POSITION_GRADIENT`), r's gradient keeps that property and is nearer the exact
    gradient (float64, from the same operands); a bf16 r's gradient does not keep it."""
    from still.compressive import attention as module
    from still.compressive.attention import _AttentionWeights

    if native:
        _native_kernel_or_skip()
    monkeypatch.setattr(module, "NATIVE_SCORES", native)
    torch.manual_seed(0)
    h, b, l, k_len, d = 2, 3, 16, 48, 32
    bf16 = torch.bfloat16
    q_content = torch.randn(h * b, l, d).to(bf16)
    k = torch.randn(h * b, k_len, d).to(bf16)
    q_position = torch.randn(h, b * l, d).to(bf16)
    r = torch.randn(h, k_len, d)
    allowed = causal_mask(l, k_len)
    if per_row_mask:
        valid = torch.ones(b, k_len, dtype=torch.bool)
        valid[1, :20] = False
        allowed = (allowed & valid[:, None, :])[None]  # (1, B, L, K)
    upstream = torch.randn(h * b, l, k_len)

    def grad_r(dtype: torch.dtype, operand_dtype: torch.dtype) -> torch.Tensor:
        leaf = r.to(dtype).clone().requires_grad_()
        operands = (t.to(operand_dtype) for t in (q_content, k, q_position))
        weights = _AttentionWeights.apply(*operands, leaf, mask_bias(allowed, operand_dtype))
        (weights.float() * upstream.to(weights.dtype).float()).sum().backward()
        return leaf.grad.double()

    exact = grad_r(torch.float64, torch.float64)  # the float64 operands hold the bf16 values exactly
    scale = exact.abs().sum(dim=1)  # (H, D): the size of what is summed
    assert (exact.sum(dim=1).abs() <= 1e-12 * scale).all()
    wide, narrow = grad_r(torch.float32, bf16), grad_r(bf16, bf16)
    assert (wide.sum(dim=1).abs() <= 1e-5 * scale).all()  # centred: zero to fp32 rounding
    assert (narrow.sum(dim=1).abs() > 1e-3 * scale).any()  # rounded: the sum is left over
    assert (wide - exact).norm() < (narrow - exact).norm()
    assert (wide - exact).norm() < 0.05 * exact.norm()


@pytest.mark.parametrize("native,compression", [(False, "conv"), (True, "conv"), (False, "most_used")])
def test_exact_position_gradient_in_a_model(monkeypatch, native, compression):
    """In a whole model under bf16 autocast, W_r's columns for the nearly constant low-frequency
    cosines get a gradient as near fp32's as the sine columns' (`EXACT_POSITION_GRADIENT`); with the
    table in bf16 they lie several times as far. In fp32 the flag changes no gradient at all.
    most_used compression needs the attention weights: the explicit path, centred too (a probe found
    its bf16 gradient 160x off in those columns)."""
    import torch.nn.functional as F

    from still.compressive import CompressiveConfig, CompressiveTransformer, attention as module

    if native:
        _native_kernel_or_skip()
    monkeypatch.setattr(module, "NATIVE_SCORES", native)
    torch.manual_seed(0)
    config = CompressiveConfig(vocab_size=40, d_model=64, n_layers=2, n_heads=2, d_ff=128, mem_len=32,
                               c_mem_len=16, compression_rate=2, dropout=0.0, compression=compression)
    model = CompressiveTransformer(config).train()
    tokens = torch.randint(0, 40, (4, 129))
    state = None
    with torch.no_grad():  # memories and compressed memories from three segments
        for s in range(3):
            state = model(tokens[:, 32 * s: 32 * (s + 1)], state).state

    def grads(precision: str, exact: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(module, "EXACT_POSITION_GRADIENT", exact)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            logits = model(tokens[:, 96:128], state).logits
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 97:129].flatten()).backward()
        return [layer.attention.position.weight.grad.clone() for layer in model.layers]

    reference = grads("fp32", False)
    assert all(a.equal(b) for a, b in zip(reference, grads("fp32", True)))
    sines, low_cosines = slice(0, 32), slice(48, 64)  # R's columns: sin, then cos; frequencies falling

    def error(grad: list[torch.Tensor], columns: slice) -> float:
        diff = torch.cat([(g - ref)[:, columns].flatten() for g, ref in zip(grad, reference)])
        return float(diff.norm() / torch.cat([ref[:, columns].flatten() for ref in reference]).norm())

    exact, rounded = grads("bf16", True), grads("bf16", False)
    assert error(exact, low_cosines) < 1.6 * error(exact, sines)
    assert error(rounded, low_cosines) > 2.5 * error(rounded, sines)
    # what a run's results record ("position_gradient")
    assert module.position_gradient_used("fp32") == "exact" and module.position_gradient_used("bf16") == "rounded"
    monkeypatch.setattr(module, "EXACT_POSITION_GRADIENT", True)
    assert module.position_gradient_used("bf16") == "exact"


def test_the_attention_each_key_received_is_summed_in_fp32_under_bf16():
    """most_used ranks the memories by the attention each received: summed in bf16 (autocast on the
    CPU) most of them tied, and the stable ranking kept the oldest (a probe: 3 distinct sums of 32,
    half the kept slots other than fp32's)."""
    from still.compressive.compression import most_used

    torch.manual_seed(0)
    attention = RelativeMultiHeadAttention(64, 2)
    for module in attention.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.02)  # the model's own initialisation
    x, memories = torch.randn(1, 32, 64), torch.randn(1, 32, 64)
    with torch.no_grad():
        exact = attention(x, memories, need_weights=True).received
        with torch.autocast("cpu", torch.bfloat16):
            rounded = attention(x, memories, need_weights=True).received
    assert rounded.dtype == torch.float32 and len(set(rounded[0, :32].tolist())) >= 30
    assert most_used(rounded[:, :32], 4).tolist() == most_used(exact[:, :32], 4).tolist()
