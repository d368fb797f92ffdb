import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from still.compressive import CompressiveConfig, CompressiveTransformer, MemoryState
from still.compressive.decode import Decoder
from still.errors import StillError

TINY = dict(vocab_size=23, d_model=32, n_layers=2, n_heads=4, d_ff=48, dropout=0.0)


def model(**kwargs) -> CompressiveTransformer:
    torch.manual_seed(0)
    return CompressiveTransformer(CompressiveConfig(**{**TINY, **kwargs}))


def tokens(b=2, l=32, seed=1):
    return torch.randint(0, 23, (b, l), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pre_norm", [True, False])
def test_segment_by_segment_equals_all_at_once(pre_norm):
    """Eval, no compression, memory long enough: the memory is an exact cache of the past."""
    net = model(mem_len=64, c_mem_len=0, pre_norm=pre_norm).eval()
    seq = tokens(l=40)
    full = net(seq).logits
    state, parts = None, []
    for start in range(0, 40, 8):
        out = net(seq[:, start : start + 8], state)
        state = out.state
        parts.append(out.logits)
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_last_logits_are_the_last_row_and_the_state_is_unchanged(pre_norm):
    net = model(mem_len=16, c_mem_len=8, compression_rate=2, pre_norm=pre_norm).eval()
    seq = tokens(l=24)
    with torch.no_grad():
        full, last = None, None
        for start in range(0, 24, 8):
            full = net(seq[:, start : start + 8], full.state if full else None)
            last = net(seq[:, start : start + 8], last.state if last else None, last_logits=True)
            assert last.logits.shape == (2, 1, 23)
            torch.testing.assert_close(last.logits, full.logits[:, -1:])
    for a, b in zip(last.state.memory + last.state.compressed, full.state.memory + full.state.compressed):
        assert torch.equal(a, b)


def test_token_by_token_equals_all_at_once():
    net = model(mem_len=32, c_mem_len=0).eval()
    seq = tokens(l=20)
    full = net(seq).logits
    state, parts = None, []
    for t in range(20):
        out = net(seq[:, t : t + 1], state)
        state, _ = out.state, parts.append(out.logits)
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)


def test_compression_parity_with_segments_that_fill_nothing():
    """With compression configured but memory never overflowing, it is Transformer-XL exactly."""
    seq = tokens(l=24)
    xl, ct = model(mem_len=32, c_mem_len=0).eval(), model(mem_len=32, c_mem_len=8).eval()
    ct.load_state_dict(xl.state_dict(), strict=False)
    a, b = xl(seq[:, :12]), ct(seq[:, :12])
    a2, b2 = xl(seq[:, 12:], a.state), ct(seq[:, 12:], b.state)
    assert torch.allclose(a2.logits, b2.logits, atol=1e-6) and b2.state.compressed_len == 0


@pytest.mark.parametrize("compression", ["conv", "dilated", "max", "mean"])
def test_memories_compress_alike_however_the_segments_are_cut(compression):
    """One layer stores its embeddings, so its memories are the same whatever the segment length;
    f_c reads each group of c on its own, so the compressed memory must be too: the dilated
    convolution once padded each call's start, and a model compressed otherwise a group at a time
    (generating) than a segment at a time (training, evaluating)."""
    net = model(n_layers=1, mem_len=8, c_mem_len=8, compression_rate=4, compression=compression).eval()
    seq = tokens(b=1, l=32)
    states = {}
    with torch.no_grad():
        for length in (8, 4, 1):
            state = None
            for start in range(0, 32, length):
                state = net(seq[:, start : start + length], state).state
            states[length] = state
    for length in (4, 1):
        assert torch.equal(states[length].memory[0], states[8].memory[0])
        torch.testing.assert_close(states[length].compressed[0], states[8].compressed[0], atol=1e-6, rtol=0)
    assert states[8].compressed_len == 6  # (24 memories overflowed: 6 groups)


def test_c_mem_len_zero_is_transformer_xl():
    net = model(mem_len=8, c_mem_len=0)
    assert net.compressor_parameters() == []
    state = None
    for start in range(0, 32, 8):
        out = net(tokens()[:, start : start + 8], state)
        state = out.state
        assert out.compression_loss is None
    assert state.memory_len == 8 and state.compressed_len == 0


def test_no_memory_is_a_causal_transformer():
    net = model(mem_len=0, c_mem_len=0).eval()
    seq = tokens(l=16)
    first = net(seq[:, :8])
    assert first.state.memory_len == 0
    # the second segment does not see the first
    assert torch.allclose(net(seq[:, 8:], first.state).logits, net(seq[:, 8:]).logits)
    # causal: changing a later token leaves earlier logits alone
    changed = seq.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 23
    assert torch.allclose(net(seq).logits[:, :10], net(changed).logits[:, :10], atol=1e-6)
    assert not torch.allclose(net(seq).logits[:, 10:], net(changed).logits[:, 10:])


@pytest.mark.parametrize("compression, loss, pre_norm", [
    ("conv", "attention", True), ("conv", "attention", False), ("dilated", "attention", True),
    ("conv", "autoencoding", True)])
