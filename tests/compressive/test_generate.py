"""Sampling and generation (generate.py); end-to-end generation from a trained run is in
tests/recipes/test_lm_recipe.py."""

import math
import re

import numpy as np
import pytest
import torch

from still.compressive.generate import filter_logits, generate, sample
from still.compressive.model import CompressiveConfig, CompressiveTransformer
from still.errors import StillError


def test_sample_follows_the_distribution_and_never_draws_an_impossible_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0]]).expand(20000, -1)  # (B, V): zeros at both ends too
    tokens = sample(probs, torch.Generator().manual_seed(0))
    assert tokens.shape == (20000,)
    frequencies = torch.bincount(tokens, minlength=6) / 20000
    assert frequencies[[0, 2, 5]].tolist() == [0, 0, 0]
    torch.testing.assert_close(frequencies, probs[0], atol=0.015, rtol=0)  # 4.5 standard errors at most
    # unnormalised rows sample as their normalisation; a row with one possible token always draws it
    assert sample(torch.tensor([[0.0, 0.0, 2.0]]), torch.Generator().manual_seed(1)).item() == 2
    assert torch.equal(sample(probs[:50], torch.Generator().manual_seed(3)),
                       sample(probs[:50], torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("v", [1, 2, 15, 16, 17, 65, 256, 1000, 4096, 4097])
def test_fused_cumulative_sums_are_the_cumulative_sums(v):
    """The compiler's cumulative sums (blocks of triangular products) equal `cumsum` at every size,
    a multiple of the block or not; past FUSED_CUMULATIVE_UP_TO it is `cumsum` itself."""
    from still.compressive.sampling import cumulative

    probs = torch.rand(3, v, dtype=torch.float64)
    torch.testing.assert_close(cumulative(probs, fused=True), probs.cumsum(-1), rtol=1e-12, atol=1e-12)
    assert cumulative(probs).equal(probs.cumsum(-1))


def test_where_cumsum_may_not_run_the_block_products_do(monkeypatch):
    """Under deterministic algorithms PyTorch refuses a floating-point `cumsum` on CUDA: sampling's
    cumulative sums (the draw's and top-p's) are then the block products, at every vocabulary size,
    and give the same tokens. (`_scan_not_allowed` is forced here: CI has no GPU.)"""
    from still.compressive import sampling

    torch.manual_seed(0)
    logits, uniform = torch.randn(4, 5000), torch.rand(4, 1)
    expected = sampling.next_token(logits, uniform, sampling.Sampling(0.9, top_p=0.8))
    monkeypatch.setattr(sampling, "_scan_not_allowed", lambda probs: True)
    monkeypatch.setattr(torch.Tensor, "cumsum", lambda *args, **kwargs: pytest.fail("cumsum ran"))
    assert sampling.next_token(logits, uniform, sampling.Sampling(0.9, top_p=0.8)).equal(expected)


def test_fused_and_plain_draws_agree_and_skip_impossible_tokens():
    from still.compressive.sampling import invert

    torch.manual_seed(0)
    for v in (7, 256, 300):
        possible = torch.rand(64, v) < 0.4  # most tokens impossible, at least one possible in every row
        possible[torch.arange(64), torch.randint(v, (64,))] = True
        probs = torch.rand(64, v).softmax(-1) * possible  # (B, V), unnormalised
        probs[0] = 0
        probs[0, v // 2] = 1  # one possible token
        uniform = torch.rand(64, 1)
        uniform[:4] = torch.tensor([[0.0], [0.5], [1 - 2**-24], [0.999]])
        plain, fused = invert(probs, uniform), invert(probs, uniform, fused=True)
        assert plain.equal(fused)
        assert (probs.gather(1, plain[:, None]) > 0).all() and plain[0] == v // 2
        running = probs.cumsum(-1)  # the first token whose cumulative probability exceeds u * total
        expected = (running <= uniform * running[:, -1:]).sum(-1).clamp(max=v - 1)
        assert plain.equal(expected)
    # u = 0 draws the first possible token, u -> 1 the last
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0]])
    assert [invert(probs, torch.tensor([[u]])).item() for u in (0.0, 0.25, 0.5, 0.75, 1 - 2**-24)] == [1, 1, 3, 3, 3]


def test_a_draw_never_picks_an_impossible_token_even_if_the_sums_round_up(monkeypatch):
    """Cumulative sums that rise (rounding, in another order of summation) at an impossible token:
    the draw passes over it to the next possible one."""
    import still.compressive.sampling as sampling

    probs = torch.tensor([[0.25, 0.25, 0.0, 0.5]])
    monkeypatch.setattr(sampling, "cumulative", lambda p, fused=False: torch.tensor([[0.25, 0.5, 0.5001, 1.0]]))
    assert sampling.invert(probs, torch.tensor([[0.50005]])).item() == 3  # token 2 is past u but impossible


@pytest.mark.parametrize("sampling", [{"temperature": 1e-40}, {"temperature": 1e-46}, {"top_p": 1e-46},
                                      {"temperature": 1e-46, "top_p": 1e-46}], ids=str)
