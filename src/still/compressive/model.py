"""The Compressive Transformer language model.

Paper: Jack W. Rae, Anna Potapenko, Siddhant M. Jayakumar, Timothy P. Lillicrap. "Compressive
Transformers for Long-Range Sequence Modelling". ICLR 2020, arXiv:1911.05507. Built on
Transformer-XL (Dai et al. 2019): see attention.py for the relative attention, memory.py for the
memory update rule and compression.py for the compression functions.

Shapes: B batch, L segment length, M memory length, N compressed memory length, V vocabulary,
d model dim.

One segment through layer l (pre-LayerNorm, the default, as labml):

    context = [cm_l, m_l]                                     (B, N + M, d), detached
    h  = h + Dropout(Attn(LN1(h), LN1(context)))              keys/values over [context, h]
    h  = h + Dropout(FF(LN2(h)))                              FF(x) = W2 Dropout(ReLU(W1 x))

Post-LayerNorm (the paper's, `pre_norm=False`): h = LN1(h + Attn(h, context)); h = LN2(h + FF(h)).
The memory m_l stores the layer's inputs h (before any norm).

Compression loss (section 3.2), one per layer whose f_c has parameters, averaged over layers:

    attention reconstruction (default):
        || attn(h, old) - attn(h, f_c(old)) ||^2 (mean)       content-only attention,
        softmax(q k^T / sqrt(D)) v per head, with the layer's query/key/value weights and LN1
        treated as constants (no output projection W_o, a fixed linear map of both sides, and no
        Transformer-XL content bias u: as labml); h and the old memories are detached, so only
        f_c learns from it
    auto-encoding:  || g(f_c(old)) - old ||^2 with a learned transposed-convolution decoder g
    none:           f_c is not trained (as for max, mean and most-used, which have no parameters)

Memories and compressed memories are stored detached, so the language-model loss never reaches
f_c, and f_c's loss never reaches the rest of the model: the two sets of parameters learn from
disjoint losses. Training (recipes/lm.py) follows DeepMind's reference code: Adam with a linear
warm-up and cosine decay, separate gradient clipping for the model and the compressors (the paper
clips at norm 0.1). labml uses a single optimizer for both losses.

Special cases (tested): `c_mem_len = 0` is Transformer-XL; `mem_len = c_mem_len = 0` is a causal
transformer with relative positions; in eval mode with `mem_len` >= the total length and no
compression, feeding a sequence in segments gives the logits of feeding it at once.

Deviations from the paper: pre-LayerNorm by default; no adaptive softmax or embeddings (character
and byte vocabularies are small), and no sqrt(d_model) scale on the embeddings (Transformer-XL's);
the memories start empty, where the paper's algorithm 1 starts them as zeros, attended to and
compressed like any memory (pass a `MemoryState` of zeros for that); the reconstruction loss is the
mean squared difference over elements and over layers (as labml's implementation), where
algorithm 2 adds up one L2 norm per layer: the same minimum, but a norm's gradient has the same
size at any error, a square's grows with it, so the layers weigh by their errors here, and the
scale differs (Adam's steps do not depend on it, but the compressors' gradient clipping at 0.1
applies to the scaled gradient); a segment longer than the memory compresses its own overflowing
inputs too (memory.py); the dilated compression reads within a group of memories, and so sees half
of them (compression.py).

Tested against tests/compressive/reference.py, the model written again from both papers with every
query-key distance spelled out: logits, the reconstruction loss and every gradient.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from still.compressive.attention import AttentionOutput, RelativeMultiHeadAttention, compute_dtype, content_attention
from still.compressive.compression import CompressionName, Compressor, Decoder
from still.compressive.memory import MemoryState, update_layer_memory, update_validity
from still.config import check_fields, check_sizes
from still.errors import StillError, check, whole
from still.layers import Dropout, dropout_add, relu_dropout

_MODELS = itertools.count()  # each model's number, for `_weights_version`
_registrations = 0  # parameters and submodules registered (assigned) in any module of this process


def is_ids(tokens: object) -> bool:
    """Whether `tokens` is a tensor of integers (not bools): ids of any integer dtype."""
    return (isinstance(tokens, torch.Tensor) and tokens.dtype != torch.bool
            and not (tokens.is_floating_point() or tokens.is_complex()))


def check_ids(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`tokens` as the embedding takes them: int32 and int64 as they are, other integer dtypes
    (uint8 byte ids, say) as int64; a one-line error where an id is outside [0, vocab_size) (the
    embedding's own is an IndexError with no value in it). Checked where the ids are on the CPU,
    as the data's are: on a GPU a look would wait for it."""
    if tokens.dtype not in (torch.int32, torch.int64):
        tokens = tokens.long()
    if tokens.device.type == "cpu" and tokens.numel():
        low, high = (int(v) for v in torch.aminmax(tokens))
        check(low >= 0 and high < vocab_size,
              f"token id {low if low < 0 else high} is outside the vocabulary (ids 0 to {vocab_size - 1})")
    return tokens