def test_losses_reach_disjoint_parameters(compression, loss, pre_norm):
    """The LM loss trains every parameter except f_c; the compression loss trains only f_c.
    (A public implementation's key/value projection stopped getting gradients here.)"""
    net = model(mem_len=8, c_mem_len=8, compression=compression, compression_loss=loss, pre_norm=pre_norm).train()
    state = None
    seq = tokens(l=40)
    for start in range(0, 32, 8):  # fill the memories
        state = net(seq[:, start : start + 8], state).state
    out = net(seq[:, 32:39], state)  # segment of 7: overflow 7 -> one group of 4 compressed
    assert out.compression_loss is not None and out.compression_loss > 0
    lm = F.cross_entropy(out.logits.flatten(0, 1), seq[:, 33:40].flatten())
    compressor_ids = {id(p) for p in net.compressor_parameters()}
    assert compressor_ids

    lm_grads = torch.autograd.grad(lm, list(net.parameters()), allow_unused=True, retain_graph=True)
    for (name, p), g in zip(net.named_parameters(), lm_grads):
        if id(p) in compressor_ids:
            assert g is None or g.abs().max() == 0, f"LM loss reached the compressor: {name}"
        else:
            assert g is not None and g.abs().max() > 0, f"no LM gradient for {name}"
    c_grads = torch.autograd.grad(out.compression_loss, list(net.parameters()), allow_unused=True)
    for (name, p), g in zip(net.named_parameters(), c_grads):
        if id(p) in compressor_ids:
            assert g is not None and g.abs().max() > 0, f"no compression gradient for {name}"
        else:
            assert g is None or g.abs().max() == 0, f"compression loss reached {name}"


@pytest.mark.parametrize("compression", ["conv", "dilated", "max", "mean", "most_used"])
def test_every_compression_runs_and_fills_the_compressed_memory(compression):
    net = model(mem_len=8, c_mem_len=8, compression=compression).train()
    state = None
    seq = tokens(l=48)
    for start in range(0, 48, 8):  # 2 compressed per segment after the first: 10, capped at 8
        out = net(seq[:, start : start + 8], state)
        state = out.state
        assert torch.isfinite(out.logits).all()
    assert state.compressed_len == 8 and state.memory_len == 8
    assert (out.compression_loss is not None) == (compression in ("conv", "dilated"))


def test_reset_rows_forget_their_past():
    net = model(mem_len=16, c_mem_len=8).eval()
    seq = tokens(b=2, l=24)
    first = net(seq[:, :16])
    reset = torch.tensor([False, True])
    out = net(seq[:, 16:], first.state, reset=reset)
    fresh = net(seq[1:, 16:])
    assert torch.allclose(out.logits[1], fresh.logits[0], atol=1e-5)  # row 1 as if nothing came before
    assert not torch.allclose(out.logits[0], net(seq[:1, 16:]).logits[0], atol=1e-3)  # row 0 remembers
    assert out.state.key_valid() is not None


def test_state_survives_a_checkpoint_round_trip():
    net = model(mem_len=8, c_mem_len=8).eval()
    state = None
    for start in range(0, 24, 8):
        state = net(tokens()[:, start : start + 8], state).state
    again = MemoryState.from_tensors(state.to_tensors())
    nxt = tokens(seed=5)[:, :8]
    assert torch.equal(net(nxt, state).logits, net(nxt, again).logits)


