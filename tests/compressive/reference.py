"""The Compressive Transformer written again from the papers, slowly and plainly, for the tests.

One batch row, float64, a loop over every query and key: Transformer-XL's relative attention
(Dai et al. 2019, section 3.3) with its distance written out for each pair,

    score(i, j) = (q_i + u) . k_j + (q_i + v) . W_R r(i - j)        r: the sinusoid of the distance,

and the Compressive Transformer's memory (Rae et al. 2019, algorithm 1: each layer stores its
inputs; what overflows the memory is compressed by f_c into the compressed memory) and its
attention-reconstruction loss (algorithm 2). It reads a `CompressiveTransformer`'s parameters
through differentiable casts, so autograd through it gives reference gradients for the model's.
It shares no code with the package beyond reading the parameters.

Memories start empty, as in the package (the paper's algorithm 1 starts them at zeros). Resets
follow the package's rule, which the model's docstrings state: a reset masks every memory of the
row; a compressed slot is valid when what it holds is of the current document (for a group of c
memories, all of them; for most_used, the memory it keeps: of V valid old memories the V // c most
attended, the oldest masked ones filling the other slots, as a fresh stream keeps V / c of V).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sinusoid(distance: float, d: int) -> torch.Tensor:
    """r(distance) (d,): sin of every frequency, then cos."""
    frequencies = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    return torch.cat([(distance * frequencies).sin(), (distance * frequencies).cos()])


def layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)


def relative_attention(layer, x: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor,
                       pre_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (L, d) queries, context (P, d) memories before them -> output (L, d), weights (H, L, P + L)."""
    attention = layer.attention
    if pre_norm:
        x, context = layer_norm(x, layer.norm1), layer_norm(context, layer.norm1)
    keys_in = torch.cat([context, x])
    (length, d), keys = x.shape, keys_in.shape[0]
    heads, d_head = attention.n_heads, attention.d_head
    q = (x @ attention.query.weight.double().T).view(length, heads, d_head)
    kv = keys_in @ attention.key_value.weight.double().T
    k, v = kv[:, :d].view(keys, heads, d_head), kv[:, d:].view(keys, heads, d_head)
    u, bias_v = attention.content_bias.double(), attention.position_bias.double()
    w_r = attention.position.weight.double()
    scores = torch.full((heads, length, keys), -math.inf, dtype=torch.float64)
    for i in range(length):
        for j in range(keys):
            distance = (keys - length + i) - j  # query i sits at key position keys - length + i
            if distance < 0 or (j < len(context) and not context_valid[j]):
                continue
            r = (w_r @ sinusoid(float(distance), d)).view(heads, d_head)
            scores[:, i, j] = ((q[i] + u) * k[j]).sum(-1) + ((q[i] + bias_v) * r).sum(-1)
    weights = (scores / math.sqrt(d_head)).softmax(-1)
    out = torch.einsum("hlk,khd->lhd", weights, v).reshape(length, d)
    return out @ attention.out.weight.double().T, weights


