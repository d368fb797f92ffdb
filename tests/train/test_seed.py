import os
import random

import numpy as np
import pytest
import torch

from still.cli import _threads
from still.errors import StillError
from still.train.seed import rng_state, seed_everything, set_rng_state


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_a_saved_rng_state_repeats_every_generators_draws():
    seed_everything(3)
    state = rng_state()
    first = draws()
    draws()
    set_rng_state(state)
    assert draws() == first
    seed_everything(3)
    assert draws() == first


def test_cuda_states_of_more_gpus_than_here_resume_on_the_first_ones(monkeypatch):
    """A run saves one CUDA generator state a GPU it saw; resumed where there are fewer GPUs, each
    GPU here takes the state of the GPU of its number (PyTorch refuses more states than GPUs)."""
    saved = [torch.tensor([i], dtype=torch.uint8) for i in range(4)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    state = rng_state()
    assert state["cuda"] == saved
    set_rng_state(state)
    assert restored == saved[:2]


@pytest.mark.parametrize("call", ["seed_everything", "cli"])
def test_deterministic_mode_sets_cublas_workspace_before_cuda_starts(monkeypatch, call):
    """`--deterministic` (the CLI) and `seed_everything(deterministic=True)` both set the cuBLAS
    workspace that deterministic products on a GPU need, unless the user set one."""
    modes = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", modes.append)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)

    def deterministic():
        if call == "cli":
            _threads(None, deterministic=True)
        else:
            seed_everything(0, deterministic=True)

    deterministic()
    assert modes == [True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_seeds_outside_torchs_range_or_not_whole_are_named_and_none_share_numpys_stream():
    """seed_everything raised NumPy's and PyTorch's own errors for 2**64, None or 1.5, took -1, and
    gave 2**32 NumPy's stream of 0 (a probe)."""
    for bad in (2**64, -1, 1.5, None, "3", True):
        with pytest.raises(StillError, match="seed must be a whole number from 0 to 2\\*\\*64 - 1"):
            seed_everything(bad)
    seed_everything(np.int64(3))
    three = draws()
    seed_everything(3)
    assert draws() == three
    seed_everything(0)
    zero = float(np.random.rand())
    for seed in (2**32, 2**64 - 1):
        seed_everything(seed)
        assert float(np.random.rand()) != zero


def test_seeds_32_bits_apart_draw_different_torch_numbers():
    """torch's CPU generator keeps a seed's low 32 bits: s and s + 2**32 drew the same (a probe)."""
    seen = []
    for seed in (0, 1, 2**32, 2**32 + 1, 2**64 - 1, 2**64 - 2**32 - 1, 2**32 - 1):
        seed_everything(seed)
        seen.append(tuple(torch.rand(4).tolist()))
    assert len(set(seen)) == len(seen)
    seed_everything(7)
    assert torch.initial_seed() == 7  # (below 2**32, as before)


@pytest.mark.parametrize("threads", [0, -1, "2", 1.5, True])
def test_a_thread_count_that_is_no_whole_number_from_1_is_named(threads):
    with pytest.raises(StillError, match=f"threads must be a whole number >= 1 or None, got {threads!r}"):
        seed_everything(0, threads=threads)