@pytest.mark.parametrize("kwargs, message", [
    ({"d_model": 30, "n_heads": 4}, "must be divisible by n_heads"),
    ({"mem_len": 10, "c_mem_len": 8, "compression_rate": 4}, "mem_len \\(10\\) must be a multiple of compression_rate"),
    ({"compression": "zip"}, "compression: 'zip' is not one of 'conv'"),
    ({"mem_len": -1}, "mem_len must be >= 0, got -1"),
    ({"dropout_attn": -1.0}, "^dropout_attn must be in \\[0, 1\\), got -1.0$"),  # (was "dropouts", both values)
    ({"dropout": 1.0}, "^dropout must be in \\[0, 1\\), got 1.0$"),
    # sizes no model can have (10**30 was an overflow TypeError deep in PyTorch, 2**40 an allocator's error)
    ({"vocab_size": 10**30}, "vocab_size must be at most 2147483647 \\(2\\*\\*31 - 1\\), got 10000000000000"),
    ({"d_ff": 2**40}, "d_ff must be at most 2147483647"),
    ({"mem_len": 2**40, "c_mem_len": 0}, "mem_len must be at most 2147483647"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(StillError, match=message):
        CompressiveConfig(**{**TINY, **kwargs})


@pytest.mark.parametrize("compression", ["conv", "most_used"])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_inference_cache_gives_the_same_logits(compression, pre_norm):
    """Without gradients in eval mode the memories' keys and values are cached; nothing changes."""
    net = model(mem_len=8, c_mem_len=8, compression=compression, pre_norm=pre_norm).eval()
    seq = tokens(l=60)
    cached_state, plain_state = None, None
    for start in list(range(0, 40, 8)) + list(range(40, 60)):  # segments, then token by token
        end = start + 8 if start < 40 else start + 1
        with torch.no_grad():
            cached = net(seq[:, start:end], cached_state)
        with torch.enable_grad():
            plain = net(seq[:, start:end], plain_state)
        assert cached.state.key_values is not None and plain.state.key_values is None
        assert torch.allclose(cached.logits, plain.logits, atol=1e-5)
        cached_state, plain_state = cached.state, plain.state


def test_stale_inference_cache_is_not_used():
    net = model(mem_len=8, c_mem_len=8).eval()
    seq = tokens(l=24)
    with torch.no_grad():
        state = net(seq[:, :16]).state
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.1)  # the weights change after the cache was made
        stale = net(seq[:, 16:], state).logits
        fresh = net(seq[:, 16:], state._replace(key_values=None)).logits
    assert torch.allclose(stale, fresh, atol=1e-6)


@pytest.mark.parametrize("compression", ["conv", "dilated", "max", "mean", "most_used"])
def test_a_reset_row_reads_as_a_fresh_stream(compression):
    """With the segment length and mem_len multiples of c, a row reset mid-stream gives the logits
    of the same tokens fed to a fresh model state (most_used too: it keeps V / c of V valid
    memories, as a fresh stream does)."""
    net = model(mem_len=8, c_mem_len=8, compression_rate=4, compression=compression, dropout=0.0).eval()
    seq = tokens(l=160)
    with torch.no_grad():
        state = None
        for start in range(0, 48, 16):
            state = net(seq[:, start : start + 16], state).state
        fresh = None
        for i, start in enumerate(range(48, 160, 16)):
            out = net(seq[:, start : start + 16], state, reset=torch.tensor([False, i == 0]))
            alone = net(seq[1:, start : start + 16], fresh)
            state, fresh = out.state, alone.state
            assert torch.allclose(out.logits[1], alone.logits[0], atol=1e-5), i


def test_a_state_that_does_not_fit_is_named():
    from still.compressive.generate import generate

    net = model(mem_len=8, c_mem_len=8).eval()
    seq = tokens(b=2, l=8)
    with torch.no_grad():
        state = net(seq).state
    cases = [(state, tokens(b=3, l=8), None, "holds 2 batch rows, the tokens 3"),
             (net.empty_state(2, dtype=torch.bfloat16), seq, None, "is torch.bfloat16 on cpu, the model's weights "
                                                                    "torch.float32"),
             (MemoryState.empty(TINY["n_layers"], 2, 8), seq, None, "width is 8, the model's d_model 32"),
             (state, seq, torch.tensor([True, False, True]), "reset must be a \\(2,\\) bool tensor")]
    for bad, x, reset, message in cases:
        with pytest.raises(StillError, match=message):
            net(x, bad, reset=reset)
    with pytest.raises(StillError, match="holds 2 batch rows, the tokens 3"):
        next(generate(net, tokens(b=3, l=4), 2, state=state, compile=False))
    for batch in (-1, 2.5, True):  # (torch's RuntimeError, TypeError; True was one row)
        with pytest.raises(StillError, match=re.escape(f"batch must be an int >= 0, got {batch!r}")):
            net.empty_state(batch)
    assert net.empty_state(np.int64(2)).batch_size == 2


def test_an_edited_state_or_reassigned_weights_are_not_served_from_the_cache():
    """The cache is of the memories and weights it was made with: memories replaced
    (`_replace(memory=...)`) or written in place, and weights loaded with `assign=True` (new
    tensors), are projected again, as a state without a cache is."""
    net = model(mem_len=8, c_mem_len=8).eval()
    seq = tokens(l=24)
    with torch.no_grad():
        state = net(seq[:, :16]).state
        zeroed = state._replace(memory=tuple(torch.zeros_like(m) for m in state.memory))
        want = net(seq[:, 16:], zeroed._replace(key_values=None)).logits
        assert torch.allclose(net(seq[:, 16:], zeroed).logits, want, atol=1e-6)
        edited = net(seq[:, :16]).state
        for _ in range(3):  # (a new tuple or tensor may take a freed one's address: it is not the same memory)
            edited = edited._replace(memory=(edited.memory[0] * 0, edited.memory[1] * 0))
            assert edited.cache(net._weights_version()) is None
        assert torch.allclose(net(seq[:, 16:], edited).logits, want, atol=1e-6)
        in_place = net(seq[:, :16]).state
        for m in in_place.memory:
            m.zero_()
        assert torch.allclose(net(seq[:, 16:], in_place).logits, want, atol=1e-6)
        state = net(seq[:, :16]).state
        net.load_state_dict({k: v * 1.1 for k, v in net.state_dict().items()}, assign=True)
        fresh = net(seq[:, 16:], state._replace(key_values=None)).logits
        assert torch.allclose(net(seq[:, 16:], state).logits, fresh, atol=1e-6)
        reset = net(seq[:, :16]).state.reset(torch.tensor([True, False]))  # (flags alone: the cache serves)
        assert reset.cache(net._weights_version()) is not None
        attention = net.layers[0].attention
        spare = torch.nn.Linear(*reversed(attention.key_value.weight.shape), bias=False)  # (made before)
        for assign in (lambda: setattr(attention.key_value, "weight", torch.nn.Parameter(
                            attention.key_value.weight * 1.1)),  # (a weight assigned by hand)
                       lambda: setattr(attention, "key_value", spare)):  # (a module assigned whole)
            state = net(seq[:, :16]).state
            assign()
            fresh = net(seq[:, 16:], state._replace(key_values=None)).logits
            assert torch.allclose(net(seq[:, 16:], state).logits, fresh, atol=1e-6)
            assert net(seq[:, 16:], state).state.cache(net._weights_version()) is not None  # (and served again)


def test_inference_mode_runs_and_keeps_its_cache():
    """Tensors made under `torch.inference_mode` keep no count of in-place writes: the cache is
    checked by identity alone there, and serves."""
    from still.compressive.generate import generate

    net = model(mem_len=8, c_mem_len=8).eval()
    seq = tokens(l=24)
    with torch.no_grad():
        want = net(seq[:, 16:], net(seq[:, :16]).state).logits
    with torch.inference_mode():
        state = net(seq[:, :16]).state
        assert state.cache(net._weights_version()) is not None
        assert torch.allclose(net(seq[:, 16:], state).logits, want, atol=1e-6)
        assert len(list(generate(net, seq[:1, :5], 4, segment_len=8, compile=None))) == 4
        # a memory written in place there is not seen (documented): `without_cache` projects it anew
        state.memory[0].zero_()
        fresh = net(seq[:, 16:], state._replace(key_values=None, key_values_version=None)).logits
        assert torch.equal(net(seq[:, 16:], state.without_cache()).logits, fresh)
        assert state.without_cache().key_values is None and state.key_values is not None


def test_a_state_pickles_and_copies_without_its_cache():
    """`torch.save(state)` of a state made in eval mode without gradients (so holding its inference
    cache, whose weak references do not pickle) was a TypeError (a probe)."""
    import copy
    import io

    net = model(mem_len=8, c_mem_len=8).eval()
    seq = tokens(l=24)
    with torch.no_grad():
        state = net(seq[:, :16]).state
        assert state.key_values is not None
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        for again in (torch.load(buffer, weights_only=False), copy.deepcopy(state)):
            assert isinstance(again, MemoryState) and again.key_values is None and again.key_values_version is None
            assert all(map(torch.equal, again.memory + again.compressed, state.memory + state.compressed))
            assert torch.equal(net(seq[:, 16:], again).logits, net(seq[:, 16:], state).logits)


def test_inference_caches_made_under_bf16_autocast_are_not_reused_in_fp32():
    """The position projection and the state's keys and values cached by a bf16 (autocast)
    forward are not used by an fp32 one, and the reverse: each gives what a fresh model gives."""
    net, fresh = model(mem_len=8, c_mem_len=8).eval(), model(mem_len=8, c_mem_len=8).eval()
    seq = tokens(l=32)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(seq[:, :24], net(seq[:, :8]).state)  # caches W_r R for up to 2 x 32 distances
            state16 = net(seq[:, 8:16], net(seq[:, :8]).state).state
        out = net(seq[:, 16:], state16)  # fp32, from a state cached in bf16
        expected = fresh(seq[:, 16:], fresh(seq[:, 8:16], fresh(seq[:, :8]).state).state)
        assert out.logits.dtype == torch.float32
        assert torch.allclose(out.logits, expected.logits, atol=0.05)  # the memories themselves went through bf16
        state32 = net(seq[:, 8:16], net(seq[:, :8]).state).state
        assert torch.allclose(net(seq[:, 16:], state32).logits, expected.logits, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = net(seq[:, 16:], state32)  # bf16, from fp32 caches
            expected16 = fresh(seq[:, 16:], fresh(seq[:, 8:16], fresh(seq[:, :8]).state).state)
        assert torch.allclose(out16.logits.float(), expected16.logits.float(), atol=0.05)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_reconstruction_loss_reusing_the_forward_projections_equals_the_direct_one(monkeypatch, pre_norm):
    """The forward pass's W_q x and the old memories' keys and values are reused by the
    attention-reconstruction loss: it must equal the loss computed from scratch."""
    from still.compressive import model as module

    monkeypatch.setattr(module, "BATCHED_RECONSTRUCTION", False)  # (layer by layer: spied on below)
    net = model(mem_len=8, c_mem_len=8, pre_norm=pre_norm).train()
    state = None
    seq = tokens(l=40)
    for start in range(0, 32, 8):
        state = net(seq[:, start : start + 8], state).state
    calls = []
    for layer in net.layers:
        original = layer.compression_loss

        def spy(kind, h, old, compressed, queries=None, old_key_values=None, original=original):
            calls.append((original(kind, h, old, compressed, queries, old_key_values),
                          original(kind, h, old, compressed)))
            return calls[-1][0]

        layer.compression_loss = spy
    net(seq[:, 32:39], state)  # overflow 7 -> 4 old memories compressed into 1, in each layer
    assert len(calls) == 2
    for reused, direct in calls:
        torch.testing.assert_close(reused, direct, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_reconstruction_losses_of_all_layers_at_once_equal_layer_by_layer(monkeypatch, pre_norm, bf16, fused):
    """`attention_reconstruction_loss` (all layers in one batch of operators) gives the mean of the
    layers' own losses and the same gradients for every compressor, with each layer's own LN1
    affine (made different here) and W_kv, under bf16 autocast too; nothing else gets a gradient.
    Its targets read the keys and values heads-major as the fused attention made them, or (`fused`
    off) rearranged from the projections."""
    from still.compressive import attention as attention_module, model as module

    monkeypatch.setattr(attention_module, "FUSED_SCORES", fused)
    seq = tokens(b=3, l=48)
    results = []
    for batched in (False, True):
        monkeypatch.setattr(module, "BATCHED_RECONSTRUCTION", batched)
        net = model(n_layers=3, mem_len=8, c_mem_len=4, pre_norm=pre_norm).train()
        with torch.no_grad():
            for layer in net.layers:
                layer.norm1.weight.normal_(1.0, 0.3)
                layer.norm1.bias.normal_(0.0, 0.3)
        if not bf16:
            net.double()
        state = None
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            for start in range(0, 32, 8):
                state = net(seq[:, start : start + 8], state).state
            loss = net(seq[:, 32:40], state).compression_loss.float()
        loss.backward()
        assert all(p.grad is None for p in net.model_parameters())
        results.append([loss.detach(), *(p.grad for p in net.compressor_parameters())])
    tolerance = dict(atol=1e-3, rtol=1e-2) if bf16 else dict(atol=1e-12, rtol=1e-9)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **tolerance)


@pytest.mark.parametrize("heads_major", [True, False])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_training_with_memories_projected_as_constants_equals_the_plain_products(monkeypatch, pre_norm, heads_major):
    """The whole model over several segments (memories and compressed memories full), in float64:
    `FOLDED_NORM` (pre-LN's affine in the weights, the memories' rows without an input gradient;
    post-LN: the latter alone), with the keys and values heads-major out of their product
    (`HEADS_MAJOR_PROJECTION`) or laid out after it, against LN1 applied and one product over
    [context, x]. The same losses, and the same gradient for every parameter."""
    from still.compressive import attention as module

    monkeypatch.setattr(module, "HEADS_MAJOR_PROJECTION", heads_major)
    seq = tokens(b=2, l=48)
    results = []
    for folded in (False, True):
        monkeypatch.setattr(module, "FOLDED_NORM", folded)
        net = model(mem_len=8, c_mem_len=4, pre_norm=pre_norm).double().train()
        with torch.no_grad():
            for layer in net.layers:
                layer.norm1.weight.normal_(1.0, 0.3)
                layer.norm1.bias.normal_(0.0, 0.3)
        state = None
        for start in range(0, 32, 8):
            state = net(seq[:, start : start + 8], state).state
        out = net(seq[:, 32:40], state)
        lm = F.cross_entropy(out.logits.flatten(0, 1), seq[:, 33:41].flatten())
        (lm + out.compression_loss).backward()
        results.append([lm.detach(), out.compression_loss.detach(), *(p.grad for p in net.parameters())])
    assert all(g is not None for g in results[1])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_mean_squared_error_matches_mse_loss(dtype):
    """The reconstruction loss's MSE: F.mse_loss's value (in fp32 for bf16 inputs, as autocast
    computes it) and gradient (in the input's dtype); the target gets none; shapes must agree."""
    from still.compressive.model import mean_squared_error

    torch.manual_seed(0)
    approx = torch.randn(6, 5, 4, dtype=dtype, requires_grad=True)
    target = torch.randn(6, 5, 4, dtype=dtype, requires_grad=True)
    loss = mean_squared_error(approx, target)
    grad, target_grad = torch.autograd.grad(loss * 3, [approx, target], allow_unused=True)
    wide = torch.promote_types(dtype, torch.float32)
    wide_approx = approx.detach().to(wide).requires_grad_()
    expected = F.mse_loss(wide_approx, target.detach().to(wide))
    (expected_grad,) = torch.autograd.grad(expected * 3, wide_approx)
    assert loss.dtype == wide and grad.dtype == dtype and target_grad is None
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad.to(dtype))
    with pytest.raises(ValueError, match="shapes differ"):
        mean_squared_error(approx, target[:, :4])


@pytest.mark.parametrize("numel", [7, 1000, 70_000])
def test_mean_squared_error_in_bf16_by_the_kernel(monkeypatch, numel):
    """bf16 on a CPU with the attention kernel (`NATIVE_SQUARED_ERROR`): the loss within float64
    rounding of the exact mean of the fp32 differences (the PyTorch path's fp32 dot product only
    within fp32's), whatever the length (blocks of 32, a tail); the gradient the same bits as the
    PyTorch path's; a target that is not contiguous takes that path."""
    from still.compressive import model as module, native

    if native.attention_library() is None:
        pytest.skip("the bf16 attention kernel cannot run here (no compiler or no AVX-512 bf16)")
    torch.manual_seed(0)
    approx = torch.randn(numel, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(numel, dtype=torch.bfloat16)
    exact = (approx.detach().double() - target.double()).square().mean()
    results = {}
    for kernel in (True, False):
        monkeypatch.setattr(module, "NATIVE_SQUARED_ERROR", kernel)
        loss = module.mean_squared_error(approx, target)
        (grad,) = torch.autograd.grad(loss * 3, approx)
        results[kernel] = (loss, grad)
        assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert abs(results[True][0].double() - exact) <= 2e-7 * exact
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=0)
    assert torch.equal(results[True][1], results[False][1])
    monkeypatch.setattr(module, "NATIVE_SQUARED_ERROR", True)
    strided = torch.randn(2 * numel, dtype=torch.bfloat16)[::2]
    assert module._native_squared_error(approx.detach(), strided) is None
    assert module._native_squared_error(approx.detach(), target) is not None


@pytest.mark.parametrize("kernel", [False, True])
def test_reconstruction_loss_in_bf16_with_the_kernels(monkeypatch, kernel):
    """At shapes the kernels take (queries a multiple of 16, old and compressed memories of 32,
    head dim 32), bf16 training's reconstruction loss computes its targets, its approximation and
    its squared error through `native_attention.cpp`: the loss lies nearer the fp32 model's than the
    PyTorch bf16 path's does, and the compressors' gradients as near as that path's."""
    from still.compressive import attention as attention_module, model as module, native

    if kernel and native.attention_library() is None:
        pytest.skip("the bf16 attention kernel cannot run here (no compiler or no AVX-512 bf16)")
    calls = []
    original = attention_module._native_content_attention

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(attention_module, "_native_content_attention", spy)
    monkeypatch.setattr(attention_module, "NATIVE_SCORES", kernel)
    monkeypatch.setattr(module, "NATIVE_SQUARED_ERROR", kernel)
    seq = tokens(b=2, l=160)
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = model(d_model=64, n_heads=2, mem_len=32, c_mem_len=32, compression_rate=1).train()
        state = None
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            for start in range(0, 128, 32):
                state = net(seq[:, start : start + 32], state).state
            loss = net(seq[:, 128:160], state).compression_loss.float()
        loss.backward()
        results[precision] = [loss.detach(), *(p.grad for p in net.compressor_parameters())]
    assert calls and all(calls) if kernel else not calls
    (loss, *grads), (want_loss, *want_grads) = results["bf16"], results["fp32"]
    # the kernels' loss lay 4e-5 from fp32's, the PyTorch bf16 path's 2.3e-4 (its scores rounded to bf16)
    assert abs(loss - want_loss) < (1e-4 if kernel else 1e-3) * want_loss
    for got, want in zip(grads, want_grads):
        assert (got - want).norm() < 0.01 * want.norm()


def test_bf16_training_under_cuda_autocasts_dtypes(monkeypatch):
    """CUDA's autocast runs softmax, log_softmax and layer_norm in fp32 where the CPU's keeps bf16.
    With those rules copied onto the CPU (and the CPU's kernels off, as on a GPU), a bf16 training
    step (both losses, all memories), an evaluation pass and an eager generation run, and the losses
    land near fp32's: no operator meets mixed dtypes."""
    from still.compressive import attention as attention_module, model as module
    from still.compressive.generate import generate

    monkeypatch.setattr(attention_module, "NATIVE_SCORES", False)
    monkeypatch.setattr(attention_module, "NATIVE_FP32", False)
    monkeypatch.setattr(module, "NATIVE_SQUARED_ERROR", False)

    def in_fp32(function):
        def cuda_rule(x, *args, **kwargs):
            if torch.is_autocast_enabled("cpu") and x.dtype == torch.bfloat16:
                with torch.autocast("cpu", enabled=False):
                    return function(x.float(), *args, **kwargs)
            return function(x, *args, **kwargs)
        return cuda_rule

    for owner, name in [(torch.Tensor, "softmax"), (torch, "softmax"), (F, "softmax"),
                        (torch.Tensor, "log_softmax"), (F, "log_softmax")]:
        monkeypatch.setattr(owner, name, in_fp32(getattr(owner, name)))
    layer_norm = F.layer_norm
    monkeypatch.setattr(F, "layer_norm", in_fp32(lambda x, shape, weight=None, bias=None, eps=1e-5: layer_norm(
        x, shape, None if weight is None else weight.float(), None if bias is None else bias.float(), eps)))
    seq = tokens(b=2, l=96)
    losses = {}
    for precision in ("fp32", "bf16"):
        net = model(mem_len=16, c_mem_len=16, compression_rate=2).train()
        state = None
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            for start in range(0, 96, 16):
                out = net(seq[:, start : start + 16], state)
                state = out.state
            lm = F.cross_entropy(out.logits.float()[:, :-1].flatten(0, 1), seq[:, 81:].flatten())
        (lm + out.compression_loss.float()).backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters() if p.requires_grad)
        losses[precision] = (lm.item(), out.compression_loss.item())
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            state, net = None, net.eval()
            for start in range(0, 96, 16):  # inference: cached projections, no reconstruction loss
                out = net(seq[:, start : start + 16], state)
                state = out.state
            lm = F.cross_entropy(out.logits.float()[:, :-1].flatten(0, 1), seq[:, 81:].flatten())
            losses[precision] += (lm.item(),)
            # generation (eager, as on a GPU without --compile): the prompt a layer at a time, then one token a step
            sampled = list(generate(net, seq[:1, :40], 24, segment_len=16, generator=torch.Generator().manual_seed(0)))
            assert len(sampled) == 24 and all(t.shape == (1,) for t in sampled)
    assert losses["bf16"][2] == pytest.approx(losses["fp32"][2], rel=0.02)
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=0.02)
    assert losses["bf16"][1] == pytest.approx(losses["fp32"][1], rel=0.1)


