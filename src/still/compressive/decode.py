"""One-token-at-a-time decoding over ring buffers (the fast path of `generate`).

`CompressiveTransformer.forward` is general: any segment length, document resets, memories that
grow and are concatenated anew. Sampling needs none of that, and at batch 1 its cost is the number
of operations and copies, not their size. `Decoder` keeps, per layer, the keys and values of the
compressed memory and of the memory in fixed-size ring buffers, head-major, written in place:

    keys, values  (B, H, N_cap + M_cap, D)   [compressed ring | memory ring]
    inputs        (B, M_cap, d)              the memory ring's layer inputs (what f_c compresses)

    N_cap = c_mem_len;  M_cap = mem_len + c when compressing, else mem_len + 1

A step writes the new token's key and value into the memory ring's next slot, attends from it over
every valid slot (one product for content, one for position, a mask for the empty slots), and
writes its layer input beside. No buffer is copied or concatenated, and the shapes never change,
so `torch.compile` captures the step once. When the memory holds mem_len + c slots its oldest c are
compressed (f_c, then projected to keys and values once) into the compressed ring's next slot:
exactly `update_layer_memory` with L = 1 (compression once every c steps, as DeepMind's sampler).
Without compression the oldest slot simply falls out of the window (Transformer-XL).

Relative positions: the model orders keys [compressed (n), memory (m), token] without gaps, so a
memory slot written a steps ago is at distance a, and the compressed slot written k compressions
ago at distance m + 1 + k. The position term of every slot is one product of (q + v) with the
precomputed W_r R for all distances, and a gather (`_layout`, cached per ring position).

Equal to `CompressiveTransformer.forward` fed one token at a time (to float rounding; tested), for
every configuration except most_used compression, which needs the attention weights (`generate`
falls back to the model's forward there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from still.compressive.memory import MemoryState
from still.compressive.model import CompressiveTransformer
from still.train.compile import MaybeCompiled


def supports(model: CompressiveTransformer, state: MemoryState | None) -> bool:
    """Whether `Decoder` can continue from `state` (None: an empty one)."""
    config = model.config
    if config.has_compression and config.compression == "most_used":
        return False
    return state is None or (state.memory_valid is None and state.compressed_valid is None)


class Decoder:
    """Ring-buffer decoding state and step for `model` in eval mode.

    decoder = Decoder(model, state, batch)   # state: after the prompt (None: empty)
    logits = decoder.step(tokens)            # tokens (B,) -> logits (B, V); advances the state

    The model's weights must not change while a decoder is in use (it projects the memories once).
    """

    def __init__(self, model: CompressiveTransformer, state: MemoryState | None, batch: int,
                 compile: bool = False) -> None:
        if model.training:
            raise ValueError("Decoder needs the model in eval mode")
        if not supports(model, state):
            raise ValueError("Decoder does not support most_used compression or states with masked slots")
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
        with torch.no_grad():
            for i, layer in enumerate(model.layers):
                kv = torch.zeros(batch, self.k_cap, 2, heads, d_head, device=device, dtype=dtype)
                # the prompt's slots, oldest first from ring position 0 (so the next writes follow them)
                if self.n:
                    kv[:, : self.n] = layer.project_context(state.compressed[i]).view(batch, self.n, 2, heads, d_head)
                if self.m:
                    kv[:, self.n_cap : self.n_cap + self.m] = layer.project_context(state.memory[i]).view(
                        batch, self.m, 2, heads, d_head)
                keys, values = kv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # (B, H, K, D) each
                self.keys.append(keys)
                self.values.append(values)
                if self.compressing:
                    inputs = torch.zeros(batch, self.m_cap, config.d_model, device=device, dtype=dtype)
                    inputs[:, : self.m] = state.memory[i]
                    self.inputs.append(inputs)
            # W_r R for the distances K-1 .. 0 (column K-1-a holds distance a), per layer, as (H, D, K)
            self.positions = [layer.attention._project_positions(self.k_cap, device, dtype).transpose(1, 2).contiguous()
                              for layer in model.layers]
            # the query and key/value projections as one product: (3d, d)
            self.qkv = [torch.cat([layer.attention.query.weight, layer.attention.key_value.weight]) for layer in model.layers]
        self._arange_c = torch.arange(self.n_cap, device=device)
        self._arange_m = torch.arange(self.m_cap, device=device)
        self._cache: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._step = MaybeCompiled(_step, "the decoding step", dynamic=False) if compile else _step

    def _layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the current ring positions and counts: the slot to write (1,), the column of the
        distance-ordered position scores for each key slot (K,), and which slots are valid (K,)."""
        key = (self.next_c, self.next_m, self.n, self.m)
        if key not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            age_m = (self.next_m - self._arange_m) % self.m_cap  # 0 for the token written this step
            age_c = (self.next_c - 1 - self._arange_c) % max(self.n_cap, 1)  # 0 for the newest compressed slot
            distance = torch.cat([self.m + 1 + age_c, age_m])
            valid = torch.cat([age_c < self.n, age_m <= self.m])
            slot = torch.tensor([self.n_cap + self.next_m], device=self._arange_m.device)
            self._cache[key] = (slot, self.k_cap - 1 - distance, valid)
        return self._cache[key]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> next-token logits (B, V), and the state advanced by one token."""
        slot, columns, valid = self._layout()
        logits = self._step(self.model, tokens[:, None], self.qkv, self.keys, self.values, self.inputs,
                            self.positions, slot, columns, valid, self.n_cap)
        self.next_m = (self.next_m + 1) % self.m_cap
        if not self.compressing:
            self.m = min(self.m + 1, self.mem_len)  # the oldest falls out of the window
        else:
            self.m += 1
            if self.m == self.m_cap:  # mem_len + c memories: compress the oldest c
                self._compress()
        return logits[:, 0]

    def _compress(self) -> None:
        c = self.rate
        oldest = (self.next_m + torch.arange(c, device=self._arange_m.device)) % self.m_cap  # the full ring's oldest c
        for i, layer in enumerate(self.model.layers):
            compressed = layer.compressor(self.inputs[i].index_select(1, oldest))  # (B, 1, d)
            b, _, d = compressed.shape
            key, value = layer.project_context(compressed).view(b, 2, layer.attention.n_heads, -1).unbind(1)
            self.keys[i][:, :, self.next_c] = key.to(self.keys[i].dtype)  # (B, H, D)
            self.values[i][:, :, self.next_c] = value.to(self.values[i].dtype)
        self.next_c = (self.next_c + 1) % self.n_cap
        self.n = min(self.n + 1, self.n_cap)
        self.m -= c  # their slots are the next to be written


def _step(model: CompressiveTransformer, token: torch.Tensor, qkv: list[torch.Tensor], keys: list[torch.Tensor],
          values: list[torch.Tensor], inputs: list[torch.Tensor], positions: list[torch.Tensor], slot: torch.Tensor,
          columns: torch.Tensor, valid: torch.Tensor, n_cap: int) -> torch.Tensor:
    """One token (B, 1) through every layer; writes its keys, values and layer inputs into the
    buffers at `slot` (in place) and returns the logits (B, 1, V)."""
    h = model.embedding(token)  # (B, 1, d)
    b = h.shape[0]
    for i, layer in enumerate(model.layers):
        attention = layer.attention
        heads, d_head = attention.n_heads, attention.d_head
        x = layer.norm1(h) if layer.pre_norm else h  # (B, 1, d)
        q, key, value = F.linear(x, qkv[i]).view(b, 3, heads, 1, d_head).unbind(1)  # (B, H, 1, D) each
        keys[i].index_copy_(2, slot, key.to(keys[i].dtype))
        values[i].index_copy_(2, slot, value.to(values[i].dtype))
        if inputs:
            inputs[i].index_copy_(1, slot - n_cap, h.to(inputs[i].dtype))
        content = (q + attention.content_bias[:, None]) @ keys[i].transpose(-1, -2)  # (B, H, 1, K)
        q_position = (q + attention.position_bias[:, None]).view(b, heads, d_head).transpose(0, 1)  # (H, B, D)
        by_distance = (q_position @ positions[i]).transpose(0, 1)[:, :, None]  # (B, H, 1, K)
        scores = (content + by_distance.index_select(-1, columns)) * attention.scale
        weights = scores.masked_fill(~valid, float("-inf")).softmax(-1)  # (B, H, 1, K)
        attended = attention.out((weights.to(values[i].dtype) @ values[i]).view(b, 1, heads * d_head))  # (B, 1, d)
        if layer.pre_norm:
            h = h + attended
            h = h + layer.feed_forward(layer.norm2(h))
        else:
            h = layer.norm1(h + attended)
            h = layer.norm2(h + layer.feed_forward(h))
    return model.head(model.norm(h))  # (B, 1, V)
