"""One-token-at-a-time decoding over ring buffers (the fast path of `generate`).

`CompressiveTransformer.forward` is general: any segment length, document resets, memories that
grow and are concatenated anew. Sampling needs none of that, and at batch 1 its cost is the number
of operations, copies and arguments, not their size. `Decoder` keeps the keys and values of the
compressed memory and of the memory in fixed-size ring buffers, all layers in one tensor each,
head-major, written in place:

    keys          (layers, B, H, D, K)               slots last (compiled: (layers, B, H, K / 16, D, 16))
    values        (layers, B, H, K, D)
    inputs        (layers, B, M_cap, d)              the memory ring's layer inputs (what f_c compresses)

    slots: [compressed ring (N_cap) | memory ring (M_cap)], K = N_cap + M_cap (compiled keys: rounded
    up to a multiple of 16, the last slots unused);  N_cap = c_mem_len;  M_cap = mem_len + c when
    compressing, else mem_len + 1

A step attends from the new token over every valid slot (one product for content, one for
position, a mask for the empty slots) and over its own key, then writes its keys, values and layer
inputs into the memory ring's next slot, for all layers at once. No buffer is copied or
concatenated, and the shapes never change, so the step compiles once (`compile`: ahead of time,
into a package cached on disk, `still.train.aot`). When the memory holds mem_len + c slots its
oldest c are compressed (f_c, then projected to keys and values) into the compressed ring's next
slot, in the same call: exactly `update_layer_memory` with L = 1 (compression once every c steps,
as DeepMind's sampler). Without compression the oldest slot simply falls out of the window
(Transformer-XL). The ring positions and counts go in as one small
integer tensor, so they never cause a recompilation.

Compiled, the step is given the model's weights as tensors (the parameters themselves, not a
copy), so the compiled function depends on the model's shapes only: one package serves every model
of that structure. (The writes go to whole tensors: a write into a view of a graph input makes the
compiled graph copy the whole input.)

Compiled, every product is written as a multiply-and-sum, which the compiler fuses with what
surrounds it into vectorised loops (the whole step becomes one C++ function): at batch 1 a call into
a matrix library costs more (about 5 us here) than the arithmetic of a 128 x 512 matrix-vector
product. Keys are stored slots-last so that the scores are sums over D vectorised across the
slots, not one horizontal sum per slot. Compiled, they are also in blocks of 16 slots (`BLOCK`, the
CPU's vector of floats), each block's D x 16 keys contiguous, so that the loop over a block reads
one run of memory rather than D rows far apart (the position table W_r R likewise: at the reference
preset the step took 10-15% less). The compression convolution is a sum over its taps
(`Compressor.one_window`), each a product with one old memory. Eager, the same products go to the
matrix library, which is faster there and wants the keys slots-last without blocks. And a step of
a small model at batch 1 is a few hundred tiny loops: waking a second thread costs more than it
saves where that thread sleeps between loops (OMP_WAIT_POLICY=PASSIVE), so on the CPU the decoder
then runs its steps on one thread unless the model is large (`threads_for`); where OpenMP's idle
threads spin a while before they sleep (its default, or GOMP_SPINCOUNT), it uses all of them.

On the CPU, a compiling decoder runs the hand-written step instead (`still.compressive.native`:
the same step in C++ over the same buffers, bf16 keys in pairs of features; built once per
machine), where it can run the model (d_head, d_model and d_ff multiples of 16, fp32 weights): a
step of the ahead-of-time compiled code is a few hundred loops each ending at an OpenMP barrier,
the hand-written one has two barriers a layer and packed matrices, and runs 1.3-3.2x faster here
(docs/performance.md, session 18). The compiled step is what runs elsewhere (GPUs, other shapes).

Relative positions: the model orders keys [compressed (n), memory (m), token] without gaps, so a
memory slot written a steps ago is at distance a, and the compressed slot written k compressions
ago at distance m + 1 + k. The position term of every slot is one product of (q + v) with the
precomputed W_r R for all distances, and a gather by each slot's distance, computed in the step
from the ring counters.

Equal to `CompressiveTransformer.forward` fed one token at a time (to float rounding; tested), for
every configuration except most_used compression, which needs the attention weights (`generate`
falls back to the model's forward there).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

from still.compressive.attention import compute_dtype
from still.compressive.memory import MemoryState
from still.compressive.model import CompressiveTransformer
from still.compressive.native import NativeStep, library as native_library, unsupported as native_unsupported
from still.compressive.sampling import Sampling, next_token
from still.train.aot import AheadOfTime, Request, ahead_of_time_all


def supports(model: CompressiveTransformer, state: MemoryState | None) -> bool:
    """Whether `Decoder` can continue from `state` (None: an empty one)."""
    config = model.config
    if config.has_compression and config.compression == "most_used":
        return False
    return state is None or (state.memory_valid is None and state.compressed_valid is None)


# On the CPU, while OpenMP's idle threads sleep between parallel regions (`openmp_threads_spin`
# false: OMP_WAIT_POLICY=PASSIVE without GOMP_SPINCOUNT), a call that runs `tokens` tokens of `batch`
# rows through a model of P parameters runs on one thread while batch * P (one token: decoding) or
# batch * P * tokens (a segment: the prompt) is below these: the call is then hundreds of small
# loops, and waking a second thread costs more than it saves. Measured on two cores
# (docs/performance.md, session 3): decoding d_model 256 x 6 layers (4.7M parameters) runs 1.7x
# faster on one thread than on two; a 512-token prompt through d_model 128 x 4 layers 1.35x faster,
# through 256 x 6 1.1x slower. Where the idle threads spin a while first, a parallel region starts
# without a wake-up, and every size measured ran faster on all threads (session 14).
# A segment in bf16 (autocast, or bf16 weights) has its own, higher threshold: its products run
# several times faster, so a wake-up costs more of each. At the reference preset (4.7M parameters,
# 128 x 4.7M) a 512-token bf16 prompt ran 1.3-1.5x faster on one thread than on two (sessions 17 and
# 27), and so did d_model 512 x 8 layers (25M parameters, 128 x 25M = 3.2G): 126 ms against 144
# (session 27; in fp32 two threads were 1.45x faster there). Larger ones were not measured.
ONE_THREAD_BELOW = {"token": 32e6, "segment": 256e6, "segment, bf16": 4e9}


def openmp_threads_spin(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether GNU OpenMP's idle threads (PyTorch's on Linux) spin before they sleep, so that a
    parallel region soon after another wakes nothing: unless OMP_WAIT_POLICY=PASSIVE, or
    GOMP_SPINCOUNT=0 (GOMP_SPINCOUNT, where set, decides over the policy). OpenMP reads both once,
    when PyTorch loads: this reads the environment as it is now, which is right unless it was changed
    since."""
    count = environ.get("GOMP_SPINCOUNT", "").strip().lower()
    if count in ("infinite", "infinity"):
        return True
    number = re.fullmatch(r"(\d+)\s*[kmgt]?", count)  # a count with an optional unit suffix
    if number:
        return int(number[1]) > 0
    return environ.get("OMP_WAIT_POLICY", "").strip().lower() != "passive"