def test_a_tiny_temperature_or_top_p_draws_the_likeliest_token(sampling):
    """T = 1e-40: the logits divided by it were infinite, the softmax NaN, and the draw token 0.
    Found by a probe: T or top-p below 1.4e-45 rounded to 0 in float32 (0 / 0, or every token
    dropped), and every draw was token 0."""
    from still.compressive.sampling import Sampling, next_token

    logits = torch.tensor([[3.0, 9.0, 1.0, 5.0], [-2.0, -7.0, -1.5, -9.0]])
    for uniform in (0.0, 0.5, 0.999):
        drawn = next_token(logits, torch.full((2, 1), uniform), Sampling(**sampling))
        assert drawn.tolist() == [1, 2]


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    # p = (0.087, 0.644, 0.237, 0.032): 0.5 keeps 3.0 only; 0.85 also 2.0 (0.881); 0.9 also 1.0 (0.968)
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.9)).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("compression", ["conv", "most_used"])  # the ring-buffer decoder, and the model's forward
def test_generation_restores_the_thread_count_and_grad_mode_between_tokens(compression, monkeypatch):
    """A small model decodes on one thread where OpenMP's threads sleep (decode.threads_for), but the
    caller's code between tokens runs with its own setting; nothing is recorded for autograd, and the
    caller's grad mode holds between tokens."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=7, d_model=8, n_layers=1, n_heads=2, d_ff=16,
                                                     mem_len=4, c_mem_len=2, compression_rate=2,
                                                     compression=compression))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for token in generate(model, torch.zeros(1, 6, dtype=torch.long), 10, segment_len=4,
                              generator=torch.Generator().manual_seed(0)):
            assert torch.get_num_threads() == 2 and 0 <= int(token) < 7
            assert torch.is_grad_enabled() and token.grad_fn is None
    finally:
        torch.set_num_threads(before)


def test_the_decoder_draws_what_the_logits_say():
    """step_sample: the step and the draw in one call, the same token as drawing from step's logits."""
    from still.compressive.decode import Decoder
    from still.compressive.sampling import Sampling, next_token

    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=9, d_model=8, n_layers=1, n_heads=2, d_ff=16,
                                                     mem_len=4, c_mem_len=2, compression_rate=2)).eval()
    a, b = Decoder(model, None, batch=3), Decoder(model, None, batch=3)
    tokens = torch.tensor([1, 2, 3])
    for i, sampling in enumerate([Sampling(), Sampling(0.7, top_k=3), Sampling(1.3, top_p=0.8)] * 3):
        uniform = torch.rand(3, 1)
        drawn = a.step_sample(tokens, uniform, sampling)
        torch.testing.assert_close(drawn, next_token(b.step(tokens), uniform, sampling), rtol=0, atol=0)
        tokens = (drawn + i) % 9


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=5, top_p=0.9)])
def test_compiled_generation_gives_the_eager_tokens(sampling):
    """The draw runs inside the compiled step from uniform numbers drawn outside it: one seed, one text."""
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2))
    prompt = torch.randint(0, 11, (2, 7))
    runs = [torch.stack(list(generate(model, prompt, 12, segment_len=4, generator=torch.Generator().manual_seed(5),
                                      compile=compile, **sampling))) for compile in (False, True)]
    assert torch.equal(runs[0], runs[1])
    assert not runs[1].requires_grad  # the compiled step, called in grad mode: nothing recorded


def test_an_excluded_token_is_never_drawn_by_any_step():
    """A probe: `lm generate` drew the padding (never a training target, not quite improbable, and
    written as nothing): 200 tokens at temperature 100 wrote 193 characters. `exclude` masks a token
    before the temperature and filters, in the eager, compiled and hand-written steps alike."""
    from still.compressive.decode import Decoder

    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                                     mem_len=4, c_mem_len=2, compression_rate=2))
    prompt = torch.randint(0, 11, (2, 7))

    def tokens(compile, **sampling):
        sampling = {"temperature": 100.0} | sampling
        return torch.stack(list(generate(model, prompt, 150, segment_len=4, generator=torch.Generator().manual_seed(5),
                                         compile=compile, **sampling)))

    assert (tokens(False) == 0).any()  # (the control: at this temperature it is drawn)
    assert Decoder(model.eval(), None, batch=2, compile=True, native=True).native is not None  # (None: hand-written)
    runs = [tokens(compile, exclude=0) for compile in (False, True, None)]
    assert all(not (run == 0).any() for run in runs) and all(torch.equal(run, runs[0]) for run in runs)
    # several (`lm generate`'s padding and document start: a probe's corpus without a newline generated 17
    # in 200 tokens, the start written as one)
    assert (tokens(False, exclude=0) == 1).any()
    runs = [tokens(compile, exclude=(1, 0, 1)) for compile in (False, True, None)]
    assert all(not (run <= 1).any() for run in runs) and all(torch.equal(run, runs[0]) for run in runs)
    greedy = [tokens(compile, exclude=int(tokens(False, top_k=1)[0, 0]), top_k=1) for compile in (False, None)]
    assert torch.equal(greedy[0], greedy[1])  # (the likeliest excluded: the next likeliest, also at a tiny T)
    assert torch.equal(tokens(None, exclude=3, temperature=1e-30)[:1], tokens(False, exclude=3, top_k=1)[:1])
    # kept no tokens: the same draws, nothing kept; the tokens and the memories after them refused
    for compile in (False, True, None):
        generation = generate(model, prompt, 150, segment_len=4, generator=torch.Generator().manual_seed(5),
                              compile=compile, exclude=(1, 0, 1), temperature=100.0, keep_tokens=False)
        assert torch.equal(torch.stack(list(generation)), runs[0]) and generation._record.chunks == []
        for ask in ("tokens", "state", "state_after"):
            with pytest.raises(StillError, match="kept no tokens \\(generate's keep_tokens=False\\)"):
                generation.state_after(1) if ask == "state_after" else getattr(generation, ask)
        prompts = generate(model, prompt, 1, segment_len=4, compile=compile).state_after(0)
        assert (generation.state_after(0).memory_len, generation.state_after(0).compressed_len) == (
            prompts.memory_len, prompts.compressed_len)  # (the prompt's state, as a generation that kept them)
    for bad in (11, -1, True, 2.0, (0, 11), "0", [0.5]):
        with pytest.raises(StillError, match=re.escape(f"exclude must be a token id (0 to 10), a sequence of them or "
                                                       f"None, got {bad!r}")):
            generate(model, prompt, 3, exclude=bad)
    with pytest.raises(StillError, match="exclude would leave a vocabulary of 11 tokens nothing to draw"):
        generate(model, prompt, 3, exclude=range(11))
    # a state that cannot go with the model or the prompt: named at the call, not at the first token
    for state, message in (({"a": 1}, "must be a MemoryState \\(or None\\), got a dict"),
                           (model.empty_state(3), "the memory state holds 3 batch rows, the tokens 2")):
        for count in (0, 3):
            with pytest.raises(StillError, match=message):
                generate(model, prompt, count, state=state)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_decoding_under_bf16_autocast_reads_bf16_matrices(precision, compile, monkeypatch):
    """Under bf16 autocast, a compiled decoder stores its matrices and keys in bf16; an eager one,
    and every decoder in fp32, in the weights' dtype. Here compiling cannot work: a bf16 decoder is
    then replaced by one in the weights' dtype (eager steps run faster in it)."""
    from still.compressive import decode, generate as module

    monkeypatch.setattr(decode, "ahead_of_time_all", lambda requests, threads=None: [None] * len(requests))
    made = []
    monkeypatch.setattr(module, "Decoder",
                        lambda *args, **kwargs: made.append(decode.Decoder(*args, **kwargs)) or made[-1])
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        tokens = list(generate(model, torch.randint(0, 11, (1, 5)), 6, segment_len=4, compile=compile))
    bf16 = precision == "bf16" and compile
    assert len(tokens) == 6 and len(made) == (2 if bf16 else 1)
    assert made[0].keys.dtype == made[0].weights["0.qkv"].dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert made[-1].keys.dtype == made[-1].weights["0.qkv"].dtype == torch.float32  # the one that decodes


