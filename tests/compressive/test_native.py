"""The hand-written decoding step (native_step.cpp) gives the model's own logits and draws."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_decode import CASES  # the same configurations as the eager and compiled steps

from helpers import BUILDS, process_gone, use_build
from still.compressive import native
from still.compressive.decode import Decoder
from still.compressive.generate import generate
from still.compressive.model import CompressiveConfig, CompressiveTransformer
from still.compressive.native import NativeStep, down_width, pack, pairs
from still.compressive.sampling import Sampling, next_token

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")

SIZES = {"d_head 16": dict(d_model=32, n_heads=2, d_ff=64), "d_head 32": dict(d_model=64, n_heads=2, d_ff=48),
         "d_head 64": dict(d_model=128, n_heads=2, d_ff=80)}  # (d_ff 48 and 80: blocks of 16 left after fours)


@pytest.fixture
def build(request, monkeypatch):
    """The hand-written step's library, built with `BUILDS[request.param]` (parametrize indirectly):
    the portable builds take the paths an AVX-512 build does not (`nonzero`'s, `add_listed`'s, and
    the 16 lanes in parts: `Lanes`)."""
    use_build(request.param, monkeypatch, "_LIBRARY")
    if BUILDS[request.param] is not None:
        assert native.library().still_avx512() == 0
    return native.library()


def _model(case: str, size: str = "d_head 16") -> CompressiveTransformer:
    torch.manual_seed(0)
    config = CompressiveConfig(vocab_size=11, n_layers=2, dropout=0.1, **SIZES[size], **CASES[case])
    return CompressiveTransformer(config).eval()


def _prompted(model: CompressiveTransformer, tokens: torch.Tensor, prompt_len: int):
    state = None
    for chunk in tokens[:, :prompt_len].split(4, dim=1):
        state = model(chunk, state).state
    return state


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("build", BUILDS, indirect=True)
def test_native_step_matches_the_model_token_by_token(case, size, threads, build):
    """fp32: the model's logits to float rounding through 31 steps (several compressions, full rings),
    on one thread and on two (the heads and products split between them)."""
    model = _model(case, size)
    tokens = torch.randint(0, 11, (2, 40))
    with torch.no_grad():
        state = _prompted(model, tokens, 9)
        decoder = Decoder(model, state, batch=2, compile=True, threads=threads, native=True)
        assert decoder.native is not None and decoder.native.threads == threads
        for t in range(9, tokens.shape[1]):
            out = model(tokens[:, t : t + 1], state)
            state = out.state
            torch.testing.assert_close(decoder.step(tokens[:, t]), out.logits[:, 0], atol=1e-5, rtol=1e-5)
        assert decoder.n == state.compressed_len and decoder.m == state.memory_len


@pytest.mark.parametrize("case", ["conv", "XL"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_threads_that_sleep_at_the_barriers_give_the_same_steps(monkeypatch, case, dtype):
    """With no spinning at the barriers a waiting thread sleeps on the futex almost every time
    (what it does where another process holds the cores): the same logits as spinning threads, over
    many steps (a lost wake-up would hang here)."""
    model = _model(case, "d_head 32")
    tokens = torch.randint(0, 11, (2, 200))
    with torch.no_grad():
        state = _prompted(model, tokens, 9)
        spinning = Decoder(model, state, batch=2, compile=True, threads=2, dtype=dtype, native=True)
        monkeypatch.setattr(native, "BARRIER_SPIN_NS", 0)
        sleeping = Decoder(model, state, batch=2, compile=True, threads=2, dtype=dtype, native=True)
        for t in range(9, tokens.shape[1]):
            torch.testing.assert_close(sleeping.step(tokens[:, t]), spinning.step(tokens[:, t]), atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("build", BUILDS, indirect=True)
def test_native_bf16_step_matches_the_model_to_bf16_rounding(case, size, build):
    """bf16 matrices, keys, values and position tables (in pairs of features), fp32 residual stream:
    the fp32 model's logits to bf16 rounding, and the same on one thread as on two (to 1e-3: the two
    threads sum the products in another order, which can round a stored bf16 key the other way)."""
    model = _model(case, size)
    tokens = torch.randint(0, 11, (2, 40))
    with torch.no_grad():
        state = _prompted(model, tokens, 9)
        one, two = (Decoder(model, state, batch=2, compile=True, threads=n, dtype=torch.bfloat16, native=True)
                    for n in (1, 2))
        assert one.keys.dtype == torch.bfloat16 and one.keys.shape[-1] == 2  # pairs of features
        for t in range(9, tokens.shape[1]):
            out = model(tokens[:, t : t + 1], state)
            state = out.state
            logits = one.step(tokens[:, t])
            torch.testing.assert_close(logits, out.logits[:, 0], atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(two.step(tokens[:, t]), logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("build", BUILDS, indirect=True)
def test_a_bf16_step_stores_its_key_and_value_rounded_as_pytorch_rounds(build):
    """A post-norm model whose first layer's keys and values are its input (the token's embedding):
    the bf16 step stores them in the memory ring's new slot bit for bit as `.to(torch.bfloat16)`
    rounds them, ties to even (halfway values above an odd and above an even bf16, both signs)."""
    torch.manual_seed(0)
    config = CompressiveConfig(vocab_size=11, n_layers=1, d_model=32, n_heads=2, d_ff=64, pre_norm=False,
                               **CASES["conv"])
    model = CompressiveTransformer(config).eval()
    halfway = torch.tensor([1 + k / 256 for k in range(1, 17, 2)])  # between bf16 neighbours, odd and even below
    row = torch.cat([halfway, -halfway, torch.randn(16)])  # (32,): both heads
    with torch.no_grad():
        model.layers[0].attention.key_value.weight.copy_(torch.cat([torch.eye(32), torch.eye(32)]))
        model.embedding.weight[3] = row
        state = _prompted(model, torch.randint(0, 11, (1, 5)), 5)
        decoder = Decoder(model, state, batch=1, compile=True, threads=2, dtype=torch.bfloat16, native=True)
        slot = decoder.n_cap + decoder.next_m  # the memory ring's slot this step writes
        decoder.step(torch.tensor([3]))
    want = row.bfloat16().view(2, 16)  # (heads, D)
    values = decoder.values[0, 0, :, slot]  # (heads, D)
    keys = decoder.keys[0, 0, :, slot // 16, :, slot % 16].reshape(2, 16)  # from pairs of features
    assert torch.equal(values.view(torch.int16), want.view(torch.int16))
    assert torch.equal(keys.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("d_model", [48, 128], ids=["blocks of 16", "blocks of 128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("build", BUILDS, indirect=True)
def test_mostly_zero_hidden_units_give_the_models_logits(d_model, dtype, threads, build):
    """The feed-forward's second product reads the weights of its nonzero inputs only: with 7 of 8
    hidden units switched off by their bias (zeros after the ReLU, as in trained models) and the
    others zero for some tokens, the logits are still the model's, on one thread and two, with the
    second matrix in blocks of 16 (d_model 48) and of 128 outputs."""
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, n_layers=2, d_model=d_model, n_heads=d_model // 16,
                                                     d_ff=64, dropout=0.0, **CASES["conv"])).eval()
    with torch.no_grad():
        for layer in model.layers:
            bias = layer.feed_forward.up.bias
            bias[torch.arange(64) % 8 != 0] = -1e3  # off for every input
    tokens = torch.randint(0, 11, (2, 30))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        state = _prompted(model, tokens, 9)
        decoder = Decoder(model, state, batch=2, compile=True, threads=threads, dtype=dtype, native=True)
        assert decoder.native is not None
        for t in range(9, tokens.shape[1]):
            out = model(tokens[:, t : t + 1], state)
            state = out.state
            torch.testing.assert_close(decoder.step(tokens[:, t]), out.logits[:, 0], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.7), Sampling(top_k=3),
                                      Sampling(top_p=0.6), Sampling(temperature=1.3, top_k=5, top_p=0.9),
                                      Sampling(temperature=1e-40), Sampling(temperature=1e-46, top_p=1e-46)],
                         ids=str)
@pytest.mark.parametrize("build", BUILDS, indirect=True)
def test_native_draws_are_next_token_of_its_logits(sampling, build):
    """step_sample draws in the same call what `next_token` draws from the step's logits with the same
    uniform numbers; and with top-k 1 the draw is the argmax."""
    model = _model("conv", "d_head 32")
    tokens = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        state = _prompted(model, tokens, 9)
    drawing, plain = (Decoder(model, state, batch=2, compile=True, native=True) for _ in range(2))
    generator = torch.Generator().manual_seed(1)
    token = tokens[:, -1]
    for _ in range(40):
        uniform = torch.rand(2, 1, generator=generator)
        logits = plain.step(token)
        drawn = drawing.step_sample(token, uniform, sampling)
        assert drawn.dtype == torch.int64 and drawn.shape == (2,)
        assert torch.equal(drawn, next_token(logits, uniform, sampling))
        token = drawn


@pytest.mark.parametrize("case", ["conv", "XL", "mean, post-norm"])
def test_steps_in_one_call_are_the_steps_one_at_a_time(case):
    """`steps_sampled`: 21 steps and draws in one call (compressions and ring wraps among them) give
    the tokens and the state of 21 `step_sample` calls; the next step's logits agree too."""
    model = _model(case, "d_head 32")
    tokens = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        state = _prompted(model, tokens, 9)
    many, one = (Decoder(model, state, batch=2, compile=True, threads=2, native=True) for _ in range(2))
    sampling, uniform = Sampling(temperature=0.9, top_p=0.95), torch.rand(21, 2, 1)
    drawn = many.steps_sampled(tokens[:, -1], uniform, sampling)
    token, expected = tokens[:, -1], []
    for u in uniform:
        token = one.step_sample(token, u, sampling)
        expected.append(token)
    assert drawn.shape == (21, 2) and torch.equal(drawn, torch.stack(expected))
    assert (many.next_c, many.next_m, many.n, many.m) == (one.next_c, one.next_m, one.n, one.m)
    torch.testing.assert_close(many.step(drawn[-1]), one.step(token), atol=0, rtol=0)
    with pytest.raises(IndexError, match="token 11"):
        many.steps_sampled(torch.tensor([11, 0]), uniform[:2], sampling)
    with pytest.raises(ValueError, match="hand-written"):
        Decoder(model, None, batch=1).steps_sampled(torch.tensor([1]), uniform[:2, :1], sampling)


