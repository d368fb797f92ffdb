"""The optimizer's step alone: PyTorch's loop over tensors, its foreach and its fused implementations.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/optimizer_step.py [--repeats 30] [--threads 2]

For the Compressive Transformer at the peer benchmark's size (d_model 128, 4 layers, d_ff 512:
1.1M parameters) and at the `reference` preset (d_model 256, 6 layers, d_ff 1024: 6.7M), with
random gradients: the median time of `step()` for Adam, AdamW and SGD (Nesterov momentum), each
implementation on a fresh model, in one process. `still.train.optim.build_optimizer` uses the fused
kernels where the device has them (Adam and AdamW since session 7, SGD since session 46;
`docs/performance.md`).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from still.bench import at_least_one, run_script  # noqa: E402
from still.compressive import CompressiveConfig, CompressiveTransformer  # noqa: E402

SIZES = {"peer (d 128, 4 layers)": dict(d_model=128, n_layers=4, d_ff=512),
         "reference (d 256, 6 layers)": dict(d_model=256, n_layers=6, d_ff=1024)}
OPTIMIZERS = {"adam": lambda ps, **kw: torch.optim.Adam(ps, lr=1e-3, **kw),
              "adamw": lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-3, **kw),
              "sgd": lambda ps, **kw: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, **kw)}
IMPLEMENTATIONS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def step_ms(size: dict, optimizer: str, implementation: str, repeats: int) -> float:
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=65, n_heads=4, **size))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = OPTIMIZERS[optimizer](list(model.parameters()), **IMPLEMENTATIONS[implementation])
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=at_least_one, default=30, help="timed steps of each; their median counts")
    parser.add_argument("--threads", type=at_least_one, default=2, help="CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} steps (ms)\n")
    print("| model | optimizer | " + " | ".join(IMPLEMENTATIONS) + " | loop / fused |")
    print("|---|---|" + "---:|" * (len(IMPLEMENTATIONS) + 1))
    for name, size in SIZES.items():
        for optimizer in OPTIMIZERS:
            ms = {impl: step_ms(size, optimizer, impl, args.repeats) for impl in IMPLEMENTATIONS}
            cells = " | ".join(f"{ms[impl]:.2f}" for impl in IMPLEMENTATIONS)
            print(f"| {name} | {optimizer} | {cells} | {ms['loop'] / ms['fused']:.2f}x |", flush=True)


if __name__ == "__main__":
    run_script(main)
