"""The machine's matrix-multiply throughput: the denominator of model FLOP utilisation (MFU).

Large square matmuls on all threads (or the GPU), fp32 and bf16; the best of several timed runs
after a warm-up. A matmul of (n, n) by (n, n) costs 2 n^3 FLOP.
"""

from __future__ import annotations

import os
import time
from typing import NoReturn

import torch

from still.errors import StillError
from still.train.progress import format_size


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def matmul_flops(dtype: torch.dtype, n: int = 4096, repeats: int = 5, device: torch.device | None = None) -> float:
    """Best FLOP/s over `repeats` timed (n x n) @ (n x n) products."""
    device = device or torch.device("cpu")
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak(n: int | None = None, repeats: int = 5, device: torch.device | None = None) -> dict[str, float | str | int]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = n or (8192 if device.type == "cuda" else 2048)
    needed = 3 * 4 * n * n  # a, b and the product, in fp32 (bf16's take half)
    if needed > (total := _memory(device)):
        _too_large(n, needed, device, f"more than its {format_size(total)}")
    try:
        return {"device": device_name(device), "threads": torch.get_num_threads(), "n": n,
                "fp32": matmul_flops(torch.float32, n, repeats, device),
                "bf16": matmul_flops(torch.bfloat16, n, repeats, device)}
    except RuntimeError as e:  # (torch.OutOfMemoryError on a GPU; on the CPU the allocator's RuntimeError)
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        _too_large(n, needed, device, "more than it has free")


def _memory(device: torch.device) -> float:
    """The device's memory in bytes (infinite where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return float("inf")


def _too_large(n: int, needed: int, device: torch.device, why: str) -> NoReturn:
    raise StillError(f"size {n}: its three {n} x {n} fp32 matrices ({format_size(needed)}) do not fit in the "
                     f"{'GPU' if device.type == 'cuda' else 'machine'}'s memory, {why}; choose a smaller size")
