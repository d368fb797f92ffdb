"""The hand-written libraries' every kernel run once or more, for a process under AddressSanitizer
(`test_native.py::test_the_hand_written_kernels_touch_only_their_own_memory`): a small
Compressive Transformer trained a few steps in fp32 and in bf16 autocast with dropout (the
training attention's kernels forward and backward, the reconstruction loss's, the dropout
kernels), then prompts and decoding steps in fp32 and bf16, on two threads.

    python sanitized_workload.py "FLAGS"   # the libraries built with native.FLAGS + FLAGS

Prints, as its last line, a JSON object: each library that could run here, and how many times
each of its entry points was called. Shapes are those the kernels take: d_head 32, segments of 32,
32 + 32 memories (keys 96 long).
"""

from __future__ import annotations

import collections
import json
import os
import sys

import torch
import torch.nn.functional as F

from still.compressive import native
from still.compressive.attention import content_attention
from still.compressive.decode import Decoder
from still.compressive.generate import generate
from still.compressive.model import CompressiveConfig, CompressiveTransformer

ENTRY_POINTS = {  # what each library does for the model (not its queries of the processor)
    "step": ("still_decoder_step", "still_decoder_run", "still_prompt_attention"),
    "attention": ("still_attention_weights", "still_attention_grads", "still_attention_backward",
                  "still_content_attention", "still_content_attention_grads", "still_squared_error",
                  "still_squared_error_grad"),
    "attention fp32": ("still_attention_weights_fp32", "still_attention_grads_fp32"),
    "dropout": ("still_dropout", "still_dropout_backward", "still_dropout_add", "still_dropout_add_backward"),
}


def counted(libraries: dict[str, object]) -> collections.Counter:
    """Each entry point of the libraries that loaded, wrapped to count its calls."""
    calls: collections.Counter = collections.Counter()
    for name, lib in libraries.items():
        if lib is None:
            continue
        for function in ENTRY_POINTS[name]:
            setattr(lib, function, _counting(getattr(lib, function), function, calls))
    return calls


def _counting(call, name: str, calls: collections.Counter):
    def wrapper(*args):
        calls[name] += 1
        return call(*args)

    return wrapper


def run() -> None:
    os.environ.pop("LD_PRELOAD", None)  # the compiler this process starts runs without the sanitizer's runtime
    native.FLAGS = (*native.FLAGS, *sys.argv[1].split())
    libraries = {"step": native.library(), "attention": native.attention_library(),
                 "attention fp32": native.attention_fp32_library(), "dropout": native.dropout_library()}
    calls = counted(libraries)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    for compression in ("conv", "max"):
        model = CompressiveTransformer(CompressiveConfig(
            vocab_size=21, d_model=128, n_layers=2, n_heads=4, d_ff=256, mem_len=32, c_mem_len=32,
            compression_rate=2, compression=compression, dropout=0.1))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        state = None
        for bf16 in (False, False, True, True):  # the memories overflow from the second step
            tokens = torch.randint(0, 21, (3, 33))
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = model(tokens[:, :-1], state)
                loss = F.cross_entropy(out.logits.float().flatten(0, 1), tokens[:, 1:].flatten())
                if out.compression_loss is not None:
                    loss = loss + out.compression_loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            state = out.state.detach()
        model.eval()
        for bf16 in (False, True):
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                for batch, prompt_len in ((1, 70), (3, 7)):  # a prompt of several segments, and of part of one
                    prompt = torch.randint(0, 21, (batch, prompt_len))
                    assert len(list(generate(model, prompt, 40, segment_len=32, compile=True, top_p=0.9))) == 40
            decoder = Decoder(model, state, 3, compile=True, threads=2,
                              dtype=torch.bfloat16 if bf16 else None, native=True)
            for _ in range(40):  # past the compressions of the memory ring
                decoder.step(torch.randint(0, 21, (3,)))
    # the reconstruction loss's approximation with gradients over keys a multiple of 32 long (the models
    # above compress 32 memories into 16), forward and backward, queries included
    q, k, v = (torch.randn(6, 32, 32).bfloat16().requires_grad_() for _ in range(3))
    content_attention(q, k, v).float().square().sum().backward()
    print(json.dumps({"loaded": [name for name, lib in libraries.items() if lib is not None],
                      "instrumented": [name for name, lib in libraries.items() if lib is not None
                                       and b"__asan_report" in open(lib._name, "rb").read()],
                      "calls": calls}))


if __name__ == "__main__":
    run()
