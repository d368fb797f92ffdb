"""The hand-written kernels where no thread can be started, for a process with a shim preloaded
whose `pthread_create` fails with EAGAIN, as at the system's limit on threads
(`test_native.py::test_the_kernels_finish_on_the_calling_thread_where_no_thread_can_be_started`).
An exception out of a library's entry point ended such a process (std::terminate); now the
kernels run their parts on the calling thread, and a decoder its step on one thread.

    python no_threads_workload.py SHIM CACHE TUNE FLAGS   # the libraries as the test's process built them

Prints, as its last line, "same": each result as with the threads.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch

from still.compressive import native
from still.compressive.attention import RelativeMultiHeadAttention
from still.compressive.decode import Decoder
from still.compressive.model import CompressiveConfig, CompressiveTransformer
from still.layers import dropout

shim, cache, tune, flags = sys.argv[1:]
native.cache_root = lambda: Path(cache)
native.TUNE, native.FLAGS = tuple(tune.split()), tuple(flags.split())
fail = ctypes.CDLL(shim).still_test_fail_threads  # (loaded already: the same library)
torch.set_num_threads(2)  # the kernels ask for 2 threads, the decoder too; OpenMP's started here, before they
torch.randn(256, 256) @ torch.randn(256, 256)  # fail (its team of one size all along: a smaller one ends threads)
torch.randn(1 << 20).exp()
assert native.library() and native.attention_fp32_library() and native.dropout_library(), "not built"


def attention() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    module = RelativeMultiHeadAttention(64, 2).train()  # fp32: still_attention_weights_fp32 and _grads_fp32
    x = torch.randn(2, 32, 64, requires_grad=True)
    out = module(x, torch.randn(2, 32, 64)).out
    out.square().sum().backward()
    return out.detach(), x.grad


def dropped() -> torch.Tensor:
    torch.manual_seed(0)
    return dropout(torch.randn(1 << 20), 0.1, True)  # still_dropout in 2 parts (`layers._threads`)


model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=32, n_layers=1, n_heads=2, d_ff=32,
                                                 mem_len=4, c_mem_len=2, compression_rate=2)).eval()


def steps() -> torch.Tensor:
    with torch.no_grad():
        decoder = Decoder(model, None, batch=1, compile=True, threads=2, native=True)
        logits = torch.stack([decoder.step(torch.tensor([t])) for t in range(8)])
    return logits, decoder.native.threads


expected = (attention(), dropped(), steps())
assert expected[2][1] == 2
fail(1)
got = (attention(), dropped(), steps())
fail(0)
assert all(torch.equal(a, b) for a, b in zip(expected[0], got[0], strict=True)), "the attention differs"
assert torch.equal(expected[1], got[1]), "the dropout differs"
assert got[2][1] == 1, got[2][1]  # the decoder on one thread: its sums in another order
torch.testing.assert_close(got[2][0], expected[2][0], atol=1e-5, rtol=1e-5)
print("same")
