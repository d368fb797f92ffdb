"""A prompt computed a layer at a time gives what the model's forward gives segment by segment."""

import re

import pytest
import torch

from still.compressive import prefill as prefill_module
from still.compressive.model import CompressiveConfig, CompressiveLayer, CompressiveTransformer
from still.compressive.prefill import plan, prefill, supports, supports_model
from still.errors import StillError
from still.train.precision import autocast

CASES = {  # (model options, prompt length, segment length)
    "conv, segments as long as the memory": (dict(mem_len=8, c_mem_len=8, compression_rate=4), 32, 8),
    "conv, a partial last segment": (dict(mem_len=16, c_mem_len=12, compression_rate=4), 50, 12),
    "conv, segments longer than the memory": (dict(mem_len=4, c_mem_len=6, compression_rate=2), 41, 9),
    "dilated": (dict(mem_len=6, c_mem_len=3, compression_rate=2, compression="dilated"), 30, 4),
    "max, post-norm": (dict(mem_len=8, c_mem_len=8, compression_rate=2, compression="max", pre_norm=False), 37, 5),
    "mean": (dict(mem_len=4, c_mem_len=5, compression_rate=4, compression="mean"), 23, 7),
    "XL": (dict(mem_len=12, c_mem_len=0), 40, 7),
    "no memory": (dict(mem_len=0, c_mem_len=0), 20, 6),
    "compressed only": (dict(mem_len=0, c_mem_len=3, compression_rate=2), 19, 4),
    "tied embeddings": (dict(mem_len=3, c_mem_len=2, compression_rate=3, tie_embeddings=True), 17, 3),
    "a prompt shorter than a segment": (dict(mem_len=6, c_mem_len=4, compression_rate=2), 3, 8),
}


def _model(**options) -> CompressiveTransformer:
    config = CompressiveConfig(vocab_size=13, d_model=16, n_layers=3, n_heads=2, d_ff=32, dropout=0.1, **options)
    return CompressiveTransformer(config).eval()


def _by_segments(model, tokens, state, segment_len):
    with torch.no_grad():
        for start in range(0, tokens.shape[1], segment_len):
            out = model(tokens[:, start : start + segment_len], state, last_logits=True)
            state = out.state
    return out.logits[:, -1], state


def _assert_same_state(got, want, atol):
    assert got.key_values_version.weights == want.key_values_version.weights  # (each its own memories)
    for state in (got, want):
        assert state.cache(state.key_values_version.weights) is not None
    assert got.memory_valid is None and want.memory_valid is None
    assert got.compressed_valid is None and want.compressed_valid is None
    for name in ("memory", "compressed", "key_values"):
        for g, w in zip(getattr(got, name), getattr(want, name), strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            torch.testing.assert_close(g, w, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("start", ["empty", "after segments", "after segments, no cache"])
def test_prefill_gives_the_forward_segment_by_segment(case, start):
    options, length, segment_len = CASES[case]
    model = _model(**options)
    tokens = torch.randint(0, 13, (2, length))
    state = None
    if start != "empty":  # a state with memories (and compressed ones) already
        _, state = _by_segments(model, torch.randint(0, 13, (2, 2 * segment_len + 1)), None, segment_len)
        if start.endswith("no cache"):
            state = state._replace(key_values=None, key_values_version=None)
    assert supports(model, state)
    logits, got = prefill(model, tokens, state, segment_len)
    want_logits, want = _by_segments(model, tokens, state, segment_len)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    _assert_same_state(got, want, atol=1e-5)
    # the state carries on as the forward's would
    more = torch.randint(0, 13, (2, segment_len))
    with torch.no_grad():
        torch.testing.assert_close(model(more, got).logits, model(more, want).logits, atol=1e-5, rtol=0)


def test_prefill_under_bf16_autocast_gives_the_bf16_forward():
    model = _model(mem_len=8, c_mem_len=8, compression_rate=4)
    tokens = torch.randint(0, 13, (1, 40))
    with autocast("bf16"):
        logits, got = prefill(model, tokens, None, 8)
        want_logits, want = _by_segments(model, tokens, None, 8)
    assert got.key_values[0].dtype == torch.bfloat16 and got.memory[0].dtype == torch.float32
    # bf16 products over 128 rows (rounded in another order) against 8 at a time: within bf16's rounding
    torch.testing.assert_close(logits.float(), want_logits.float(), atol=0.05, rtol=0)
    _assert_same_state(got, want, atol=0.05)
    # and an fp32 prefill's cache is not read by a bf16 forward, nor the reverse
    _, fp32 = prefill(model, tokens, None, 8)
    with autocast("bf16"):
        _, again = prefill(model, tokens[:, :8], fp32, 8)
    assert again.key_values[0].dtype == torch.bfloat16


def test_a_bf16_prefill_with_the_hand_written_attention_gives_the_pytorch_one(monkeypatch):
    """Under bf16 autocast (`generate` with `compile`): the prompt's attention through the kernel,
    the scores in fp32, within bf16's rounding of PyTorch's bf16 attention; the cache in bf16."""
    from still.compressive import native

    if native.library() is None:
        pytest.skip("no C++ compiler builds the hand-written kernels here")
    calls = []
    attend = native.prompt_attention

    def counted(*args):
        out = attend(*args)
        calls.append(out is not None)  # (None: PyTorch's attention instead)
        return out

    monkeypatch.setattr(native, "prompt_attention", counted)
    config = CompressiveConfig(vocab_size=13, d_model=32, n_layers=3, n_heads=2, d_ff=64, mem_len=8, c_mem_len=8,
                               compression_rate=4)  # (d_head 16: the kernel's smallest)
    model = CompressiveTransformer(config).eval()
    tokens = torch.randint(0, 13, (1, 40))
    with autocast("bf16"):
        want_logits, want = prefill(model, tokens, None, 8)
        assert not calls
        logits, got = prefill(model, tokens, None, 8, written=True)
    assert calls and all(calls) and got.key_values[0].dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), want_logits.float(), atol=0.05, rtol=0)
    _assert_same_state(got, want, atol=0.05)


