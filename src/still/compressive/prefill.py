"""A long prompt through the model a layer at a time ("prefill").

Feeding P tokens in segments of L through `CompressiveTransformer.forward` runs every layer once a
segment, each time over L rows: at d_model 128 and L = 128 about 37 operators a layer a segment,
most too small to keep two cores busy, and in bf16 no faster than in fp32 (a bf16 product of 128
rows took about 25 µs whatever its size here). The same values can be computed a layer at a time,
since a segment's memories at layer l are layer l's inputs of earlier segments (memory.py), all
known once the layer below has run over every segment. For layer l, with X (B, P, d) its inputs:

    N      = LN1(X)                       (pre-LN; post-LN attends over X itself)
    Q, KV  = W_q N, W_kv N                one product each over all P rows
    for each segment s in turn:
        A_s = attention of Q_s over [the layer's cached keys and values, KV_s]
        the layer's memory update with X_s (its cache with KV_s)
    H      = X + W_o A                    (post-LN: LN1(X + W_o A))
    X'     = H + FF(LN2(H))               over all P rows

Only the attention and the memory update run once a segment. For a prompt the last layer's
outputs are only needed at the last position (the next-token logits), so there the attention and
the feed-forward run for that one row; its keys and values still enter its memory. With
`all_logits` (evaluation of a few long streams, `StreamScorer`) every position's logits come out.

The result equals `forward` segment by segment up to the products' rounding (tests/compressive/
test_prefill.py): the next-token logits and the state (memories, compressed memories and the
inference cache). Used at inference without gradients for models whose compression needs no
attention weights (not most_used), feed-forward blocks not compiled, and states without masked
slots; `prefill` runs the segments through `forward` otherwise.
"""

from __future__ import annotations

import torch

from still.compressive.attention import compute_dtype
from still.compressive.memory import MemoryState, update_layer_memory
from still.compressive.model import CompressiveLayer, CompressiveTransformer


def supports_model(model: torch.nn.Module) -> bool:
    """Whether `prefill` can run `model` a layer at a time in eval mode: a `CompressiveTransformer`
    whose compression needs no attention weights (not most_used) and whose feed-forward blocks are
    not compiled (`compile_feed_forward`: compiled for the segments' shapes, they would compile again
    for every prompt's)."""
    if not isinstance(model, CompressiveTransformer):
        return False
    config = model.config
    most_used = config.has_compression and config.compression == "most_used"
    return not most_used and not any("feed_forward_block" in vars(layer) for layer in model.layers)


def supports(model: CompressiveTransformer, state: MemoryState | None) -> bool:
    """Whether `prefill` computes `model`'s prompt a layer at a time from `state` (else it runs the
    segments through the forward): `supports_model`, eval mode, and no masked slots in `state`."""
    return not model.training and supports_model(model) and (state is None or state.key_valid() is None)