@pytest.mark.parametrize("case", ["runs", "d_head 8", "no library"])
def test_the_default_decodes_with_the_hand_written_step_where_it_runs_else_eagerly(case, monkeypatch):
    """compile=None (`still lm generate`'s default): the hand-written step where it can run this
    model, the tokens of compile=True; where it cannot (d_head not a multiple of 16, or it cannot be
    built here), eager steps, saying why, and never the minute of compiling ahead of time."""
    from still.compressive import decode, generate as module

    monkeypatch.setattr(decode, "ahead_of_time_all", lambda requests, threads=None: pytest.fail("compiled"))
    if case == "no library":
        monkeypatch.setattr(module, "native_library", lambda fallback: None)
    said, made = [], []
    monkeypatch.setattr(module, "log", said.append)
    monkeypatch.setattr(module, "Decoder",
                        lambda *args, **kwargs: made.append(decode.Decoder(*args, **kwargs)) or made[-1])
    torch.manual_seed(0)
    d_model = 16 if case == "d_head 8" else 32
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=d_model, n_layers=1, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2))
    prompt = torch.randint(0, 11, (2, 7))

    def run(compile):
        return torch.stack(list(generate(model, prompt, 20, segment_len=4, compile=compile,
                                         generator=torch.Generator().manual_seed(5))))

    tokens = run(None)
    hand_written = case == "runs"
    assert (made[-1].native is not None) == hand_written and made[-1].compile == hand_written
    assert said == (["the hand-written decoding step cannot run here: it needs d_head, d_model and d_ff in "
                     "multiples of 16 (got 8, 16, 32); using eager steps"] if case == "d_head 8" else [])
    assert torch.equal(tokens, run(False))
    if hand_written:
        assert torch.equal(tokens, run(True))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_drawing_the_uniform_numbers_in_blocks_gives_the_same_tokens(monkeypatch, compile):
    """`generate` draws its uniform numbers DRAWN_AT_ONCE tokens at a time: on the CPU the same
    numbers, so the same tokens, as one draw a token; also where the hand-written step takes 16
    tokens' numbers a call across blocks (`_Draws.take`)."""
    from still.compressive import generate as module

    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=32, n_layers=1, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2))  # d_head 16
    prompt = torch.randint(0, 11, (2, 7))
    runs = []
    for at_once in (1, 3, 7, 1024):
        monkeypatch.setattr(module, "DRAWN_AT_ONCE", at_once)
        runs.append(torch.stack(list(generate(model, prompt, 40, segment_len=4, compile=compile,
                                              generator=torch.Generator().manual_seed(5)))))
    assert all(torch.equal(runs[0], run) for run in runs[1:])
    draws = module._Draws(3, 2, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert draws.take().shape == (2, 1) and draws.take(2).shape == (2, 2, 1)
    with pytest.raises(RuntimeError, match="more uniform numbers"):
        draws.take()


def _streams_and_model(batch: int):
    from still.data.text import TokenStreams

    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                                     mem_len=8, c_mem_len=4, compression_rate=2, dropout=0.1))
    docs = [torch.randint(3, 20, (int(n),)) for n in torch.randint(5, 60, (7,))]  # documents end mid-stream
    return TokenStreams(docs, batch, 8), model