def test_a_top_k_of_one_draws_the_argmax():
    model = _model("mean, post-norm", "d_head 32")
    drawing, plain = (Decoder(model, None, batch=2, compile=True, native=True) for _ in range(2))
    token = torch.tensor([1, 2])
    for _ in range(20):
        logits = plain.step(token)
        token = drawing.step_sample(token, torch.rand(2, 1), Sampling(temperature=2.0, top_k=1))
        assert torch.equal(token, logits.argmax(-1))


def test_a_token_outside_the_vocabulary_is_refused_and_changes_nothing():
    model = _model("conv")
    decoder = Decoder(model, None, batch=2, compile=True, native=True)
    decoder.step(torch.tensor([1, 2]))
    keys, counters = decoder.keys.clone(), (decoder.next_c, decoder.next_m, decoder.n, decoder.m)
    with pytest.raises(IndexError, match="token 11 is outside the vocabulary of 11"):
        decoder.step(torch.tensor([3, 11]))
    with pytest.raises(IndexError, match="token -1"):
        decoder.step_sample(torch.tensor([-1, 0]), torch.rand(2, 1), Sampling())
    assert torch.equal(decoder.keys, keys)
    assert (decoder.next_c, decoder.next_m, decoder.n, decoder.m) == counters


def test_models_it_cannot_run_use_the_compiled_step_or_are_refused_when_asked():
    torch.manual_seed(0)
    small = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                                     mem_len=4, c_mem_len=2, compression_rate=2)).eval()
    assert native.unsupported(Decoder(small, None, batch=1, compile=True, native=False)) == (
        "it needs d_head, d_model and d_ff in multiples of 16 (got 8, 16, 32)")
    with pytest.raises(ValueError, match="multiples of 16"):
        Decoder(small, None, batch=1, compile=True, native=True)
    assert Decoder(_model("conv"), None, batch=1, compile=False).native is None  # only where compiling
    assert Decoder(_model("conv"), None, batch=1, compile=True, native=False).native is None


def test_without_a_compiler_the_decoder_falls_back_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(native, "_LIBRARY", [])
    monkeypatch.setattr(native, "compiler", lambda: None)
    model = _model("conv")
    decoder = Decoder(model, None, batch=1, compile=True)
    assert decoder.native is None
    said = capsys.readouterr().err
    assert "the hand-written decoding step and prompt attention are unavailable (no C++ compiler found" in said
    with pytest.raises(ValueError, match="could not be built"):
        Decoder(model, None, batch=1, compile=True, native=True)


