"""The fixed-shape decoder gives the model's own logits, token after token."""

import copy

import pytest
import torch

from still.compressive import decode
from still.compressive.decode import Decoder, openmp_threads_spin, supports, threads_for
from still.compressive.model import CompressiveConfig, CompressiveTransformer
from still.compressive.sampling import Sampling
from still.train.precision import autocast

CASES = {
    "conv": dict(mem_len=6, c_mem_len=4, compression_rate=3),
    "dilated": dict(mem_len=6, c_mem_len=3, compression_rate=2, compression="dilated"),
    "max": dict(mem_len=4, c_mem_len=2, compression_rate=2, compression="max"),
    "mean, post-norm": dict(mem_len=4, c_mem_len=5, compression_rate=4, compression="mean", pre_norm=False),
    "XL": dict(mem_len=7, c_mem_len=0),
    "no memory": dict(mem_len=0, c_mem_len=0),
    "compressed only": dict(mem_len=0, c_mem_len=3, compression_rate=2),
    "tied embeddings": dict(mem_len=3, c_mem_len=2, compression_rate=3, tie_embeddings=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("prompt_len", [1, 9])
@pytest.mark.parametrize("fused", [False, True], ids=["eager products", "fused products"])
@pytest.mark.parametrize("blocks", [False, True], ids=["keys slots last", "keys in blocks"])
def test_decoder_matches_the_model_token_by_token(case, prompt_len, fused, blocks, monkeypatch):
    """`fused`: the products written as multiply-and-sum, as the compiled step runs them (here eagerly).
    `blocks`: the keys and position table in blocks of slots, as a compiling decoder lays them out
    (here with compiling unavailable, so the steps run eagerly on that layout)."""
    if blocks:
        monkeypatch.setattr(decode, "ahead_of_time_all", lambda requests, threads=None: [None] * len(requests))
    if fused:
        step, compress = decode._step, decode._step_and_compress
        monkeypatch.setattr(decode, "_step", lambda *args: step(*args[:-1], True))
        monkeypatch.setattr(decode, "_step_and_compress", lambda *args: compress(*args[:-1], True))
    torch.manual_seed(0)
    config = CompressiveConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.1, **CASES[case])
    model = CompressiveTransformer(config).eval()
    tokens = torch.randint(0, 11, (2, prompt_len + 30))
    with torch.no_grad():
        state = None
        for chunk in tokens[:, :prompt_len].split(4, dim=1):
            state = model(chunk, state).state
        decoder = Decoder(model, state, batch=2, compile=blocks)
        assert decoder.keys.ndim == (6 if blocks else 5)
        for t in range(prompt_len, tokens.shape[1]):  # 30 steps: several compressions and a full compressed memory
            out = model(tokens[:, t : t + 1], state)
            state = out.state
            torch.testing.assert_close(decoder.step(tokens[:, t]), out.logits[:, 0], atol=1e-5, rtol=1e-5)
        assert decoder.n == state.compressed_len and decoder.m == state.memory_len


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fused", [False, True], ids=["eager products", "fused products"])
def test_a_bf16_decoder_matches_the_model_to_bf16_rounding(case, fused, monkeypatch):
    """dtype=bf16: the matrices and the key and value buffers in bf16, the residual stream and the
    logits in fp32; the fp32 model's logits to bf16 rounding, through compressions and a full ring."""
    if fused:
        step, compress = decode._step, decode._step_and_compress
        monkeypatch.setattr(decode, "_step", lambda *args: step(*args[:-1], True))
        monkeypatch.setattr(decode, "_step_and_compress", lambda *args: compress(*args[:-1], True))
    torch.manual_seed(0)
    config = CompressiveConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, d_ff=32, **CASES[case])
    model = CompressiveTransformer(config).eval()
    tokens = torch.randint(0, 11, (2, 35))
    with torch.no_grad():
        state = model(tokens[:, :5]).state
        decoder, plain = Decoder(model, state, batch=2, dtype=torch.bfloat16), Decoder(model, state, batch=2)
        assert decoder.keys.dtype == decoder.values.dtype == decoder.weights["1.qkv"].dtype == torch.bfloat16
        assert decoder.weights["embedding"].dtype == decoder.weights["1.u"].dtype == torch.float32
        for t in range(5, tokens.shape[1]):
            out = model(tokens[:, t : t + 1], state)
            state = out.state
            logits, fp32 = decoder.step(tokens[:, t]), plain.step(tokens[:, t])
            assert logits.dtype == torch.float32
            torch.testing.assert_close(logits, out.logits[:, 0], atol=2e-2, rtol=2e-2)
            assert not torch.equal(logits, fp32) or config.mem_len + config.c_mem_len == 0  # it did round
        assert decoder.n == state.compressed_len and decoder.m == state.memory_len