@pytest.mark.parametrize("batch", [1, 3])
def test_evaluation_summed_on_the_device_gives_the_same_result(batch, monkeypatch):
    """Off the CPU, evaluation sums its losses where the model is and reads them once (a read per
    segment would wait for a GPU's queue each time): the same bits, tokens and buckets. Forced here
    on the CPU, where nothing may be read before the end."""
    from still.compressive.generate import evaluate_streams

    streams, model = _streams_and_model(batch)
    edges = [0, 4, 16, 32, 10_000]
    plain = evaluate_streams(model, streams, position_edges=edges)
    reads = []
    cpu = torch.Tensor.cpu  # the losses' copies (floats; the memories' validity flags are kept there anyway)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: (reads.append(self.shape) if self.is_floating_point()
                                                           else None) or cpu(self))
    deferred = evaluate_streams(model, streams, position_edges=edges, on_device=True)
    assert reads == [torch.Size([len(edges) - 1])]  # the buckets, once (and the total by float())
    assert deferred["tokens"] == plain["tokens"]
    assert deferred["bits_per_token"] == pytest.approx(plain["bits_per_token"], rel=1e-12)
    for a, b in zip(deferred["by_position"], plain["by_position"]):
        assert a["tokens"] == b["tokens"] and a["bits_per_token"] == pytest.approx(b["bits_per_token"], rel=1e-12)


@pytest.mark.parametrize("batch, shards", [(4, 2), (5, 2), (5, 3), (3, 8)])
def test_sharded_evaluation_gives_the_unsharded_losses(batch, shards):
    from still.compressive.generate import evaluate_streams

    streams, model = _streams_and_model(batch)
    edges = [0, 4, 16, 64]
    plain = evaluate_streams(model, streams, position_edges=edges)
    sharded = evaluate_streams(model, streams, position_edges=edges, shards=shards)
    assert model.training  # put back as it was
    assert sharded["tokens"] == plain["tokens"] == streams.num_targets
    assert sharded["bits_per_token"] == pytest.approx(plain["bits_per_token"], abs=1e-6)
    assert [b["tokens"] for b in sharded["by_position"]] == [b["tokens"] for b in plain["by_position"]]
    assert ([b["bits_per_token"] for b in sharded["by_position"]]
            == pytest.approx([b["bits_per_token"] for b in plain["by_position"]], abs=1e-6))


def test_shards_score_their_rows_under_the_callers_autocast_without_gradients():
    import threading

    from still.compressive.generate import StreamScorer

    streams, model = _streams_and_model(4)
    model.eval()
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(
        (threading.current_thread().name, args[0].shape[0], torch.is_grad_enabled(), out.logits.dtype)))
    segment = streams.segment(0)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), StreamScorer(model, 4, shards=2) as scorer:
        sharded = scorer(segment.inputs, segment.targets, segment.reset)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), StreamScorer(model, 4) as scorer:
        plain = scorer(segment.inputs, segment.targets, segment.reset)
    shard_calls = sorted(seen[:2])
    assert [(name.startswith("still-shard"), rows, grad, dtype) for name, rows, grad, dtype in shard_calls] == [
        (True, 2, False, torch.bfloat16)] * 2
    assert sharded.shape == (4, 8) and sharded.dtype == torch.float32
    assert torch.allclose(sharded, plain, atol=1e-6) and not torch.equal(plain, torch.zeros_like(plain))
    assert (sharded[segment.targets == -100] == 0).all()


def test_stream_scorer_refuses_what_it_cannot_do():
    from still.compressive.generate import StreamScorer
    from still.errors import StillError

    streams, model = _streams_and_model(4)
    with pytest.raises(StillError, match="shards must be >= 1"):
        StreamScorer(model, 4, shards=0)
    segment = streams.segment(0)
    with StreamScorer(model, 3) as scorer, pytest.raises(StillError, match="made for 3 rows, got 4"):
        scorer(segment.inputs, segment.targets)
    with pytest.raises(StillError, match="not on meta"):
        StreamScorer(model.to("meta"), 4, shards=2)
    with pytest.raises(StillError, match=re.escape("segment_len must be an int >= 1, got 2.5")):
        StreamScorer(model, 4, segment_len=2.5)


def test_a_call_of_several_segments_reads_the_ids_as_the_forward_does():
    """Several segments go through prefill: uint8 ids as one segment reads them, and an id outside
    the vocabulary named (they were the embedding's RuntimeError and IndexError)."""
    from still.compressive.generate import StreamScorer

    _, model = _streams_and_model(1)
    model.eval()
    inputs, targets = torch.randint(3, 20, (1, 16)), torch.randint(3, 20, (1, 16))
    with torch.no_grad(), StreamScorer(model, 1, segment_len=8) as bytes_, StreamScorer(model, 1, segment_len=8) as ids:
        torch.testing.assert_close(bytes_(inputs.to(torch.uint8), targets), ids(inputs, targets), atol=0, rtol=0)
        inputs[0, 9] = model.config.vocab_size
        with pytest.raises(StillError, match=f"token id {model.config.vocab_size} is outside the vocabulary"):
            ids(inputs, targets)