def test_steps_across_document_boundaries_read_nothing_from_the_device(monkeypatch):
    """On a GPU, every value read from the device waits for all the work queued before it. The
    memories' validity flags stay on the CPU and resets are read there, so training and evaluation
    steps across document boundaries read nothing from the device: here the meta device stands in
    for a GPU, where reading any value fails (autocast, which meta lacks, is left out)."""
    import contextlib

    autocast, enabled = torch.autocast, torch.is_autocast_enabled
    monkeypatch.setattr(torch, "autocast", lambda device_type, *args, **kwargs: (
        contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *args, **kwargs)))
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda *args: False if args and args[0] == "meta" else enabled(*args))
    config = CompressiveConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=4, d_ff=64, mem_len=8, c_mem_len=8,
                               compression_rate=2)
    model = CompressiveTransformer(config).to("meta")
    tokens = torch.zeros(3, 8, dtype=torch.long, device="meta")
    state, masked = None, []
    for step in range(8):
        reset = torch.tensor([step == 2, step == 3, False])  # on the CPU, as the data is
        out = model(tokens, state, reset=reset)
        loss = out.logits.float().sum()
        (loss if out.compression_loss is None else loss + out.compression_loss).backward()
        state = out.state.detach()
        masked.append(state.memory_valid is not None)
        assert out.logits.device.type == "meta" and state.memory[0].device.type == "meta"
        assert masked[-1] is False or state.memory_valid.device.type == "cpu"
    assert masked == [False, False, True, True, True, False, False, False]  # until the reset rows' slots fill
    model.eval()
    with torch.no_grad():
        for step in range(3):
            state = model(tokens, state, reset=torch.tensor([step == 1, False, False])).state
            masked.append(state.memory_valid is not None)
    assert masked[-3:] == [False, True, True]
    checkpoint = state.to_tensors()  # on the memories' device (rank 0 gathers them there)
    assert {t.device.type for t in checkpoint.values()} == {"meta"}


