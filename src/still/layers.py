"""Layers shared by the models.

`dropout` / `Dropout`: inverted dropout (Srivastava et al. 2014) whose mask is cheaper to draw on
the CPU. PyTorch's CPU dropout draws one random number per element (`bernoulli_`), about 6 ns an
element here: at the `reference` preset the masks took a fifth of a bf16 training step. Here each
element has a 16-bit lane, kept where it is at least a threshold: four lanes a 64-bit word of
SplitMix64 (Steele, Lea and Flood 2014) over a counter from one 64-bit seed that each call draws
from the PyTorch generator (`_lanes`), so a call costs the generator one draw and the lanes can be
made again for the backward instead of kept. The drop probability is p rounded to a multiple of
2^-16 (at most 7.7e-6 away), and kept elements are scaled by the inverse of the exact keep
probability, so the expectation of every output is its input. On other devices: `F.dropout`.
(Until session 30 the lanes came from the generator itself, a word per four elements, `random_`:
about 10 ms of a 235 ms bf16 step at the reference preset.)

`relu_dropout`: `dropout(F.relu(x))`; `dropout_add`: `h + dropout(x)`. On CPUs (where a C++
compiler is found) all three run as one pass each way (`native_dropout.cpp`, built once per machine,
in AVX-512 registers where the processor has them, else in portable code: the lanes made and
compared, the ReLU, the scaled mask and the add applied together, where PyTorch's path makes the
lanes, then the mask in three int16 passes, applies it in a fourth, and a ReLU or the add takes a
pass each way), with PyTorch's arithmetic: the same bits either way.

`thread_generator`: the generator `dropout` draws from in this thread when given none (the shards
of a training step, each in its own thread, draw from their own: `still.train.shards`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LANES = 65536  # 16-bit lanes
# SplitMix64's increment and multipliers, as int64 (PyTorch's integers wrap around as uint64 would)
_GOLDEN, _MIX1, _MIX2 = (c - 2**64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # 1.0 as an int16 bit pattern
_local = threading.local()
NATIVE = True
"""fp32 and bf16 dropout on the CPU by `native_dropout.cpp` where it can run (the same bits as the
PyTorch path, which False takes; tests compare the two)."""


@contextlib.contextmanager
def thread_generator(generator: torch.Generator | None) -> Iterator[None]:
    """Within the block, `dropout` in this thread draws from `generator` when given none (None: the
    global generator). Other threads are not affected."""
    previous = getattr(_local, "generator", None)
    _local.generator = generator
    try:
        yield
    finally:
        _local.generator = previous


def dropout(x: torch.Tensor, p: float, training: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero each element of `x` with probability p (rounded to a multiple of 2^-16 on the CPU) and
    scale the others by 1 / (1 - p); the identity when not `training` or p = 0."""
    return _dropped(x, p, training, generator, lambda: x)