def test_evaluation_splits_its_rows_where_that_pays(monkeypatch):
    from still.compressive.decode import ONE_THREAD_BELOW
    from still.compressive.generate import SHARD_ROWS_WHERE_SPINNING, eval_shards

    _, model = _streams_and_model(1)
    params = sum(p.numel() for p in model.parameters())
    small = int(ONE_THREAD_BELOW["segment"] // params)  # tokens x rows below which one thread runs it all
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: every row counts, if big enough
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert [eval_shards(model, batch, small, threads=2) for batch in (1, 2, 16)] == [1, 2, 2]
    assert eval_shards(model, 16, small, threads=2, precision="bf16") == 2  # (where threads sleep, in bf16 too)
    assert eval_shards(model, 2, small // 2 - 1, threads=2) == 1  # small work: one thread, unsharded
    assert eval_shards(model, 16, small, threads=1) == 1
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")  # they spin: small batches run faster whole
    rows = 2 * SHARD_ROWS_WHERE_SPINNING
    assert [eval_shards(model, batch, 8, threads=2) for batch in (2, rows - 1, rows)] == [1, 1, 2]
    assert eval_shards(model, rows, 8, threads=2, precision="bf16") == 1  # bf16: one shard is quicker here
    assert eval_shards(model.to("meta"), rows, small, threads=2) == 1  # not a CPU


def test_a_small_models_unsharded_scoring_runs_on_one_thread_where_threads_sleep(monkeypatch):
    from still.compressive.generate import StreamScorer

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    streams, model = _streams_and_model(1)
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    segment = streams.segment(0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad(), StreamScorer(model.eval(), 1) as scorer:
            scorer(segment.inputs, segment.targets, segment.reset)
        assert seen == [1] and torch.get_num_threads() == 2  # and the setting put back
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_evaluation_of_a_few_rows_a_layer_at_a_time_gives_the_segment_by_segment_losses(batch, monkeypatch):
    """A few rows on the CPU: consecutive segments are scored in one call, a layer at a time (a new
    call wherever a document starts); the losses are those of one segment a call."""
    from still.compressive import generate as module

    streams, model = _streams_and_model(batch)
    edges = [0, 4, 16, 64]
    calls = []
    score = module.StreamScorer._score
    monkeypatch.setattr(module.StreamScorer, "_score",
                        lambda self, i, inputs, *rest: calls.append(inputs.shape[1]) or score(self, i, inputs, *rest))
    chunked = module.evaluate_streams(model, streams, position_edges=edges)
    assert max(calls) > 8 and sum(calls) == 8 * len(streams)  # several segments a call, each segment once
    calls.clear()
    monkeypatch.setattr(module, "LAYERWISE_ROWS", 0)  # one segment a call
    plain = module.evaluate_streams(model, streams, position_edges=edges)
    assert set(calls) == {8} and model.training
    assert chunked["tokens"] == plain["tokens"] == streams.num_targets
    assert chunked["bits_per_token"] == pytest.approx(plain["bits_per_token"], abs=1e-6)
    # both as the model's forward a segment at a time, every row's memories reset where its documents start
    model.eval()
    with torch.no_grad():
        total, state = 0.0, None
        for segment in streams:
            out = model(segment.inputs, state, reset=segment.reset)
            state = out.state
            total += torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), segment.targets.flatten(),
                                                       ignore_index=-100, reduction="sum").item()
    model.train()
    assert chunked["bits_per_token"] == pytest.approx(total / streams.num_targets / math.log(2), abs=1e-6)
    assert [b["tokens"] for b in chunked["by_position"]] == [b["tokens"] for b in plain["by_position"]]
    assert ([b["bits_per_token"] for b in chunked["by_position"]]
            == pytest.approx([b["bits_per_token"] for b in plain["by_position"]], abs=1e-6))


@pytest.mark.parametrize("reset", [None, [False, False], [True, False], [True, True]])
def test_a_call_of_several_segments_scores_as_one_call_a_segment(reset):
    """`reset` flags the first segment only: the rows that start anew forget their memories (every row:
    as if there were none), the others go on."""
    from still.compressive.generate import StreamScorer

    streams, model = _streams_and_model(2)
    model.eval()
    inputs, targets = torch.randint(3, 20, (2, 40)), torch.randint(3, 20, (2, 40))
    targets[1, 30:] = -100
    flags = None if reset is None else torch.tensor(reset)
    with torch.no_grad(), StreamScorer(model, 2, segment_len=8) as several, StreamScorer(model, 2) as one:
        for scorer in (several, one):  # the same memories before
            scorer(inputs[:, :8], targets[:, :8])
        got = several(inputs, targets, flags)
        want = torch.cat([one(inputs[:, s : s + 8], targets[:, s : s + 8], flags if s == 0 else None)
                          for s in range(0, 40, 8)], dim=1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (got[1, 30:] == 0).all()
        # and the memories after them are the same
        torch.testing.assert_close(several(inputs[:, :8], targets[:, :8]), one(inputs[:, :8], targets[:, :8]),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_several_segments_a_call_take_the_hand_written_attention_where_it_runs(precision, monkeypatch):
    """A scorer's calls of several segments compute their attention by the hand-written prompt
    kernel (`native.prompt_attention`, fp32 or bf16 on the CPU), `written=False` by PyTorch's: the
    same losses to rounding, and the same memories after."""
    import still.compressive.native as native
    from still.compressive.generate import StreamScorer
    from still.train.precision import autocast

    if native.library() is None:
        pytest.skip("no C++ compiler here: the hand-written kernels cannot be built")
    calls, real = [], native.prompt_attention

    def written_attention(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)  # (None: it could not run, and PyTorch's did)
        return out

    monkeypatch.setattr(native, "prompt_attention", written_attention)
    _, model = _streams_and_model(2)
    model.eval()
    inputs, targets = torch.randint(3, 20, (2, 40)), torch.randint(3, 20, (2, 40))
    got = {}
    for written in (True, False):
        calls.clear()
        with torch.no_grad(), autocast(precision), StreamScorer(model, 2, segment_len=8, written=written) as scorer:
            got[written] = [scorer(inputs, targets), scorer(inputs[:, :16], targets[:, :16])]
        assert calls == ([True] * len(calls) if written else []) and (calls or not written)
    atol = 1e-5 if precision == "fp32" else 2e-2
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_which_scorers_take_several_segments_a_call():
    from still.compressive.generate import LAYERWISE_LOGITS, LAYERWISE_ROWS, LAYERWISE_TOKENS, StreamScorer
    from still.errors import StillError

    _, model = _streams_and_model(1)
    assert StreamScorer(model, 2, segment_len=8).chunk == LAYERWISE_TOKENS // 8
    # a large vocabulary: no more segments than keep the logits within LAYERWISE_LOGITS numbers
    model.config = CompressiveConfig(**{**model.config.__dict__, "vocab_size": LAYERWISE_LOGITS // 64})
    assert StreamScorer(model, 2, segment_len=8).chunk == 4
    model.config = CompressiveConfig(**{**model.config.__dict__, "vocab_size": LAYERWISE_LOGITS // 16 + 1})
    assert StreamScorer(model, 2, segment_len=8).chunk == 1
    model.config = CompressiveConfig(**{**model.config.__dict__, "vocab_size": 20})
    assert StreamScorer(model, 1, segment_len=LAYERWISE_TOKENS * 2).chunk == 1  # a segment is enough already
    assert StreamScorer(model, 2).chunk == 1  # the segment length unknown
    assert StreamScorer(model, LAYERWISE_ROWS // 8 + 1, segment_len=8).chunk == 1  # many rows: segment by segment
    with StreamScorer(model, 4, shards=2, segment_len=8) as sharded:
        assert sharded.chunk == 1
    model.config = CompressiveConfig(**{**model.config.__dict__, "compression": "most_used"})
    assert StreamScorer(model, 2, segment_len=8).chunk == 1  # needs the attention weights
    with pytest.raises(StillError, match="segment_len must be an int >= 1, got 0"):
        StreamScorer(model, 2, segment_len=0)


def test_evaluation_leaves_the_models_modes_as_they_were_also_after_an_error():
    from still.compressive.generate import evaluate_streams
    from still.data.text import TokenStreams

    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=32, n_layers=2, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2))
    model.train()
    model.layers[1].eval()  # frozen by its owner
    before = [m.training for m in model.modules()]
    streams = TokenStreams([torch.randint(2, 11, (30,))], 1, 8)
    evaluate_streams(model, streams)
    assert [m.training for m in model.modules()] == before

    def failing(step):
        raise KeyboardInterrupt

    streams.segment = failing
    with pytest.raises(KeyboardInterrupt):
        evaluate_streams(model, streams)
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("compile", [False, None])
def test_generation_leaves_the_models_modes_as_they_were(compile):
    """A sample taken in the middle of training (a preview) must not switch dropout off for the rest
    of it; a module the caller had put in eval mode stays there."""
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=32, n_layers=2, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2))
    model.train()
    model.layers[1].eval()
    before = [m.training for m in model.modules()]
    tokens = generate(model, torch.randint(0, 11, (1, 5)), 20, segment_len=4, compile=compile)
    next(tokens)
    assert not any(m.training for m in model.modules())  # sampling runs in eval mode
    assert len(list(tokens)) == 19
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("compression", ["most_used", "conv"])
def test_overlapping_generations_stay_in_eval_mode_until_the_last_ends(compression):
    """A probe: two generations of a model in training mode read in turn; the first to end put
    training mode back under the other, whose later tokens drew dropout masks."""
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                                     mem_len=8, c_mem_len=8, compression_rate=2,
                                                     compression=compression, dropout=0.5))
    model.train()
    model.layers[1].eval()
    before = [m.training for m in model.modules()]
    prompt = torch.randint(0, 40, (1, 7))
    alone = torch.stack(list(generate(model, prompt, 30, top_k=1, compile=False)))
    first = generate(model, prompt, 2, top_k=1, compile=False)
    next(first)
    second = generate(model, prompt, 30, top_k=1, compile=False)
    token = next(second)
    list(first)
    assert not any(m.training for m in model.modules())  # the second still runs
    assert torch.equal(torch.stack([token, *second]), alone)
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("compile", [False, None])
def test_a_generation_dropped_half_way_puts_the_modes_back_at_once(compile):
    """Dropped after a few tokens (`islice`, `break` then forgotten), a generation puts the modes back
    when the last reference goes, not when the cyclic collector next runs: then it would switch
    dropout on in the middle of whatever the caller did next (an evaluation, say)."""
    import gc
    import itertools

    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=32, n_layers=2, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2))
    model.train()
    collecting = gc.isenabled()
    gc.disable()
    try:
        assert len(list(itertools.islice(generate(model, torch.randint(0, 11, (1, 5)), 40, compile=compile), 3))) == 3
        assert model.training and all(m.training for m in model.modules())
        generation = generate(model, torch.randint(0, 11, (1, 5)), 40, compile=compile)
        next(generation)
        del generation
        assert model.training
        model.eval()
        gc.collect()  # (nothing left to switch it back)
        assert not model.training
    finally:
        if collecting:
            gc.enable()


