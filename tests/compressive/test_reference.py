"""The whole model against `reference.py`, written again from the papers: logits over many segments
with every compression function, both norms, uneven segments and resets; the attention-reconstruction
loss and the compressor's gradient (algorithm 2); the language-model loss's gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import Reference

from still.compressive import CompressiveConfig, CompressiveTransformer
from still.compressive.compression import COMPRESSIONS

VOCAB = 23
STREAM = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))


def model(**changes) -> CompressiveTransformer:
    """A small model with biases and norms away from their initial values (so each is tested)."""
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48, dropout=0.0, mem_len=8,
                    c_mem_len=6, compression_rate=2) | changes
    net = CompressiveTransformer(CompressiveConfig(**settings))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if "compressor" in name:
                p.normal_(0, 0.2)
    return net


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_logits_with_uneven_segments_and_a_reset(compression, pre_norm, training):
    """Two rows; the second starts a new document at the fourth segment and the sixth. Segments of
    uneven length leave a part of a group of c waiting in the memory, and most_used then keeps some
    memories of the old document: the compressed slots' flags must say which."""
    net = model(compression=compression, pre_norm=pre_norm).train(training)
    rows = [Reference(net), Reference(net)]
    state, start, worst = None, 0, 0.0
    for s, length in enumerate([5, 7, 3, 9, 6, 10, 4, 8]):
        tokens = STREAM[:, start : start + length]
        start += length
        reset = torch.tensor([False, s in (3, 5)])
        with torch.set_grad_enabled(training):
            out = net(tokens, state, reset=reset)
        state = out.state
        for r, reference in enumerate(rows):
            if reset[r]:
                reference.reset()
            want, _ = reference.step(tokens[r])
            worst = max(worst, (out.logits[r].double() - want).abs().max().item())
    assert worst < 1e-4


@pytest.mark.parametrize("compression", ["conv", "dilated"])
@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
def test_reconstruction_loss_and_the_compressors_gradient(compression, pre_norm):
    net = model(compression=compression, pre_norm=pre_norm, n_layers=3).train()
    reference = Reference(net)
    weights = [layer.compressor.conv.weight for layer in net.layers]
    # the reference differentiates f_c through float64 copies of its weights
    copies = [torch.nn.Parameter(w.detach().double()) for w in weights]
    state, start, compared = None, 0, 0
    for length in [5, 7, 3, 9, 6]:
        tokens = STREAM[:1, start : start + length]
        start += length
        out = net(tokens, state)
        state = out.state
        for layer, copy in zip(net.layers, copies):
            layer.compressor.conv.weight = copy
        try:
            _, want = reference.step(tokens[0])
        finally:
            for layer, weight in zip(net.layers, weights):
                layer.compressor.conv.weight = weight
        if want is None:
            assert out.compression_loss is None
            continue
        compared += 1
        assert out.compression_loss.item() == pytest.approx(want.item(), rel=1e-5)
        others = [p for p in net.parameters() if all(p is not w for w in weights)]
        got = torch.autograd.grad(out.compression_loss, [*weights, *others], allow_unused=True)
        expected = torch.autograd.grad(want, copies)
        for g, e in zip(got, expected):
            assert ((g.double() - e).norm() / e.norm()).item() < 1e-4
        assert all(g is None or not g.any() for g in got[len(weights):]), "the loss reached the model"
    assert compared >= 3


@pytest.mark.parametrize("compression", ["conv", "most_used"])
@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
def test_language_model_gradients(compression, pre_norm):
    net = model(compression=compression, pre_norm=pre_norm, mem_len=16, c_mem_len=8, compression_rate=4,
                n_heads=2, d_ff=32).train()
    reference = Reference(net)
    state = None
    for start in range(0, 40, 8):
        tokens, targets = STREAM[:1, start : start + 8], STREAM[:1, start + 1 : start + 9]
        out = net(tokens, state)
        state = out.state
        want, _ = reference.step(tokens[0])
    names, params = zip(*[(n, p) for n, p in net.named_parameters() if "compressor" not in n])
    got = torch.autograd.grad(F.cross_entropy(out.logits[0], targets[0]), params, allow_unused=True)
    expected = torch.autograd.grad(F.cross_entropy(want, targets[0]), params, allow_unused=True)
    for name, g, e in zip(names, got, expected):
        g = torch.zeros_like(e) if g is None else g
        assert ((g.double() - e).norm() / (e.norm() + 1e-12)).item() < 1e-4, name