def test_the_plan_places_each_segments_keys_and_the_next_state_by_the_memory_rule():
    # 12 tokens in segments of 4, memory 4, compressed memory 2 at rate 2, from an empty state; the
    # rows are [cache (none), the prompt's 12, the new compressed slots'], so compressed slot j is row 12 + j
    got = plan(0, 0, 12, 4, 4, 2, 2, True, torch.device("cpu"))
    assert [k.tolist() for k in got.keys] == [[0, 1, 2, 3], list(range(8)), [12, 13, *range(4, 12)]]
    assert got.counts == (0, 4, 4)  # the second and third segments compress 4 memories each
    assert got.cache.tolist() == [14, 15, 8, 9, 10, 11]  # compressed slots 2 and 3, then the last segment
    assert got.memory == (8, 12) and got.compressed == (2, 4)
    # after 2 memories and 1 compressed slot (rows 0, then 1 and 2 of the cache), without compression:
    # Transformer-XL drops the oldest
    xl = plan(2, 1, 5, 4, 4, 2, 2, False, torch.device("cpu"))
    assert [k.tolist() for k in xl.keys] == [[0, 1, 2, 3, 4, 5, 6], [0, 3, 4, 5, 6, 7]]
    assert xl.cache.tolist() == [0, 4, 5, 6, 7] and xl.memory == (3, 7) and xl.compressed == (0, 1)
    assert plan(0, 0, 12, 4, 4, 2, 2, True, torch.device("cpu")) is got  # memoised: once for every layer


def test_the_plan_groups_runs_of_segments_of_one_length_padding_their_keys_in_front():
    # the same prompt in groups of at most 2 segments, and a last segment of 2 tokens in a group of its own
    got = plan(0, 0, 14, 4, 4, 2, 2, True, torch.device("cpu"), 2)
    assert [(g.first, g.padding) for g in got.groups] == [(0, (4, 0)), (2, (0,)), (3, (0,))]
    assert got.groups[0].keys.tolist() == [0, 0, 0, 0, 0, 1, 2, 3, *range(8)]
    assert [g.keys.tolist() for g in got.groups[1:]] == [k.tolist() for k in got.keys[2:]]
    assert len(got.keys[3]) == 8  # the last segment's: 2 compressed slots, 4 memories, its own 2 tokens
    assert [len(g.padding) for g in plan(0, 0, 14, 4, 4, 2, 2, True, torch.device("cpu")).groups] == [1, 1, 1, 1]