def compress(compressor, old: torch.Tensor, received: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """f_c: old (n, d) -> (n / c, d), and for most_used the indices kept."""
    n, d = old.shape
    c = compressor.rate
    if compressor.kind == "max":
        return old.view(n // c, c, d).amax(1), None
    if compressor.kind == "mean":
        return old.view(n // c, c, d).mean(1), None
    weight = compressor.conv.weight.double() if compressor.conv is not None else None
    if compressor.kind == "conv":  # kernel = stride = c
        return F.conv1d(old.T[None], weight, stride=c)[0].T, None
    if compressor.kind == "dilated":  # kernel c, dilation 2, over each group of c left-padded by c - 1
        groups = F.pad(old.T.reshape(d, n // c, c).transpose(0, 1), (c - 1, 0))  # (n/c, d, 2c - 1)
        return F.conv1d(groups, weight, dilation=2)[:, :, 0], None
    # most_used: of the V valid memories (received >= 0) the V // c most attended; the oldest masked
    # ones in the slots left; in time order
    valid = [j for j in range(n) if received[j] >= 0]
    best = sorted(valid, key=lambda j: -received[j].item())[: len(valid) // c]
    masked = [j for j in range(n) if received[j] < 0][: n // c - len(best)]
    keep = torch.tensor(sorted(best + masked), dtype=torch.long)
    return old[keep], keep


def reconstruction_loss(layer, hidden: torch.Tensor, old: torch.Tensor, compressed: torch.Tensor,
                        pre_norm: bool) -> torch.Tensor:
    """Algorithm 2: || attn(h, old) - attn(h, f_c(old)) ||^2, mean, content attention only, with the
    attention's weights, the layer's inputs h and the old memories held constant."""
    attention = layer.attention
    d, heads, d_head = attention.d_model, attention.n_heads, attention.d_head
    w_q, w_kv = attention.query.weight.double().detach(), attention.key_value.weight.double().detach()

    def norm(x):
        if not pre_norm:
            return x
        n = layer.norm1
        return F.layer_norm(x, (d,), n.weight.double().detach(), n.bias.double().detach(), n.eps)

    q = (norm(hidden.detach()) @ w_q.T).view(-1, heads, d_head)

    def attend(memories):
        kv = norm(memories) @ w_kv.T
        k, v = kv[:, :d].view(-1, heads, d_head), kv[:, d:].view(-1, heads, d_head)
        weights = (torch.einsum("lhd,khd->hlk", q, k) / math.sqrt(d_head)).softmax(-1)
        return torch.einsum("hlk,khd->lhd", weights, v).reshape(-1, d)

    return ((attend(old.detach()) - attend(compressed)) ** 2).mean()


class Reference:
    """One batch row of `model`, segment by segment: `step(tokens (L,))` -> (logits (L, V) float64,
    the compression loss or None); `reset()` starts a new document."""

    def __init__(self, model) -> None:
        self.model, self.config = model, model.config
        layers, d = self.config.n_layers, self.config.d_model
        self.memory = [torch.zeros(0, d, dtype=torch.float64) for _ in range(layers)]
        self.compressed = [torch.zeros(0, d, dtype=torch.float64) for _ in range(layers)]
        self.memory_valid = [torch.zeros(0, dtype=torch.bool) for _ in range(layers)]
        self.compressed_valid = [torch.zeros(0, dtype=torch.bool) for _ in range(layers)]

    def reset(self) -> None:
        self.memory_valid = [torch.zeros_like(v) for v in self.memory_valid]
        self.compressed_valid = [torch.zeros_like(v) for v in self.compressed_valid]

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        model, config = self.model, self.config
        pre, c = config.pre_norm, config.compression_rate
        h = model.embedding.weight.double()[tokens]
        losses = []
        for i, layer in enumerate(model.layers):
            context = torch.cat([self.compressed[i], self.memory[i]])
            context_valid = torch.cat([self.compressed_valid[i], self.memory_valid[i]])
            attended, weights = relative_attention(layer, h, context, context_valid, pre)
            inputs = h
            if pre:
                h = h + attended
                x = layer_norm(h, layer.norm2)
            else:
                h = x = layer_norm(h + attended, layer.norm1)
            ff = layer.feed_forward
            y = F.relu(x @ ff.up.weight.double().T + ff.up.bias.double()) @ ff.down.weight.double().T
            y = y + ff.down.bias.double()
            h = h + y if pre else layer_norm(h + y, layer.norm2)

            # algorithm 1: the layer's inputs join the memory; what overflows is compressed
            both = torch.cat([self.memory[i], inputs.detach()])
            both_valid = torch.cat([self.memory_valid[i], torch.ones(len(tokens), dtype=torch.bool)])
            overflow = len(both) - config.mem_len
            n_s = c * (overflow // c) if config.c_mem_len else max(overflow, 0)
            if overflow <= 0 or n_s == 0:
                self.memory[i], self.memory_valid[i] = both, both_valid
                continue
            old, old_valid = both[:n_s], both_valid[:n_s]
            self.memory[i], self.memory_valid[i] = both[n_s:], both_valid[n_s:]
            if not config.c_mem_len:  # Transformer-XL: the oldest are dropped
                continue
            start = len(self.compressed[i])
            received = weights.sum((0, 1))[start : start + n_s].masked_fill(~old_valid, -1.0)
            new, kept = compress(layer.compressor, old, received)
            new_valid = old_valid[kept] if kept is not None else old_valid.view(-1, c).all(1)
            if layer.compressor.conv is not None and config.compression_loss == "attention":
                losses.append(reconstruction_loss(layer, inputs, old, new, pre))
            self.compressed[i] = torch.cat([self.compressed[i], new.detach()])[-config.c_mem_len :]
            self.compressed_valid[i] = torch.cat([self.compressed_valid[i], new_valid])[-config.c_mem_len :]
        if pre:
            h = layer_norm(h, model.norm)
        return h @ model.head.weight.double().T, (torch.stack(losses).mean() if losses else None)
