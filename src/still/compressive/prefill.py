"""A long prompt through the model a layer at a time ("prefill").

Feeding P tokens in segments of L through `CompressiveTransformer.forward` runs every layer once a
segment, each time over L rows: at d_model 128 and L = 128 about 37 operators a layer a segment,
most too small to keep two cores busy, and in bf16 no faster than in fp32 (a bf16 product of 128
rows took about 25 µs whatever its size here). The same values can be computed a layer at a time,
since a segment's memories at layer l are layer l's inputs of earlier segments (memory.py), all
known once the layer below has run over every segment. For layer l, with X (B, P, d) its inputs:

    N      = LN1(X)                       (pre-LN; post-LN attends over X itself)
    Q, KV  = W_q N, W_kv N                one product each over all P rows
    C      = f_c(the memories the prompt compresses), KV_C = W_kv LN1(C)     one call each
    for each group of segments (up to GROUP_ROWS queries):
        A_s = attention of Q_s over its keys and values, gathered from [cache, KV, KV_C]
              for the group's segments at once, stacked in the batch
    H      = X + W_o A                    (post-LN: LN1(X + W_o A))
    X'     = H + FF(LN2(H))               over all P rows

Only the attention runs by segments, and several segments' in one call: each segment's keys are
padded at the front to the group's longest and the padding masked out (`Group`). Its about twenty
operators a call cost more than the padding's products: against one segment a call, a 512-token
prompt at d_model 128 took 0.90x the time (fp32 and bf16), one of 2048 tokens 0.75x (fp32) and
0.64x (bf16); at d_model 256 (6 layers, 8 heads) 0.92x and 0.83x, and 0.88x and 0.80x
(docs/performance.md, session 28). With `written` (fp32 on the CPU) a group's attention runs
through a hand-written kernel instead (`native.prompt_attention`), without (L, K) score tensors.

Which rows each segment's keys are, and which the next state keeps, the memory rule says, and says
alike for every layer: it runs once a prompt, on the rows' indices (`plan`), and each layer reads
its keys from one tensor by index (where running the rule on each layer's tensors took about six
operators a segment and layer, docs/performance.md, session 22). For a prompt the last layer's
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

import functools
from typing import NamedTuple

import torch

from still.compressive import native
from still.compressive.attention import compute_dtype
from still.compressive.memory import MemoryState, update_layer_memory
from still.compressive.model import CompressiveTransformer, check_ids, described, is_ids
from still.errors import check, whole

GROUP_ROWS = 1024
"""Queries (batch x segment length x segments) whose segments attend in one call (`Group`). A bound
on the scores' memory: at 8 heads, 1024 queries over 385 keys hold 12.6 MB of fp32 scores."""


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


class Plan(NamedTuple):
    """Where a prompt's segments find their keys, computed once for every layer (the memory rule
    moves the same rows in each). A layer's keys and values are kept in one tensor, `rows`:

        [cache (N0 + M0), the prompt's own (P), the new compressed slots' (F)]   (B, N0 + M0 + P + F, 2d)

    the state's cache first (its N0 compressed slots, then its M0 memories), then those the layer
    projects: its inputs' and, after them, those of the compressions the prompt makes."""

    keys: tuple[torch.Tensor, ...]
    """Per segment, its keys' rows in `rows` (K_s,): [compressed memory, memory, the segment]."""
    counts: tuple[int, ...]
    """The old memories each segment compresses (runs of c, consecutive in [memory, x])."""
    cache: torch.Tensor
    """The last segment's next cache's rows in `rows` (N' + M',): [compressed memory, memory]."""
    memory: tuple[int, int]
    """The next memory: rows [a, b) of [memory, x]."""
    compressed: tuple[int, int]
    """The next compressed memory: rows [a, b) of [compressed memory, the new compressions]."""
    groups: tuple[Group, ...] = ()
    """The segments in runs that attend in one call each (`Group`), in order."""


class Group(NamedTuple):
    """Consecutive segments of one length whose attention runs as one call, the segments stacked in
    the batch (`RelativeMultiHeadAttention.causal_attention`'s `padding`): each segment's keys padded
    at the front to the group's longest."""

    first: int
    """The group's first segment."""
    keys: torch.Tensor
    """(S K,): each segment's rows in `rows` (`Plan.keys`), after `padding[s]` rows of padding (row 0)."""
    padding: tuple[int, ...]
    """Per segment, the padding before its keys (K less its own keys)."""