@pytest.mark.parametrize("case", ["conv, a partial last segment", "max, post-norm", "XL", "no memory"])
@pytest.mark.parametrize("start", ["empty", "after segments"])
def test_segments_attending_together_give_what_they_give_one_at_a_time(case, start, monkeypatch):
    options, length, segment_len = CASES[case]
    model = _model(**options)
    tokens = torch.randint(0, 13, (2, 3 * length))
    state = None if start == "empty" else prefill(model, torch.randint(0, 13, (2, 2 * segment_len + 1)), None,
                                                  segment_len)[1]
    calls = []
    attend = model.layers[0].attention.causal_attention
    monkeypatch.setattr(model.layers[0].attention, "causal_attention",
                        lambda q, kv, padding=None: calls.append(q.shape[0]) or attend(q, kv, padding))
    full, partial = divmod(tokens.shape[1], segment_len)  # whole segments; a last one of `partial` tokens
    results = {}
    for rows, expected in ((1, full + (partial > 0)),  # one segment a call
                           (2 * segment_len * 3, -(-full // 3) + (partial > 0)),  # three whole ones a call
                           (10**6, 1 + (partial > 0))):  # all the whole ones in one call
        monkeypatch.setattr(prefill_module, "GROUP_ROWS", rows)
        calls.clear()
        results[rows] = prefill(model, tokens, state, segment_len, all_logits=True)
        assert sum(calls) == 2 * (full + (partial > 0))  # each segment of each row once
        assert len(calls) == expected
    for rows in (2 * segment_len * 3, 10**6):
        torch.testing.assert_close(results[rows][0], results[1][0], atol=1e-5, rtol=0)
        _assert_same_state(results[rows][1], results[1][1], atol=1e-5)


def test_the_state_after_a_prompt_does_not_keep_the_prompts_inputs_alive():
    model = _model(mem_len=8, c_mem_len=8, compression_rate=4)
    _, state = prefill(model, torch.randint(0, 13, (1, 200)), None, 8)
    for t in (*state.memory, *state.compressed, *state.key_values):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_the_last_layer_runs_its_attention_and_feed_forward_for_the_last_position_only(monkeypatch):
    model = _model(mem_len=8, c_mem_len=8, compression_rate=4)
    rows = []
    block = CompressiveLayer.feed_forward_block
    monkeypatch.setattr(CompressiveLayer, "feed_forward_block",
                        lambda self, h: rows.append(h.shape[1]) or block(self, h))
    prefill(model, torch.randint(0, 13, (1, 24)), None, 8)
    assert rows == [24, 24, 1]
    rows.clear()
    logits, _ = prefill(model, torch.randint(0, 13, (1, 24)), None, 8, all_logits=True)  # every position's
    assert rows == [24, 24, 24] and logits.shape == (1, 24, 13)


@pytest.mark.parametrize("case", ["conv, a partial last segment", "max, post-norm", "XL"])
def test_prefill_gives_every_positions_logits_as_the_forward(case):
    options, length, segment_len = CASES[case]
    model = _model(**options)
    tokens = torch.randint(0, 13, (2, length))
    _, state = _by_segments(model, torch.randint(0, 13, (2, segment_len + 3)), None, segment_len)
    logits, got = prefill(model, tokens, state, segment_len, all_logits=True)
    want = []
    with torch.no_grad():
        for start in range(0, length, segment_len):
            out = model(tokens[:, start : start + segment_len], state)
            want.append(out.logits)
            state = out.state
    torch.testing.assert_close(logits, torch.cat(want, dim=1), atol=1e-5, rtol=0)
    _assert_same_state(got, state, atol=1e-5)


def test_a_model_with_compiled_feed_forward_blocks_runs_through_the_forward():
    model = _model(mem_len=4, c_mem_len=4, compression_rate=2)
    assert supports_model(model)
    model.compile_feed_forward()  # (compiled lazily: nothing is compiled here)
    assert not supports_model(model) and not supports(model, None)


@pytest.mark.parametrize("why", ["most_used", "masked slots", "training"])
def test_what_prefill_cannot_do_runs_through_the_forward(why, monkeypatch):
    """most_used compression needs the attention weights; masked slots (a document boundary) need
    the masked attention; a model in training mode has dropout: each runs through `forward`."""
    options = dict(mem_len=4, c_mem_len=4, compression_rate=2)
    model = _model(**options, compression="most_used") if why == "most_used" else _model(**options)
    tokens = torch.randint(0, 13, (2, 13))
    state = None
    if why == "masked slots":
        _, state = _by_segments(model, tokens, None, 4)
        state = state.reset(torch.tensor([True, False]))
    if why == "training":
        model.train()
    assert not supports(model, state)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    torch.manual_seed(1)
    logits, got = prefill(model, tokens, state, 4)
    assert len(calls) == 4
    if why != "training":  # (dropout draws differ between runs)
        monkeypatch.setattr(model, "forward", forward)
        want_logits, want = _by_segments(model, tokens, state, 4)
        torch.testing.assert_close(logits, want_logits, atol=0, rtol=0)


@pytest.mark.parametrize("length, segment_len, message", [
    (0, 4, "tokens must be ids (batch, length >= 1), got torch.int64 of shape (1, 0)"),
    (5, 0, "segment_len must be an int >= 1, got 0"),
    (5, 2.5, "segment_len must be an int >= 1, got 2.5")])
def test_prefill_refuses_an_empty_prompt_or_segment(length, segment_len, message):
    with pytest.raises(StillError, match=re.escape(message)):
        prefill(_model(), torch.zeros(1, length, dtype=torch.long), None, segment_len)


def test_prefill_checks_the_tokens_as_the_forward_does():
    """uint8 ids are read as the forward reads them; an id outside the vocabulary and 1-D tokens
    are named (they were the embedding's RuntimeError and IndexError, and an unpacking error)."""
    model, tokens = _model(mem_len=8, c_mem_len=4, compression_rate=2), torch.randint(0, 13, (2, 9))
    logits, state = prefill(model, tokens.to(torch.uint8), None, 4)
    want_logits, want = _by_segments(model, tokens, None, 4)
    torch.testing.assert_close(logits, want_logits)
    _assert_same_state(state, want, atol=1e-6)
    for bad, message in ((torch.tensor([[3, 13]]), "token id 13 is outside the vocabulary (ids 0 to 12)"),
                         (torch.tensor([[-1, 2]]), "token id -1 is outside the vocabulary"),
                         (torch.tensor([3, 4]), "got torch.int64 of shape (2,)"),
                         (torch.zeros(1, 3), "tokens must be ids (batch, length >= 1), got torch.float32"),
                         ([[1, 2]], "tokens must be ids (batch, length >= 1), got a list")):
        with pytest.raises(StillError, match=re.escape(message)):
            prefill(model, bad, None, 4)


def test_generate_feeds_the_prompt_through_prefill(monkeypatch):
    from still.compressive import generate as generate_module

    model = _model(mem_len=4, c_mem_len=4, compression_rate=2)
    calls = []
    monkeypatch.setattr(generate_module, "prefill",
                        lambda *args, **kw: calls.append((args[1].shape, kw)) or prefill_module.prefill(*args, **kw))
    tokens = list(generate_module.generate(model, torch.randint(0, 13, (1, 10)), 3, segment_len=4))
    assert calls == [(torch.Size([1, 10]), {"written": False})] and len(tokens) == 3
    calls.clear()  # with `compile`, the prompt's attention through the hand-written kernel where it can
    one_head = CompressiveTransformer(CompressiveConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=1, d_ff=32,
                                                        mem_len=4, c_mem_len=4, compression_rate=2)).eval()
    tokens = list(generate_module.generate(one_head, torch.randint(0, 13, (1, 10)), 3, segment_len=4, compile=True))
    assert calls == [(torch.Size([1, 10]), {"written": True})] and len(tokens) == 3


@pytest.mark.parametrize("kind", ["conv", "max", "mean", "dilated"])
def test_each_layer_compresses_every_segments_old_memories_in_one_call(kind, monkeypatch):
    from still.compressive.compression import Compressor

    model = _model(mem_len=8, c_mem_len=8, compression_rate=4, compression=kind)
    seen = []
    forward = Compressor.forward
    monkeypatch.setattr(Compressor, "forward",
                        lambda self, old, *rest: seen.append(old.shape[1]) or forward(self, old, *rest))
    tokens = torch.randint(0, 13, (1, 40))  # 5 segments of 8: the last 4 compress 8 memories each
    logits, state = prefill(model, tokens, None, 8)
    assert seen == [32] * len(model.layers)
    want_logits, want = _by_segments(model, tokens, None, 8)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    _assert_same_state(state, want, atol=1e-5)