def threads_for(model: torch.nn.Module, batch: int, tokens: int) -> int | None:
    """CPU threads for one call over (batch, tokens) (under this thread's autocast, if any): 1 for
    small work while OpenMP's idle threads sleep (`openmp_threads_spin`), else None (as set)."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or openmp_threads_spin():
        return None
    size = batch * sum(p.numel() for p in model.parameters())
    if tokens == 1:
        return 1 if size < ONE_THREAD_BELOW["token"] else None
    low = compute_dtype(weight.device, weight.dtype) in (torch.bfloat16, torch.float16)
    return 1 if size * tokens < ONE_THREAD_BELOW["segment, bf16" if low else "segment"] else None


class StepShape(NamedTuple):
    """What a decoding step's graph is specialised on: Python constants, the same for every step."""

    layers: int
    heads: int
    d_head: int
    n_cap: int
    m_cap: int
    pre_norm: bool
    eps: float  # the layer norms'
    compression: str | None  # None: no compressed memory
    rate: int
    tap_rows: tuple[int, ...]  # conv and dilated: the old memory each weight tap reads (Compressor.one_window)
    block: int  # slots a block of the keys and the position table holds (`_blocks`); 0: not in blocks


class Decoder:
    """Ring-buffer decoding state and step for `model` in eval mode.

    decoder = Decoder(model, state, batch)   # state: after the prompt (None: empty)
    logits = decoder.step(tokens)            # tokens (B,) -> logits (B, V); advances the state

    The steps compute in the weights' dtype, also under autocast (`_without_autocast`).
    `dtype`: what the matrices and the key and value buffers that every step reads are stored in
    (None: the weights' dtype). bf16 halves the bytes a token reads; the products still sum in the
    weights' dtype, and the residual stream, norms and biases stay in it. Compiled, this makes a step
    1.3-1.6x faster on the CPU here (docs/performance.md, session 15), and the hand-written step
    1.9-2.0x (session 18); eager bf16 products at batch 1 are slower than fp32 ones, so `generate`
    asks for bf16 only where it compiles.
    `compile`: run the step compiled: on the CPU the hand-written step (`native`), else compiled ahead
    of time (`still.train.aot`: built once per shape in a child process and cached, then loaded).
    `threads`: CPU threads for the steps (None: `threads_for`: one for small models where OpenMP's
    idle threads sleep, else PyTorch's setting).
    `native`: with `compile` on the CPU, run the hand-written step (`still.compressive.native`; None:
    where it can run this model and be built, else the compiled one; True: it or an error; False:
    never).
    The model's weights must not change while a decoder is in use: make a new one after a change.
    """

    def __init__(self, model: CompressiveTransformer, state: MemoryState | None, batch: int,
                 compile: bool = False, threads: int | None = None, dtype: torch.dtype | None = None,
                 native: bool | None = None) -> None:
        if model.training:
            raise ValueError("Decoder needs the model in eval mode")
        if not supports(model, state):
            raise ValueError("Decoder does not support most_used compression or states with masked slots")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        config = model.config
        self.rate = config.compression_rate
        self.compressing = config.has_compression
        self.n_cap = config.c_mem_len if self.compressing else 0
        self.m_cap = config.mem_len + (self.rate if self.compressing else 1)
        self.mem_len = config.mem_len
        self.k_cap = self.n_cap + self.m_cap
        block = BLOCK if compile else 0  # the keys in blocks of slots for the compiled step
        k_keys = -(-self.k_cap // BLOCK) * BLOCK if block else self.k_cap  # slots rounded up to whole blocks
        weight = model.embedding.weight
        stored = dtype or weight.dtype  # the matrices and the key and value buffers
        device, dtype = weight.device, weight.dtype
        if state is None:
            state = model.empty_state(batch, device, dtype)
        model.check_state(state, batch)
        self.n, self.m = state.compressed_len, state.memory_len  # slots in use
        assert self.n <= self.n_cap and self.m < self.m_cap, (self.n, self.m)
        self.next_c, self.next_m = self.n % max(self.n_cap, 1), self.m  # ring positions to write next
        layers, heads, d_head = config.n_layers, config.n_heads, config.d_model // config.n_heads
        self.threads = threads if threads is not None else threads_for(model, batch, 1)
        self._threads = using_threads(self.threads)
        convolution = self.compressing and config.compression in ("conv", "dilated")
        with torch.no_grad(), self._threads, _without_autocast(device.type):
            # the keys and values the model's forward cached for the state (if made with these weights)
            version = model._weights_version()
            cached = state.cache(version)
            # keys (layers, B, H, D, K) (compiled: then in blocks of slots); values (layers, B, H, K, D)
            keys = torch.zeros(layers, batch, heads, d_head, k_keys, device=device, dtype=stored)
            self.values = torch.zeros(layers, batch, heads, self.k_cap, d_head, device=device, dtype=stored)
            self.inputs = (torch.zeros(layers, batch, self.m_cap, config.d_model, device=device, dtype=dtype)
                           if self.compressing else torch.zeros(0, device=device, dtype=dtype))
            # the prompt's slots, oldest first from ring position 0 (so the next writes follow them):
            # the compressed ones in [0, n), the memories in [n_cap, n_cap + m)
            slots = ((slice(0, self.n), slice(0, self.n)),
                     (slice(self.n, self.n + self.m), slice(self.n_cap, self.n_cap + self.m)))
            # every layer's at once (one copy each way, not one a layer: a decoder's set-up is part of
            # a short generation's time), (layers, B, n + m, 2d)
            context_kv = torch.stack(list(cached) if cached is not None else [
                layer.project_context(torch.cat([state.compressed[i], state.memory[i]], dim=1))
                for i, layer in enumerate(model.layers)])
            # (layers, B, n + m, H, D) each
            k, v = context_kv.view(layers, batch, self.n + self.m, 2, heads, d_head).unbind(3)
            for source, ring in slots:
                keys[..., ring] = k[:, :, source].permute(0, 1, 3, 4, 2)
                self.values[:, :, :, ring] = v[:, :, source].transpose(2, 3)
            if self.compressing and self.m:
                self.inputs[:, :, : self.m] = torch.stack(state.memory)
            self.keys = _blocks(keys, block)  # compiled: (layers, B, H, K / 16, D, 16)
            self.weights, tap_rows, self.derived = _weights(model, version, self.k_cap, k_keys, block, stored,
                                                            convolution)
            self._weight_list = tuple(self.weights.values())  # what a compiled call is given first
        norm = model.layers[0].norm1
        self.shape = StepShape(layers=layers, heads=heads, d_head=d_head, n_cap=self.n_cap, m_cap=self.m_cap,
                               pre_norm=config.pre_norm, eps=norm.eps,
                               compression=config.compression if self.compressing else None, rate=self.rate,
                               tap_rows=tuple(tap_rows), block=block)
        # a step, and a step followed by the compression (every c-th step when compressing); each
        # returning the logits, or a token drawn from them. Compiled: each when first needed.
        self._functions = _step_functions()
        self._counts = torch.zeros(4, dtype=torch.long) if device.type == "cpu" else None
        self._counts_view = self._counts.numpy() if self._counts is not None else None
        self.compile = compile
        self._compiled: dict[tuple[str, Sampling | None], AheadOfTime | None] = {}
        self.native = self._native_step(native) if compile else None

    def _native_step(self, wanted: bool | None) -> NativeStep | None:
        """The hand-written step (`still.compressive.native`) where it can run this decoder and
        `wanted` is not False; with `wanted` True, an error where it cannot."""
        if wanted is False:
            return None
        reason = native_unsupported(self)
        if reason is None and native_library() is None:
            reason = "it could not be built"
        if reason is not None:
            if wanted:
                raise ValueError(f"the hand-written decoding step cannot run here: {reason}")
            return None
        with self._threads:  # (its packing's copies on the decoder's threads)
            return NativeStep(self, self.threads if self.threads is not None else torch.get_num_threads())

    def _counters(self) -> torch.Tensor:
        """The ring positions and counts as the step reads them: (next_c, next_m, n, m). On the CPU
        one tensor, written in place through NumPy (a new tensor a step took 2.3 µs, this 0.3)."""
        counts = (self.next_c, self.next_m, self.n, self.m)
        if self._counts is None:
            return torch.tensor(counts, device=self.keys.device)
        self._counts_view[:] = counts
        return self._counts

    def _compiled_step(self, which: str, sampling: Sampling | None, args: tuple) -> AheadOfTime | None:
        """The compiled function `which` for this decoder's shapes (and `sampling`'s constants),
        built or loaded at its first use, together with its twin (the step with or without the
        compression: both are needed, and are built side by side); None where compiling is
        unavailable."""
        key = (which, sampling)
        if key not in self._compiled:
            sampled = sampling is not None
            pair = [_name(sampled, False), _name(sampled, True)] if self.compressing else [which]
            requests = [Request(_by_name, (tuple(self.weights), name, self.shape, sampling), args,
                                what=_DESCRIPTIONS[name]) for name in pair]
            with self._threads:  # compiled for the thread count it runs with
                compiled = ahead_of_time_all(requests, threads=torch.get_num_threads())
            self._compiled |= {(name, sampling): c for name, c in zip(pair, compiled)}
        return self._compiled[key]

    def prepare(self, sampling: Sampling | None = None) -> bool:
        """Compile (or load) now the steps that `step` (sampling None) or `step_sample` with
        `sampling` will run, rather than at their first call; whether they will run compiled
        (nothing to do, and False, when not compiling)."""
        if not self.compile:
            return False
        if self.native is not None:
            return True
        batch = self.keys.shape[1]
        args = (self.keys, self.values, self.inputs, self._counters(),
                torch.zeros(batch, 1, dtype=torch.long, device=self.keys.device))
        if sampling is not None:
            args += (torch.zeros(batch, 1, device=self.keys.device),)
        compiled = self._compiled_step(_name(sampling is not None, False), sampling, (*self._weight_list, *args))
        return compiled is not None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> next-token logits (B, V), and the state advanced by one token. (Nothing is
        recorded for autograd, in any grad mode: see `_run`.)"""
        return self._run(tokens, None, None)[:, 0]

    def step_sample(self, tokens: torch.Tensor, uniform: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        """tokens (B,) -> the next tokens (B,) drawn from the step's logits with `sampling` and the
        uniform numbers (B, 1) (`sampling.next_token`), in the same call; the state advanced."""
        return self._run(tokens, uniform, sampling)

    def steps_sampled(self, tokens: torch.Tensor, uniform: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        """len(uniform) calls of `step_sample` in one, each fed the token drawn by the one before (the
        first fed `tokens` (B,)), with the uniform numbers (steps, B, 1): the tokens drawn (steps, B).
        The hand-written step only (`native`): one foreign call instead of one a token."""
        if self.native is None:
            raise ValueError("steps_sampled needs the hand-written step (Decoder(compile=True) on the CPU)")
        drawn, counters = self.native.run(tokens, [self.next_c, self.next_m, self.n, self.m], uniform, sampling)
        self.next_c, self.next_m, self.n, self.m = counters
        return drawn

    def _run(self, tokens: torch.Tensor, uniform: torch.Tensor | None, sampling: Sampling | None) -> torch.Tensor:
        # mem_len + c memories after this step: compress the oldest c, in the same call
        compress = self.compressing and self.m + 1 == self.m_cap
        if self.native is not None:
            out = self.native(tokens, (self.next_c, self.next_m, self.n, self.m), compress, uniform, sampling)
            self._advance(compress)
            return out
        which = _name(sampling is not None, compress)
        args = (self.keys, self.values, self.inputs, self._counters(), tokens.view(-1, 1).contiguous())
        if sampling is not None:
            args += (uniform.contiguous(),)
        compiled = None
        if self.compile:
            compiled = self._compiled.get((which, sampling), _NOT_YET)
            if compiled is _NOT_YET:
                compiled = self._compiled_step(which, sampling, (*self._weight_list, *args))
        with self._threads:
            if compiled is not None:  # a call outside autograd: no grad mode to switch (1.3 µs a token)
                out = compiled(*self._weight_list, *args)[0]
            else:
                fn = self._functions[which]
                with torch.no_grad(), _without_autocast(self.keys.device.type):
                    out = (fn(self.weights, *args, self.shape, False) if sampling is None else
                           fn(self.weights, *args, self.shape, sampling, False))
        self._advance(compress)
        return out

    def _advance(self, compress: bool) -> None:
        """The ring positions and counts after a step (with the compression, if `compress`)."""
        self.next_m = (self.next_m + 1) % self.m_cap
        if not self.compressing:
            self.m = min(self.m + 1, self.mem_len)  # the oldest falls out of the window
        elif compress:
            self.next_c = (self.next_c + 1) % self.n_cap
            self.n = min(self.n + 1, self.n_cap)
            self.m += 1 - self.rate  # the compressed slots are the next to be written
        else:
            self.m += 1


def _weights(model: CompressiveTransformer, version: tuple[int, ...], k_cap: int, k_keys: int, block: int,
             stored: torch.dtype, convolution: bool) -> tuple[dict[str, torch.Tensor], list[int], dict]:
    """What every step reads of the model, by name, laid out as the steps read them; the rows of the
    compression's taps; and a dict for what users of the decoder derive from them (the hand-written
    step's packed matrices). Kept on the model for the next decoder of the same layout while its
    weights are unchanged (`version`: their `_weights_version()`, which in-place updates bump):
    building them costs milliseconds, about a tenth of a short generation's time at d_model 128."""
    weight = model.embedding.weight
    key = (version, weight.data_ptr(), weight.dtype, k_cap, k_keys, block, stored, convolution)
    cached = getattr(model, "_decoding_weights", None)
    if cached is not None and cached[0] == key:
        return cached[1:]
    config, device, dtype = model.config, weight.device, weight.dtype
    with torch.no_grad(), _without_autocast(device.type):
        tensors = {"embedding": model.embedding.weight, "head": model.head.weight.to(stored)}
        if config.pre_norm:
            tensors |= {"norm.weight": model.norm.weight, "norm.bias": model.norm.bias}
        tap_rows: list[int] = []
        for i, layer in enumerate(model.layers):
            attention, feed_forward = layer.attention, layer.feed_forward
            tensors |= {
                f"{i}.qkv": torch.cat([attention.query.weight, attention.key_value.weight]).to(stored),  # (3d, d)
                f"{i}.u": attention.content_bias, f"{i}.v": attention.position_bias,  # (H, D)
                # W_r R for the distances K-1 .. 0 (column K-1-a holds distance a): (H, D, K),
                # compiled in blocks of slots as the keys, (H, K / 16, D, 16)
                f"{i}.positions": _blocks(
                    F.pad(attention.position_projection(k_cap, device, dtype).transpose(1, 2),
                          (0, k_keys - k_cap)).to(stored), block),
                f"{i}.out": attention.out.weight.to(stored),
                f"{i}.norm1.weight": layer.norm1.weight, f"{i}.norm1.bias": layer.norm1.bias,
                f"{i}.norm2.weight": layer.norm2.weight, f"{i}.norm2.bias": layer.norm2.bias,
                f"{i}.up.weight": feed_forward.up.weight.to(stored), f"{i}.up.bias": feed_forward.up.bias,
                f"{i}.down.weight": feed_forward.down.weight.to(stored), f"{i}.down.bias": feed_forward.down.bias}
            if convolution:  # f_c of the oldest c memories: the taps (T, d, d) and which memory each reads
                tap_rows, taps = layer.compressor.one_window()
                tensors[f"{i}.taps"] = taps.to(stored)
        weights = {name: t.contiguous() for name, t in tensors.items()}  # compiled: laid out as compiled
    derived: dict = {}
    model._decoding_weights = (key, weights, tap_rows, derived)  # one layout at a time
    return weights, tap_rows, derived

def _by_name(*args: object) -> torch.Tensor:
    """The step as it is compiled: the weights as separate tensors, in the order of `names`, then
    the step's own tensors; last the constants (names, which, shape, sampling). Products fused."""
    *tensors, names, which, shape, sampling = args
    weights, rest = dict(zip(names, tensors)), tensors[len(names) :]
    fn = _step_functions()[which]
    return fn(weights, *rest, shape, True) if sampling is None else fn(weights, *rest, shape, sampling, True)


def _name(sampled: bool, compress: bool) -> str:
    """The step function's name (a key of `_step_functions`): with the draw or not, with the compression or not."""
    return _NAMES[sampled, compress]


_NAMES = {(sampled, compress): ("sample " if sampled else "") + ("compress" if compress else "step")
          for sampled in (False, True) for compress in (False, True)}

_NOT_YET = object()  # a compiled step not yet built or loaded (None: compiling is unavailable)

_DESCRIPTIONS = {"step": "the decoding step", "compress": "the decoding step with compression",
                 "sample step": "the decoding step with sampling",
                 "sample compress": "the decoding step with compression and sampling"}


def _step_functions() -> dict[str, Callable[..., torch.Tensor]]:
    """The step functions by name (looked up when called, so that tests can replace them)."""
    return {"step": _step, "compress": _step_and_compress, "sample step": _sample_step,
            "sample compress": _sample_step_and_compress}


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """The steps compute in the weights' dtype whatever the caller's autocast: a step reads every
    weight for a few rows, and casting them to bf16 for each token costs more than bf16 products
    save (eager, measured here: 1.1x-2.1x slower under bf16 autocast at batch 1 and 16; the
    compiled step has no matrix products for autocast to touch)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class using_threads:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Run the body on `threads` CPU threads (None: as set), then restore the setting. (A class, not
    a generator: it is entered once per decoded token.)"""

    def __init__(self, threads: int | None) -> None:
        self.threads, self.before = threads, None

    def __enter__(self) -> None:
        if self.threads is not None:
            self.before = torch.get_num_threads()
            if self.before != self.threads:
                torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        if self.before is not None and self.before != self.threads:
            torch.set_num_threads(self.before)
        self.before = None


def _realized(x: torch.Tensor) -> torch.Tensor:
    """x itself; compiled, written to a buffer of its own before its readers run. The compiler
    otherwise computes a small producer (a layer norm, the attention's normalisation) inside each
    reader's loop: inside a matrix-vector product's loop that is once per output row (1,024 times
    for the feed-forward's first product at d_model 256), divisions included. An `as_strided`
    view is what makes the compiler keep a buffer (docs/performance.md: the reference preset's
    step 953 -> 599 us)."""
    return x.as_strided(x.shape, x.stride())


def _by_weight(x: torch.Tensor, weight: torch.Tensor, fused: bool) -> torch.Tensor:
    """x (..., in) times weight (out, in) transposed: (..., out)."""
    if fused:
        return (_realized(x)[..., None, :] * weight).sum(-1)
    return F.linear(x.to(weight.dtype), weight)


BLOCK = 16  # slots a block of the compiled step's keys and position table holds


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., D, K) with K a multiple of `block` -> (..., K / block, D, block), contiguous (block 0: x)."""
    if not block:
        return x.contiguous()
    *lead, d, k = x.shape
    return x.reshape(*lead, d, k // block, block).transpose(-3, -2).contiguous()


def _by_slots(x: torch.Tensor, y: torch.Tensor, k: int, block: int, fused: bool) -> torch.Tensor:
    """x (..., n, D) times the slots of y (..., D, K), or of y (..., K / block, D, block) in
    blocks (`_blocks`): the products with the first k slots, (..., n, k)."""
    if not block:
        return _by(x, y, fused)[..., :k]
    if fused:
        out = (x[..., :, None, :, None] * y.unsqueeze(-4)).sum(-2)  # (..., n, K / block, block)
    else:  # eager where compiling failed: one small product a block, (n, D) x (D, block), in one call
        out = torch.matmul(x[..., None, :, :].to(y.dtype), y).transpose(-3, -2)  # (..., n, K / block, block)
    return out.flatten(-2)[..., :k]


def _by(x: torch.Tensor, y: torch.Tensor, fused: bool) -> torch.Tensor:
    """x (..., n, K) times y (..., K, D): (..., n, D)."""
    if fused:
        return (x[..., :, :, None] * y[..., None, :, :]).sum(-2)
    return x.to(y.dtype) @ y


def _layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)


def _feed_forward(x: torch.Tensor, w: dict[str, torch.Tensor], i: int, fused: bool) -> torch.Tensor:
    """FeedForward in eval mode."""
    up = _by_weight(x, w[f"{i}.up.weight"], fused) + w[f"{i}.up.bias"]
    return _by_weight(F.relu(up), w[f"{i}.down.weight"], fused) + w[f"{i}.down.bias"]


def _step(w: dict[str, torch.Tensor], keys: torch.Tensor, values: torch.Tensor, inputs: torch.Tensor,
          counters: torch.Tensor, token: torch.Tensor, shape: StepShape, fused: bool) -> torch.Tensor:
    """One token (B, 1) through every layer; writes its keys, values and layer inputs into the
    buffers (in place) and returns the logits (B, 1, V). `w`: the weights by name.
    `counters`: (next_c, next_m, n, m). `fused`: products as multiply-and-sum (for the compiler)."""
    next_c, next_m, n, m = counters.unbind()
    n_cap, m_cap, heads, d_head = shape.n_cap, shape.m_cap, shape.heads, shape.d_head
    k_cap, scale = n_cap + m_cap, d_head**-0.5
    device = counters.device
    # for every key slot its distance to the token and whether it holds a memory; the slot written
    # now holds the token's own key and value only after the step, so the token attends to them apart
    age_m = (next_m - torch.arange(m_cap, device=device)).remainder(m_cap)  # 0 for the token written now
    age_c = (next_c - 1 - torch.arange(n_cap, device=device)).remainder(max(n_cap, 1))  # 0: newest compressed
    columns = k_cap - 1 - torch.cat([m + 1 + age_c, age_m])  # (K,): column of W_r R for each slot's distance
    valid = torch.cat([age_c < n, (age_m <= m) & (age_m > 0)])  # (K,)
    h = F.embedding(token, w["embedding"])  # (B, 1, d)
    b = h.shape[0]
    new_keys, new_values, new_inputs = [], [], []
    for i in range(shape.layers):
        x = _layer_norm(h, w, f"{i}.norm1", shape.eps) if shape.pre_norm else h  # (B, 1, d)
        q, key, value = _by_weight(x, w[f"{i}.qkv"], fused).view(b, 3, heads, 1, d_head).unbind(1)  # (B, H, 1, D) each
        q_content, q_position = q + w[f"{i}.u"][:, None], q + w[f"{i}.v"][:, None]
        content = _by_slots(q_content, keys[i], k_cap, shape.block, fused)  # (B, H, 1, K)
        by_column = _by_slots(q_position, w[f"{i}.positions"], k_cap, shape.block, fused)  # (B, H, 1, K)
        scores = ((content + by_column.index_select(-1, columns)) * scale).masked_fill(~valid, float("-inf"))
        # (B, H, 1, 1): distance 0
        own = ((q_content * key).sum(-1, keepdim=True) + by_column[..., k_cap - 1 :]) * scale
        if fused:  # the softmax over [slots, own] without concatenating them (a concatenation stops
            # the compiler from vectorising the softmax along the slots)
            scores = _realized(scores)  # read by three passes: the gather of its position scores once
            top = torch.maximum(scores.amax(-1, keepdim=True), own)  # (B, H, 1, 1)
            weights = _realized((scores - top).exp())  # (B, H, 1, K): read by the sum and the product
            own_weight = (own - top).exp()  # (B, H, 1, 1)
            total = weights.sum(-1, keepdim=True) + own_weight
            attended = (_by(weights, values[i], True) + own_weight * value) / total  # (B, H, 1, D)
        else:  # fewer operations
            weights = torch.cat([scores, own], -1).softmax(-1)  # (B, H, 1, K + 1)
            attended = weights[..., :k_cap].to(values.dtype) @ values[i] + weights[..., k_cap:] * value
        attended = _by_weight(attended.view(b, 1, heads * d_head), w[f"{i}.out"], fused)  # (B, 1, d)
        new_keys.append(key.transpose(-1, -2))  # (B, H, D, 1)
        new_values.append(value)  # (B, H, 1, D)
        new_inputs.append(h)  # (B, 1, d)
        if shape.pre_norm:
            h = h + attended
            h = h + _feed_forward(_layer_norm(h, w, f"{i}.norm2", shape.eps), w, i, fused)
        else:
            h = _layer_norm(h + attended, w, f"{i}.norm1", shape.eps)
            h = _layer_norm(h + _feed_forward(h, w, i, fused), w, f"{i}.norm2", shape.eps)
    slot = (n_cap + next_m).view(1)
    _write_keys(keys, slot, new_keys, shape.block)  # into the memory ring's next slot
    values.index_copy_(3, slot, torch.stack(new_values).to(values.dtype))
    if shape.compression is not None:
        inputs.index_copy_(2, next_m.view(1), torch.stack(new_inputs).to(inputs.dtype))
    if shape.pre_norm:
        h = _layer_norm(h, w, "norm", shape.eps)
    return _by_weight(h, w["head"], fused).to(h.dtype)  # (B, 1, V)


def _write_keys(keys: torch.Tensor, slot: torch.Tensor, new: list[torch.Tensor], block: int) -> None:
    """Every layer's new keys (B, H, D, 1) into slot `slot` (1,) of the keys, in place (and not
    through a view: the compiled step would copy the whole buffer to write through one)."""
    new_keys = torch.stack(new).to(keys.dtype)  # (layers, B, H, D, 1)
    if not block:
        keys.index_copy_(4, slot, new_keys)
    else:
        keys[:, :, :, slot // block, :, slot % block] = new_keys[..., 0]


def _step_and_compress(w: dict[str, torch.Tensor], keys: torch.Tensor, values: torch.Tensor, inputs: torch.Tensor,
                       counters: torch.Tensor, token: torch.Tensor, shape: StepShape, fused: bool) -> torch.Tensor:
    """`_step`, after which the memory ring is full (mem_len + c): then the oldest c inputs of every
    layer are compressed into the compressed ring's next slot (keys and values, in place)."""
    logits = _step(w, keys, values, inputs, counters, token, shape, fused)
    next_c, next_m = counters[0].view(1), (counters[1] + 1).remainder(shape.m_cap)  # the ring after the step
    oldest = inputs.index_select(2, (next_m + torch.arange(shape.rate, device=counters.device)).remainder(shape.m_cap))
    new_keys, new_values = [], []
    for i in range(shape.layers):
        old = oldest[i]  # (B, c, d)
        if shape.compression in ("conv", "dilated"):  # a sum over the taps, each a product with one old memory
            rows, taps = old[:, list(shape.tap_rows)], w[f"{i}.taps"]  # (B, T, d), (T, d, d)
            compressed = ((rows[:, :, None, :] * taps).sum(-1) if fused else
                          torch.einsum("btj,toj->bto", rows.to(taps.dtype), taps).to(old.dtype))
            compressed = compressed.sum(1, keepdim=True)  # (B, 1, d)
        elif shape.compression == "max":
            compressed = old.amax(1, keepdim=True)
        else:
            assert shape.compression == "mean", shape.compression
            compressed = old.mean(1, keepdim=True)
        b, d = compressed.shape[0], compressed.shape[-1]
        x = _layer_norm(compressed, w, f"{i}.norm1", shape.eps) if shape.pre_norm else compressed  # project_context
        key, value = _by_weight(x, w[f"{i}.qkv"][d:], fused).view(b, 2, shape.heads, 1, shape.d_head).unbind(1)
        new_keys.append(key.transpose(-1, -2))  # (B, H, D, 1)
        new_values.append(value)  # (B, H, 1, D)
    _write_keys(keys, next_c, new_keys, shape.block)  # into the compressed ring's slot next_c
    values.index_copy_(3, next_c, torch.stack(new_values).to(values.dtype))
    return logits


def _sample_step(weights: dict[str, torch.Tensor], keys: torch.Tensor, values: torch.Tensor,
                 inputs: torch.Tensor, counters: torch.Tensor, token: torch.Tensor, uniform: torch.Tensor,
                 shape: StepShape, sampling: Sampling, fused: bool) -> torch.Tensor:
    """`_step`, then the next token drawn from its logits: (B,)."""
    logits = _step(weights, keys, values, inputs, counters, token, shape, fused)
    return next_token(logits[:, 0], uniform, sampling, fused)


def _sample_step_and_compress(weights: dict[str, torch.Tensor], keys: torch.Tensor,
                              values: torch.Tensor, inputs: torch.Tensor, counters: torch.Tensor, token: torch.Tensor,
                              uniform: torch.Tensor, shape: StepShape, sampling: Sampling, fused: bool) -> torch.Tensor:
    """`_step_and_compress`, then the next token drawn from its logits: (B,)."""
    logits = _step_and_compress(weights, keys, values, inputs, counters, token, shape, fused)
    return next_token(logits[:, 0], uniform, sampling, fused)