def test_another_models_inference_cache_is_not_used():
    """Two models of one configuration have made as many in-place writes to their weights; the keys
    and values a state caches are still only its own model's (`_weights_version`)."""
    config = CompressiveConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=4, d_ff=64, mem_len=8, c_mem_len=8,
                               compression_rate=2)
    torch.manual_seed(0)
    a, b = CompressiveTransformer(config).eval(), CompressiveTransformer(config).eval()
    x0, x = torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8))
    with torch.no_grad():
        state = a(x0).state  # with a's cached keys and values
        assert state.key_values is not None
        fresh = MemoryState.from_tensors(state.to_tensors())  # the memories alone
        torch.testing.assert_close(b(x, state).logits, b(x, fresh).logits, rtol=0, atol=0)


def test_a_state_of_another_layer_count_is_refused():
    config = CompressiveConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=4, d_ff=64, mem_len=8, c_mem_len=8,
                               compression_rate=2)
    model = CompressiveTransformer(config)
    tokens = torch.randint(0, 20, (2, 8))
    state = model(tokens).state
    for layers in (1, 3):
        wrong = MemoryState((state.memory * 2)[:layers], (state.compressed * 2)[:layers])
        with pytest.raises(StillError, match=f"the memory state has {layers} layers, the model 2"):
            model(tokens, wrong)


