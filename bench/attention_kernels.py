"""The training attention's hand-written fp32 kernels against PyTorch's path, in one process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/attention_kernels.py [--tune=-march=x86-64-v3] [--step]

Times `_AttentionOutputs` forward and backward in fp32 at a reference-preset shard's shapes (4 heads,
batch 8, segment 128, 384 keys, head dim 64; one thread, as each of `still lm train`'s two shards
has), alternating `attention.NATIVE_FP32` on and off, and with `--step` whole fp32 training steps of
the reference preset (two shards) the same way. `--tune` builds the hand-written libraries with other
flags than -march=native, as for another processor: '-march=x86-64-v3' (AVX2 with FMA, no AVX-512).
PyTorch's own kernels follow the processor; to time them as on an AVX2 machine too, set
`ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from still.bench import at_least_one, run_script  # noqa: E402
from still.compressive import attention, native  # noqa: E402
from still.compressive.attention import _AttentionOutputs, causal_mask_bias  # noqa: E402


def attention_ms(repeats: int) -> tuple[float, float]:
    """Median ms of `repeats` forwards and backwards (after 3 untimed) at a reference shard's shapes."""
    h, b, l, k_len, d = 4, 8, 128, 384, 64
    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=generator)

    operands = [normal(h * b, l, d, scale=0.125), normal(h * b, k_len, d), normal(h * b, k_len, d),
                normal(h, b * l, d, scale=0.125), normal(h, k_len, d)]  # q_content, k, v, q_position, r
    bias = causal_mask_bias(l, k_len, torch.device("cpu"), torch.float32)
    grad = normal(h * b, l, d)
    times = []
    for i in range(repeats + 3):
        qc, k, v, qp, r = (t.clone().requires_grad_() for t in operands)
        start = time.perf_counter()
        out = _AttentionOutputs.apply(qc, k, v, qp, r, bias)
        middle = time.perf_counter()
        out.backward(grad)
        end = time.perf_counter()
        if i >= 3:
            times.append((middle - start, end - middle))
    return tuple(1e3 * statistics.median(t[j] for t in times) for j in (0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", help="build the hand-written libraries with these flags instead of -march=native: "
                        "'-march=x86-64-v3' (AVX2 with FMA, no AVX-512)")
    parser.add_argument("--rounds", type=at_least_one, default=3,
                        help="rounds alternating the kernel and PyTorch's path")
    parser.add_argument("--repeats", type=at_least_one, default=15, help="timed forwards and backwards a round")
    parser.add_argument("--step", action="store_true",
                        help="also time fp32 training steps (reference preset, 2 shards)")
    parser.add_argument("--steps", type=at_least_one, default=8, help="timed training steps a round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="still-bench-native-") as built:
        if args.tune is not None:  # built into a directory of this run's (not the user's cache)
            native.TUNE = tuple(args.tune.split())
            native.cache_root = lambda: Path(built)
        run(args)


def run(args: argparse.Namespace) -> None:
    if native.attention_fp32_library() is None:
        sys.exit("the fp32 attention kernels cannot run with this build (no compiler, or neither AVX-512 nor FMA)")
    import reference_speed
    from decode_steps import _cpu

    threads = torch.get_num_threads()
    build = "-march=native" if args.tune is None else repr(args.tune)
    print(f"machine: {_cpu()}, {threads} threads; libraries built with {build}; PyTorch's kernels: "
          f"{torch.backends.cpu.get_cpu_capability()}")
    rows: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for kernel in (True, False):
            attention.NATIVE_FP32 = kernel
            name = "kernel" if kernel else "PyTorch"
            torch.set_num_threads(1)
            forward, backward = attention_ms(args.repeats)
            torch.set_num_threads(threads)
            rows.setdefault(f"attention forward, ms ({name})", []).append(forward)
            rows.setdefault(f"attention backward, ms ({name})", []).append(backward)
            if args.step:
                rate = reference_speed.train_rate("fp32", args.steps, 6, 0, shards=2)[0]
                rows.setdefault(f"training step fp32, 2 shards, tokens/s ({name})", []).append(rate)
    attention.NATIVE_FP32 = True
    print(f"medians of {args.rounds} rounds (each round's figure a median of {args.repeats} calls or "
          f"{args.steps} steps)")
    for name, values in rows.items():
        print(f"  {name:<52} {statistics.median(values):9.2f}   ({', '.join(f'{v:.2f}' for v in values)})")
    for what, faster in (("attention forward, ms", False), ("attention backward, ms", False),
                         ("training step fp32, 2 shards, tokens/s", True)):
        kernel, plain = rows.get(f"{what} (kernel)"), rows.get(f"{what} (PyTorch)")
        if kernel and plain:
            ratio = statistics.median(kernel) / statistics.median(plain)
            print(f"  {what.split(',')[0]}: the kernel {ratio if faster else 1 / ratio:.3f}x as fast as PyTorch's path")


if __name__ == "__main__":
    run_script(main)
