"""One-token-at-a-time decoding over ring buffers (the fast path of `generate`).

`CompressiveTransformer.forward` is general: any segment length, document resets, memories that
grow and are concatenated anew. Sampling needs none of that, and at batch 1 its cost is the number
of operations and copies, not their size. `Decoder` keeps, per layer, the keys and values of the
compressed memory and of the memory in fixed-size ring buffers, head-major, written in place:

    keys          (B, H, D, N_cap + M_cap)   [compressed ring | memory ring], slots last
    values        (B, H, N_cap + M_cap, D)
    inputs        (B, M_cap, d)              the memory ring's layer inputs (what f_c compresses)

    N_cap = c_mem_len;  M_cap = mem_len + c when compressing, else mem_len + 1

A step writes the new token's key and value into the memory ring's next slot, attends from it over
every valid slot (one product for content, one for position, a mask for the empty slots), and
writes its layer input beside. No buffer is copied or concatenated, and the shapes never change,
so `torch.compile` captures the step once. When the memory holds mem_len + c slots its oldest c are
compressed (f_c, then projected to keys and values once) into the compressed ring's next slot:
exactly `update_layer_memory` with L = 1 (compression once every c steps, as DeepMind's sampler).
Without compression the oldest slot simply falls out of the window (Transformer-XL). The ring
positions and counts go in as one small integer tensor, so they never cause a recompilation.

Compiled, every product is written as a multiply-and-sum, which the compiler fuses with what
surrounds it into vectorised loops (the whole step becomes one C++ function): at batch 1 a call into
a matrix library costs more (about 5 us here) than the arithmetic of a 128 x 512 matrix-vector
product. Keys are stored slots-last so that the scores are sums over D vectorised across the
slots, not one horizontal sum per slot. Eager, the same
products go to the matrix library, which is faster there. And a step of a small model at batch 1
is a few hundred tiny loops: waking a second thread costs more than it saves, so on the CPU the
decoder runs its steps on one thread unless the model is large (`threads`).

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

import torch
import torch.nn.functional as F
from torch import nn

from still.compressive.memory import MemoryState
from still.compressive.model import CompressiveTransformer
from still.train.compile import MaybeCompiled


def supports(model: CompressiveTransformer, state: MemoryState | None) -> bool:
    """Whether `Decoder` can continue from `state` (None: an empty one)."""
    config = model.config
    if config.has_compression and config.compression == "most_used":
        return False
    return state is None or (state.memory_valid is None and state.compressed_valid is None)


# On the CPU, a call that runs `tokens` tokens of `batch` rows through a model of P parameters runs
# on one thread while batch * P (one token: decoding) or batch * P * tokens (a segment: the prompt)
# is below these: the call is then hundreds of small loops, and waking a second thread costs more
# than it saves. Measured on two cores (docs/performance.md): decoding d_model 256 x 6 layers
# (4.7M parameters) runs 1.7x faster on one thread than on two; a 512-token prompt through
# d_model 128 x 4 layers 1.35x faster, through 256 x 6 1.1x slower.
ONE_THREAD_BELOW = {"token": 32e6, "segment": 256e6}


def threads_for(model: torch.nn.Module, batch: int, tokens: int) -> int | None:
    """CPU threads for one call over (batch, tokens): 1 for small work, else None (as set)."""
    if next(model.parameters()).device.type != "cpu":
        return None
    size = batch * sum(p.numel() for p in model.parameters())
    small = size < ONE_THREAD_BELOW["token"] if tokens == 1 else size * tokens < ONE_THREAD_BELOW["segment"]
    return 1 if small else None


class Decoder:
    """Ring-buffer decoding state and step for `model` in eval mode.

    decoder = Decoder(model, state, batch)   # state: after the prompt (None: empty)
    logits = decoder.step(tokens)            # tokens (B,) -> logits (B, V); advances the state

    `compile`: run the step (and the compression) through `torch.compile`. `threads`: CPU threads
    for the steps (None: one for small models, else PyTorch's setting). The model's weights must
    not change while a decoder is in use (it projects the memories once).
    """

    def __init__(self, model: CompressiveTransformer, state: MemoryState | None, batch: int,
                 compile: bool = False, threads: int | None = None) -> None:
        if model.training:
            raise ValueError("Decoder needs the model in eval mode")
        if not supports(model, state):
            raise ValueError("Decoder does not support most_used compression or states with masked slots")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        config = model.config
        self.model, self.rate = model, config.compression_rate
        self.compressing = config.has_compression
        self.n_cap = config.c_mem_len if self.compressing else 0
        self.m_cap = config.mem_len + (self.rate if self.compressing else 1)
        self.mem_len = config.mem_len
        self.k_cap = self.n_cap + self.m_cap
        weight = model.embedding.weight
        device, dtype = weight.device, weight.dtype
        if state is None:
            state = model.empty_state(batch, device, dtype)
        self.n, self.m = state.compressed_len, state.memory_len  # slots in use
        assert self.n <= self.n_cap and self.m < self.m_cap, (self.n, self.m)
        self.next_c, self.next_m = self.n % max(self.n_cap, 1), self.m  # ring positions to write next
        heads, d_head = config.n_heads, config.d_model // config.n_heads
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.threads = threads if threads is not None else threads_for(model, batch, 1)
        self._threads = using_threads(self.threads)
        # the keys and values the model's forward cached for the state (if made with these weights)
        cached = state.key_values if state.key_values_version == model._weights_version() else None
        with torch.no_grad(), self._threads:
            for i, layer in enumerate(model.layers):
                kv = torch.zeros(batch, self.k_cap, 2, heads, d_head, device=device, dtype=dtype)
                context_kv = (cached[i] if cached is not None else  # (B, n + m, 2d)
                              layer.project_context(torch.cat([state.compressed[i], state.memory[i]], dim=1)))
                # the prompt's slots, oldest first from ring position 0 (so the next writes follow them)
                kv[:, : self.n] = context_kv[:, : self.n].view(batch, self.n, 2, heads, d_head)
                kv[:, self.n_cap : self.n_cap + self.m] = context_kv[:, self.n :].view(batch, self.m, 2, heads, d_head)
                keys, values = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, K, D) each
                self.keys.append(keys.transpose(-1, -2).contiguous())  # (B, H, D, K): scores vectorise over K
                self.values.append(values.contiguous())
                if self.compressing:
                    inputs = torch.zeros(batch, self.m_cap, config.d_model, device=device, dtype=dtype)
                    inputs[:, : self.m] = state.memory[i]
                    self.inputs.append(inputs)
            # W_r R for the distances K-1 .. 0 (column K-1-a holds distance a), per layer: (H, D, K)
            self.positions = [layer.attention.position_projection(self.k_cap, device, dtype).transpose(1, 2).contiguous()
                              for layer in model.layers]
            # the query and key/value projections as one product: (3d, d)
            self.qkv = [torch.cat([layer.attention.query.weight, layer.attention.key_value.weight]) for layer in model.layers]
        options = {"options": {"cpp_wrapper": True}} if device.type == "cpu" else {}
        self._step = MaybeCompiled(_step, "the decoding step", dynamic=False, **options) if compile else None
        self._compress = (MaybeCompiled(_compress, "the compression step", dynamic=False, **options)
                          if compile and self.compressing else None)
        self._checked = {"step": 0, "compress": 0}  # calls so far that ran with all of dynamo's guards
        self._skip_guards: contextlib.AbstractContextManager = contextlib.nullcontext()
        if compile:  # made once (making one costs 120 us); making it also sets it, so restore at once
            self._skip_guards = torch.compiler.set_stance(skip_guard_eval_unsafe=True)
            self._skip_guards.__exit__(None, None, None)

    def _counters(self) -> torch.Tensor:
        """The ring positions and counts as the step reads them: (next_c, next_m, n, m)."""
        return torch.tensor([self.next_c, self.next_m, self.n, self.m], device=self.keys[0].device)

    def _guards(self, which: str, compiled: bool) -> contextlib.AbstractContextManager:
        """After its first two compiled calls (compiled, then checked by every guard), a decoder's
        calls skip dynamo's guard checks (20 us of a 150 us step here): nothing a guard checks
        (shapes, dtypes, the model's structure) changes between the steps of one decoder, and the
        guards that tell its graph from other decoders' graphs still run."""
        if not compiled:
            return contextlib.nullcontext()
        if self._checked[which] < 2:
            self._checked[which] += 1
            return contextlib.nullcontext()
        return self._skip_guards

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> next-token logits (B, V), and the state advanced by one token."""
        with self._threads:
            compiled = self._step is not None and self._step.active  # products fused for the compiler
            with self._guards("step", compiled):
                logits = (self._step if compiled else _step)(self.model, tokens[:, None], self.qkv, self.keys,
                                                             self.values, self.inputs, self.positions, self._counters(),
                                                             self.n_cap, self.m_cap, compiled)
            self.next_m = (self.next_m + 1) % self.m_cap
            if not self.compressing:
                self.m = min(self.m + 1, self.mem_len)  # the oldest falls out of the window
            else:
                self.m += 1
                if self.m == self.m_cap:  # mem_len + c memories: compress the oldest c
                    compiled = self._compress is not None and self._compress.active
                    with self._guards("compress", compiled):
                        (self._compress if compiled else _compress)(self.model, self.inputs, self.keys, self.values,
                                                                    self._counters(), self.m_cap, compiled)
                    self.next_c = (self.next_c + 1) % self.n_cap
                    self.n = min(self.n + 1, self.n_cap)
                    self.m -= self.rate  # their slots are the next to be written
        return logits[:, 0]


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


def _by_weight(x: torch.Tensor, weight: torch.Tensor, fused: bool) -> torch.Tensor:
    """x (..., in) times weight (out, in) transposed: (..., out)."""
    if fused:
        return (x[..., None, :] * weight).sum(-1)
    return F.linear(x, weight)


def _by(x: torch.Tensor, y: torch.Tensor, fused: bool) -> torch.Tensor:
    """x (..., n, K) times y (..., K, D): (..., n, D)."""
    if fused:
        return (x[..., :, :, None] * y[..., None, :, :]).sum(-2)
    return x @ y


def _linear(x: torch.Tensor, linear: nn.Linear, fused: bool) -> torch.Tensor:
    if not fused:
        return linear(x)
    y = _by_weight(x, linear.weight, True)
    return y if linear.bias is None else y + linear.bias


def _step(model: CompressiveTransformer, token: torch.Tensor, qkv: list[torch.Tensor], keys: list[torch.Tensor],
          values: list[torch.Tensor], inputs: list[torch.Tensor], positions: list[torch.Tensor],
          counters: torch.Tensor, n_cap: int, m_cap: int, fused: bool) -> torch.Tensor:
    """One token (B, 1) through every layer; writes its keys, values and layer inputs into the
    buffers (in place) and returns the logits (B, 1, V). `counters`: (next_c, next_m, n, m).
    `fused`: products as multiply-and-sum (for the compiler)."""
    next_c, next_m, n, m = counters.unbind()
    device = counters.device
    # the slot to write, and for every key slot its distance to the token and whether it holds one
    age_m = (next_m - torch.arange(m_cap, device=device)).remainder(m_cap)  # 0 for the token written now
    age_c = (next_c - 1 - torch.arange(n_cap, device=device)).remainder(max(n_cap, 1))  # 0: newest compressed
    columns = n_cap + m_cap - 1 - torch.cat([m + 1 + age_c, age_m])  # (K,): column of W_r R for each slot's distance
    valid = torch.cat([age_c < n, age_m <= m])  # (K,)
    slot = (n_cap + next_m).view(1)
    h = model.embedding(token)  # (B, 1, d)
    b = h.shape[0]
    for i, layer in enumerate(model.layers):
        attention = layer.attention
        heads, d_head = attention.n_heads, attention.d_head
        x = layer.norm1(h) if layer.pre_norm else h  # (B, 1, d)
        q, key, value = _by_weight(x, qkv[i], fused).view(b, 3, heads, 1, d_head).unbind(1)  # (B, H, 1, D) each
        keys[i].index_copy_(3, slot, key.transpose(-1, -2).to(keys[i].dtype))
        values[i].index_copy_(2, slot, value.to(values[i].dtype))
        if inputs:
            inputs[i].index_copy_(1, slot - n_cap, h.to(inputs[i].dtype))
        content = _by(q + attention.content_bias[:, None], keys[i], fused)  # (B, H, 1, K)
        by_column = _by(q + attention.position_bias[:, None], positions[i], fused)  # (B, H, 1, K)
        scores = (content + by_column.index_select(-1, columns)) * attention.scale
        weights = scores.masked_fill(~valid, float("-inf")).softmax(-1)  # (B, H, 1, K)
        attended = _by(weights.to(values[i].dtype), values[i], fused).view(b, 1, heads * d_head)  # (B, 1, d)
        attended = _linear(attended, attention.out, fused)
        feed_forward = layer.feed_forward
        if layer.pre_norm:
            h = h + attended
            x = layer.norm2(h)
        else:
            h = x = layer.norm1(h + attended)
        x = _linear(F.relu(_linear(x, feed_forward.up, fused)), feed_forward.down, fused)  # FeedForward, eval
        h = h + x if layer.pre_norm else layer.norm2(h + x)
    return _linear(model.norm(h), model.head, fused)  # (B, 1, V)


def _compress(model: CompressiveTransformer, inputs: list[torch.Tensor], keys: list[torch.Tensor],
              values: list[torch.Tensor], counters: torch.Tensor, m_cap: int, fused: bool) -> None:
    """Compress the memory ring's oldest c inputs of every layer into the compressed ring's next
    slot (keys and values, in place). `counters`: (next_c, next_m, n, m) with the ring full."""
    next_c, next_m = counters[0].view(1), counters[1]
    for i, layer in enumerate(model.layers):
        c = layer.compressor.rate
        oldest = (next_m + torch.arange(c, device=counters.device)).remainder(m_cap)  # (c,)
        compressed = layer.compressor(inputs[i].index_select(1, oldest))  # (B, 1, d); a gathered window: no fusing
        b = compressed.shape[0]
        x = layer.norm1(compressed) if layer.pre_norm else compressed  # layer.project_context:
        key, value = _linear(x, layer.attention.key_value, fused).view(b, 2, layer.attention.n_heads, 1, -1).unbind(1)
        keys[i].index_copy_(3, next_c, key.transpose(-1, -2).to(keys[i].dtype))  # (B, H, D, 1) into slot next_c
        values[i].index_copy_(2, next_c, value.to(values[i].dtype))