def test_a_state_made_under_longer_memories_is_refused():
    """A Transformer-XL model given a compressive model's state would keep its compressed slots
    forever; a memory longer than mem_len (+ c - 1 while a group fills) was made by another model."""
    base = dict(vocab_size=20, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    torch.manual_seed(0)
    compressive = CompressiveTransformer(CompressiveConfig(**base, mem_len=8, c_mem_len=8, compression_rate=2)).eval()
    xl = CompressiveTransformer(CompressiveConfig(**base, mem_len=8, c_mem_len=0)).eval()
    longer = CompressiveTransformer(CompressiveConfig(**base, mem_len=16, c_mem_len=0)).eval()
    tokens = torch.randint(0, 20, (2, 8))
    with torch.no_grad():
        state = compressive(tokens).state
        state = compressive(tokens, state).state  # 8 memories, 4 compressed ones
        assert (state.memory_len, state.compressed_len) == (8, 4)
        with pytest.raises(StillError, match="holds 8 memories and 4 compressed ones.*c_mem_len 0"):
            xl(tokens, state)
        with pytest.raises(StillError, match="holds 8 memories and 4 compressed ones"):
            Decoder(xl, state, 2)
        long_state = longer(torch.randint(0, 20, (2, 16))).state  # 16 memories
        with pytest.raises(StillError, match="holds 16 memories and 0 compressed ones.*mem_len 8"):
            xl(tokens, long_state)
        # an odd segment length leaves the compressive model's memory c - 1 past mem_len: still its own
        odd = compressive(torch.randint(0, 20, (2, 9))).state
        assert odd.memory_len == 9
        compressive(tokens, odd)
        Decoder(compressive, odd, 2)
        # layers that disagree, and validity flags of another shape
        ragged = state._replace(memory=(state.memory[0], state.memory[1][:, :4]))
        with pytest.raises(StillError, match=r"layer 1's memory has shape \(2, 4, 32\), layer 0's \(2, 8, 32\)"):
            compressive(tokens, ragged)
        flags = state._replace(memory_valid=torch.ones(2, 5, dtype=torch.bool))
        with pytest.raises(StillError, match=r"memory_valid has shape \(2, 5\), expected \(2, 8\)"):
            compressive(tokens, flags)


def test_tokens_and_states_the_model_cannot_read_are_named():
    """0-length segments ("invalid storage offset -1"), 1-D tokens (an unpack error), ids outside
    the vocabulary (the embedding's IndexError), a layer's memory of another dtype (a mixed-dtype
    matmul) and a state's tensors without a key (KeyError) raised PyTorch's or Python's own errors."""
    config = CompressiveConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=4, d_ff=64, mem_len=8, c_mem_len=8,
                               compression_rate=2)
    model = CompressiveTransformer(config).eval()
    for tokens, message in ((torch.zeros(2, 0, dtype=torch.long), r"got torch.int64 of shape \(2, 0\)"),
                            (torch.zeros(5, dtype=torch.long), r"got torch.int64 of shape \(5,\)"),
                            (torch.zeros(2, 3), r"got torch.float32 of shape \(2, 3\)"),
                            (torch.tensor([[1, 20]]), r"token id 20 is outside the vocabulary \(ids 0 to 19\)"),
                            (torch.tensor([[-1, 2]]), r"token id -1 is outside the vocabulary")):
        with pytest.raises(StillError, match=message):
            model(tokens)
    tokens = torch.randint(0, 20, (2, 8))
    with torch.no_grad():
        state = model(tokens).state
        mixed = state._replace(memory=(state.memory[0], state.memory[1].double()))
        with pytest.raises(StillError, match="layer 1's memory is torch.float64 on cpu, the model's weights "
                                             "torch.float32"):
            model(tokens, mixed)
        tensors = state.to_tensors()
        del tensors["compressed/1"]
        with pytest.raises(StillError, match="the memory state's tensors have no 'compressed/1'"):
            MemoryState.from_tensors(tensors)