def described(tokens: object) -> str:
    """What `tokens` is, for a message: its dtype and shape, or its type."""
    if isinstance(tokens, torch.Tensor):
        return f"{tokens.dtype} of shape {tuple(tokens.shape)}"
    return f"a {type(tokens).__name__}"


def _registered(module: nn.Module, name: str, value: object) -> None:
    """Count a parameter or submodule assigned to any module (PyTorch's global registration hooks):
    weights assigned by hand are new tensors, which `_weights_version` must see."""
    global _registrations
    _registrations += 1


nn.modules.module.register_module_parameter_registration_hook(_registered)
nn.modules.module.register_module_module_registration_hook(_registered)

BATCHED_RECONSTRUCTION = True
"""Training computes the attention-reconstruction losses of all layers in one batch of operators
(`attention_reconstruction_loss`) instead of layer by layer (`CompressiveLayer.compression_loss`).
Tests compare the two."""

NATIVE_SQUARED_ERROR = True
"""bf16 on a CPU with the attention kernel (`still.compressive.native.attention_library`): the
reconstruction loss's squared error, forward and backward, in one pass each of
`native_attention.cpp` (the same fp32 differences) instead of three and one of PyTorch's. Tests
compare the two."""

CompressionLoss = Literal["attention", "autoencoding", "none"]