def compressions(layer: CompressiveLayer, memory: torch.Tensor, compressed: torch.Tensor, x: torch.Tensor,
                 segment_len: int, rule: dict) -> list[tuple[torch.Tensor, torch.Tensor] | None] | None:
    """Each segment's new compressed memories f_c(old) and their keys and values, computed in one
    call for all of `x`'s (B, P, d) segments after `memory` (B, M, d); None for a segment that
    compresses nothing. The memories leave in order, so the old memories of the segments in turn
    are consecutive runs of [memory, x], each a multiple of the rate c, compressed each on its own
    (`Compressor.compress_runs`). None without compression, or for most_used (it needs the
    attention each memory received)."""
    compressor = layer.compressor
    if compressor is None or compressor.needs_attention or rule["c_mem_len"] == 0:
        return None
    counts = []  # old memories compressed by each segment, from the rule run on rows of no features

    def count(old: torch.Tensor) -> torch.Tensor:
        counts[-1] = old.shape[1]
        return old[:, :: rule["rate"]]  # (B, n_s / c, 0)

    empty_memory, empty_compressed = memory[..., :0], compressed[..., :0]
    for start in range(0, x.shape[1], segment_len):
        counts.append(0)
        empty_memory, empty_compressed, _, _ = update_layer_memory(
            empty_memory, empty_compressed, x[:, start : start + segment_len, :0], compress=count, **rule)
    total = sum(counts)
    if total == 0:
        return None
    old = (torch.cat([memory, x], dim=1) if memory.shape[1] else x)[:, :total]  # (B, total, d)
    fresh = compressor.compress_runs(old, counts)  # (B, total / c, d)
    fresh_kv = layer.project_context(fresh)  # (B, total / c, 2d)
    out, first, c = [], 0, rule["rate"]
    for n in counts:
        part = slice(first // c, (first + n) // c)
        out.append((fresh[:, part], fresh_kv[:, part]) if n else None)
        first += n
    return out


@torch.no_grad()
def prefill(model: CompressiveTransformer, tokens: torch.Tensor, state: MemoryState | None = None,
            segment_len: int = 128, *, all_logits: bool = False) -> tuple[torch.Tensor, MemoryState]:
    """tokens (B, P), P >= 1, fed in segments of `segment_len` after `state` (None: empty) ->
    the logits at the last position (B, V), or with `all_logits` at every position (B, P, V), and
    the state after the last segment, with its inference cache: what `model(segment, state)` gives
    segment by segment."""
    b, p = tokens.shape
    if p == 0 or segment_len <= 0:
        raise ValueError(f"need at least one token and segment_len > 0, got {p} tokens and {segment_len}")
    if not supports(model, state):
        logits = []
        for start in range(0, p, segment_len):
            out = model(tokens[:, start : start + segment_len], state, last_logits=not all_logits)
            state = out.state
            logits.append(out.logits)
        return (torch.cat(logits, dim=1) if all_logits else out.logits[:, -1]), state
    config = model.config
    if state is None:
        state = model.empty_state(b, tokens.device, model.embedding.weight.dtype)
    version = model._weights_version()
    caches = state.key_values if state.key_values_version == version else None
    if caches and caches[0].dtype != compute_dtype(tokens.device, model.embedding.weight.dtype):
        caches = None  # made under another precision: projected again
    rule = dict(mem_len=config.mem_len, c_mem_len=config.c_mem_len, rate=config.compression_rate)
    starts = range(0, p, segment_len)

    x = model.embedding(tokens)  # (B, P, d): the first layer's inputs
    new_memory, new_compressed, new_caches = [], [], []
    for i, (layer, memory, compressed) in enumerate(zip(model.layers, state.memory, state.compressed)):
        last = i == len(model.layers) - 1 and not all_logits  # only the last position's outputs needed
        attention = layer.attention
        normed = layer.norm1(x) if layer.pre_norm else x  # (B, P, d)
        kv = attention.key_value(normed)  # (B, P, 2d)
        # (the last layer's outputs are read at the last position only)
        queries = attention.query(normed[:, -1:] if last else normed)  # (B, P, d), or (B, 1, d)
        cache = caches[i] if caches is not None else layer.project_context(torch.cat([compressed, memory], dim=1))
        fresh = compressions(layer, memory, compressed, x, segment_len, rule)  # each segment's f_c(old), or None
        heads = []  # each segment's attention outputs, before W_o
        for s, start in enumerate(starts):
            segment = slice(start, start + segment_len)
            keys = torch.cat([cache, kv[:, segment]], dim=1) if cache.shape[1] else kv[:, segment]  # (B, K, 2d)
            if not last:
                heads.append(attention.causal_attention(queries[:, segment], keys))  # (B, L, d)
            elif start == starts[-1]:
                heads.append(attention.causal_attention(queries, keys))  # (B, 1, d)
            memory, compressed, _, _, cache = layer.update_memory(
                memory, compressed, x[:, segment], context_kv=cache, segment_kv=kv[:, segment],
                precomputed=fresh[s] if fresh is not None else None, **rule)
        new_memory.append(memory)
        new_compressed.append(compressed)
        new_caches.append(cache)
        out = attention.out(torch.cat(heads, dim=1) if len(heads) > 1 else heads[0])  # (B, P, d), or (B, 1, d)
        h = x[:, -1:] if last else x
        h = h + out if layer.pre_norm else layer.norm1(h + out)
        x = layer.feed_forward_block(h)  # the next layer's inputs
    logits = model.head(model.norm(x))  # (B, P, V), or (B, 1, V)
    state = MemoryState(tuple(new_memory), tuple(new_compressed), None, None, tuple(new_caches), version)
    return (logits if all_logits else logits[:, -1]), state