def test_most_used_and_training_mode_are_refused():
    config = CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32, mem_len=4, c_mem_len=2,
                               compression="most_used")
    model = CompressiveTransformer(config)
    assert not supports(model, None)
    with pytest.raises(ValueError, match="eval mode"):
        Decoder(model, None, batch=1)
    with pytest.raises(ValueError, match="most_used"):
        Decoder(model.eval(), None, batch=1)


def test_compiled_decoder_gives_the_same_tokens():
    """The step compiled ahead of time (a real compile, about ten seconds a function at this size):
    the same logits; the second decoder of the same shapes loads the packages instead."""
    torch.manual_seed(0)
    config = CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32, mem_len=4, c_mem_len=2,
                               compression_rate=2)
    model = CompressiveTransformer(config).eval()
    eager, compiled = Decoder(model, None, batch=1), Decoder(model, None, batch=1, compile=True)
    tokens = torch.randint(0, 11, (12,))
    for t in tokens:
        torch.testing.assert_close(compiled.step(t[None]), eager.step(t[None]), atol=1e-5, rtol=1e-5)


def test_a_compiled_bf16_decoder_matches_the_fp32_one_to_bf16_rounding():
    """bf16 matrices and keys compiled (the products summing in fp32): what `generate --compile`
    runs under bf16 autocast."""
    torch.manual_seed(0)
    config = CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32, mem_len=4, c_mem_len=2,
                               compression_rate=2)
    model = CompressiveTransformer(config).eval()
    eager, compiled = Decoder(model, None, batch=1), Decoder(model, None, batch=1, compile=True, dtype=torch.bfloat16)
    assert compiled.keys.dtype == torch.bfloat16
    for t in torch.randint(0, 11, (12,)):
        logits = compiled.step(t[None])
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, eager.step(t[None]), atol=2e-2, rtol=2e-2)
    assert all(step is not None for step in compiled._compiled.values())  # it did compile


def test_a_decoder_that_cannot_compile_decodes_eagerly(monkeypatch, capsys):
    from still.train import aot

    def no_compiler(spec, path):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(aot, "_Build", no_compiler)
    monkeypatch.setattr(aot, "_LOADED", {})
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16,
                                                     mem_len=4, c_mem_len=2, compression_rate=2, pre_norm=False)).eval()
    eager, compiled = Decoder(model, None, batch=2), Decoder(model, None, batch=2, compile=True)
    for t in torch.randint(0, 11, (6, 2)):
        torch.testing.assert_close(compiled.step(t), eager.step(t))
    err = capsys.readouterr().err
    assert err.count("--compile: cannot compile the decoding step (InvalidCxxCompiler") == 1
    assert err.count("--compile: cannot compile the decoding step with compression (InvalidCxxCompiler") == 1
    assert "running without compiling" in err


def test_decoding_steps_compute_in_the_weights_dtype_under_autocast():
    """bf16 autocast covers the prompt, not the one-token steps (casting every weight for each
    token costs more than it saves): the steps give the fp32 logits, in fp32."""
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2)).eval()
    plain = Decoder(model, None, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = Decoder(model, None, batch=2)
        for t in torch.randint(0, 11, (9, 2)):
            out = under_autocast.step(t)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, plain.step(t), atol=1e-6, rtol=1e-6)


def test_small_models_decode_on_one_thread_where_openmp_threads_sleep(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32)).eval()
    size = sum(p.numel() for p in model.parameters())
    assert Decoder(model, None, batch=1).threads == 1 and Decoder(model, None, batch=1, threads=3).threads == 3
    assert threads_for(model, 1, 1) == 1 and threads_for(model, 4, 128) == 1
    monkeypatch.setattr(decode, "ONE_THREAD_BELOW", {"token": 2 * size, "segment": 100 * size,
                                                    "segment, bf16": 1000 * size})
    assert threads_for(model, 1, 1) == 1 and threads_for(model, 2, 1) is None  # batch x parameters
    assert threads_for(model, 1, 99) == 1 and threads_for(model, 1, 100) is None  # x tokens for a segment
    with autocast("bf16"):  # a bf16 segment's own threshold; a token's stays
        assert threads_for(model, 1, 999) == 1 and threads_for(model, 1, 1000) is None
        assert threads_for(model, 1, 1) == 1 and threads_for(model, 2, 1) is None
    bf16_weights = copy.deepcopy(model).to(torch.bfloat16)
    assert threads_for(bf16_weights, 1, 999) == 1 and threads_for(bf16_weights, 1, 1000) is None
    with pytest.raises(ValueError, match="threads"):
        Decoder(model, None, batch=1, threads=0)


