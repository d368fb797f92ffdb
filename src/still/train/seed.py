"""One entry point for seeding, and a deterministic mode."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from still.errors import check, whole

MAX_SEED = 2**32 - 1  # NumPy's largest; the seeds made from a seed (times 1,000,003, plus an epoch) stay in int64


def check_seed(seed: int, name: str = "seed") -> None:
    """Refuse (`StillError`) a seed outside [0, MAX_SEED]: larger ones overflowed PyTorch's int64 in
    the seeds made from them."""
    check(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED,
          f"{name} must be a whole number from 0 to {MAX_SEED}, got {seed!r}")


def seed_everything(seed: int, deterministic: bool = False, threads: int | None = None) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA).

    With `deterministic`, also ask PyTorch for deterministic algorithms (erroring on ops that have
    none) and fix the thread count, so two runs on the same machine give identical numbers.
    `seed` is a whole number from 0 to 2**64 - 1 (a `StillError` otherwise; the recipes' seeds are
    held to `MAX_SEED` by `check_seed`, and seed stages with seed + 1). torch's CPU generator keeps
    32 bits: a larger seed reaches it folded into 32 (every bit counts; two of the 2**64 seeds may
    still share torch's numbers, as two of any 2**32 + 1 must).
    """
    check(whole(seed) and 0 <= seed < 2**64,
          f"seed must be a whole number from 0 to 2**64 - 1 (torch's range), got {seed!r}")
    check(threads is None or (whole(threads) and threads >= 1),
          f"threads must be a whole number >= 1 or None, got {threads!r}")
    seed = int(seed)
    random.seed(seed)
    # NumPy takes 32 bits: a larger seed as its two words, so that no two seeds share a stream
    np.random.seed(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32])
    torch.manual_seed(seed if seed < 2**32 else _fold32(seed))
    if threads is not None:
        torch.set_num_threads(int(threads))
    if deterministic:
        deterministic_algorithms()


def _fold32(seed: int) -> int:
    """A seed of 2**32 or more as 32 bits, for torch's CPU generator, which keeps the low 32 bits
    alone (a probe: seeds s and s + 2**32 drew the same numbers): SplitMix64's finaliser, whose low
    word depends on every bit of the seed."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0xFFFFFFFF


def deterministic_algorithms() -> None:
    """PyTorch's deterministic algorithms (an error for operators that have none), with the cuBLAS
    workspace setting they need on CUDA (read when cuBLAS starts; without it the first product on a
    GPU fails), and cuDNN's benchmark off."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """Every RNG state a resumed run needs: Python, NumPy, torch CPU (and CUDA where present)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # one state a GPU the run saw; fewer here: the first ones
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
