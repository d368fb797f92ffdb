"""The memory state and its update rule (Rae et al. 2019, section 3 and algorithm 1).

Per layer l the state holds

    memory             m_l   (B, <= mem_len (+ c - 1), d): the layer's inputs of past segments
    compressed memory  cm_l  (B, <= c_mem_len, d)

both detached from the graph (no backpropagation across segments). After a segment whose layer-l
inputs are h_l (B, L, d):

    m'   = concat(m_l, h_l)                                 oldest first
    s    = len(m') - mem_len                                how far m' overflows
    if c_mem_len > 0:
        n_s  = c * floor(s / c)                             compress whole groups of c only
        old  = m'[:n_s] ; m_l = m'[n_s:]
        cm_l = concat(cm_l, f_c(old))[-c_mem_len:]          the oldest compressed ones are dropped
    else:                                                   Transformer-XL: no compression
        m_l  = m'[-mem_len:]                                the oldest memories are dropped

With mem_len and the segment length multiples of c (as in training) the memory never exceeds
mem_len. When they are not, and in one-token-at-a-time sampling, up to c - 1 memories wait until a
whole group of c can be compressed: compression happens once every c steps (DeepMind's sampler
does the same), and the memory holds at most mem_len + c - 1.

A segment longer than the memory (L > mem_len, which neither the paper nor the recipes use): the
segment's own first L - mem_len inputs overflow too, and are compressed with the old memories.
Algorithm 1 compresses the old memories only (`old_mem <- m[:n_s]`) and so drops those inputs
uncompressed; here nothing leaves the memory without passing through f_c.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch

from still.errors import StillError


class CacheMadeFor:
    """What an inference cache was made for: a version of the weights, and memory tensors: the
    very tensors (weak references: a new tensor at a freed one's address is another), and the
    in-place writes they had (not counted for inference-mode tensors, which keep no count)."""

    __slots__ = ("weights", "tensors", "writes")

    def __init__(self, weights_version: tuple, tensors: tuple[torch.Tensor, ...]) -> None:
        self.weights = weights_version
        self.tensors = tuple(weakref.ref(t) for t in tensors)
        self.writes = _writes(tensors)

    def fits(self, weights_version: tuple, tensors: tuple[torch.Tensor, ...]) -> bool:
        return (self.weights == weights_version and len(tensors) == len(self.tensors)
                and all(ref() is t for ref, t in zip(self.tensors, tensors)) and self.writes == _writes(tensors))


def _writes(tensors: tuple[torch.Tensor, ...]) -> int:
    return sum(t._version for t in tensors if not t.is_inference())


class MemoryState(NamedTuple):
    """The recurrent state of a Compressive Transformer.

    `memory` and `compressed` hold one tensor per layer (the layer's inputs, not yet normalised or
    projected). `memory_valid` (B, M) and
    `compressed_valid` (B, N) say which slots hold something of the current document in each batch
    row (None: all of them); a document boundary resets a row by marking its slots invalid, and the
    attention masks invalid slots out. The flags are kept on the CPU, wherever the memories are: what
    is decided from them every step (is any row reset? are all slots valid again?) then waits for
    nothing queued on a GPU; `key_valid` gives them on the memories' device.
    """

    memory: tuple[torch.Tensor, ...]  # each (B, M, d)
    compressed: tuple[torch.Tensor, ...]  # each (B, N, d)
    memory_valid: torch.Tensor | None = None  # (B, M) bool
    compressed_valid: torch.Tensor | None = None  # (B, N) bool
    key_values: tuple[torch.Tensor, ...] | None = None
    """Inference cache: per layer, the keys and values of [compressed, memory] (B, N + M, 2d),
    projected once when each slot entered the memory. Only used and kept in eval mode without
    gradients (the weights cannot change); derivable, so never saved."""
    key_values_version: CacheMadeFor | None = None
    """What the cache was made for: the model and the version of its weights (`_weights_version`),
    and these very memory tensors. A stale cache, another model's, or one of memories since replaced
    (`_replace(memory=...)`) or written in place is ignored (`cache`). Under `torch.inference_mode`
    the memories are inference tensors, which keep no count of writes: one written in place there
    is not seen, so drop the cache after such a write (`state.without_cache()`)."""

    def without_cache(self) -> MemoryState:
        """This state without its inference cache (the memories are projected again at the next use)."""
        return self._replace(key_values=None, key_values_version=None)

    def __reduce__(self) -> tuple:
        """Pickled (`torch.save(state)`, `copy.deepcopy`) without the inference cache, which is
        derivable (and its weak references do not pickle). `torch.load` reads it back with
        `weights_only=False` only (its default unpickler takes no classes of ours), which runs what
        the file says: for files from elsewhere, save `to_tensors()` with safetensors and read them
        with `from_tensors` (as `still lm generate --save-state` does)."""
        return MemoryState, (self.memory, self.compressed, self.memory_valid, self.compressed_valid)

    def cache(self, weights_version: tuple) -> tuple[torch.Tensor, ...] | None:
        """The inference cache where it was made with weights of `weights_version` for these
        memories as they are, else None (the memories are then projected again)."""
        made = self.key_values_version
        if self.key_values is None or made is None:
            return None
        return self.key_values if made.fits(weights_version, (*self.compressed, *self.memory)) else None

    def with_cache(self, key_values: tuple[torch.Tensor, ...], weights_version: tuple) -> MemoryState:
        """This state with the inference cache of its memories, made with weights of `weights_version`."""
        return self._replace(key_values=key_values,
                             key_values_version=CacheMadeFor(weights_version, (*self.compressed, *self.memory)))

    @staticmethod
    def empty(n_layers: int, batch: int, d_model: int, device=None, dtype=torch.float32) -> MemoryState:
        def zeros():
            return torch.zeros(batch, 0, d_model, device=device, dtype=dtype)

        return MemoryState(tuple(zeros() for _ in range(n_layers)), tuple(zeros() for _ in range(n_layers)))

    @property
    def batch_size(self) -> int:
        return self.memory[0].shape[0]

    @property
    def memory_len(self) -> int:
        return self.memory[0].shape[1]

    @property
    def compressed_len(self) -> int:
        return self.compressed[0].shape[1]

    def validity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M) and (B, N) validity, materialised, on the CPU."""
        b = self.batch_size
        mv = (self.memory_valid.cpu() if self.memory_valid is not None
              else torch.ones(b, self.memory_len, dtype=torch.bool))
        cv = (self.compressed_valid.cpu() if self.compressed_valid is not None
              else torch.ones(b, self.compressed_len, dtype=torch.bool))
        return mv, cv

    def key_valid(self) -> torch.Tensor | None:
        """(B, N + M) validity of [compressed memory, memory] on the memories' device, or None when all
        are valid."""
        if self.memory_valid is None and self.compressed_valid is None:
            return None
        mv, cv = self.validity()
        return torch.cat([cv, mv], dim=1).to(self.memory[0].device, non_blocking=True)

    def reset(self, rows: torch.Tensor) -> MemoryState:
        """Forget the memories of the batch rows where `rows` (B,) is True (a new document starts).
        (Given on the CPU, as the data is, it is read without waiting for a GPU.)"""
        rows = rows.to("cpu", torch.bool)
        if not bool(rows.any()):
            return self
        mv, cv = self.validity()
        keep = ~rows[:, None]
        return self._replace(memory_valid=mv & keep, compressed_valid=cv & keep)

    def detach(self) -> MemoryState:
        return self._replace(memory=tuple(m.detach() for m in self.memory),
                             compressed=tuple(c.detach() for c in self.compressed))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat dict of tensors, for a checkpoint (`safetensors.torch.save_file`, `torch.save`), all
        on the memories' device, each contiguous and its own (the memories are often views of a
        longer segment's tensors, which a checkpoint would otherwise save whole, or refuse)."""
        mv, cv = (v.to(self.memory[0].device, torch.uint8) for v in self.validity())
        out = {f"memory/{i}": _own(m) for i, m in enumerate(self.memory)}
        out.update({f"compressed/{i}": _own(c) for i, c in enumerate(self.compressed)})
        out.update({"memory_valid": mv, "compressed_valid": cv})
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> MemoryState:
        """The state `to_tensors` gave (a `StillError` naming a tensor that is missing)."""
        n = len([k for k in tensors if k.startswith("memory/")])
        try:
            mv, cv = tensors["memory_valid"].to("cpu", torch.bool), tensors["compressed_valid"].to("cpu", torch.bool)
            state = MemoryState(tuple(tensors[f"memory/{i}"] for i in range(n)),
                                tuple(tensors[f"compressed/{i}"] for i in range(n)),
                                None if bool(mv.all()) else mv, None if bool(cv.all()) else cv)
        except KeyError as e:
            raise StillError(f"the memory state's tensors have no {e.args[0]!r} (to_tensors writes "
                             "memory/<layer>, compressed/<layer>, memory_valid and compressed_valid)") from None
        return state


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t`, contiguous and alone in its storage (a copy where it is a view of more)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def update_validity(memory_valid: torch.Tensor, compressed_valid: torch.Tensor, segment_len: int, *, mem_len: int,
                    c_mem_len: int, rate: int, most_used: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The update rule applied to the validity flags (B, M), (B, N): the segment's L slots are
    valid; a compressed slot is valid when all c memories it came from were.

    `most_used`: the compressed slots are n_s / c of the n_s old memories themselves, kept in time
    order: of V valid ones V // c, and invalid ones in the other slots (`compression.most_used`). In
    a row the invalid slots are the oldest (a reset marks every slot, and what comes after is
    valid), so the last V // c slots are valid, in every layer alike."""
    b = memory_valid.shape[0]

    def all_of_group(old: torch.Tensor) -> torch.Tensor:  # (B, n_s, 1) -> (B, n_s / c, 1)
        return old.view(b, old.shape[1] // rate, rate, 1).all(2)

    def valid_kept(old: torch.Tensor) -> torch.Tensor:  # (B, n_s, 1) -> (B, n_s / c, 1)
        kept = old.shape[1] // rate
        valid = old.sum(1, keepdim=True) // rate  # (B, 1, 1)
        return torch.arange(kept)[None, :, None] >= kept - valid

    memory, compressed, _, _ = update_layer_memory(
        memory_valid[:, :, None], compressed_valid[:, :, None], memory_valid.new_ones(b, segment_len, 1),
        mem_len=mem_len, c_mem_len=c_mem_len, rate=rate, compress=valid_kept if most_used else all_of_group)
    return memory[:, :, 0], compressed[:, :, 0]


def update_layer_memory(memory: torch.Tensor, compressed: torch.Tensor, hidden: torch.Tensor, *, mem_len: int,
                        c_mem_len: int, rate: int, compress: Callable[[torch.Tensor], torch.Tensor] | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One layer's update rule (see the module docstring).

    Args: memory (B, M, d), compressed (B, N, d), hidden (B, L, d): the layer's inputs this segment.
    Returns: (new memory, new compressed memory, the old memories that were compressed (B, n_s, d)
    or None, their compression f_c(old) (B, n_s / c, d) with its graph, or None). The new states
    are detached.
    """
    hidden, m = hidden.detach(), memory.shape[1]
    overflow = m + hidden.shape[1] - mem_len

    def extended() -> torch.Tensor:  # [memory, hidden] (B, M + L, d), oldest first
        return torch.cat([memory, hidden], dim=1) if m else hidden

    # (not concatenated where what is kept or dropped is one of them: an empty memory, or exactly
    # the old memories leaving, as with a segment as long as the memory; that copy took about 6% of
    # a prompt at d_model 128, docs/performance.md, session 18)
    if overflow <= 0:
        return extended(), compressed, None, None
    if c_mem_len == 0 or compress is None:  # Transformer-XL: drop the oldest
        return (hidden[:, overflow - m :] if overflow >= m else extended()[:, overflow:]), compressed, None, None
    n_s = rate * (overflow // rate)
    if n_s == 0:
        return extended(), compressed, None, None  # wait for a whole group of c
    if n_s == m:
        old, kept = memory, hidden  # (B, n_s, d), (B, L, d)
    else:
        both = extended()
        old, kept = both[:, :n_s], both[:, n_s:]
    new_compressed = compress(old)  # (B, n_s / c, d)
    compressed = torch.cat([compressed, new_compressed.detach()], dim=1)[:, -c_mem_len:]  # (B, <= N, d)
    return kept, compressed, old, new_compressed