@dataclass(frozen=True)
class CompressiveConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 1024
    mem_len: int = 128
    """Memories per layer (the layer inputs of past segments); 0: none."""
    c_mem_len: int = 128
    """Compressed memories per layer; 0: no compression (Transformer-XL)."""
    compression_rate: int = 4
    """c: old memories compressed per compressed memory."""
    compression: CompressionName = "conv"
    """f_c: conv, dilated, max, mean or most_used."""
    compression_loss: CompressionLoss = "attention"
    """How f_c learns: attention (reconstruction), autoencoding or none."""
    pre_norm: bool = True
    """Pre-LayerNorm (labml); False: post-LayerNorm (the paper)."""
    dropout: float = 0.1
    dropout_attn: float = 0.0
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        check_fields(self)  # values of the annotated types; lists given for tuples stored as tuples
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "compression_rate"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        check_sizes(self, "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "compression_rate", "mem_len",
                    "c_mem_len")
        check(self.d_model % self.n_heads == 0,
              f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check((self.d_model // self.n_heads) % 2 == 0 and self.d_model % 2 == 0,
              f"d_model ({self.d_model}) must be even, for the sinusoidal encodings")
        check(self.mem_len >= 0, f"mem_len must be >= 0, got {self.mem_len}")
        check(self.c_mem_len >= 0, f"c_mem_len must be >= 0, got {self.c_mem_len}")
        check(self.c_mem_len == 0 or self.mem_len % self.compression_rate == 0,
              f"mem_len ({self.mem_len}) must be a multiple of compression_rate ({self.compression_rate}) "
              "when there is a compressed memory")
        for name in ("dropout", "dropout_attn"):
            check(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def has_compression(self) -> bool:
        return self.c_mem_len > 0

    @property
    def trains_compressor(self) -> bool:
        return self.has_compression and self.compression in ("conv", "dilated") and self.compression_loss != "none"


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At inference the ReLU in place: a fresh (B, L, d_ff) buffer costs its pages' first touch, 12%
        # of a bf16 prompt at the reference preset; in training it was 2-3% slower (docs/performance.md, session 20)
        return self.down(relu_dropout(self.up(x), self.dropout.p, self.training))  # (B, L, d)


class LayerMemory(NamedTuple):
    """One layer's memories after a segment (`CompressiveLayer.update_memory`)."""

    memory: torch.Tensor  # (B, M', d)
    compressed: torch.Tensor  # (B, N', d)
    old: torch.Tensor | None  # the old memories compressed (B, n_s, d)
    fresh: torch.Tensor | None  # their compression f_c(old) (B, n_s / c, d), with its graph
    key_values: torch.Tensor | None  # the next inference cache (B, N' + M', 2d)


class CompressiveLayer(nn.Module):
    def __init__(self, config: CompressiveConfig) -> None:
        super().__init__()
        self.pre_norm = config.pre_norm
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attention = RelativeMultiHeadAttention(config.d_model, config.n_heads, config.dropout_attn)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.dropout = Dropout(config.dropout)
        self.compressor = (Compressor(config.compression, config.d_model, config.compression_rate)
                           if config.has_compression else None)
        self.decoder = (Decoder(config.d_model, config.compression_rate)
                        if config.trains_compressor and config.compression_loss == "autoencoding" else None)

    def forward(self, h: torch.Tensor, context: torch.Tensor, key_valid: torch.Tensor | None,
                need_weights: bool = False, context_kv: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, AttentionOutput]:
        """h (B, L, d), context (B, N + M, d) or its projected keys and values `context_kv`
        (B, N + M, 2d) -> (B, L, d) and the attention's output (with the attention each key
        received, this segment's keys and values, and the projections it made)."""
        if self.pre_norm:  # the attention applies LN1 to h and the context
            attention = self.attention(h, context, key_valid, need_weights, context_kv, norm=self.norm1)
            h = dropout_add(h, attention.out, self.dropout.p, self.training)
        else:
            attention = self.attention(h, context, key_valid, need_weights, context_kv)
            h = self.norm1(dropout_add(h, attention.out, self.dropout.p, self.training))
        return self.feed_forward_block(h), attention

    def feed_forward_block(self, h: torch.Tensor) -> torch.Tensor:
        """The layer's second half, h (B, L, d) -> (B, L, d): the feed-forward sublayer with its norm
        and residual (what `CompressiveTransformer.compile_feed_forward` compiles)."""
        if self.pre_norm:
            return dropout_add(h, self.feed_forward(self.norm2(h)), self.dropout.p, self.training)
        return self.norm2(dropout_add(h, self.feed_forward(h), self.dropout.p, self.training))

    def update_memory(self, memory: torch.Tensor, compressed: torch.Tensor, hidden: torch.Tensor, *, mem_len: int,
                      c_mem_len: int, rate: int, received: torch.Tensor | None = None,
                      context_kv: torch.Tensor | None = None, segment_kv: torch.Tensor | None = None
                      ) -> LayerMemory:
        """This layer's memory update rule (memory.py) after a segment whose layer inputs were
        `hidden` (B, L, d). `received` (B, N + M + L): the attention each key received (most_used
        compression). With the inference cache, the keys and values of [compressed, memory]
        `context_kv` (B, N + M, 2d) and of the segment `segment_kv` (B, L, 2d), the same rule gives
        the next cache, the new compressed slots projected once. (A compressed slot whose group holds
        a masked memory is masked itself: every f_c reads its own group only.)"""
        n = compressed.shape[1]

        def compress(old: torch.Tensor) -> torch.Tensor:
            scores = received[:, n : n + old.shape[1]] if received is not None else None  # (B, n_s)
            return self.compressor(old, scores)

        rule = dict(mem_len=mem_len, c_mem_len=c_mem_len, rate=rate)
        has_compressor = self.compressor is not None
        memory, compressed, old, fresh = update_layer_memory(memory, compressed, hidden,
                                                             compress=compress if has_compressor else None, **rule)
        cache = None
        if context_kv is not None:
            mem_kv, cmem_kv, _, _ = update_layer_memory(
                context_kv[:, n:], context_kv[:, :n], segment_kv,
                compress=(lambda _: self.project_context(fresh)) if has_compressor else None, **rule)
            cache = torch.cat([cmem_kv, mem_kv], dim=1)  # (B, N' + M', 2d)
        return LayerMemory(memory, compressed, old, fresh, cache)

    def project_context(self, x: torch.Tensor) -> torch.Tensor:
        """Keys and values of memory slots x (B, n, d) -> (B, n, 2d), as the attention computes them."""
        return self.attention.key_value(self.norm1(x) if self.pre_norm else x)

    def norm_as_constant(self, x: torch.Tensor) -> torch.Tensor:
        """LN1 with its parameters treated as constants (identity for post-LN, whose attention sees raw inputs)."""
        if not self.pre_norm:
            return x
        return F.layer_norm(x, self.norm1.normalized_shape, self.norm1.weight.detach(), self.norm1.bias.detach(),
                            self.norm1.eps)

    def compression_loss(self, kind: CompressionLoss, h: torch.Tensor, old: torch.Tensor,
                         compressed: torch.Tensor, queries: torch.Tensor | None = None,
                         old_key_values: torch.Tensor | None = None) -> torch.Tensor:
        """The loss that trains this layer's f_c; only f_c (and the decoder) receive its gradient.

        `queries` (B, L, d) and `old_key_values` (B, n_s, 2d): the segment's W_q x and the old
        memories' keys and values as the forward pass projected them (the same values: the
        attention saw norm1(h) and norm1(old) with pre-LN, h and old with post-LN); reused,
        detached, instead of projected again. Without them they are computed here."""
        if kind == "autoencoding":
            return F.mse_loss(self.decoder(compressed), old.detach())
        attention = self.attention
        if queries is None or old_key_values is None:
            queries = F.linear(self.norm_as_constant(h.detach()), attention.query.weight.detach())  # (B, L, d)
            old_key_values = F.linear(self.norm_as_constant(old.detach()), attention.key_value.weight.detach())
        queries, old_key_values = queries.detach(), old_key_values.detach()
        target = attention.projected_content_attention(queries, old_key_values)  # (B, L, d)
        # (B, n_s/c, 2d)
        compressed_kv = F.linear(self.norm_as_constant(compressed), attention.key_value.weight.detach())
        approx = attention.projected_content_attention(queries, compressed_kv)  # (B, L, d)
        return F.mse_loss(approx, target)


def attention_reconstruction_loss(layers: Sequence[CompressiveLayer], queries: Sequence[torch.Tensor],
                                  old_keys: Sequence[torch.Tensor], old_values: Sequence[torch.Tensor],
                                  compressed: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over layers of `CompressiveLayer.compression_loss` with the attention-reconstruction
    loss, all layers at once: the same values, with one set of operators for all layers instead of
    one per layer (about 280 operators fewer a step at the peer benchmark's size; where waking a
    sleeping thread is dear, every operator counts: docs/performance.md, session 11).

    Per layer l, constants: the queries W_q x (B, L, d) and the old memories' keys and values
    heads-major (H*B, n_s, D) (`RelativeMultiHeadAttention.heads_major_key_values`: views of those
    the forward made); and f_c(old) (B, n_s / c, d) with its graph. Every layer's tensors have the
    same shapes. Each layer's targets are computed from its keys and values read in place (at the
    reference preset, one shard, all six layers: 9.8 against 12.2 ms in fp32 for a stack of every
    layer's and PyTorch's flash kernel, 6.4 against 8.5 ms in bf16 for the stack and plain
    products: docs/performance.md, session 14); the compressed memories' attention runs for
    all layers at once. Each layer's own LN1 affine and W_kv (constants) project its compressed
    memories; the losses' mean over layers equals the MSE over all layers' elements at once, since
    every layer has as many."""
    n, (b, l, d) = len(layers), queries[0].shape
    hb, n_c = old_keys[0].shape[0], compressed[0].shape[1]
    h = hb // b
    dh = d // h
    dtype = old_keys[0].dtype  # the products' (bf16 under autocast)
    q = torch.empty(n, h, b, l, dh, dtype=dtype, device=queries[0].device)  # every layer's W_q x * scale
    targets = torch.empty(n * hb, l, dh, dtype=dtype, device=q.device)
    with torch.no_grad():
        for i, (queries_i, keys, values) in enumerate(zip(queries, old_keys, old_values)):
            torch.mul(queries_i.detach().view(b, l, h, dh).permute(2, 0, 1, 3), layers[i].attention.scale, out=q[i])
            content_attention(q[i].view(hb, l, dh), keys, values, out=targets[i * hb : (i + 1) * hb])
    fresh = torch.stack(compressed).view(n, b * n_c, d)  # (n, B*n_c, d), with f_c's graph
    if layers[0].pre_norm:  # LN1 with each layer's affine, as constants
        norms = [layer.norm1 for layer in layers]
        gamma = torch.stack([norm.weight.detach() for norm in norms])[:, None]  # (n, 1, d)
        beta = torch.stack([norm.bias.detach() for norm in norms])[:, None]
        fresh = torch.addcmul(beta, F.layer_norm(fresh, (d,), eps=norms[0].eps), gamma)
    weights = torch.stack([layer.attention.key_value.weight.detach() for layer in layers])  # (n, 2d, d)
    compressed_kv = torch.bmm(fresh, weights.transpose(1, 2))  # (n, B*n_c, 2d)
    # heads-major, like the queries: (n, B, n_c, [k, v], H, D) -> [k, v] x (n*H*B, n_c, D)
    keys, values = compressed_kv.view(n, b, n_c, 2, h, dh).permute(3, 0, 4, 1, 2, 5).reshape(2, n * hb, n_c, dh)
    approx = content_attention(q.view(n * hb, l, dh), keys, values)  # (n*HB, L, D)
    return mean_squared_error(approx, targets)


class _MeanSquaredError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, approx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        native = _native_squared_error(approx, target)
        if native is not None:  # bf16 on a CPU with the kernel: one pass, the same fp32 differences
            ctx.save_for_backward(approx, target)
            ctx.native = True
            return native / approx.numel()
        ctx.native = False
        dtype = torch.promote_types(approx.dtype, torch.float32)  # the loss in fp32 (or wider)
        diff = torch.sub(approx.to(dtype), target)  # exact for bf16 inputs; fp32 whatever the inputs
        flat = diff.view(-1)
        ctx.save_for_backward(diff)
        ctx.approx_dtype = approx.dtype
        return torch.dot(flat, flat) / flat.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.native:
            approx, target = ctx.saved_tensors
            return _native_squared_error_grad(approx, target, float(grad) * 2.0 / approx.numel()), None
        (diff,) = ctx.saved_tensors
        out = torch.empty(diff.shape, dtype=ctx.approx_dtype, device=diff.device)
        return torch.mul(diff, grad * (2.0 / diff.numel()), out=out), None  # in approx's dtype, in one pass


def _native_squared_error(approx: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """sum((approx - target)^2) as an fp32 scalar from `native_attention.cpp` (bf16 on a CPU with
    the kernel, both contiguous), or None where it cannot. Each difference is exact in fp32, as in
    the PyTorch path; the sum runs in fp32 over blocks of 1024 and in float64 over the blocks."""
    if (not NATIVE_SQUARED_ERROR or torch.compiler.is_compiling() or approx.device.type != "cpu"
            or approx.dtype != torch.bfloat16 or target.dtype != torch.bfloat16
            or not approx.is_contiguous() or not target.is_contiguous()):
        return None
    from still.compressive import native

    lib = native.attention_library()
    if lib is None:
        return None
    total = ctypes.c_double()
    if lib.still_squared_error(approx.data_ptr(), target.data_ptr(), approx.numel(), ctypes.byref(total)) != 0:
        return None
    return torch.tensor(total.value, dtype=torch.float32, device=approx.device)


def _native_squared_error_grad(approx: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """bf16(scale (approx - target)), the difference and the product in fp32 (after
    `_native_squared_error` ran: the kernel is there)."""
    from still.compressive import native

    out = torch.empty_like(approx)
    code = native.attention_library().still_squared_error_grad(approx.data_ptr(), target.data_ptr(), approx.numel(),
                                                               scale, out.data_ptr())
    if code != 0:
        raise RuntimeError(f"the bf16 attention kernel's squared error gradient failed ({code})")
    return out


def mean_squared_error(approx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((approx - target)^2) as `F.mse_loss`, with `target` a constant (no gradient), in fp32
    (or wider) whatever the inputs' dtype, as autocast's `mse_loss` gives it: the difference once in
    fp32 and a dot product, where autocast casts both (bf16) inputs to fp32 first and the backward
    forms the difference again. (Forward and backward at the reference preset, one shard: 2.9
    against 4.1 ms in bf16, 1.8 against 2.6 ms in fp32: docs/performance.md, session 14.)"""
    if approx.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(approx.shape)} and {tuple(target.shape)}")
    return _MeanSquaredError.apply(approx, target.detach())


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, L, V)
    state: MemoryState
    compression_loss: torch.Tensor | None  # scalar, when computed


def _reloaded(model: CompressiveTransformer, incompatible_keys) -> None:
    """After `load_state_dict`: the parameters as they are now (`assign=True` makes new ones), and
    one more load (the inference cache's version)."""
    model._weights, model._loads = list(model.parameters()), model._loads + 1


class CompressiveTransformer(nn.Module):
    def __init__(self, config: CompressiveConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = Dropout(config.dropout)
        self.layers = nn.ModuleList(CompressiveLayer(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model) if config.pre_norm else nn.Identity()
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init)
        if config.tie_embeddings:
            self.head.weight = self.embedding.weight
        self._identity = next(_MODELS)  # (another model's state carries another model's cache)
        self._weights, self._loads = list(self.parameters()), 0  # for the inference cache's version
        self._registrations = _registrations
        self.register_load_state_dict_post_hook(_reloaded)

    @torch.compiler.disable  # (a compiled forward would guard on the global count: recompiled at each module made)
    def _weights_version(self) -> tuple:
        """Which model, how many `load_state_dict` calls (with `assign=True` they replace the
        parameter tensors) and `weights_changed` calls it has had, how many parameters and
        submodules had been assigned in the process when its parameters were last listed (one
        assigned by hand, here or in any module, lists them again), how many in-place writes they
        have had (an optimizer step, a `load_state_dict`), and where their data lie (new data put in
        through `.data =`, `vector_to_parameters` or `.half()`): what a state's inference cache was
        made with. In-place writes through `.data` are not seen: call `weights_changed` after them."""
        count = _registrations  # (read before listing: a registration meanwhile lists them again next time)
        if self._registrations != count:
            self._weights, self._registrations = list(self.parameters()), count
        return (self._identity, self._loads, self._registrations, sum(p._version for p in self._weights),
                tuple(p.data_ptr() for p in self._weights))

    def weights_changed(self) -> None:
        """Say that the weights were written where PyTorch's version counters do not see it (in
        place through `.data`, or by a fused optimizer built outside `still.train.optim`): the
        inference caches (the position projections W_r R, the compressor's cast weights, a state's
        memory keys and values, the decoding step's weights) are made anew from them. Writes PyTorch
        counts (an optimizer's step in general, `load_state_dict`, in-place operations) and new data
        (`.data =`, `vector_to_parameters`, `.half()`) are seen without it."""
        self._loads += 1
        for module in self.modules():
            if isinstance(module, RelativeMultiHeadAttention):
                module._positions = None
            elif isinstance(module, Compressor):
                module._cast_key = None

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.ConvTranspose1d)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def compile_feed_forward(self) -> None:
        """`torch.compile` each layer's `feed_forward_block`, in place: the parameters and the state
        dict stay as they are. Shapes are fixed in training (B, L, d), so it compiles once per batch
        size and mode; the attention, whose memories change length while they fill, stays eager.
        Dropout runs eagerly inside (`still.layers.dropout`). On the CPUs measured here it is slower
        than eager (docs/performance.md, session 15): meant for GPUs."""
        for layer in self.layers:
            layer.feed_forward_block = torch.compile(layer.feed_forward_block, dynamic=False)

    def compressor_parameters(self) -> list[nn.Parameter]:
        """f_c and the auto-encoding decoders: trained only by the compression loss."""
        return [p for layer in self.layers for m in (layer.compressor, layer.decoder) if m is not None
                for p in m.parameters()]

    def model_parameters(self) -> list[nn.Parameter]:
        """Everything else: trained only by the language-model loss."""
        ids = {id(p) for p in self.compressor_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def check_state(self, state: MemoryState, batch: int) -> None:
        """A one-line error where `state` cannot go with this model and `batch` rows of tokens."""
        problem = next(self._state_problems(state, batch), None)
        if problem is not None:
            raise StillError(problem)

    def _state_problems(self, state: MemoryState, batch: int) -> Iterator[str]:
        """What keeps `state` from this model, first problem first. (Every forward asks: a message is
        formatted only where its condition fails; formatting them all took 40 µs for six layers.)"""
        config, weight = self.config, self.embedding.weight
        if not isinstance(state, MemoryState):
            yield f"the memory state must be a MemoryState (or None), got a {type(state).__name__}"
            return
        if not len(state.memory) == len(state.compressed) == config.n_layers:
            yield f"the memory state has {len(state.memory)} layers, the model {config.n_layers}"
            return
        memory = state.memory[0]
        if memory.shape[0] != batch:
            yield f"the memory state holds {memory.shape[0]} batch rows, the tokens {batch}"
        if memory.shape[-1] != config.d_model:
            yield f"the memory state's width is {memory.shape[-1]}, the model's d_model {config.d_model}"
        if memory.dtype != weight.dtype or memory.device != weight.device:
            yield (f"the memory state is {memory.dtype} on {memory.device}, the model's weights {weight.dtype} on "
                   f"{weight.device} (make it with model.empty_state(batch, device, dtype))")
        # a state made under other memory lengths would keep slots this model never drops (an XL
        # model's compressed slots, say): refused, as is a state whose layers disagree
        # (a compressing model's memory may run up to c - 1 past mem_len, waiting for a whole group)
        m, n = state.memory_len, state.compressed_len
        m_cap = config.mem_len + (config.compression_rate - 1 if config.has_compression else 0)
        if m > m_cap or n > config.c_mem_len:
            yield (f"the memory state holds {m} memories and {n} compressed ones, more than this model keeps "
                   f"(mem_len {config.mem_len}, c_mem_len {config.c_mem_len}): it was made by another model")
        for what, tensors, length in (("memory", state.memory, m), ("compressed memory", state.compressed, n)):
            for i, t in enumerate(tensors):
                if t.shape != (batch, length, config.d_model):
                    yield f"layer {i}'s {what} has shape {tuple(t.shape)}, layer 0's {(batch, length, config.d_model)}"
                if t.dtype != weight.dtype or t.device != weight.device:
                    yield (f"layer {i}'s {what} is {t.dtype} on {t.device}, the model's weights {weight.dtype} on "
                           f"{weight.device}")
        for what, valid, length in (("memory", state.memory_valid, m), ("compressed", state.compressed_valid, n)):
            if valid is not None and valid.shape != (batch, length):
                yield f"the state's {what}_valid has shape {tuple(valid.shape)}, expected {(batch, length)}"
            if valid is not None and valid.dtype != torch.bool:
                yield f"the state's {what}_valid must be bool, got {valid.dtype}"

    def empty_state(self, batch: int, device=None, dtype=torch.float32) -> MemoryState:
        """The memories before the first segment of `batch` rows: none."""
        # (-1 was torch's RuntimeError, 2.5 its TypeError; NumPy's integers are taken, as generate's)
        check(whole(batch) and batch >= 0,
              f"batch must be an int >= 0, got {batch!r}")
        return MemoryState.empty(self.config.n_layers, int(batch), self.config.d_model, device, dtype)

    def forward(self, tokens: torch.Tensor, state: MemoryState | None = None, *, reset: torch.Tensor | None = None,
                with_compression_loss: bool | None = None, last_logits: bool = False) -> ModelOutput:
        """tokens (B, L) -> logits (B, L, V), the next state, and the compression loss.

        `state` is the memory from the previous segment (None: empty). `reset` (B,) bool marks batch
        rows where a new document starts with this segment: their memories are masked out. That is a
        fresh start when the memory holds whole groups of c, as it always does when the segment
        length and mem_len are multiples of c (the recipes require the first); otherwise the new
        document's first memories share a group with masked ones, so that compressed slot is masked
        and the later groups fall c-aligned with the stream, not with the document. The
        compression loss is computed when training a compressor, or when `with_compression_loss`,
        for a model whose compressor learns (`config.trains_compressor`: conv or dilated, with a
        compression loss); for the others it is None.
        `last_logits`: the logits of the last position only, (B, 1, V) (a prompt needs no others).
        """
        config = self.config
        check(is_ids(tokens) and tokens.ndim == 2 and tokens.shape[1] >= 1,
              f"tokens must be ids (batch, length >= 1), got {described(tokens)}")
        tokens = check_ids(tokens, config.vocab_size)
        b, l = tokens.shape
        if state is None:
            state = self.empty_state(b, tokens.device, self.embedding.weight.dtype)
        self.check_state(state, b)
        if reset is not None:
            check(isinstance(reset, torch.Tensor) and reset.dtype == torch.bool and tuple(reset.shape) == (b,),
                  f"reset must be a ({b},) bool tensor, one per batch row, got {described(reset)}")
            state = state.reset(reset)
        if any(t.requires_grad for t in (*state.memory, *state.compressed)):
            # (a state made by hand with a graph; a forward's own are detached): no gradient crosses
            # segments, neither the language model's nor the reconstruction loss's (Transformer-XL's
            # stop-gradient)
            state = state.detach()
        if with_compression_loss is None:
            with_compression_loss = self.training and config.trains_compressor
        key_valid = state.key_valid()  # (B, N + M) or None
        need_weights = config.has_compression and config.compression == "most_used"
        # At inference the weights are fixed, so each memory slot's keys and values are projected
        # once, when it enters the memory, and cached in the state.
        use_cache = not self.training and not torch.is_grad_enabled()
        version = self._weights_version() if use_cache else None  # in-place updates bump it
        caches = state.cache(version) if use_cache else None
        if caches and caches[0].dtype != compute_dtype(tokens.device, self.embedding.weight.dtype):
            caches = None  # made under another precision (bf16 autocast or not): projected again

        h = self.dropout(self.embedding(tokens))  # (B, L, d)
        layer_inputs, attentions, context_kvs = [], [], []
        for i, (layer, memory, compressed) in enumerate(zip(self.layers, state.memory, state.compressed)):
            layer_inputs.append(h)
            context_kv = caches[i] if caches is not None else None  # (B, N + M, 2d)
            context = torch.cat([compressed, memory], dim=1) if context_kv is None else None  # (B, N + M, d)
            if use_cache and context_kv is None:
                context_kv = layer.project_context(context)
            h, attention = layer(h, context, key_valid, need_weights, context_kv)
            if not with_compression_loss:  # keep only what the memory update needs (not every layer's projections)
                attention = attention._replace(queries=None, all_key_values=None, key_values_by_head=None)
            attentions.append(attention)
            context_kvs.append(context_kv)
        logits = self.head(self.norm(h[:, -1:] if last_logits else h))  # (B, L, V), or (B, 1, V)

        new_memory, new_compressed, new_caches, loss_inputs = [], [], [], []
        # (every layer's memories follow the same rule, so their tensors have the same shapes)
        batched = BATCHED_RECONSTRUCTION and config.compression_loss == "attention" and config.n_layers > 1
        n = state.compressed_len
        rule = dict(mem_len=config.mem_len, c_mem_len=config.c_mem_len, rate=config.compression_rate)
        for layer, memory, compressed, hidden, attention, context_kv in zip(
                self.layers, state.memory, state.compressed, layer_inputs, attentions, context_kvs):
            received = attention.received  # (B, N + M + L) with need_weights, else None
            if received is not None and key_valid is not None:  # the invalid slots rank below every valid one
                received = torch.cat([received[:, : key_valid.shape[1]].masked_fill(~key_valid, -1.0),
                                      received[:, key_valid.shape[1] :]], dim=1)
            mem, cmem, old, fresh, cache = layer.update_memory(
                memory, compressed, hidden, received=received,
                context_kv=context_kv if use_cache else None, segment_kv=attention.key_values, **rule)
            new_memory.append(mem)
            new_compressed.append(cmem)
            new_caches.append(cache)
            if with_compression_loss and old is not None and config.trains_compressor:
                old_slots = slice(n, n + old.shape[1])  # the old memories: the first n_s keys after the compressed ones
                if batched:
                    loss_inputs.append((layer, fresh, attention.queries,
                                        *layer.attention.heads_major_key_values(attention, old_slots)))
                else:
                    old_kv = attention.all_key_values  # (B, K, 2d); None where made heads-major: projected again
                    loss_inputs.append((layer, hidden, old, fresh, attention.queries,
                                        old_kv[:, old_slots] if old_kv is not None else None))  # (B, n_s, 2d)

        memory_valid, compressed_valid = None, None
        if key_valid is not None:
            memory_valid, compressed_valid = update_validity(
                *state.validity(), l, mem_len=config.mem_len, c_mem_len=config.c_mem_len, rate=config.compression_rate,
                most_used=need_weights)
            if bool(memory_valid.all()) and bool(compressed_valid.all()):
                memory_valid, compressed_valid = None, None
        next_state = MemoryState(tuple(new_memory), tuple(new_compressed), memory_valid, compressed_valid)
        if use_cache:
            next_state = next_state.with_cache(tuple(new_caches), version)
        compression_loss = None
        if loss_inputs:
            if batched:
                layers, fresh, queries, old_keys, old_values = zip(*loss_inputs)
                compression_loss = attention_reconstruction_loss(layers, queries, old_keys, old_values, fresh)
            else:
                compression_loss = torch.stack([
                    layer.compression_loss(config.compression_loss, *args)
                    for layer, *args in loss_inputs]).mean()
        return ModelOutput(logits, next_state, compression_loss)