def test_ids_of_any_integer_dtype_are_read_and_other_inputs_are_named():
    """A probe: uint8 ids (byte-level text's natural dtype), int8 and int16 raised the embedding's
    RuntimeError; a list, a tuple state, a float reset or float validity flags raised Python's or
    PyTorch's own errors, or (reset) were taken as bools."""
    config = CompressiveConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=4, d_ff=64, mem_len=8, c_mem_len=8,
                               compression_rate=2)
    model = CompressiveTransformer(config).eval()
    tokens = torch.randint(0, 20, (2, 8))
    with torch.no_grad():
        want = model(tokens).logits
        for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
            torch.testing.assert_close(model(tokens.to(dtype)).logits, want, rtol=0, atol=0)
        state = model(tokens).state
        for bad, kwargs, message in (
                ([[1, 2]], {}, "tokens must be ids .* got a list"),
                (tokens.bool(), {}, r"got torch.bool of shape \(2, 8\)"),
                (tokens, {"state": tuple(state)}, "the memory state must be a MemoryState .* got a tuple"),
                (tokens, {"reset": torch.tensor([0.5, 0.0])},
                 r"reset must be a \(2,\) bool tensor, .* got torch.float32"),
                (tokens, {"reset": [True, False]}, r"reset must be a \(2,\) bool tensor, .* got a list"),
                (tokens, {"state": state._replace(memory_valid=torch.ones(2, state.memory_len))},
                 "the state's memory_valid must be bool, got torch.float32")):
            with pytest.raises(StillError, match=message):
                model(bad, **kwargs)