def test_generation_refuses_bad_counts_and_top_k():
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=32, n_layers=1, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2))
    prompt = torch.randint(0, 11, (1, 5))
    assert list(generate(model, prompt, 0, compile=None)) == []  # none asked for: none drawn, either step
    assert list(generate(model, prompt, 0, compile=False)) == []
    for kwargs, message in (({"max_new_tokens": -3}, "max_new_tokens must be an int >= 0, got -3"),
                            ({"max_new_tokens": 2, "top_k": 0}, "top_k must be an int >= 1 or None, got 0"),
                            ({"max_new_tokens": 2, "top_k": 2.5}, "top_k must be an int >= 1 or None, got 2.5")):
        with pytest.raises(StillError, match=re.escape(message)):
            generate(model, prompt, **kwargs)
    # NumPy's integers, as top_k took them (a probe: "must be an int, got np.int64(5)")
    gen = torch.Generator().manual_seed(0)
    numpy = list(generate(model, prompt, np.int64(3), segment_len=np.int64(2), generator=gen, compile=False))
    gen.manual_seed(0)
    assert torch.equal(torch.stack(numpy), torch.stack(list(generate(model, prompt, 3, segment_len=2, generator=gen,
                                                                     compile=False))))


def test_compile_asked_for_a_model_it_cannot_run_says_so(capsys):
    """A most_used model: `--compile` fell back to the model's own steps unsaid."""
    model = _state_model(2, "most_used")
    tokens = list(generate(model, torch.randint(0, 11, (1, 5)), 2, compile=True))
    assert len(tokens) == 2
    assert "the compiled decoding step cannot run this model (most_used compression)" in capsys.readouterr().err


