"""The CPU dropout: the right drop rate, an unbiased output, the gradient of its mask, and seeded."""

import pytest
import torch

from helpers import BUILDS, use_build
from still import layers
from still.layers import LANES, Dropout, dropout


def test_drop_rate_and_expectation():
    torch.manual_seed(0)
    x = torch.rand(400, 1000) + 0.5
    for p in (0.1, 0.5, 0.9):
        y = dropout(x, p)
        kept = y != 0
        n = x.numel()
        rate = round(p * LANES) / LANES  # the rounded probability
        assert abs(1 - kept.float().mean().item() - rate) < 4 * (rate * (1 - rate) / n) ** 0.5
        torch.testing.assert_close(y[kept], x[kept] / (1 - rate))
        # unbiased: the mean over the elements stays the input's (to sampling noise)
        assert abs(y.mean().item() / x.mean().item() - 1) < 4 * (rate / (1 - rate) / n) ** 0.5 * 1.2


def test_every_16_bit_lane_drops_at_the_same_rate():
    """Four elements share one 64-bit draw: each of the four lanes must be uniform on its own."""
    torch.manual_seed(1)
    kept = dropout(torch.ones(10**6), 0.3) != 0  # element i uses lane i % 4
    by_lane = kept.view(-1, 4).float().mean(0)
    assert (by_lane - 0.7).abs().max() < 4 * (0.21 / 250_000) ** 0.5


def test_identity_and_edge_cases():
    x = torch.randn(3, 5)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module = Dropout(0.5).eval()
    assert module(x) is x and "p=0.5" in repr(module)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability must be in"):
            dropout(x, bad)
        with pytest.raises(ValueError, match="dropout probability must be in"):
            Dropout(bad)


def test_gradient_is_the_scaled_mask_and_seeds_repeat():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.25)
    y.sum().backward()
    kept = y.detach() != 0
    rate = round(0.25 * LANES) / LANES
    torch.testing.assert_close(x.grad, kept.float() / (1 - rate))
    torch.manual_seed(5)
    assert torch.equal(dropout(x.detach(), 0.25), y.detach())
    generator = torch.Generator().manual_seed(3)
    a = dropout(x.detach(), 0.25, generator=generator)
    assert torch.equal(a, dropout(x.detach(), 0.25, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, y.detach())


def test_bf16_inputs_keep_their_dtype():
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    assert dropout(x, 0.5).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_and_gradient_are_round_x_times_scale_at_the_kept_lanes(dtype):
    """The mask is built from the lanes of the call's seed (its one draw from the generator): the
    numbers must be those of the plain definition, where(lane >= threshold, x * scale, 0), bit for
    bit, and so must the gradient."""
    p = 0.1
    x = torch.randn(3, 5, 7).to(dtype).requires_grad_()
    y = dropout(x, p, generator=torch.Generator().manual_seed(11))
    seed = int(torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(11)))
    dropped = round(p * LANES)
    keep = layers._lanes(seed, x.numel()).view(x.shape) >= dropped - LANES // 2
    scale = LANES / (LANES - dropped)
    assert 0 < int((~keep).sum()) < x.numel()
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # bit for bit, the sign of a zero too

    def same_bits(a, b):
        return torch.equal(a.view(bits), b.view(bits))

    assert y.dtype == dtype and same_bits(y, torch.where(keep, x.detach() * scale, 0))
    g = torch.randn(x.shape).to(dtype)
    (grad,) = torch.autograd.grad(y, x, g)
    assert same_bits(grad, torch.where(keep, g * scale, 0))