@pytest.mark.parametrize(("environ", "spin"), [
    ({}, True),  # GNU OpenMP's default: spin, then sleep
    ({"OMP_WAIT_POLICY": "ACTIVE"}, True),
    ({"OMP_WAIT_POLICY": "passive"}, False),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}, True),  # the count decides over the policy
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10k"}, True),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "infinity"}, True),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}, False),
    ({"GOMP_SPINCOUNT": "0"}, False),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "lots"}, False),  # not a count: OpenMP ignores it
])
def test_openmp_threads_spin_reads_the_wait_policy_and_spin_count(environ, spin):
    assert openmp_threads_spin(environ) is spin


def test_every_model_decodes_on_all_threads_where_openmp_threads_spin(monkeypatch):
    """A spinning thread starts the next loop without a wake-up: all threads paid at every size
    measured (docs/performance.md, session 14)."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32)).eval()
    assert threads_for(model, 1, 1) is None and threads_for(model, 1, 128) is None
    assert Decoder(model, None, batch=1).threads is None
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert threads_for(model, 1, 1) == 1 and Decoder(model, None, batch=1).threads == 1


def test_compiled_decoders_of_two_models_interleaved():
    """Two models of the same shapes but another structure (post-norm), stepped in turn: each gets
    its own compiled step (the structure is part of the package's key)."""
    torch.manual_seed(0)
    models = [CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                                       mem_len=4, c_mem_len=2, compression_rate=2,
                                                       pre_norm=pre_norm)).eval() for pre_norm in (True, False)]
    eager = [Decoder(model, None, batch=1) for model in models]
    compiled = [Decoder(model, None, batch=1, compile=True) for model in models]
    for t in torch.randint(0, 11, (14,)):
        for e, c in zip(eager, compiled):
            torch.testing.assert_close(c.step(t[None]), e.step(t[None]), atol=1e-5, rtol=1e-5)


def test_compiled_decoders_of_two_models_of_one_structure_read_their_own_weights():
    """Same shapes and structure: one compiled package, each decoder's weights as its inputs. A
    decoder made after a weight change sees the change."""
    config = CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32, mem_len=4, c_mem_len=2,
                               compression_rate=2)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(CompressiveTransformer(config).eval())
    eager = [Decoder(model, None, batch=1) for model in models]
    compiled = [Decoder(model, None, batch=1, compile=True) for model in models]
    tokens = torch.randint(0, 11, (10,))
    for t in tokens:
        outs = [c.step(t[None]) for c in compiled]
        for out, e in zip(outs, eager):
            torch.testing.assert_close(out, e.step(t[None]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(outs[0], outs[1])
    with torch.no_grad():
        models[0].head.weight.mul_(-1)
    fresh, fresh_eager = Decoder(models[0], None, batch=1, compile=True), Decoder(models[0], None, batch=1)
    torch.testing.assert_close(fresh.step(tokens[:1]), fresh_eager.step(tokens[:1]), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fresh_eager.step(tokens[1:2]), models[0](tokens[None, 1:2],  # the changed model
                                   models[0](tokens[None, :1]).state).logits[:, 0], atol=1e-5, rtol=1e-5)


def test_decoder_uses_the_cached_keys_and_values_only_when_the_weights_are_unchanged():
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                                     mem_len=6, c_mem_len=4, compression_rate=3)).eval()
    tokens = torch.randint(0, 11, (1, 13))
    with torch.no_grad():
        state = None
        for chunk in tokens.split(4, dim=1):
            state = model(chunk, state).state
        assert state.key_values is not None
        uncached = state._replace(key_values=None, key_values_version=None)
        token = torch.tensor([5])
        torch.testing.assert_close(Decoder(model, state, 1).step(token), Decoder(model, uncached, 1).step(token))
        model.layers[0].attention.key_value.weight.mul_(2)  # the cache is now stale: recomputed
        torch.testing.assert_close(Decoder(model, state, 1).step(token), Decoder(model, uncached, 1).step(token))


def test_prepare_compiles_what_the_steps_then_run(monkeypatch):
    from still.train import aot

    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2)).eval()
    sampling = Sampling(0.9, top_k=4)
    decoder, eager = Decoder(model, None, batch=2, compile=True), Decoder(model, None, batch=2)
    decoder.prepare(sampling)
    assert decoder._compiled and all(c is not None for c in decoder._compiled.values())

    def no_more_building(spec, path):
        raise AssertionError("compiled again at a step")

    monkeypatch.setattr(aot, "_Build", no_more_building)
    tokens = torch.tensor([1, 2])
    for _ in range(7):  # steps and compressions
        uniform = torch.rand(2, 1)
        drawn = decoder.step_sample(tokens, uniform, sampling)
        assert torch.equal(drawn, eager.step_sample(tokens, uniform, sampling))
        tokens = drawn