def _state_model(c_mem_len: int, compression: str = "conv") -> CompressiveTransformer:
    """Two layers (the second's memories are the first's outputs, which depend on how the tokens were
    fed), d_head 16 (the hand-written step runs it), dropout on (it must be off for the state)."""
    torch.manual_seed(0)
    return CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=32, n_layers=2, n_heads=2, d_ff=32,
                                                    mem_len=4, c_mem_len=c_mem_len, compression_rate=2,
                                                    compression=compression, dropout=0.1))


def _fed(model: CompressiveTransformer, state, prompt: torch.Tensor, tokens: torch.Tensor, segment_len: int):
    """The state the model's forward leaves after `state`, fed `prompt` (B, P) in segments of
    `segment_len` and then `tokens` (B, n) one at a time, in eval mode without gradients."""
    from still.compressive.generate import eval_mode

    with eval_mode(model), torch.no_grad():
        for start in range(0, prompt.shape[1], segment_len):
            state = model(prompt[:, start : start + segment_len], state).state
        for i in range(tokens.shape[1]):
            state = model(tokens[:, i : i + 1], state).state
    return state


def _assert_same_state(got, want) -> None:
    assert got.memory_len == want.memory_len and got.compressed_len == want.compressed_len
    for a, b in zip((*got.memory, *got.compressed), (*want.memory, *want.compressed)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got.memory_valid is want.memory_valid is None and got.compressed_valid is want.compressed_valid is None


def _start_state(model: CompressiveTransformer):
    """Memories of some earlier text (3 rows), full and compressing."""
    return _fed(model, None, torch.randint(0, 11, (3, 9)), torch.zeros(3, 0, dtype=torch.long), 4)


@pytest.mark.parametrize("compile", [False, None], ids=["eager", "default"])
@pytest.mark.parametrize("model_kind", ["conv", "xl", "most_used"])
def test_the_state_is_the_forward_over_the_prompt_and_the_tokens_yielded(model_kind, compile):
    """`Generation.state`: the memories after the prompt and every token yielded so far, the last
    included: the model's forward fed the prompt in segments and the tokens one at a time, computed
    in eval mode (dropout off) whatever the model's mode, before, during and after generation; with
    no token yet, the prompt's. The ring-buffer decoder (eager or hand-written, which yields in
    bursts) and, for most_used, the model's own steps."""
    model = _state_model(0 if model_kind == "xl" else 2, "most_used" if model_kind == "most_used" else "conv")
    start = _start_state(model)
    model.train()
    model.layers[1].eval()  # frozen by its owner: stays so
    modes = [m.training for m in model.modules()]
    prompt = torch.randint(0, 11, (3, 7))
    generation = generate(model, prompt, 21, segment_len=4, state=start, compile=compile,
                          generator=torch.Generator().manual_seed(1))
    _assert_same_state(generation.state, _fed(model, start, prompt, prompt[:, :0], 4))  # not started: the prompt's
    firsts = [next(generation) for _ in range(5)]  # within the hand-written step's first burst of 16
    _assert_same_state(generation.state, _fed(model, start, prompt, torch.stack(firsts, 1), 4))
    tokens = torch.stack(firsts + list(generation), 1)  # (3, 21)
    assert tokens.shape == (3, 21) and [m.training for m in model.modules()] == modes
    assert torch.equal(torch.stack(generation.tokens, 1), tokens)
    state = generation.state
    assert [m.training for m in model.modules()] == modes  # put back after the state's pass too
    _assert_same_state(state, _fed(model, start, prompt, tokens, 4))
    assert generation.state is state  # kept until more tokens come
    _assert_same_state(generation.state_after(20), _fed(model, start, prompt, tokens[:, :20], 4))
    _assert_same_state(generation.state_after(0), _fed(model, start, prompt, tokens[:, :0], 4))
    assert state.key_values is not None  # with its inference cache, as a prompt's state
    with pytest.raises(StillError, match=re.escape("count must be an int in [0, 21] (the tokens yielded), got 22")):
        generation.state_after(22)
    # NumPy's integers are counts, as generate's ints are; a bool is not (True was taken as 1)
    _assert_same_state(generation.state_after(np.int64(20)), _fed(model, start, prompt, tokens[:, :20], 4))
    for bad in (True, 2.0):
        with pytest.raises(StillError, match=re.escape(f"count must be an int in [0, 21] (the tokens yielded), "
                                                       f"got {bad!r}")):
            generation.state_after(bad)


@pytest.mark.parametrize("compile", [False, None], ids=["eager", "default"])
def test_the_state_after_no_tokens_is_the_prompts(compile):
    model = _state_model(2)
    start = _start_state(model)
    prompt = torch.randint(0, 11, (3, 6))
    generation = generate(model, prompt, 0, segment_len=4, state=start, compile=compile)
    assert list(generation) == [] and generation.tokens == []
    assert model.training  # (the pass ran in eval mode, and put it back)
    _assert_same_state(generation.state, _fed(model, start, prompt, prompt[:, :0], 4))
    _assert_same_state(generate(model, prompt, 0, segment_len=4).state, _fed(model, None, prompt, prompt[:, :0], 4))


@pytest.mark.parametrize("compile", [False, None], ids=["eager", "default"])
@pytest.mark.parametrize("model_kind", ["conv", "xl"])
def test_generating_on_from_the_state_draws_what_one_longer_generation_draws(model_kind, compile):
    """A generation continued from `state_after(n - 1)`, its prompt the last token yielded, with the
    same random numbers (one generator for both calls: on the CPU a block of numbers is those of as
    many calls) draws the tokens of one generation of n + m; and the next logits read from `state`
    (the last token included) are those of the forward fed everything."""
    from still.compressive.generate import eval_mode

    model = _state_model(0 if model_kind == "xl" else 2)
    start = _start_state(model)
    prompt = torch.randint(0, 11, (3, 7))

    def run(prompt, count, state, generator):
        generation = generate(model, prompt, count, segment_len=4, state=state, compile=compile, generator=generator,
                              temperature=0.9, top_k=8)
        return generation, torch.stack(list(generation), 1)

    _, whole = run(prompt, 30, start, torch.Generator().manual_seed(3))  # (3, 30)
    generator = torch.Generator().manual_seed(3)
    first, head = run(prompt, 13, start, generator)
    second, tail = run(head[:, -1:], 17, first.state_after(12), generator)
    assert torch.equal(torch.cat([head, tail], 1), whole)
    _assert_same_state(second.state, _fed(model, start, prompt, whole, 4))
    after = torch.randint(0, 11, (3, 5))
    want_state = _fed(model, start, prompt, head, 4)
    with eval_mode(model), torch.no_grad():
        got, want = model(after, first.state).logits, model(after, want_state).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_names_every_bad_argument():
    """segment_len 0 raised a plain ValueError, top_k=True went through as 1, a prompt of no rows
    divided by zero, and ids outside the vocabulary raised the embedding's IndexError."""
    model = CompressiveTransformer(CompressiveConfig(vocab_size=20, d_model=32, n_layers=1, n_heads=4, d_ff=64,
                                                     mem_len=8, c_mem_len=8, compression_rate=2))
    prompt = torch.randint(0, 20, (1, 4))
    for kwargs, message in (({"segment_len": 0}, "segment_len must be an int >= 1, got 0"),
                            ({"segment_len": True}, "segment_len must be an int >= 1, got True"),
                            ({"top_k": True}, "top_k must be an int >= 1 or None, got True"),
                            ({"max_new_tokens": True}, "max_new_tokens must be an int >= 0, got True"),
                            ({"prompt": torch.zeros(0, 4, dtype=torch.long)}, r"batch >= 1, length >= 1\), got "
                                                                              r"torch.int64 of shape \(0, 4\)"),
                            ({"prompt": torch.tensor([[3, 25]])}, r"token id 25 is outside the vocabulary"),
                            ({"prompt": [[3, 4]]}, "the prompt must be ids .* got a list"),
                            ({"temperature": "1"}, "temperature must be a finite number > 0, got '1'"),
                            ({"top_p": "0.5"}, r"top_p must be in \(0, 1\], got '0.5'"),
                            ({"generator": 5}, "generator must be a torch.Generator or None, got a int")):
        args = {"prompt": prompt, "max_new_tokens": 3} | kwargs
        with pytest.raises(StillError, match=message):
            generate(model, args.pop("prompt"), args.pop("max_new_tokens"), **args)
    import numpy as np

    bytes_prompt = generate(model, prompt.to(torch.uint8), 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.stack(list(bytes_prompt)),
                       torch.stack(list(generate(model, prompt, 3, generator=torch.Generator().manual_seed(0)))))
    plain = CompressiveTransformer(CompressiveConfig(vocab_size=20, d_model=32, n_layers=1, n_heads=4, d_ff=64,
                                                     mem_len=0, c_mem_len=0))
    with pytest.raises(StillError, match=r"keeps no memories \(mem_len 0, c_mem_len 0\): its tokens would be drawn"):
        generate(plain, prompt, 3)  # (a probe: each token drawn from the one before it alone)
    with_numpy = generate(model, prompt, 3, top_k=np.int64(2), generator=torch.Generator().manual_seed(0))
    with_int = generate(model, prompt, 3, top_k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.stack(list(with_numpy)), torch.stack(list(with_int)))


@pytest.mark.parametrize("compile", [None, False])
def test_a_diverged_models_outputs_are_refused_before_any_token(compile):
    """Found by a fuzzer: a model whose weights give NaN outputs drew token 0 every step (all tokens
    impossible), and `lm generate` printed an empty line with exit code 0."""
    model = CompressiveTransformer(CompressiveConfig(vocab_size=7, d_model=8, n_layers=1, n_heads=2, d_ff=16,
                                                     mem_len=4, c_mem_len=2, compression_rate=2))
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(StillError, match="the model's outputs after the prompt are not finite: its weights diverged"):
        list(generate(model, torch.zeros(1, 3, dtype=torch.long), 5, compile=compile))


def test_a_perplexity_past_floats_range_is_infinite():
    """Found by a fuzzer: a loss above 709 nats (a model far from trained) made `math.exp` raise in
    the evaluation, and `lm train` ended in a traceback."""
    from still.compressive.generate import _exp

    assert _exp(1.0) == math.e and _exp(709.0) == math.exp(709.0) and _exp(710.0) == math.inf