def test_weights_written_past_the_version_counters_are_read_after_weights_changed():
    """A probe: new data put in (vector_to_parameters) and in-place writes through `.data` left the
    inference caches (W_r R, a state's keys and values, the decoding step's weights) of the old
    weights in use: other logits, other greedy text, with the weights equal."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from still.compressive.generate import generate

    config = CompressiveConfig(vocab_size=11, d_model=32, n_layers=1, n_heads=2, d_ff=64, mem_len=8, c_mem_len=8,
                               compression_rate=2)
    torch.manual_seed(1)
    model = CompressiveTransformer(config).eval()
    torch.manual_seed(2)
    other = CompressiveTransformer(config).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(10)
    x = torch.randint(0, 11, (1, 8))

    def read(m):
        with torch.no_grad():
            state = m(x).state  # (its keys and values cached in the state)
            return m(x, state).logits, torch.stack(list(generate(m, x, 12, top_k=1, state=state))).flatten()

    read(model)  # every cache made with the first weights
    vector_to_parameters(parameters_to_vector(other.parameters()), model.parameters())  # new data
    logits, text = read(model)
    want_logits, want_text = read(other)
    torch.testing.assert_close(logits, want_logits)
    assert torch.equal(text, want_text)
    source, fresh = CompressiveTransformer(config), CompressiveTransformer(config).eval()  # (made before the state:
    read(model)  # a module made afterwards would list the weights again, which the caches see)
    with torch.no_grad():
        state = model(x).state  # its memories' keys and values cached with these weights
        for p, q in zip(model.parameters(), source.parameters()):
            p.data.copy_(q.data * 3)  # in place through .data: no version counter sees it, so say so
    model.weights_changed()
    fresh.load_state_dict(model.state_dict())
    uncached = MemoryState.from_tensors(state.to_tensors())
    with torch.no_grad():
        torch.testing.assert_close(model(x, state).logits, fresh(x, uncached).logits)
    text = torch.stack(list(generate(model, x, 12, top_k=1, state=state)))
    assert torch.equal(text, torch.stack(list(generate(fresh, x, 12, top_k=1, state=uncached))))


@pytest.mark.parametrize("batched", [True, False])
def test_a_state_made_with_a_graph_is_detached(batched, monkeypatch):
    """A state whose memories carry a graph (made by hand) passed gradient from the reconstruction
    loss into what made them, and came back with its graph: the docstrings promise stop-gradient."""
    import still.compressive.model as model_module

    monkeypatch.setattr(model_module, "BATCHED_RECONSTRUCTION", batched)
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=13, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                                     mem_len=8, c_mem_len=4, compression_rate=2, dropout=0.0)).train()
    source = torch.randn(2, 8, 32, requires_grad=True)
    state = MemoryState((source * 1.0, source * 2.0), (torch.zeros(2, 0, 32),) * 2)
    out = model(torch.randint(0, 13, (2, 8)), state)
    (out.logits.sum() + out.compression_loss).backward()
    assert source.grad is None and out.compression_loss.item() > 0
    kept = model(torch.randint(0, 13, (2, 2)), MemoryState((source[:, :4],) * 2, (torch.zeros(2, 0, 32),) * 2))
    assert not any(t.requires_grad for t in (*kept.state.memory, *kept.state.compressed))