def test_lanes_are_splitmix64_of_the_seed():
    """`_lanes` (and so the kernel, tested against it below) is SplitMix64 over seed + (w + 1) *
    golden, four little-endian 16-bit lanes a word: checked against the algorithm in Python's
    integers, for seeds of both signs."""
    mask = 2**64 - 1

    def splitmix(x: int) -> int:
        z = x & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    for seed in (0, 12345, -(2**63), 2**62 + 7):
        lanes = layers._lanes(seed, 10)
        words = [splitmix(seed + (w + 1) * 0x9E3779B97F4A7C15) for w in range(3)]
        want = [(words[i // 4] >> (16 * (i % 4))) & 0xFFFF for i in range(10)]
        assert [v & 0xFFFF for v in lanes.tolist()] == want


def test_drop_rates_that_round_to_none_or_all():
    x = torch.randn(1000)
    assert torch.equal(dropout(x, 1e-6), x)  # rounds to 0 of 2^16 lanes
    assert torch.equal(dropout(x, 1 - 1e-6), torch.zeros_like(x))


def test_dropout_on_the_compile_path_draws_the_same_masks(monkeypatch):
    """Inside torch.compile the masks are drawn eagerly (a graph break). PyTorch's flag behind
    `is_compiling` is global while any thread compiles, so a shard thread running eagerly may take
    that path too: the same masks, from the same generator."""
    x = torch.randn(1000)
    plain = dropout(x, 0.3, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(dropout(x, 0.3, generator=torch.Generator().manual_seed(1)), plain)



@pytest.mark.parametrize("function", ["dropout", "relu_dropout", "dropout_add"])
def test_dropout_off_the_cpu_is_traced_inside_torch_compile(monkeypatch, function):
    """Off the CPU, inside torch.compile, every dropout is PyTorch's `F.dropout` called inline,
    which the compiler traces and fuses, not the eager CPU path behind a graph break (a GPU's
    compiled feed-forward block would be cut in three). The meta device stands in for the GPU."""
    from still import layers

    def eager(*args, **kwargs):
        raise AssertionError("the eager path behind a graph break was taken")

    calls = []

    def traced(x, p, training):
        calls.append((x.device.type, p, training))
        return x.clone()

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(layers, "_masked_eagerly", eager)
    monkeypatch.setattr(layers.F, "dropout", traced)
    x = torch.empty(4, 8, device="meta")
    args = (x, x) if function == "dropout_add" else (x,)
    y = getattr(layers, function)(*args, 0.25)
    assert calls == [("meta", 0.25, True)] and y.shape == x.shape and y.device == x.device
    with pytest.raises(AssertionError, match="graph break"):  # on the CPU, still the eager path
        getattr(layers, function)(*(torch.ones(4, 8) for _ in args), 0.25)

def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers, every NaN as one value (PyTorch's own loops write NaN's bits two ways)."""
    bits = t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32).clone()
    bits[torch.isnan(t)] = -1
    return bits


@pytest.fixture(params=list(BUILDS))
def kernels(request, monkeypatch):
    """`native_dropout.cpp` as this machine builds it, and built for x86-64-v3 and untuned, whose
    portable kernels an AVX-512 machine would otherwise never run (`helpers.BUILDS`)."""
    from still.compressive import native

    use_build(request.param, monkeypatch, "_DROPOUT")
    lib = native.dropout_library()
    if lib is None:
        pytest.skip("the dropout kernels cannot be built here (no compiler)")
    assert lib.still_dropout_avx512() in ((0,) if BUILDS[request.param] is not None else (0, 1))
    return lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,threads", [((3, 100, 37), 1), ((16, 128, 1024), 3)])
def test_native_dropout_gives_the_pytorch_paths_bits(monkeypatch, kernels, dtype, relu, shape, threads):
    """`native_dropout.cpp` (`layers.NATIVE`): dropout, and dropout after a ReLU (`relu_dropout`),
    forward and backward, give the bits the PyTorch path gives from the same draws, at NaN, +-inf,
    +-0 and subnormals too, on one thread or three (in parts), for lengths not multiples of 16."""
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    grad = torch.randn(shape).to(dtype)
    special = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 3.0])
    x.view(-1)[:8] = special.to(dtype)
    grad.view(-1)[8:16] = special.to(dtype)
    calls, apply = [], layers._NativeDropout.apply
    monkeypatch.setattr(layers._NativeDropout, "apply", lambda *args: calls.append(1) or apply(*args))

    def run(kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(layers, "NATIVE", kernel)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            xx = x.clone().requires_grad_()
            generator = torch.Generator().manual_seed(3)
            out = layers.relu_dropout(xx, 0.1, True, generator) if relu else layers.dropout(xx, 0.1, True, generator)
            out.backward(grad)
            return out.detach(), xx.grad
        finally:
            torch.set_num_threads(before)

    kernel, plain = run(True), run(False)
    assert calls == [1]  # the kernel ran once, the PyTorch path not at all
    for got, want in zip(kernel, plain):
        assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))
    assert (kernel[0] == 0).float().mean() > 0.09  # dropped (and with the ReLU, negative) elements are there


def test_relu_dropout_outside_training_is_the_relu():
    x = torch.randn(4, 32)
    for training, p in ((False, 0.5), (True, 0.0)):
        assert torch.equal(layers.relu_dropout(x.clone(), p, training), torch.relu(x))
    with pytest.raises(ValueError, match="1.5"):
        layers.relu_dropout(x, 1.5)


def test_native_dropout_rounds_bf16_to_nearest_even(kernels):
    """bf16 outputs: round(scale * x) to nearest, ties to even, as PyTorch rounds; called directly
    with every lane kept and scales that put scale * 1 halfway between bf16 neighbours: 1 + 2^-8
    (between 1 and 1 + 2^-7: down, to the even one) and 1 + 3 * 2^-8 (up, to 1 + 2^-6)."""
    lib = kernels
    x = torch.tensor([1.0, 1.0 + 2**-7, -3.0] * 6, dtype=torch.bfloat16)  # 18: a full block and a tail
    lanes = torch.zeros(18, dtype=torch.int16)
    for scale, tie in ((1 + 2**-8, 1.0), (1 + 3 * 2**-8, 1.0 + 2**-6)):
        out = torch.empty_like(x)
        assert lib.still_dropout(x.data_ptr(), lanes.data_ptr(), 18, -(2**15), scale, 0, 1, out.data_ptr(), 1) == 0
        assert torch.equal(out, (x.float() * scale).to(torch.bfloat16))  # PyTorch's own rounding
        assert out[0].item() == out[-3].item() == tie


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,threads", [((3, 100, 37), 1), ((16, 128, 512), 3)])
def test_native_dropout_add_gives_the_pytorch_paths_bits(monkeypatch, kernels, dtype, shape, threads):
    """`dropout_add(h, x)` (a residual connection: fp32 h, x fp32 or bf16) by `native_dropout.cpp`:
    the sum, h's gradient and x's (the sum's gradient rounded to x's dtype, then the dropout's
    backward) are the bits `h + dropout(x)` gives through PyTorch, on one thread or three."""
    torch.manual_seed(0)
    h, x, grad = torch.randn(shape), torch.randn(shape).to(dtype), torch.randn(shape)
    x.view(-1)[:8] = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 3.0]).to(dtype)
    calls, apply = [], layers._NativeDropoutAdd.apply
    monkeypatch.setattr(layers._NativeDropoutAdd, "apply", lambda *args: calls.append(1) or apply(*args))

    def run(kernel: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(layers, "NATIVE", kernel)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            hh, xx = h.clone().requires_grad_(), x.clone().requires_grad_()
            out = layers.dropout_add(hh, xx, 0.1, True, torch.Generator().manual_seed(5))
            out.backward(grad)
            return [out.detach(), hh.grad, xx.grad]
        finally:
            torch.set_num_threads(before)

    kernel, plain = run(True), run(False)
    assert calls == [1]
    assert [t.dtype for t in kernel] == [torch.float32, torch.float32, dtype]
    for got, want in zip(kernel, plain):
        assert torch.equal(_bits(got), _bits(want))
    assert torch.equal(_bits(layers.dropout_add(h, x, 0.1, training=False)), _bits(h + x))