def relu_dropout(x: torch.Tensor, p: float, training: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """`dropout(F.relu(x), p, training, generator)`, the ReLU in the dropout's pass each way where
    the kernel runs; without gradients, not training or p = 0 the ReLU alone (in place when no
    gradient is recorded)."""
    return _dropped(x, p, training, generator, lambda: F.relu(x, inplace=not torch.is_grad_enabled()), relu=True)


def dropout_add(h: torch.Tensor, x: torch.Tensor, p: float, training: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """`h + dropout(x, p, training, generator)` (a residual connection), the add in the dropout's
    pass where the kernel runs (fp32 h, x fp32 or bf16 of h's shape): forward, and backward with the
    rounding of the sum's gradient to x's dtype that autograd would make before the dropout's."""
    return _dropped(x, p, training, generator, lambda: h + x, residual=h)


def _dropped(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None,
             untouched: Callable[[], torch.Tensor], relu: bool = False,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """What `dropout`, `relu_dropout` and `dropout_add` share: p checked, `untouched()` when not
    `training` or p = 0, else `_masked` (on the CPU eagerly inside torch.compile: a graph break, so
    that the masks come from this thread's generator, as without it; on other devices `_masked` is
    PyTorch's dropout, which the compiler traces and fuses with its neighbours)."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0:
        return untouched()
    if torch.compiler.is_compiling():
        if x.device.type != "cpu":  # PyTorch's dropout, as `_masked` takes there, traced into the graph
            y = F.dropout(F.relu(x) if relu else x, p, True)
            return y if residual is None else residual + y
        return _masked_eagerly(x, p, generator, relu=relu, residual=residual)
    return _masked(x, p, generator, relu=relu, residual=residual)


def _masked(x: torch.Tensor, p: float, generator: torch.Generator | None, relu: bool = False,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """`dropout` (of `F.relu(x)` where `relu`; added to `residual` where given) in training, 0 < p <= 1."""

    def added(y: torch.Tensor) -> torch.Tensor:
        return y if residual is None else residual + y

    if p == 1:
        return added(torch.zeros_like(x))
    if generator is None:
        generator = getattr(_local, "generator", None)
    if x.device.type != "cpu" or generator is not None and generator.device.type != "cpu":
        return added(F.dropout(F.relu(x) if relu else x, p, True))
    dropped = round(p * LANES)  # lanes below this value are dropped
    if dropped == 0:  # p < 2^-17: nothing is dropped
        return added(F.relu(x) if relu else x.clone())
    if dropped == LANES:  # p > 1 - 2^-17: everything is
        return added(torch.zeros_like(x))
    scale = LANES / (LANES - dropped)
    seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))  # the call's one draw
    threshold = dropped - LANES // 2  # lanes >= threshold are kept
    if NATIVE and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous():
        from still.compressive import native

        if native.dropout_library() is not None:
            if residual is None:
                return _NativeDropout.apply(x, seed, threshold, scale, relu)
            if (residual.dtype == torch.float32 and residual.shape == x.shape and residual.is_contiguous()
                    and not relu):
                return _NativeDropoutAdd.apply(residual, x, seed, threshold, scale)
    lanes = _lanes(seed, x.numel()).view(x.shape)  # uniform in [-2^15, 2^15)
    if relu:
        x = F.relu(x)
    # the mask as numbers, in int16 passes: a boolean mask and `where` (or a bool-to-float cast) took
    # 5-7x as long as a product per element (docs/performance.md, session 12)
    kept = lanes.clamp_(threshold - 1, threshold).sub_(threshold - 1)  # 1 kept, 0 dropped (int16)
    if x.dtype in _ONE_BITS:  # the bits of 1.0 in x's 16-bit dtype: kept * those bits, read as that dtype
        mask = kept.mul_(_ONE_BITS[x.dtype]).view(x.dtype)  # 1. or 0.
    else:
        mask = kept.to(x.dtype)
    return added(_MaskedScale.apply(x, mask, scale))


def _lanes(seed: int, n: int) -> torch.Tensor:
    """The 16-bit lanes (n,) int16 of `seed`, as `native_dropout.cpp` makes them: word w (from 0) is
    SplitMix64 of seed + (w + 1) * golden, and element 4 w + j takes its bits 16 j .. 16 j + 15."""
    z = torch.arange(1, (n + 3) // 4 + 1, dtype=torch.int64).mul_(_GOLDEN).add_(seed)
    z = (z ^ _shifted_right(z, 30)).mul_(_MIX1)
    z = (z ^ _shifted_right(z, 27)).mul_(_MIX2)
    return (z ^ _shifted_right(z, 31)).view(torch.int16)[:n]


def _shifted_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z >> bits as unsigned 64-bit numbers (PyTorch shifts int64 arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


# (PyTorch's flag behind `is_compiling` is global while a thread compiles, so another shard thread
# may come here too: this runs eagerly either way)
_masked_eagerly = torch.compiler.disable(_masked)


class _MaskedScale(torch.autograd.Function):
    """x * mask * scale for a mask of ones and zeros in x's dtype, in one pass each way: `addcmul`
    onto a zero computes x * 1 * scale in float32 (or wider) and rounds once, so the result is
    round(x * scale) or +0, what where(mask, x * scale, 0) gives, bit for bit, also in bf16 and fp16
    (where a product by the mask, then by the scale, took two passes: docs/performance.md, session 14).
    The gradient likewise: round(grad * scale) or +0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.addcmul(x.new_zeros(()), x, mask, value=scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, mask, value=ctx.scale), None, None


def _threads(n: int) -> int:
    """The threads a dropout kernel call of n elements takes: PyTorch's intra-op threads (at most
    `native.MAX_THREADS`) from 2^20 elements, else one. The kernel starts its helpers each call: for
    the teacher's (128, 1200) of the MNIST recipe two threads gained nothing measurable, and a thread
    that must wait for a busy core costs more than the pass (docs/performance.md, session 30)."""
    from still.compressive import native

    return 1 if n < 2**20 else min(torch.get_num_threads(), native.MAX_THREADS)


def _succeeded(code: int) -> None:
    """A dropout kernel's return code: 0, or an error (not reached: the library said it runs here)."""
    if code != 0:
        raise RuntimeError(f"the dropout kernel failed ({code})")


class _NativeDropout(torch.autograd.Function):
    """`_MaskedScale` of the mask of `seed`'s lanes (after `F.relu` where `relu`) by
    `native_dropout.cpp`: one pass each way, the same bits. Keeps the seed and, after a ReLU, its input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, threshold: int, scale: float, relu: bool) -> torch.Tensor:
        from still.compressive import native

        out = torch.empty_like(x)
        _succeeded(native.dropout_library().still_dropout(
            x.data_ptr(), seed, x.numel(), threshold, scale, int(relu), int(x.dtype == torch.bfloat16),
            out.data_ptr(), _threads(x.numel())))
        ctx.save_for_backward(x if relu else None)
        ctx.seed, ctx.threshold, ctx.scale = seed, threshold, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from still.compressive import native

        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        _succeeded(native.dropout_library().still_dropout_backward(
            grad.data_ptr(), ctx.seed, None if x is None else x.data_ptr(), grad.numel(), ctx.threshold,
            ctx.scale, int(grad.dtype == torch.bfloat16), out.data_ptr(), _threads(grad.numel())))
        return out, None, None, None, None


class _NativeDropoutAdd(torch.autograd.Function):
    """h + `_MaskedScale` of x by the mask of `seed`'s lanes (fp32 h, x fp32 or bf16) by
    `native_dropout.cpp`: the dropout's output rounded to x's dtype and added in fp32, one pass; the
    backward gives h the sum's gradient and x the dropout's backward of that gradient rounded to
    x's dtype, one pass."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, x: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:
        from still.compressive import native

        out = torch.empty_like(h)
        _succeeded(native.dropout_library().still_dropout_add(
            h.data_ptr(), x.data_ptr(), seed, x.numel(), threshold, scale, int(x.dtype == torch.bfloat16),
            out.data_ptr(), _threads(x.numel())))
        ctx.seed, ctx.threshold, ctx.scale, ctx.x_dtype = seed, threshold, scale, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from still.compressive import native

        grad = grad.float().contiguous()
        grad_x = torch.empty(grad.shape, dtype=ctx.x_dtype, device=grad.device)
        _succeeded(native.dropout_library().still_dropout_add_backward(
            grad.data_ptr(), ctx.seed, grad.numel(), ctx.threshold, ctx.scale, int(ctx.x_dtype == torch.bfloat16),
            grad_x.data_ptr(), _threads(grad.numel())))
        return grad, grad_x, None, None, None


class Dropout(nn.Module):
    """`nn.Dropout` with `dropout`'s mask."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
