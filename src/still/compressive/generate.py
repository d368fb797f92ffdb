"""Streaming generation and evaluation with the memories carried.

Generation feeds the prompt in segments (computed a layer at a time: prefill.py), then one token
at a time; each new token attends to at most mem_len + c - 1 memories and c_mem_len compressed
memories per layer, so the cost of a new token does not grow with the number of tokens generated so
far (nothing of the past is recomputed). Compression happens once every c tokens (memory.py). The
tokens after the prompt go through `decode.Decoder` (fixed-shape buffers, optionally compiled), or
through the model's own forward for most_used compression.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.compressive.decode import Decoder, openmp_threads_spin, supports, threads_for, using_threads
from still.compressive.memory import MemoryState
from still.compressive.model import CompressiveTransformer, check_ids, described, is_ids
from still.compressive.native import library as native_library
from still.compressive.prefill import prefill, supports_model
from still.compressive.sampling import Sampling, filter_logits, next_token, sample, uniforms
from still.errors import StillError, whole
from still.train.precision import this_threads_modes
from still.train.progress import log
from still.train.shards import ShardPool

__all__ = ["Generation", "StreamScorer", "eval_shards", "evaluate_streams", "filter_logits", "generate", "sample"]


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def generate(model: CompressiveTransformer, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, segment_len: int = 128,
             generator: torch.Generator | None = None, state: MemoryState | None = None,
             compile: bool | None = False, exclude: int | Sequence[int] | None = None,
             keep_tokens: bool = True) -> Generation:
    """The `max_new_tokens` tokens (B,) sampled one at a time after `prompt` (B, P), P >= 1, read after
    `state` (None: no memories): a `Generation`, which yields them and gives the memories after them.
    The model runs in eval mode; its modules' modes are restored when the iterator ends (or is closed).

    `compile`: run the decoding step compiled: on the CPU written by hand (`still.compressive.native`,
    built once per machine), else ahead of time (`still.train.aot`, once per model shape); both cached.
    None: the hand-written step where it can run this model (on the CPU, where a C++ compiler builds
    it: seconds, once per machine), else eager steps (never the minute of compiling ahead of time).

    `exclude`: a token, or tokens, never drawn (`(Vocab.PAD, Vocab.DOC)`, say: never training
    targets, their probabilities are not quite 0, and `Vocab.decode` writes them as nothing and a
    newline).

    `keep_tokens`: keep the tokens for `Generation.tokens` and `.state` (8 bytes a token and row);
    False: a stream of any length in bounded memory, whose `tokens` and `state` are refused.

    Nothing is recorded for autograd. (Not by `torch.no_grad()` as a decorator: on a generator it
    switches the mode around every token, 1.3 µs each; the compiled step needs no switch at all.)"""
    if not (_real(temperature) and 0 < temperature < math.inf):
        raise StillError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_p is not None and not (_real(top_p) and 0 < top_p <= 1):
        raise StillError(f"top_p must be in (0, 1], got {top_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise StillError(f"generator must be a torch.Generator or None, got a {type(generator).__name__}")
    if top_k is not None and not (whole(top_k) and top_k >= 1):
        raise StillError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    top_k = int(top_k) if top_k is not None else None  # (NumPy's integers too)
    for name, value, low in (("max_new_tokens", max_new_tokens, 0), ("segment_len", segment_len, 1)):
        if not (whole(value) and value >= low):
            raise StillError(f"{name} must be an int >= {low}, got {value!r}")
    max_new_tokens, segment_len = int(max_new_tokens), int(segment_len)  # (NumPy's integers too: a probe)
    if not (is_ids(prompt) and prompt.ndim == 2 and prompt.shape[0] > 0 and prompt.shape[1] > 0):
        raise StillError(f"the prompt must be ids (batch >= 1, length >= 1), got {described(prompt)}")
    prompt = check_ids(prompt, model.config.vocab_size)
    if state is not None:  # (at the call: a probe's dict was an AttributeError at the first token)
        model.check_state(state, prompt.shape[0])
    excluded = () if exclude is None else (exclude,) if whole(exclude) else exclude
    if not (isinstance(excluded, Sequence) and not isinstance(excluded, str)
            and all(whole(i) and 0 <= i < model.config.vocab_size for i in excluded)):
        raise StillError(f"exclude must be a token id (0 to {model.config.vocab_size - 1}), a sequence of them or "
                         f"None, got {exclude!r}")
    excluded = tuple(sorted({int(i) for i in excluded}))  # (NumPy's integers too; each once)
    if len(excluded) >= model.config.vocab_size:
        raise StillError(f"exclude would leave a vocabulary of {model.config.vocab_size} tokens nothing to draw")
    if model.config.mem_len == 0 and model.config.c_mem_len == 0:
        # (each token is read as a segment of one, over the memories: without any, it would be drawn
        # from the token before it alone, where training read up to a segment of context)
        raise StillError("this model keeps no memories (mem_len 0, c_mem_len 0): its tokens would be drawn each "
                         "from the one before it alone; generate from a model with memories")
    generation = Generation(model, prompt, state, segment_len, written=compile is True, keep=bool(keep_tokens))
    if max_new_tokens:
        sampling = Sampling(temperature, top_k, top_p, excluded)
        generation._iterator = _in_eval_mode(model, _generate(model, prompt, max_new_tokens, sampling, segment_len,
                                                              generator, state, compile, generation._record))
    return generation


class _Record:
    """What the token generator leaves for `Generation.state`: the tokens, in the (n, B) chunks they
    come in (a (B,) view each would hold some 600 bytes a token), how many of them were yielded, the
    state after the prompt and the last state computed. Not the `Generation` itself: the generator
    would then hold its owner, and a generation dropped half-way would restore the model's modes
    only when the cyclic collector ran, at any later moment."""

    __slots__ = ("after_prompt", "chunks", "keep", "known", "store", "written", "yielded")

    def __init__(self, written: bool, keep: bool) -> None:
        self.chunks: list[torch.Tensor] = []  # (n, B) each
        self.keep = keep  # (False: no chunks kept, `generate`'s keep_tokens)
        self.store = self.chunks.append if keep else _ignore  # what the token generator does with each chunk
        self.yielded = 0
        self.after_prompt: MemoryState | None = None  # set by `_generate` once it has read the prompt
        self.known: tuple[int, MemoryState] | None = None  # the state after the first k tokens, the last computed
        self.written = written

    def tokens(self) -> torch.Tensor:
        """The tokens yielded, (n, B) (the chunks joined into one, kept)."""
        if not self.keep and self.yielded:
            raise StillError("this generation kept no tokens (generate's keep_tokens=False): neither its tokens nor "
                             "the memories after them can be given")
        if len(self.chunks) > 1:
            self.chunks[:] = [torch.cat(self.chunks)]
        return self.chunks[0][: self.yielded] if self.chunks else torch.zeros(0, 0, dtype=torch.long)


class Generation:
    """What `generate` returns: an iterator of the sampled tokens, (B,) each, that also gives the
    memories they leave.

        generation = generate(model, prompt, 100, state=state)
        for token in generation:              # (B,) each, as it is sampled
            ...
        after = generation.state              # the memories after the prompt and every token yielded
        logits = model(more, after).logits    # reads on (or generate(model, more, n, state=after))

    `state` is the `MemoryState` the model's forward leaves, from generate's `state`, fed the prompt
    in segments of `segment_len` and then the tokens yielded so far (the last included) one at a
    time, as generation fed them. Generating on from `state_after(n - 1)` with the n-th token as the
    prompt (and the same random generator) draws what one longer generation would have drawn, to
    float rounding (`still lm generate --save-state` keeps those two). It is not what a prompt of
    the same tokens leaves: a prompt's token attends over the memories and its segment's earlier
    tokens, a sampled one over at most mem_len + c - 1 memories, so every layer above the first
    stores other inputs (in a barely trained model, next logits 1e-2 apart).

    The decoder's ring buffers (`decode.Decoder`, the hand-written step) keep keys and values (maybe
    in bf16), not the memories, so the model computes the state again: exactly what feeding those
    tokens gives, not the decoder's numbers. On access, in eval mode (the modules' modes restored
    after, as `eval_mode` does), without gradients, under the caller's autocast at that moment (read
    it under the autocast that sampled, as `still lm generate` does); kept until more tokens are
    yielded. The cost: a pass a layer at a time (`prefill.prefill`, a token a segment) over the
    tokens yielded since the state last computed, from it (at first from the state after the
    prompt, kept from the prompt's pass), so each token once while the reads go forward: about 50 µs
    a token at d_model 128 with the hand-written prompt kernel (fp32 on the CPU, where generation ran
    compiled), 250 µs without (`STATE_CHUNK`). Sampling pays nothing for it but keeping its tokens (each
    call's tensor of them, `_Record`) and counting them. With no token yielded it is the prompt's
    state (computed on access where generation has not read the prompt: max_new_tokens 0, or before
    the first token). `state_after(k)`: after the prompt and the first k tokens.

    A `for` loop runs the token generator itself (`iter` gives it: no method of this class runs
    between tokens); `next()` and `close()` on this object go to it too.
    """

    def __init__(self, model: CompressiveTransformer, prompt: torch.Tensor, state: MemoryState | None,
                 segment_len: int, written: bool, keep: bool = True) -> None:
        self._model, self._prompt, self._start, self._segment_len = model, prompt, state, segment_len
        self._record = _Record(written, keep)
        self._iterator: Iterator[torch.Tensor] = iter(())

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._iterator

    def __next__(self) -> torch.Tensor:
        return next(self._iterator)

    def close(self) -> None:
        """End generation (the model's modes restored); the state stays that of the tokens yielded."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    @property
    def tokens(self) -> list[torch.Tensor]:
        """The tokens yielded so far, (B,) each."""
        return list(self._record.tokens().unbind(0))

    @property
    def state(self) -> MemoryState:
        """The memories after the prompt and every token yielded so far (see the class)."""
        return self.state_after(self._record.yielded)

    def state_after(self, count: int) -> MemoryState:
        """The memories after the prompt and the first `count` tokens yielded (0 <= count <= those
        yielded), computed on from the last state computed where it came before (see the class)."""
        record = self._record
        # (as generate's ints: NumPy's taken, a bool not)
        if not (whole(count) and 0 <= count <= record.yielded):
            raise StillError(f"count must be an int in [0, {record.yielded}] (the tokens yielded), got {count!r}")
        count = int(count)
        known = record.known
        if known is not None and known[0] == count:
            return known[1]
        model = self._model
        with eval_mode(model), torch.no_grad():
            done, state = known if known is not None and known[0] < count else (0, self._prompt_state())
            yielded = record.tokens() if count > done else None  # (n, B); refused where none were kept
            for start in range(done, count, STATE_CHUNK):  # (one token a segment: any split gives the same state)
                tokens = yielded[start : min(start + STATE_CHUNK, count)].T.contiguous()  # (B, n)
                with using_threads(threads_for(model, tokens.shape[0], min(self._segment_len, tokens.shape[1]))):
                    _, state = prefill(model, tokens, state, 1, written=record.written)
        record.known = count, state
        return state

    def _prompt_state(self) -> MemoryState:
        """The state after the prompt: `_generate`'s, or computed here where it has not read it (yet)."""
        record = self._record
        if record.after_prompt is None:
            _, record.after_prompt = _read_prompt(self._model, self._prompt, self._start, self._segment_len,
                                                  record.written)
        return record.after_prompt


def _read_prompt(model: CompressiveTransformer, prompt: torch.Tensor, state: MemoryState | None, segment_len: int,
                 written: bool) -> tuple[torch.Tensor, MemoryState]:
    """`prefill`'s logits after `prompt` (B, V) and the state, on the threads that suit its segments."""
    with using_threads(threads_for(model, prompt.shape[0], min(segment_len, prompt.shape[1]))):
        return prefill(model, prompt, state, segment_len, written=written)


STATE_CHUNK = 256
"""Tokens `Generation.state` reads a call, one a segment (`prefill.prefill`): a call's plan holds
about 6 kB a token, and is memoised; past the first chunks the memories hold the same number of
slots at each chunk's start (a multiple of c tokens), so the later chunks reuse the first's plan.
Fed 2048 tokens at d_model 128 (2 layers, mem 64 + 64) a chunk of 256 took the time of one call,
about 50 µs a token with the hand-written prompt kernel and 250 µs without."""


def _in_eval_mode(model: nn.Module, tokens: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """`tokens`, with `model` in eval mode from the first until the iterator ends or is closed;
    then each module that was training trains again."""
    with eval_mode(model):
        yield from tokens


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside; after, each module that was training trains again, and only
    those (a submodule its owner froze in eval stays so), also after an error. Holds of one model
    that overlap (two generations read in turn) keep it in eval mode until the last ends: the first
    to end put training mode back under the other (a probe: its later tokens drew dropout masks)."""
    training = [module for module in model.modules() if module.training]  # (a tenth of eval()'s 0.2 ms)
    if training:
        model.eval()
    hold = _EVAL_HOLDS.setdefault(model, _Hold())
    hold.count += 1
    hold.training.extend(training)
    try:
        yield
    finally:
        hold.count -= 1
        if not hold.count:
            del _EVAL_HOLDS[model]
            for module in hold.training:  # (not `train()`, which would also set its children's modes)
                module.training = True


class _Hold:
    """A model's overlapping `eval_mode`s: how many are open, and the modules to train again after the last."""

    def __init__(self) -> None:
        self.count = 0
        self.training: list[nn.Module] = []


_EVAL_HOLDS: weakref.WeakKeyDictionary[nn.Module, _Hold] = weakref.WeakKeyDictionary()


def _exp(x: float) -> float:
    """e^x; infinite past float64's range, where `math.exp` raises (a perplexity of a loss above 709
    nats, a model far from trained)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _generate(model: CompressiveTransformer, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling,
              segment_len: int, generator: torch.Generator | None, state: MemoryState | None, compile: bool | None,
              record: _Record) -> Iterator[torch.Tensor]:
    native = None  # the decoder's choice between the hand-written and the compiled step
    if compile is None:  # the hand-written step where it can run, else eager steps
        cpu = model.embedding.weight.device.type == "cpu"
        compile = native = cpu and native_library(fallback="eager steps") is not None
    with torch.no_grad():
        logits, state = _read_prompt(model, prompt, state, segment_len, compile)  # (B, V): a layer at a time
        if not bool(logits.isfinite().all()):  # (a diverged model's NaN outputs drew token 0, every time)
            raise StillError("the model's outputs after the prompt are not finite: its weights diverged (an "
                             "earlier checkpoint may not have)")
        batch, device = prompt.shape[0], logits.device
        draws = _Draws(max_new_tokens, batch, generator, device)  # (B, 1) a token
        token = next_token(logits, draws.take(), sampling)  # (B,)
        dtype = _stored_dtype(device, compile)
        decoder = _decoder(model, state, batch, compile, dtype, native)
        # compiling, if any, before the first token rather than after it; where it failed, the
        # eager steps run faster in the weights' dtype
        if decoder is not None and not decoder.prepare(sampling) and dtype is not None:
            decoder = Decoder(model, state, batch)
    # (`Generation.state` reads on from the prompt's state, computed alike; one it computed before is
    # dropped: the same to float rounding, but not this one)
    record.after_prompt, record.written, record.known = state, compile, None
    if decoder is not None and decoder.native is not None:  # STEPS_A_CALL steps and draws in each call
        yield from _stepped(decoder, token, max_new_tokens, draws, sampling, record)
        return
    keep = record.store  # all `Generation.state` needs of the loop: each token, and the count yielded
    for i in range(max_new_tokens):
        keep(token[None])
        record.yielded += 1
        yield token
        if i == max_new_tokens - 1:
            break
        if decoder is not None:  # the step and the draw in one call
            token = decoder.step_sample(token, draws.take(), sampling)
        else:
            with torch.no_grad(), using_threads(threads_for(model, batch, 1)):
                out = model(token[:, None], state)
                state = out.state
                token = next_token(out.logits[:, -1], draws.take(), sampling)


def _ignore(tokens: torch.Tensor) -> None:
    """What a generation that keeps no tokens does with them."""


def _decoder(model: CompressiveTransformer, state: MemoryState, batch: int, compile: bool, dtype: torch.dtype | None,
             native: bool | None) -> Decoder | None:
    """The decoder for `generate` (None where it cannot run: the model's forward steps then); with
    `native` True (the default's choice), eager steps where the hand-written one cannot run this model."""
    if not supports(model, state):
        if compile and not native:  # (asked for: a probe's --compile of a most_used model fell back unsaid)
            log("the compiled decoding step cannot run this model (" + (
                "most_used compression" if model.config.has_compression and model.config.compression == "most_used"
                else "memories with gaps") + "); using the model's own steps")
        return None
    if not native:
        return Decoder(model, state, batch, compile=compile, dtype=dtype, native=native)
    try:
        return Decoder(model, state, batch, compile=True, dtype=dtype, native=True)
    except ValueError as error:  # (only the hand-written step's refusal: the rest is checked above)
        log(f"{error}; using eager steps")
        return Decoder(model, state, batch)


STEPS_A_CALL = 16
"""Tokens the hand-written step draws in one call (`Decoder.steps_sampled`): its Python costs about
5 µs a call, a tenth of a bf16 step at d_model 128 (docs/performance.md, session 18); streamed
tokens then come in bursts of 16, about 0.6 ms apart at that size."""


def _stepped(decoder: Decoder, token: torch.Tensor, count: int, draws: _Draws, sampling: Sampling,
             record: _Record) -> Iterator[torch.Tensor]:
    """`token` and the count - 1 tokens after it (each (B,)), drawn STEPS_A_CALL at a time with the
    next uniform numbers of `draws`: the tokens of as many `step_sample` calls, each call's kept in
    `record` and counted there as each is yielded."""
    keep = record.store
    keep(token[None])
    record.yielded += 1
    yield token
    left = count - 1
    while left > 0:
        steps = min(STEPS_A_CALL, left)
        drawn = decoder.steps_sampled(token, draws.take(steps), sampling)  # (steps, B)
        keep(drawn)
        for token in drawn.unbind(0):  # a token (B,) at a time (unbind: 0.5 µs a view, iterating 0.85)
            record.yielded += 1
            yield token
        left -= steps


def _stored_dtype(device: torch.device, compile: bool) -> torch.dtype | None:
    """What the compiled decoding steps store their matrices and keys in under the caller's bf16
    autocast: bf16 (half the bytes a token reads, 1.3-2.0x faster here); else None, the weights'
    dtype (eager bf16 products at batch 1 are slower than fp32 ones: `Decoder`)."""
    bf16 = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16
    return torch.bfloat16 if compile and bf16 else None


DRAWN_AT_ONCE = 1024  # tokens whose uniform numbers are drawn in one call


class _Draws:
    """The uniform numbers of `tokens` tokens (at least one) in turn, drawn `DRAWN_AT_ONCE` tokens at
    a time (a call costs as much as three indexings; on the CPU the numbers are those of one call a
    token): `take()` the next token's (B, 1), `take(k)` the next k tokens' (k, B, 1), a view where
    they lie in one call's numbers (stacking 16 tokens' rows cost about 10 µs a call of the
    hand-written step, `_stepped`)."""

    def __init__(self, tokens: int, batch: int, generator: torch.Generator | None, device: torch.device) -> None:
        self.left, self.batch, self.generator, self.device = max(tokens, 1), batch, generator, device
        self.drawn, self.at = torch.empty(0, batch, 1, device=device), 0

    def take(self, k: int | None = None) -> torch.Tensor:
        parts, wanted = [], 1 if k is None else k
        while wanted:
            if self.at == len(self.drawn):
                if not self.left:
                    raise RuntimeError("more uniform numbers taken than the tokens they were drawn for")
                steps = min(DRAWN_AT_ONCE, self.left)
                self.drawn = uniforms(self.batch, self.generator, self.device, steps)
                self.at, self.left = 0, self.left - steps
            n = min(wanted, len(self.drawn) - self.at)
            parts.append(self.drawn[self.at : self.at + n])
            self.at, wanted = self.at + n, wanted - n
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out[0] if k is None else out


# rows a shard needs, where OpenMP's idle threads spin, for splitting an evaluation to pay
SHARD_ROWS_WHERE_SPINNING = 8
# An unsharded evaluation on the CPU of at most LAYERWISE_ROWS rows a segment (batch x segment
# length) reads LAYERWISE_TOKENS tokens a row a call, a layer at a time (prefill.py), as long as the
# call's logits stay within LAYERWISE_LOGITS numbers: at batches 1 and 2 1.1-1.2x faster in fp32 and
# 1.3-1.5x in bf16 than a segment a call (docs/performance.md, session 20)
LAYERWISE_ROWS = 512
LAYERWISE_TOKENS = 1024
LAYERWISE_LOGITS = 2**25  # 128 MiB of fp32 logits


def eval_shards(model: torch.nn.Module, batch: int, tokens: int, threads: int | None = None,
                precision: str = "fp32") -> int:
    """The shards (`StreamScorer`) an evaluation of segments of `batch` x `tokens` in `precision`
    uses when not told: 2 on a CPU with two or more intra-op threads where, while OpenMP's idle
    threads spin a while between operators (its default: `openmp_threads_spin`), the evaluation is
    fp32 and each shard gets at least `SHARD_ROWS_WHERE_SPINNING` rows, or, where they sleep
    (`OMP_WAIT_POLICY=PASSIVE`), at least one row of work too big for one thread (`threads_for`: a
    small model's few rows run fastest on one thread); else 1. Measured on two cores
    (docs/performance.md, sessions 16 and 20): sleeping, two shards ran the reference preset's batch
    2 1.6x and batch 16 1.2-1.4x faster, a d_model 128 model's batch 16 1.4-1.7x; spinning, the
    reference preset's batch 16 1.03-1.09x in fp32 but 0.94-0.96x in bf16 (d_model 128: 0.89-0.92x),
    batches 2 down to 0.57x."""
    threads = torch.get_num_threads() if threads is None else threads
    if next(model.parameters()).device.type != "cpu" or threads < 2 or batch < 2:
        return 1
    if openmp_threads_spin():
        return 2 if batch >= 2 * SHARD_ROWS_WHERE_SPINNING and precision == "fp32" else 1
    return 1 if threads_for(model, batch, tokens) == 1 else 2


class StreamScorer:
    """The model's loss on segment after segment of B streams, the memories carried, optionally
    split across CPU threads.

        scorer = StreamScorer(model, batch=16, shards=2)
        nll = scorer(inputs, targets, reset)   # (B, L) each, reset (B,) -> nats (B, L), fp32, on the CPU
                                               # (on_device=True: where the model is, not waited for)
        scorer.close()                         # (or `with StreamScorer(...) as scorer:`)

    `shards` > 1 (CPU only): each of that many worker threads (`still.train.shards.ShardPool`, one
    intra-op thread each on two cores) runs the forward of its own contiguous rows and keeps their
    memories, as sharded training does. A row's result does not depend on the other rows, so the
    losses are the unsharded ones to float rounding (the products' blocking differs with the
    number of rows). At the reference preset, batch 16, on two cores: 1.03-1.09x where OpenMP's idle
    threads spin, 1.2-1.4x where they sleep (`OMP_WAIT_POLICY=PASSIVE`; `eval_shards`). The workers
    compute under the caller's grad mode and autocast (`this_threads_modes`). Rows that divide
    unevenly are split as evenly as they can be; never more shards than rows. Unsharded, a call runs
    on the threads `decode.threads_for` chooses, as `generate`'s prompt does (one for a small
    model's few rows where OpenMP's idle threads sleep).

    `segment_len`: a call may then take several consecutive segments (B, K x L), `reset` flagging
    the first one only (no document may start in a later one): computed a layer at a time
    (`prefill.prefill`) where that can run, else segment by segment. `chunk` is how many segments
    a call should take for speed: `LAYERWISE_TOKENS` tokens' worth (fewer where the logits would
    pass `LAYERWISE_LOGITS` numbers) for an unsharded scorer of at most `LAYERWISE_ROWS` rows a
    segment on the CPU, else 1 (`evaluate_streams` gives it that). Several segments a call are
    computed without gradients, their attention (fp32 or bf16, on the CPU) by the hand-written
    prompt kernel where it can run (`native.prompt_attention`; `written=False`: PyTorch's): at the
    reference preset, batch 1 to 4, 1.08-1.20x the tokens a second (docs/performance.md, session 40).
    """

    def __init__(self, model: torch.nn.Module, batch: int, shards: int = 1, segment_len: int | None = None,
                 written: bool = True) -> None:
        if batch < 1 or shards < 1:
            raise StillError(f"batch and shards must be >= 1, got {batch} and {shards}")
        if segment_len is not None and not (whole(segment_len) and segment_len >= 1):
            raise StillError(f"segment_len must be an int >= 1, got {segment_len!r}")  # (2.5 was taken)
        segment_len = None if segment_len is None else int(segment_len)  # (NumPy's integers too)
        self.model = model
        self.device = next(model.parameters()).device
        shards = min(shards, batch)
        if shards > 1 and self.device.type != "cpu":
            raise StillError(f"shards ({shards}) split the rows across CPU threads: not on {self.device}")
        self.bounds = [batch * i // shards for i in range(shards + 1)]  # shard i: rows bounds[i] .. bounds[i + 1]
        self.states: list[MemoryState | None] = [None] * shards  # each shard's memories
        self._pool = ShardPool(shards) if shards > 1 else None
        self.segment_len = segment_len
        self.written = written
        self.chunk = 1
        if (segment_len is not None and shards == 1 and self.device.type == "cpu"
                and batch * segment_len <= LAYERWISE_ROWS and supports_model(model)):
            self.chunk = max(1, min(LAYERWISE_TOKENS // segment_len,
                                    LAYERWISE_LOGITS // (batch * segment_len * model.config.vocab_size)))

    @property
    def shards(self) -> int:
        return len(self.states)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, reset: torch.Tensor | None = None,
                 on_device: bool = False) -> torch.Tensor:
        """inputs, targets (B, L) (targets -100: nothing to predict), or several segments (B, K x L)
        with `segment_len`; reset (B,): a new document starts in that row (with the first segment)
        -> the loss of every target in nats (B, L) or (B, K x L), fp32 on the CPU (0 where -100), or
        with `on_device` on the model's device (a copy to the CPU waits for a GPU's queued work)."""
        if inputs.shape[0] != self.bounds[-1]:
            raise StillError(f"the scorer was made for {self.bounds[-1]} rows, got {inputs.shape[0]}")
        if self._pool is None:  # a small model's few rows on one thread where waking another costs more
            tokens = inputs.shape[1] if self.segment_len is None else min(inputs.shape[1], self.segment_len)
            with using_threads(threads_for(self.model, inputs.shape[0], tokens)):
                nll = self._score(0, inputs, targets, reset)
            return nll if on_device else nll.cpu()
        modes = this_threads_modes(self.device)

        def score(i: int) -> torch.Tensor:
            with modes():
                return self._score(i, inputs, targets, reset)

        return torch.cat(self._pool.map(score, range(self.shards)))  # (shards: on the CPU)

    def _score(self, i: int, inputs: torch.Tensor, targets: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
        rows = slice(self.bounds[i], self.bounds[i + 1])
        reset = None if reset is None else reset[rows]  # on the CPU: read there, not waited for on a GPU
        if self.segment_len is not None and inputs.shape[1] > self.segment_len:  # several segments
            state = self.states[i]
            if reset is not None and state is not None:
                state = None if bool(reset.all()) else state.reset(reset)  # every row anew: as no memories
            logits, self.states[i] = prefill(self.model, inputs[rows].to(self.device), state, self.segment_len,
                                             all_logits=True, written=self.written)
        else:
            out = self.model(inputs[rows].to(self.device), self.states[i], reset=reset)
            logits, self.states[i] = out.logits, out.state
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets[rows].flatten().to(self.device),
                              ignore_index=-100, reduction="none")
        return nll.view(rows.stop - rows.start, -1)

    def close(self) -> None:
        """End the worker threads, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> StreamScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.no_grad()
def evaluate_streams(model: CompressiveTransformer, streams, max_segments: int | None = None,
                     position_edges: list[int] | None = None, progress=None, shards: int = 1,
                     on_device: bool | None = None) -> dict:
    """Bits per token and perplexity over `streams` (a `TokenStreams`), streaming with memory.

    With `position_edges`, also the mean loss (bits) of the targets whose position within their
    document falls in each bucket [edges[i], edges[i+1]). `shards`: split each segment's rows
    across this many CPU threads (`StreamScorer`). Where the scorer takes several segments a call
    (a few rows on the CPU: `StreamScorer.chunk`), consecutive segments go together, a new chunk
    wherever a document starts. `on_device` (None: off the CPU): the losses are summed where the
    model is and read once at the end, not segment by segment (each read waits for a GPU's queue).
    """
    with eval_mode(model):
        return _evaluate_streams(model, streams, max_segments, position_edges, progress, shards, on_device)


def _evaluate_streams(model: CompressiveTransformer, streams, max_segments: int | None, position_edges,
                      progress, shards: int, on_device: bool | None) -> dict:
    total, count = 0.0, 0
    edges = torch.tensor(position_edges) if position_edges else None
    bucket_sum = torch.zeros(len(position_edges) - 1, dtype=torch.float64) if position_edges else None
    bucket_count = torch.zeros_like(bucket_sum) if position_edges else None
    device = next(model.parameters()).device
    on_device = device.type != "cpu" if on_device is None else on_device
    # on the device: the sum, and each bucket's with one past the last for the targets in none
    device_total = torch.zeros((), dtype=torch.float64, device=device) if on_device else None
    device_buckets = torch.zeros(len(bucket_sum) + 1, dtype=torch.float64, device=device) if (
        on_device and edges is not None) else None
    n = len(streams) if max_segments is None else min(max_segments, len(streams))
    steps = range(n) if progress is None else progress(range(n))
    with StreamScorer(model, streams.batch_size, shards, streams.segment_len) as scorer:
        pending: list = []  # consecutive segments scored in one call; documents start only in the first
        first_start = None  # (B,): a document starts in that row with the first pending segment

        def score() -> None:
            nonlocal total, count

            def join(name: str) -> torch.Tensor:  # (B, K x L)
                return torch.cat([getattr(segment, name) for segment in pending], dim=1)

            targets, positions = join("targets"), join("positions")
            nll = scorer(join("inputs"), targets, first_start, on_device=on_device)  # (B, K x L)
            valid = targets != -100  # (on the CPU, as the data is)
            count += int(valid.sum())
            if on_device:  # no masks picking entries there (their sizes would be read from it): nll is 0 at -100
                device_total.add_(nll.double().sum())
            else:
                total += float(nll[valid].double().sum())
            if edges is not None:
                bucket = torch.bucketize(positions, edges, right=True) - 1  # (B, K x L): of [edges[i], edges[i+1])
                keep = valid & (bucket >= 0) & (bucket < len(bucket_sum))
                bucket_count.index_add_(0, bucket[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
                if on_device:  # the targets in no bucket go to a spare one past the last
                    slots = torch.where(keep, bucket, len(bucket_sum)).flatten().to(device, non_blocking=True)
                    device_buckets.index_add_(0, slots, nll.flatten().double())
                else:
                    bucket_sum.index_add_(0, bucket[keep], nll[keep].double())
            pending.clear()

        for step in steps:
            segment = streams.segment(step)
            # a row's padding after its last document predicts nothing: its memories need no reset
            start = segment.reset & (segment.targets != -100).any(dim=1)  # (B,)
            if pending and (len(pending) == scorer.chunk or bool(start.any())):
                score()
            if not pending:
                first_start = start
            pending.append(segment)
        if pending:
            score()
    if on_device:  # the one read
        total = float(device_total)
        if device_buckets is not None:
            bucket_sum = device_buckets[:-1].cpu()
    if count == 0:
        raise StillError("nothing to evaluate: the split has no targets")
    nats = total / count
    result = {"bits_per_token": nats / math.log(2), "perplexity": _exp(nats), "tokens": count}
    if edges is not None:
        result["by_position"] = [
            {"from": int(edges[i]), "to": int(edges[i + 1]), "tokens": int(bucket_count[i]),
             "bits_per_token": float(bucket_sum[i] / bucket_count[i] / math.log(2)) if bucket_count[i] else None}
            for i in range(len(bucket_sum))]
    return result