@functools.lru_cache(maxsize=16)
def plan(m0: int, n0: int, p: int, segment_len: int, mem_len: int, c_mem_len: int, rate: int, compresses: bool,
         device: torch.device, group: int = 1) -> Plan:
    """The memory rule (`update_layer_memory`, the one the forward runs) applied to the rows' indices
    for a prompt of p tokens after M0 memories and N0 compressed ones, in segments of `segment_len`.
    `compresses`: whether old memories are compressed (else dropped). `group`: at most this many
    segments attend in one call (`Group`). Memoised (the last 16: a plan holds about 6 kB a
    segment); its tensors are read-only."""
    def rows(a: int, b: int) -> torch.Tensor:  # (1, b - a, 1)
        return torch.arange(a, b, device=device)[None, :, None]

    memory, compressed = rows(0, m0), rows(0, n0)  # indices into [memory, x] and [compressed, new]
    made = [0, n0]  # memories compressed so far, compressed slots so far

    def compress(old: torch.Tensor) -> torch.Tensor:  # (1, n_s, 1) -> (1, n_s / c, 1)
        n = old.shape[1]
        if int(old[0, 0, 0]) != made[0] or int(old[0, -1, 0]) != made[0] + n - 1:
            raise AssertionError("the memories did not leave in order")  # the rule guarantees it
        counts[-1], made[0], made[1] = n, made[0] + n, made[1] + n // rate
        return rows(made[1] - n // rate, made[1])

    counts, contexts = [], []
    rule = dict(mem_len=mem_len, c_mem_len=c_mem_len, rate=rate, compress=compress if compresses else None)
    for start in range(0, p, segment_len):
        segment = rows(m0 + start, m0 + min(start + segment_len, p))
        contexts.append((compressed, torch.cat([memory, segment], dim=1)))
        counts.append(0)
        memory, compressed, _, _ = update_layer_memory(memory, compressed, segment, **rule)

    def place(c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # rows of `rows` for [compressed c, memory m]
        c = c.flatten()
        return torch.cat([torch.where(c < n0, c, c + m0 + p), m.flatten() + n0])

    def window(t: torch.Tensor) -> tuple[int, int]:  # a run of consecutive rows (all the rule makes)
        t = t.flatten()
        if t.numel() and not torch.equal(t, torch.arange(int(t[0]), int(t[0]) + t.numel(), device=device)):
            raise AssertionError("a memory that is not a run of consecutive rows")
        return (int(t[0]), int(t[0]) + t.numel()) if t.numel() else (0, 0)

    keys = tuple(place(c, m) for c, m in contexts)
    groups, lengths = [], [min(segment_len, p - start) for start in range(0, p, segment_len)]
    for s in range(len(keys)):
        if groups and s - groups[-1][0] < group and lengths[s] == lengths[groups[-1][0]]:
            groups[-1].append(s)
        else:
            groups.append([s])

    def grouped(members: list[int]) -> Group:
        k = max(keys[s].numel() for s in members)
        padding = tuple(k - keys[s].numel() for s in members)
        rows = torch.cat([torch.cat([keys[s].new_zeros(pad), keys[s]]) for s, pad in zip(members, padding)])
        return Group(members[0], rows, padding)

    return Plan(keys, tuple(counts), place(compressed, memory), window(memory), window(compressed),
                tuple(grouped(members) for members in groups))


def _rows_of(parts: list[torch.Tensor], window: tuple[int, int]) -> torch.Tensor:
    """Rows [a, b) of the concatenation of `parts` (B, n_i, d), copied (a view of a prompt's
    inputs would keep all of them alive in the state), in the dtype their concatenation has (the
    state's fp32 under bf16 autocast, as the forward's rule gives it)."""
    a, b = window
    dtype = functools.reduce(torch.promote_types, [part.dtype for part in parts])
    pieces, first = [], 0
    for part in parts:
        n = part.shape[1]
        lo, hi = max(a - first, 0), min(b - first, n)
        if lo < hi:
            pieces.append(part[:, lo:hi])
        first += n
    if not pieces:
        return parts[0][:, :0].to(dtype, copy=True)
    return torch.cat(pieces, dim=1).to(dtype) if len(pieces) > 1 else pieces[0].to(dtype, copy=True)


@torch.no_grad()
def prefill(model: CompressiveTransformer, tokens: torch.Tensor, state: MemoryState | None = None,
            segment_len: int = 128, *, all_logits: bool = False, written: bool = False
            ) -> tuple[torch.Tensor, MemoryState]:
    """tokens (B, P), P >= 1, fed in segments of `segment_len` after `state` (None: empty) ->
    the logits at the last position (B, V), or with `all_logits` at every position (B, P, V), and
    the state after the last segment, with its inference cache: what `model(segment, state)` gives
    segment by segment. `written`: the attention of fp32 prompts on the CPU through the hand-written
    kernel (`native.prompt_attention`, built once per machine; `generate` asks for it with `compile`)."""
    # the forward's checks, before the embedding's errors (uint8 ids, an id past the vocabulary, 1-D tokens)
    check(is_ids(tokens) and tokens.ndim == 2 and tokens.shape[1] >= 1,
          f"tokens must be ids (batch, length >= 1), got {described(tokens)}")
    check(whole(segment_len) and segment_len >= 1,
          f"segment_len must be an int >= 1, got {segment_len!r}")
    tokens, segment_len = check_ids(tokens, model.config.vocab_size), int(segment_len)
    b, p = tokens.shape
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
    model.check_state(state, b)
    version = model._weights_version()
    caches = state.cache(version)
    if caches and caches[0].dtype != compute_dtype(tokens.device, model.embedding.weight.dtype):
        caches = None  # made under another precision: projected again
    compressor = model.layers[0].compressor
    compresses = compressor is not None and config.c_mem_len > 0
    layout = plan(state.memory_len, state.compressed_len, p, segment_len, config.mem_len, config.c_mem_len,
                  config.compression_rate, compresses, tokens.device, max(1, GROUP_ROWS // (b * segment_len)))
    starts = range(0, p, segment_len)
    compressing = sum(layout.counts)  # old memories compressed in all, the first of [memory, x]

    x = model.embedding(tokens)  # (B, P, d): the first layer's inputs
    new_memory, new_compressed, new_caches = [], [], []
    for i, (layer, memory, compressed) in enumerate(zip(model.layers, state.memory, state.compressed)):
        last = i == len(model.layers) - 1 and not all_logits  # only the last position's outputs needed
        attention = layer.attention
        normed = layer.norm1(x) if layer.pre_norm else x  # (B, P, d)
        kv = attention.key_value(normed)  # (B, P, 2d)
        # (the last layer's outputs are read at the last position only)
        queries = attention.query(normed[:, -1:] if last else normed)  # (B, P, d), or (B, 1, d)
        if caches is not None:
            cache = caches[i]  # (B, N0 + M0, 2d)
        elif state.memory_len + state.compressed_len:
            cache = layer.project_context(torch.cat([compressed, memory], dim=1))
        else:
            cache = kv[:, :0]  # an empty state's: no rows, and no operators run for them
        parts = [cache, kv]  # `rows` of `Plan`: [cache, the prompt's, the new compressed slots']
        fresh = None
        if compressing:  # every segment's compressions in one call: f_c of each run of old memories
            old = (torch.cat([memory, x], dim=1) if memory.shape[1] else x)[:, :compressing]  # (B, n, d)
            fresh = layer.compressor(old)  # (B, n / c, d): each f_c here reads each group of c on its own
            parts.append(layer.project_context(fresh))  # (B, n / c, 2d)
        parts = [t for t in parts if t.shape[1]]
        rows = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, N0 + M0 + P + F, 2d)
        heads = []  # each segment's attention outputs, before W_o
        if last:  # the last segment's last query: (B, 1, d)
            out = native.prompt_attention(attention, queries, rows, layout.keys[-1], (0,), 1) if written else None
            heads.append(out if out is not None else
                         attention.causal_attention(queries, rows.index_select(1, layout.keys[-1])))
        for group in layout.groups if not last else ():
            count, start = len(group.padding), starts[group.first]
            length = min(segment_len, p - start)  # each of the group's segments'
            group_queries = queries[:, start : start + count * length]  # (B, S L, d)
            out = native.prompt_attention(attention, group_queries, rows, group.keys, group.padding, length) \
                if written else None
            if out is not None:  # the hand-written kernel's (fp32 on the CPU), which reads `rows` by index
                heads.append(out)
                continue
            keys = rows.index_select(1, group.keys)  # (B, S K, 2d): per segment [padding, compressed, memory, segment]
            if count == 1:
                heads.append(attention.causal_attention(group_queries, keys))  # (B, L, d)
                continue
            group_queries = group_queries.reshape(b * count, length, -1)  # (B S, L, d)
            out = attention.causal_attention(group_queries, keys.view(b * count, -1, keys.shape[-1]), group.padding)
            heads.append(out.view(b, count * length, -1))  # (B, S L, d)
        new_memory.append(_rows_of([memory, x], layout.memory))
        new_compressed.append(_rows_of([compressed] if fresh is None else [compressed, fresh], layout.compressed))
        new_caches.append(rows.index_select(1, layout.cache))
        out = attention.out(torch.cat(heads, dim=1) if len(heads) > 1 else heads[0])  # (B, P, d), or (B, 1, d)
        h = x[:, -1:] if last else x
        h = h + out if layer.pre_norm else layer.norm1(h + out)
        x = layer.feed_forward_block(h)  # the next layer's inputs
    logits = model.head(model.norm(x))  # (B, P, V), or (B, 1, V)
    state = MemoryState(tuple(new_memory), tuple(new_compressed)).with_cache(tuple(new_caches), version)
    return (logits if all_logits else logits[:, -1]), state
