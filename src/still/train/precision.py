"""Numeric precision of a run: fp32, or bf16 autocast with fp32 master weights.

With "bf16", matrix products, convolutions and attention run in bfloat16 under `torch.autocast`
(on the CPU and on CUDA); the parameters, the optimizer state, the residual stream kept as memory
and the losses stay in float32. bfloat16 has float32's exponent range, so no loss scaling is
needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from still.errors import check

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    check(precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """The context that computes in `precision` on `device` (a no-op for fp32)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _cpu_has_bf16() -> bool | None:
    """Whether this CPU has bf16 matrix instructions that PyTorch's products use (AVX-512 BF16, AMX,
    Arm's BF16), as oneDNN reads it; None where this PyTorch cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def bf16_slower(precision: str, device: torch.device | str) -> str | None:
    """Why `precision` would make PyTorch's products on `device` slower than fp32, or None: bf16 on a
    CPU without bf16 matrix instructions, where PyTorch emulates them (a reference-preset training
    step 10x slower than fp32 with PyTorch held to AVX2, docs/performance.md, session 34)."""
    if precision != "bf16" or torch.device(device).type != "cpu" or _cpu_has_bf16() is not False:
        return None
    return ("this CPU has no bf16 matrix instructions (AVX-512 BF16, AMX or Arm's BF16), so PyTorch emulates "
            "bf16 products: several times slower than fp32 here (--precision fp32)")


def this_threads_modes(device: torch.device | str) -> Callable[[], contextlib.AbstractContextManager]:
    """This thread's grad mode and autocast on `device`, as a context for another thread to enter:
    both are thread-local in PyTorch, so a worker thread otherwise computes with gradients and
    without autocast whatever its caller's `no_grad` and `autocast`."""
    device_type = torch.device(device).type
    grad = torch.is_grad_enabled()
    enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

    def enter() -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.set_grad_enabled(grad))
        stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        return stack

    return enter
