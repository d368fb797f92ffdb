"""The bf16 training attention's weights, one shard's worth, on each of its paths.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/attention_weights.py [--repeats 30] [--threads 1]

`attention._AttentionWeights` forward (and forward + backward) at the reference preset's shapes for
one shard of a sharded step (`still lm train --preset reference`: 4 heads x 8 rows, 128 queries over
384 keys, head dim 64, the causal mask), under bf16 autocast, on

    bf16 scores       PyTorch's path: both products, the mask and the softmax in bf16 (five passes)
    fp32 position     `attention.FP32_POSITION_SCORES`: the position product, sum and softmax in fp32
    native, AMX tiles     `attention.NATIVE_SCORES` (the default where it runs): `native_attention.cpp`,
                          every score in fp32 on AMX tiles, the weights written once
    native, AVX-512 bf16  the same kernel with its products on AVX-512 bf16's dot products (what
                          runs on processors without AMX, such as AMD's Zen 4 and 5)

(the native paths where they can run here).

Prints the median milliseconds of each (interleaved, after warm-up), and how far each path's
weights lie from the float64 computation from the same bf16 operands (largest absolute difference).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from still.bench import at_least_one, run_script  # noqa: E402
from still.compressive import attention, native  # noqa: E402
from still.compressive.attention import _AttentionWeights, _shifted_view, causal_mask_bias  # noqa: E402
from still.train.results import format_table  # noqa: E402

PATHS = {"bf16 scores": (False, False, None), "fp32 position": (False, True, None),
         "native, AMX tiles": (True, False, "AMX tiles"), "native, AVX-512 bf16": (True, False, "AVX-512 bf16")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=at_least_one, default=30, help="timed calls of each; their median counts")
    parser.add_argument("--threads", type=at_least_one, default=1, help="1: as a shard runs it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, b, l, k_len, d = 4, 8, 128, 384, 64
    bf16 = torch.bfloat16
    torch.manual_seed(0)
    q_content, k, q_position, r = (t.to(bf16) for t in (
        0.3 * torch.randn(h * b, l, d), torch.randn(h * b, k_len, d), 0.3 * torch.randn(h, b * l, d),
        torch.randn(h, k_len, d)))
    bias = causal_mask_bias(l, k_len, torch.device("cpu"), bf16)
    position = torch.bmm(q_position.double(), r.double().transpose(1, 2)).view(h * b, l, k_len)
    scores = _shifted_view(position) + torch.bmm(q_content.double(), k.double().transpose(1, 2))
    exact = (scores.view(h, b, l, k_len) + bias.double()).view(h * b, l, k_len).softmax(-1)
    grad = torch.randn(h * b, l, k_len).to(bf16)
    paths = {name: flags for name, flags in PATHS.items()
             if flags[2] is None or native.allow_tiles(flags[2] == "AMX tiles") == flags[2]}

    def run(flags: tuple[bool, bool, str | None], backward: bool) -> torch.Tensor:
        attention.NATIVE_SCORES, attention.FP32_POSITION_SCORES, products = flags
        if products is not None:
            native.allow_tiles(products == "AMX tiles")
        inputs = [t.detach().requires_grad_(backward) for t in (q_content, k, q_position, r)]
        with torch.autocast("cpu", dtype=bf16), torch.set_grad_enabled(backward):
            weights = _AttentionWeights.apply(*inputs, bias)
        if backward:
            weights.backward(grad)
        return weights

    times: dict[tuple[str, bool], list[float]] = {}
    for backward in (False, True):
        for flags in paths.values():
            for _ in range(3):
                run(flags, backward)
        for _ in range(args.repeats):
            for name, flags in paths.items():
                start = time.perf_counter()
                run(flags, backward)
                times.setdefault((name, backward), []).append(time.perf_counter() - start)
    rows = []
    for name, flags in paths.items():
        error = (run(flags, False).double() - exact).abs().max()
        rows.append({"path": name, "forward ms": f"{statistics.median(times[name, False]) * 1e3:.3f}",
                     "forward + backward ms": f"{statistics.median(times[name, True]) * 1e3:.3f}",
                     "largest |w - exact|": f"{float(error):.2e}"})
    print(f"({h * b}, {l}, {k_len}) weights, head dim {d}, {args.threads} thread(s), medians of {args.repeats}; "
          f"torch {torch.__version__}")
    print(format_table(rows))


if __name__ == "__main__":
    run_script(main)
