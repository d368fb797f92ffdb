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