def test_the_attention_kernels_lost_are_said_for_the_precision_that_asks(tmp_path, monkeypatch, capsys):
    """Found by a probe: an fp32 run without a compiler, or with a cache folder that cannot be
    written, was told of the bf16 kernel alone (the fp32 one was lost too), and after "building"."""
    for case in ("no compiler", "read-only"):
        monkeypatch.setattr(native, "_ATTENTION", [])
        monkeypatch.setattr(native, "_ATTENTION_UNSAID", {}, raising=False)
        if case == "no compiler":
            monkeypatch.setattr(native, "compiler", lambda: None)
            reason = "no C++ compiler found: set CXX or install g++"
        else:
            monkeypatch.undo()
            monkeypatch.setattr(native, "_ATTENTION", [])
            monkeypatch.setattr(native, "_ATTENTION_UNSAID", {}, raising=False)
            monkeypatch.setattr(native, "cache_root", lambda: tmp_path)

            def read_only(*args, dir, **kwargs):
                raise OSError(30, "Read-only file system", str(dir))

            monkeypatch.setattr(native.tempfile, "mkdtemp", read_only)
            reason = "[Errno 30] Read-only file system: "
        capsys.readouterr()
        assert native.attention_fp32_library() is None and native.attention_fp32_library() is None
        said = capsys.readouterr().err
        assert said.startswith(f"the fp32 attention kernels are unavailable ({reason}"), said
        assert said.count("\n") == 1 and said.endswith("); fp32 training takes PyTorch's products\n"), said
        assert native.attention_library() is None and native.attention_library() is None
        said = capsys.readouterr().err
        assert said.startswith(f"the bf16 attention kernels are unavailable ({reason}"), said
        assert said.count("\n") == 1 and said.endswith("); bf16 training rounds the attention scores to bf16\n")


def test_the_build_is_cached_and_keyed_on_the_source(tmp_path, monkeypatch):
    """A second build of the same source finds the library; a changed source builds anew."""
    monkeypatch.setattr(native, "cache_root", lambda: tmp_path)
    first = native._build()
    assert first.exists() and first.is_relative_to(tmp_path)
    assert native._build() == first
    changed = tmp_path / "changed.cpp"
    changed.write_text(native.SOURCE.read_text() + "\n// a change\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native._build() != first


def test_a_flag_the_compiler_refuses_is_dropped_and_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(native, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(native, "TUNE", ("-fno-such-flag-in-any-compiler",))
    assert native._build().exists()
    err = capsys.readouterr().err
    assert "could not build the decoding step and prompt attention with -fno-such-flag-in-any-compiler" in err
    assert "building the hand-written decoding step and prompt attention with" in err
    assert native._build().exists() and capsys.readouterr().err == ""  # the failure remembered, the build cached


def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch, capsys):
    """A cached library cut short (a full disk, a copy: loaded, it crashed the process with SIGBUS),
    emptied, or without the record of its build is built again; where its folder cannot be written,
    it is refused with a line that names it."""
    monkeypatch.setattr(native, "cache_root", lambda: tmp_path)
    path = native._build(native.DROPOUT_SOURCE, "dropout kernels")
    whole = path.read_bytes()
    for damage in ("cut in half", "empty", "no record"):
        capsys.readouterr()
        if damage == "no record":
            native._record(path).unlink()
        else:
            path.write_bytes(whole[: len(whole) // 2] if damage == "cut in half" else b"")
        assert native._build(native.DROPOUT_SOURCE, "dropout kernels") == path
        assert path.read_bytes() == whole, damage
        said = capsys.readouterr().err
        assert f"the cached library of the dropout kernels ({path}) is not the one its build recorded" in said
    assert native._build(native.DROPOUT_SOURCE, "dropout kernels") == path and capsys.readouterr().err == ""

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    path.write_bytes(whole[:100])
    monkeypatch.setattr(native.tempfile, "mkdtemp", read_only)
    said = re.escape(f"{path} is not the library its build recorded, and its folder cannot be written (Read-only "
                     "file system) to build it again: set STILL_CACHE to a folder that can be")
    with pytest.raises(RuntimeError, match=f"^{said}$"):
        native._build(native.DROPOUT_SOURCE, "dropout kernels")
    assert "building" not in capsys.readouterr().err


def test_a_failed_build_is_remembered_for_a_day_and_a_killed_one_not_at_all(tmp_path, monkeypatch, capsys):
    """A compiler that fails is not run again at every start (the failure remembered, and said to be,
    with the file that remembers it) but a day later; one killed (for memory on a busy machine, once)
    is tried again at the next run, the tuned build too."""
    calls, mode, cxx = tmp_path / "calls", tmp_path / "mode", tmp_path / "g++"
    cxx.write_text(f"""#!/bin/sh
echo >> {calls}
case $(cat {mode}) in
killed) echo "g++: fatal error: Killed signal terminated program cc1plus" >&2; exit 1;;
failing) echo "g++: error: this compiler is broken" >&2; exit 1;;
signal) kill -KILL $$;;
esac
exec {native.compiler()} "$@"
""")
    cxx.chmod(0o755)
    monkeypatch.setattr(native, "compiler", lambda: str(cxx))
    monkeypatch.setattr(native, "cache_root", lambda: tmp_path / "native")
    monkeypatch.setattr(native, "TUNE", ("-O2",))  # (a tuned build any compiler takes)

    def build(state: str, runs: int) -> Path:
        mode.write_text(state)
        calls.write_text("")
        try:
            return native._build(native.DROPOUT_SOURCE, "dropout kernels")
        finally:
            assert calls.read_text().count("\n") == runs, state

    with pytest.raises(RuntimeError, match="was killed building native_dropout.cpp .*Killed signal.*; tried again at "
                                           "the next run$"):
        build("killed", runs=1)  # (not then untuned: the flags were not at fault, a review probe)
    with pytest.raises(RuntimeError, match=r"was killed building native_dropout.cpp \(killed by signal 9\)"):
        build("signal", runs=1)
    assert not list((tmp_path / "native").glob("*/failed"))
    with pytest.raises(RuntimeError, match="this compiler is broken$"):
        build("failing", runs=2)
    failed = sorted(str(marker) for marker in (tmp_path / "native").glob("*/failed"))
    assert len(failed) == 2
    with pytest.raises(RuntimeError) as raised:
        build("working", runs=0)  # remembered
    said = re.search(r"this compiler is broken; remembered from an earlier run: tried again a day after it, or at once "
                     r"where (\S+) is deleted$", str(raised.value))
    assert said and said[1] in failed, str(raised.value)
    for marker in map(Path, failed):  # a day on
        os.utime(marker, (marker.stat().st_atime, marker.stat().st_mtime - native.RETRY_FAILED_S))
    capsys.readouterr()
    assert native._intact(build("working", runs=1))  # the tuned build, at its first try
    assert "could not build" not in capsys.readouterr().err



def test_a_killed_builds_leftovers_are_removed_by_the_next_build_and_a_live_ones_are_not(tmp_path, monkeypatch):
    """A build killed outright (SIGKILL) left its temporary folder in the cache for good (a probe:
    counted by `still data list`, cleared by nothing). A build's folder is named with its pid now:
    the next build, or the next process that finds the library built, removes those of processes
    gone, in every key's folder, and an older still's unnamed ones an hour old."""
    import time

    monkeypatch.setattr(native, "cache_root", lambda: tmp_path)
    path = native._build(native.DROPOUT_SOURCE, "dropout kernels")
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    other = tmp_path / "0123456789abcdef0123"  # (another compiler's or source's key)
    other.mkdir()
    dead = [path.parent / f".{path.name}.{ended.pid}-abc_1.tmp", other / f".libnative_step.so.{ended.pid}-x.tmp",
            path.parent / "tmpk2j4_x"]
    live = [path.parent / f".{path.name}.{os.getppid()}-abc_2.tmp", path.parent / "tmpfresh"]
    for folder in dead + live:
        folder.mkdir()
        (folder / path.name).write_bytes(b"half a library")
    two_hours_ago = time.time() - 2 * 3600  # (`LEFTOVERS_AFTER_S` ago and more)
    os.utime(dead[-1], (two_hours_ago, two_hours_ago))
    assert native._build(native.DROPOUT_SOURCE, "dropout kernels") == path
    assert not any(p.exists() for p in dead) and all(p.exists() for p in live)


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
def test_a_build_whose_process_is_killed_or_interrupted_ends_its_compiler(tmp_path, signal_name):
    """SIGKILL of a process building left the compiler (g++ and its cc1plus) running on, and its
    temporary folder in the cache. Now the compiler ends with the process (as an ahead-of-time
    build's does) and the next build removes the folder; interrupted (Ctrl-C), the process ends
    the compiler and removes the folder itself."""
    import signal
    import time

    started, cxx, root = tmp_path / "started", tmp_path / "g++", tmp_path / "native"
    cxx.write_text(f"#!/bin/sh\necho $$ > {started}.part && mv {started}.part {started}\nexec sleep 60\n")
    cxx.chmod(0o755)
    building = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys\nfrom still.compressive import native\n"
        "native.compiler, native.cache_root = lambda: sys.argv[1], lambda: pathlib.Path(sys.argv[2])\n"
        "native._build(native.DROPOUT_SOURCE, 'dropout kernels')\n"), str(cxx), str(root)],
        stderr=subprocess.DEVNULL)
    compiler = None
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        compiler = int(started.read_text())
        assert len([p for p in root.glob("*/*") if p.is_dir()]) == 1  # (the build's temporary folder)
        building.send_signal(getattr(signal, signal_name))
        building.wait(60)

        deadline = time.monotonic() + 20
        while not process_gone(compiler) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(compiler)
    finally:
        building.kill()
        if compiler is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(compiler, signal.SIGKILL)
    if signal_name == "SIGKILL":
        native._sweep(root)  # (what the next build does first)
    assert [p for p in root.glob("*/*") if p.is_dir()] == []

FAILING_THREADS = r"""
#include <dlfcn.h>
#include <pthread.h>
#include <cerrno>
static int fail = 0;
extern "C" void still_test_fail_threads(int f) { fail = f; }
extern "C" int pthread_create(pthread_t* t, const pthread_attr_t* a, void* (*fn)(void*), void* arg) {
    using Create = int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
    static Create real = reinterpret_cast<Create>(dlsym(RTLD_NEXT, "pthread_create"));
    return fail ? EAGAIN : real(t, a, fn, arg);
}
"""


@pytest.mark.skipif(sys.platform != "linux", reason="a preloaded pthread_create (Linux's dynamic loader)")
def test_the_kernels_finish_on_the_calling_thread_where_no_thread_can_be_started(tmp_path):
    """Found by a probe: where a thread could not be started (pthread_create's EAGAIN: the system's
    limit on threads), the decoder's set-up, the training attention's and the dropout's kernels let
    C++'s exception out of their C entry points, which ended the process (SIGABRT). Now the parts
    run on the calling thread, and a decoder runs its step on one (`no_threads_workload.py`)."""
    for built in (native.library(), native.attention_fp32_library(), native.dropout_library()):
        if built is None:
            pytest.skip("a hand-written library does not run here")
    source, shim = tmp_path / "failthread.cpp", tmp_path / "libfailthread.so"
    source.write_text(FAILING_THREADS)
    subprocess.run([native.compiler(), "-shared", "-fPIC", "-O1", str(source), "-o", str(shim), "-ldl"], check=True,
                   capture_output=True, timeout=60)
    preload = " ".join(filter(None, (os.environ.get("LD_PRELOAD"), str(shim))))  # (after a sanitizer's runtime)
    workload = Path(__file__).with_name("no_threads_workload.py")
    done = subprocess.run([sys.executable, str(workload), str(shim), str(native.cache_root()), " ".join(native.TUNE),
                           " ".join(native.FLAGS)], env=os.environ | {"LD_PRELOAD": preload}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.splitlines()[-1:] == ["same"], (done.returncode, done.stderr[-3000:])
    assert "the hand-written decoding step could not start its helper threads" in done.stderr


def test_the_attention_kernel_builds_beside_the_decoding_step(tmp_path, monkeypatch, capsys):
    """`native_attention.cpp` goes through the same cached build, as a library of its own name."""
    monkeypatch.setattr(native, "cache_root", lambda: tmp_path)
    path = native._build(native.ATTENTION_SOURCE, "bf16 attention kernel")
    assert path.name == "libnative_attention.so" and path.exists() and path != native._build()
    assert "building the hand-written bf16 attention kernel with" in capsys.readouterr().err
    lib = native._load_attention(path)
    available = lib.still_attention_available()
    assert available in (0, 1)
    # the products: 1 AMX tiles, 0 AVX-512 bf16's dot products, -1 none (no bf16 kernels in this build)
    assert lib.still_attention_tiles() in ((0, 1) if available == 0 else (-1,))
    if available == 0:  # the dot products can be asked for anywhere the kernels run, and given back
        before = lib.still_attention_tiles()
        assert lib.still_attention_allow_tiles(0) == 0
        assert lib.still_attention_allow_tiles(1) == before
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags:  # this processor runs them: they built
        assert available == 0, "the bf16 attention kernels did not build for a processor with AVX-512 bf16"


def _cpu_flags() -> set[str]:
    """This processor's flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def test_a_forked_process_is_refused_rather_than_left_waiting():
    decoder = Decoder(_model("conv"), None, batch=1, compile=True, threads=2, native=True)
    decoder.native._pid = -1  # as a child forked from the decoder's process sees it
    with pytest.raises(RuntimeError, match="forked"):
        decoder.step(torch.tensor([1]))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_helper_threads_end_with_their_decoder():
    model = _model("conv")
    before = _threads()
    decoders = [Decoder(model, None, batch=1, compile=True, threads=2, native=True) for _ in range(3)]
    for decoder in decoders:
        decoder.step(torch.tensor([1]))
    assert _threads() == before + 3  # one helper each
    del decoders, decoder
    assert _threads() == before


def test_threads_are_capped_by_the_heads():
    decoder = Decoder(_model("conv"), None, batch=1, compile=True, threads=8, native=True)
    assert decoder.native.threads == 2  # two heads to split


def test_generate_compiled_gives_the_tokens_of_the_eager_steps():
    """generate(compile=True) on the CPU runs the hand-written step: the same tokens as the eager
    decoder, from the same generator."""
    model = _model("dilated", "d_head 32")
    prompt = torch.randint(0, 11, (2, 13))
    runs = [list(generate(model, prompt, 40, generator=torch.Generator().manual_seed(3), segment_len=4,
                          compile=compile)) for compile in (False, True)]
    assert torch.equal(torch.stack(runs[0]), torch.stack(runs[1]))


@pytest.mark.parametrize("case", ["conv", "dilated", "max", "mean, post-norm", "compressed only", "a longer ring"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("build", BUILDS, indirect=True)
def test_compressions_computed_together_are_those_computed_one_at_a_time(case, dtype, threads, monkeypatch, build):
    """The compressions of several compressing steps computed at the first of them give the logits,
    keys and values of one compression a step, bit for bit (at most as many as the full ring holds: 1
    to 4 in the small cases, 8 of the ring's 9 in the longer one, so computed twice in 31 steps). A
    compressing step run again from the same counters computes them again rather than taking the
    next kept one."""
    if case == "a longer ring":
        torch.manual_seed(0)
        model = CompressiveTransformer(CompressiveConfig(vocab_size=11, n_layers=2, dropout=0.1, **SIZES["d_head 32"],
                                                         mem_len=16, c_mem_len=5, compression_rate=2)).eval()
    else:
        model = _model(case, "d_head 32")
    tokens = torch.randint(0, 11, (2, 40))
    with torch.no_grad():
        state = _prompted(model, tokens, 9)
        together = Decoder(model, state, batch=2, compile=True, threads=threads, dtype=dtype, native=True)
        monkeypatch.setattr(native, "COMPRESS_GROUPS", 1)
        alone = Decoder(model, state, batch=2, compile=True, threads=threads, dtype=dtype, native=True)

    def same() -> bool:
        return torch.equal(together.keys, alone.keys) and torch.equal(together.values, alone.values)

    compressions = 0
    for t in range(9, tokens.shape[1]):
        compressions += together.m + 1 == together.m_cap
        assert torch.equal(together.step(tokens[:, t]), alone.step(tokens[:, t])) and same()
    assert compressions >= 7
    while together.m + 1 != together.m_cap:  # to the next compressing step, then run it twice
        together.step(tokens[:, 0]), alone.step(tokens[:, 0])
    counters = (together.next_c, together.next_m, together.n, together.m)
    for _ in range(2):
        for decoder in (together, alone):
            decoder.next_c, decoder.next_m, decoder.n, decoder.m = counters
            decoder.step(tokens[:, 1])
        assert same()
    assert torch.equal(together.step(tokens[:, 2]), alone.step(tokens[:, 2])) and same()


def test_three_threads_split_four_heads_unevenly_and_agree(monkeypatch):
    """Four heads on three threads (one, one and two heads each; more threads than this machine's
    cores): the model's logits to float rounding, and eight compressions computed together equal to
    one at a time, bit for bit, in fp32 and bf16."""
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, n_layers=2, d_model=64, n_heads=4, d_ff=48,
                                                     mem_len=16, c_mem_len=5, compression_rate=2)).eval()
    tokens = torch.randint(0, 11, (2, 50))
    with torch.no_grad():
        state = _prompted(model, tokens, 9)
        for dtype in (torch.float32, torch.bfloat16):
            monkeypatch.setattr(native, "COMPRESS_GROUPS", 8)
            together = Decoder(model, state, batch=2, compile=True, threads=3, dtype=dtype, native=True)
            monkeypatch.setattr(native, "COMPRESS_GROUPS", 1)
            alone = Decoder(model, state, batch=2, compile=True, threads=3, dtype=dtype, native=True)
            assert together.native.threads == 3
            reference = state
            for t in range(9, tokens.shape[1]):
                logits = together.step(tokens[:, t])
                assert torch.equal(logits, alone.step(tokens[:, t]))
                assert torch.equal(together.keys, alone.keys) and torch.equal(together.values, alone.values)
                if dtype == torch.float32:
                    out = model(tokens[:, t : t + 1], reference)
                    reference = out.state
                    torch.testing.assert_close(logits, out.logits[:, 0], atol=1e-5, rtol=1e-5)


def test_groups_must_be_positive():
    decoder = Decoder(_model("conv"), None, batch=1, compile=True, native=False)
    with pytest.raises(ValueError, match="groups must be >= 1, got 0"):
        NativeStep(decoder, 1, groups=0)


def test_pack_and_pairs_lay_out_what_the_step_reads():
    matrix = torch.arange(20 * 6, dtype=torch.float32).view(20, 6)
    packed = pack(matrix, torch.float32)  # (2, 6, 16): block, input, output
    assert packed.shape == (2, 6, 16) and packed[1, 4, 3] == matrix[19, 4] and packed[1, 4, 4] == 0
    paired = pack(matrix, torch.bfloat16)  # (2, 3, 16, 2): block, pair of inputs, output, input in the pair
    assert paired.shape == (2, 3, 16, 2) and paired[0, 2, 5, 1] == matrix[5, 5].bfloat16()
    wide = pack(torch.arange(128 * 6, dtype=torch.float32).view(128, 6), torch.float32, 128)  # (1, 6, 128)
    assert wide.shape == (1, 6, 128) and wide[0, 4, 100] == 100 * 6 + 4
    tall = torch.arange(64 * 6, dtype=torch.float32).view(64, 6)
    by_input = pack(tall, torch.bfloat16, 32, by_input=True)  # (2, 6, 16, 2): block, input, pair of outputs, output
    assert by_input.shape == (2, 6, 16, 2)
    assert by_input[1, 4, 5, 0] == tall[42, 4].bfloat16() and by_input[1, 4, 5, 1] == tall[43, 4].bfloat16()
    widths = [16, 64, 32, 128, 128] if native.library().still_avx512() else [16, 32, 32, 32, 32]  # (sums in registers)
    assert [down_width(d) for d in (48, 64, 96, 256, 384)] == widths
    blocked = torch.arange(2 * 4 * 16.0).view(2, 4, 16)  # (KB, D, 16)
    assert pairs(blocked).shape == (2, 2, 16, 2) and pairs(blocked)[1, 1, 7, 0] == blocked[1, 2, 7]


def test_native_step_is_the_decoders_step_on_the_cpu():
    decoder = Decoder(_model("conv"), None, batch=1, compile=True)
    assert isinstance(decoder.native, NativeStep) and decoder.prepare(Sampling())


def _advised_for_huge_pages(address: int) -> bool | None:
    """Whether the mapping holding `address` was advised `MADV_HUGEPAGE` (`hg` among its `VmFlags`
    in /proc/self/smaps: the advice itself, whatever the system then makes of it); None where the
    system does not say."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        first = line.split()[0]
        if "-" in first and ":" not in first:  # a mapping's header: start-end perms ...
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
        elif inside and first == "VmFlags:":
            return "hg" in line.split()[1:]
    return None


HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage").is_dir() and hasattr(__import__("mmap"), "MADV_HUGEPAGE")
"""Whether this system has transparent huge pages to advise (a kernel built without them refuses the advice)."""


@pytest.mark.skipif(not HUGE_PAGES, reason="no transparent huge pages here")
def test_tensors_on_huge_pages_are_copies_in_one_advised_block():
    tensors = {"a": torch.arange(10.0), "b": torch.arange(6, dtype=torch.int16).view(2, 3).t(),  # (not contiguous)
               "c": torch.ones(3, 5, dtype=torch.bfloat16), "empty": torch.zeros(0),
               "big": torch.arange(600_000.0)}  # 2.4 MB: the block over two huge pages
    placed = native.on_huge_pages(tensors)
    for name, tensor in tensors.items():
        assert placed[name].dtype == tensor.dtype and torch.equal(placed[name], tensor)
        assert placed[name].is_contiguous() and placed[name].data_ptr() % 64 == 0
        assert placed[name].data_ptr() != tensor.data_ptr() or tensor.numel() == 0
    assert placed["a"].data_ptr() % native.HUGE_PAGE == 0  # the first at a huge page's start
    assert placed["b"].data_ptr() - placed["a"].data_ptr() == 64  # 40 bytes, to the next 64
    placed["a"][0] = 7.0
    assert tensors["a"][0] == 0.0  # a copy
    del tensors
    assert float(placed["a"].sum()) == 52.0 and float(placed["big"][-1]) == 599_999.0  # the block lives on
    assert _advised_for_huge_pages(placed["big"].data_ptr() + 4 * 599_999) is True
    assert _advised_for_huge_pages(torch.zeros(600_000).data_ptr()) is False  # (the helper tells them apart)


def test_tensors_of_less_than_a_huge_page_are_left_as_they_are():
    tensors = {"a": torch.arange(10.0), "b": torch.zeros(500_000)}  # 2.0 MB: under 2 MiB
    placed = native.on_huge_pages(tensors)
    assert placed["a"] is tensors["a"] and placed["b"] is tensors["b"]


def test_tensors_off_the_cpu_are_left_where_they_are():
    tensors = {"a": torch.zeros(600_000), "b": torch.zeros(4, device="meta")}
    placed = native.on_huge_pages(tensors)
    assert placed["a"] is tensors["a"] and placed["b"] is tensors["b"]


def test_without_madvise_the_tensors_are_left_as_they_are(monkeypatch):
    import mmap

    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    tensors = {"a": torch.arange(600_000.0)}
    assert native.on_huge_pages(tensors)["a"] is tensors["a"]


@pytest.mark.skipif(not HUGE_PAGES, reason="no transparent huge pages here")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_step_reads_its_matrices_and_rings_from_memory_advised_for_huge_pages(dtype):
    torch.manual_seed(0)  # the peer benchmark's model: matrices of 2.4 MB in bf16, rings of 3.1 MB at batch 4
    model = CompressiveTransformer(CompressiveConfig(vocab_size=65, d_model=128, n_layers=4, n_heads=4, d_ff=512,
                                                     mem_len=128, c_mem_len=128, compression_rate=4)).eval()
    decoder = Decoder(model, None, batch=4, compile=True, dtype=dtype)
    assert isinstance(decoder.native, NativeStep)
    packed = decoder.derived["native"]
    for tensor in (packed["0.qkv"], packed["1.positions"], packed["head"], decoder.keys, decoder.values,
                   decoder.inputs):
        assert _advised_for_huge_pages(tensor.data_ptr()) is True


def test_a_decoder_with_its_own_hand_written_step_takes_no_second_one():
    decoder = Decoder(_model("conv"), None, batch=1, compile=True)
    assert isinstance(decoder.native, NativeStep)
    keys = decoder.keys
    with pytest.raises(ValueError, match="has its hand-written step already"):
        NativeStep(decoder, 1)
    assert decoder.keys is keys  # (the step's rings left where its step writes)


@pytest.mark.parametrize("d_head", [16, 32, 48])
@pytest.mark.parametrize(("b", "length", "padding"), [(1, 5, (7, 0, 3)), (2, 4, (0, 2)), (2, 1, (0,)), (1, 19, (0,))])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("build", BUILDS, indirect=True)
def test_prompt_attention_gives_the_pytorch_attention(d_head, b, length, padding, threads, monkeypatch, build):
    """`native.prompt_attention`: a group of segments, each over keys of its own gathered from the
    rows by index after its padding, gives `causal_attention` over the gathered keys with that
    padding (several segments a call, a lone segment, one query), one task a thread or shared."""
    from still.compressive.attention import RelativeMultiHeadAttention

    monkeypatch.setattr(native, "PROMPT_ONE_THREAD_BELOW", 0)
    torch.manual_seed(0)
    heads = 3
    d = heads * d_head
    attention = RelativeMultiHeadAttention(d, heads).eval()
    with torch.no_grad():
        attention.content_bias.normal_()
        attention.position_bias.normal_()
        k = max(padding) + 2 * length + 9  # each segment: its padding, 9 or more memories, its own tokens
        s = len(padding)
        rows = torch.randn(b, 50, 2 * d)
        keys = torch.cat([torch.cat([torch.zeros(pad, dtype=torch.long), torch.randint(50, (k - pad,))])
                          for pad in padding])  # (S K,)
        queries = torch.randn(b, s * length + 3, d)[:, 3:]  # a view, as a group of a longer prompt's
        with torch.autocast("cpu", enabled=False):
            torch.set_num_threads(threads)
            try:
                got = native.prompt_attention(attention, queries, rows, keys, padding, length)
            finally:
                torch.set_num_threads(2)
        want = attention.causal_attention(queries.reshape(b * s, length, d),
                                          rows.index_select(1, keys).view(b * s, k, 2 * d), padding)
    assert got is not None and got.shape == (b, s * length, d)
    torch.testing.assert_close(got, want.view(b, s * length, d), atol=2e-6, rtol=1e-5)


def test_prompt_attention_leaves_what_it_cannot_take_to_pytorch():
    from still.compressive.attention import RelativeMultiHeadAttention

    rows, keys = torch.randn(1, 10, 64), torch.arange(8)
    with torch.no_grad():
        assert native.prompt_attention(RelativeMultiHeadAttention(32, 4).eval(), torch.randn(1, 4, 32),
                                       rows, keys, (0,), 4) is None  # d_head 8
        attention = RelativeMultiHeadAttention(32, 2).eval()
        assert native.prompt_attention(attention, torch.randn(1, 4, 32), rows, keys, (0,), 4) is not None
        assert native.prompt_attention(attention, torch.randn(1, 4, 32).half(), rows.half(), keys, (0,), 4) is None
        halved = RelativeMultiHeadAttention(32, 2).eval().bfloat16()  # (a model made bf16 whole: its weights)
        assert native.prompt_attention(halved, torch.randn(1, 4, 32).bfloat16(), rows.bfloat16(), keys, (0,),
                                       4) is None
        assert native.prompt_attention(attention, torch.randn(1, 4, 32), rows.bfloat16(), keys, (0,), 4) is None
    assert native.prompt_attention(attention, torch.randn(1, 4, 32), rows, keys, (0,), 4) is None  # gradients


@pytest.mark.parametrize("build", BUILDS, indirect=True)
def test_bf16_prompt_attention_is_the_fp32_kernels_on_the_rounded_inputs(monkeypatch, build):
    """Under bf16 autocast the prompt's queries and rows are bf16: the kernel reads them as fp32 (the
    position table made in fp32 there too) and gives its outputs back in bf16."""
    from still.compressive.attention import RelativeMultiHeadAttention

    monkeypatch.setattr(native, "PROMPT_ONE_THREAD_BELOW", 0)
    attention = RelativeMultiHeadAttention(64, 2).eval()
    padding, length = (3, 0), 5
    rows = torch.randn(2, 40, 128).bfloat16()
    keys = torch.cat([torch.cat([torch.zeros(pad, dtype=torch.long), torch.randint(40, (20 - pad,))])
                      for pad in padding])
    queries = torch.randn(2, 10, 64).bfloat16()
    with torch.no_grad():
        with torch.autocast("cpu", enabled=False):
            want = native.prompt_attention(attention, queries.float(), rows.float(), keys, padding, length)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = native.prompt_attention(attention, queries, rows, keys, padding, length)
    assert got is not None and got.dtype == torch.bfloat16
    assert torch.equal(got, want.bfloat16())


@pytest.mark.parametrize("case", ["conv", "XL", "mean, post-norm"])
@pytest.mark.parametrize("start", ["empty", "after segments"])
@pytest.mark.parametrize("build", BUILDS, indirect=True)
def test_prefill_with_the_hand_written_attention_gives_the_pytorch_prefill(case, start, monkeypatch, build):
    """`prefill(..., written=True)` (what `generate` runs with `compile`): the same logits and state as
    the PyTorch attention, each group and the last layer's query through the kernel."""
    from still.compressive.prefill import prefill

    monkeypatch.setattr(native, "PROMPT_ONE_THREAD_BELOW", 0)
    model = _model(case, "d_head 32")
    tokens = torch.randint(0, 11, (2, 45))
    state = None if start == "empty" else prefill(model, torch.randint(0, 11, (2, 13)), None, 6)[1]
    calls = []
    attend = native.prompt_attention

    def counted(*args):
        out = attend(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(native, "prompt_attention", counted)
    want_logits, want = prefill(model, tokens, state, 6)
    assert not calls
    logits, got = prefill(model, tokens, state, 6, written=True)
    # a layer: a group of the 7 whole segments, the last 3 tokens alone; the last layer: its last query
    assert calls == [True] * ((len(model.layers) - 1) * 2 + 1)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    for name in ("memory", "compressed", "key_values"):
        for g, w in zip(getattr(got, name), getattr(want, name), strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inputs, outputs", [(1024, 256), (80, 48), (64, 64), (160, 96)])  # blocks of 128, 16, 64, 32
@pytest.mark.parametrize("build", BUILDS, indirect=True)
def test_the_listed_product_gives_the_full_products_outputs_bit_for_bit(dtype, inputs, outputs, build):
    """The feed-forward's second product reads only its nonzero inputs' weights, packed by input
    (`product_listed`): the very floats `product` gives over every input, packed in pairs, for inputs
    whose sums depend on their order (magnitudes over 10 decades), with zeros of both signs, and
    for inputs all zero; in every build (`BUILDS`)."""
    torch.manual_seed(0)
    matrix = torch.randn(outputs, inputs)
    stored = matrix.to(dtype).float()  # the weights the step multiplies by
    magnitudes = torch.exp(4 * torch.randn(4, inputs))
    x = torch.relu(torch.randn(4, inputs)) * magnitudes
    x[1, 1::3] = -0.0  # zeros of both signs
    x[2] = 0.0
    x[3, : inputs // 2] = 0.0  # no even input nonzero, the odd ones in the upper half only
    x[3, inputs // 2 :: 2] = 0.0
    by_pairs, by_input = pack(matrix, dtype), pack(matrix, dtype, down_width(outputs), by_input=True)
    dims = torch.tensor([inputs, outputs, int(dtype == torch.bfloat16)], dtype=torch.int64)
    for row in x:
        full, listed = torch.full((outputs,), float("nan")), torch.full((outputs,), float("nan"))
        assert build.still_down_products(dims.data_ptr(), by_pairs.data_ptr(), by_input.data_ptr(), row.data_ptr(),
                                         full.data_ptr(), listed.data_ptr()) == 0
        assert torch.equal(listed.view(torch.int32), full.view(torch.int32))
        exact = stored.double() @ row.double()
        scale = (stored.double().abs() @ row.double()).clamp_min(1e-30)
        assert ((listed.double() - exact).abs() <= 1e-5 * scale).all()
    odd = torch.tensor([inputs + 1, outputs, 0], dtype=torch.int64)
    assert build.still_down_products(odd.data_ptr(), *[0] * 5) == 1


SANITIZED = "-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
"""The flags the sanitized libraries get beside `native.FLAGS` (-O1: a third of -O3's build time)."""
SANITIZER_OPTIONS = {"ASAN_OPTIONS": "detect_leaks=0:alloc_dealloc_mismatch=0:halt_on_error=1",
                     "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
"""As scripts/sanitized_tests.sh: PyTorch and Python keep at exit what the checker would call leaks."""


def _address_sanitizer(tmp_path: Path) -> tuple[str | None, str]:
    """What to preload (LD_PRELOAD: the compiler's AddressSanitizer runtime, and its C++ library)
    where a library built with `SANITIZED` loads into a Python that preloads them, within a minute;
    else None and why. (Where the compiler is clang,
    its shared libraries do not carry the checkers' runtimes; where the kernel randomises more of
    the address space than the runtime knows (GCC 13's and older, on Linux 6.5's 32 bits), a process
    under it never starts.)"""
    cxx = native.compiler()
    found = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True,
                           check=False).stdout.strip()
    if not (os.path.isabs(found) and os.path.exists(found)):
        return None, f"{cxx} has no AddressSanitizer runtime (libasan)"
    # (the C++ library preloaded too: the runtime wraps the function that throws C++ exceptions only
    # where it is loaded when the runtime starts, and Python itself does not load it)
    cxx_library = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                                 check=False).stdout.strip()
    if os.path.isabs(cxx_library) and os.path.exists(cxx_library):
        found = f"{found} {cxx_library}"
    source, library = tmp_path / "probe.cpp", tmp_path / "libprobe.so"
    source.write_text('extern "C" int probe(const int* x, int n) { int s = 0; for (int i = 0; i < n; ++i) s += x[i]; '
                      "return s; }\n")
    try:
        subprocess.run([cxx, *native.FLAGS, *SANITIZED.split(), str(source), "-o", str(library)], check=True,
                       capture_output=True, timeout=60)
        loaded = subprocess.run(
            [sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(library)!r})"], capture_output=True, timeout=60,
            env=os.environ | SANITIZER_OPTIONS | {"LD_PRELOAD": found}, check=False)
    except (subprocess.SubprocessError, OSError) as error:
        return None, f"a sanitized library could not be built or loaded ({type(error).__name__})"
    if loaded.returncode != 0:
        return None, f"a sanitized library does not load here: {loaded.stderr.decode(errors='replace')[-300:]}"
    return found, ""


def test_the_hand_written_kernels_touch_only_their_own_memory(tmp_path):
    """Every kernel of the three libraries (the decoding step and the prompt's attention; the
    training attention forward and backward, fp32 and bf16, and the reconstruction loss's; the
    dropout kernels) built with AddressSanitizer and UndefinedBehaviorSanitizer and run by a small
    model's training, prompts and decoding steps (`sanitized_workload.py`), in a process with the
    sanitizer's runtime loaded first, which then also guards PyTorch's CPU tensors: a read or write
    past a tensor's end or into freed memory, or an overflowing or misaligned operation, stops it
    with a report. Built for this machine (-march=native); AVX-512's masked loads and stores (the
    tails of some loops) are compiler builtins the checker does not see. (Every build's, the
    portable ones too, through the native tests: `scripts/sanitized_tests.sh`.)"""
    runtime, why = _address_sanitizer(tmp_path)
    if runtime is None:
        pytest.skip(why)
    env = os.environ | SANITIZER_OPTIONS | {"LD_PRELOAD": runtime, "STILL_CACHE": str(tmp_path),
                                            "OMP_WAIT_POLICY": "PASSIVE"}
    workload = Path(__file__).with_name("sanitized_workload.py")
    with open(tmp_path / "stderr", "w+") as stderr:
        result = subprocess.run([sys.executable, str(workload), SANITIZED], env=env, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, timeout=600, check=False)
        stderr.seek(0)
        errors = stderr.read()
    assert result.returncode == 0 and "Sanitizer" not in errors and "runtime error" not in errors, errors[-6000:]
    ran = json.loads(result.stdout.splitlines()[-1])
    assert "step" in ran["loaded"] and "dropout" in ran["loaded"], ran  # (the attention's need AVX-512 bf16, or FMA)
    assert ran["instrumented"] == ran["loaded"], ran  # the libraries are the sanitized builds
    from sanitized_workload import ENTRY_POINTS

    never = [f for name in ran["loaded"] for f in ENTRY_POINTS[name] if not ran["calls"].get(f)]
    assert not never, f"the workload never called {never}"
