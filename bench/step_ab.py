"""Before and after: step times of two source trees, interleaved, each measurement a fresh process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/step_ab.py OLD_SRC NEW_SRC [--rounds 3]

OLD_SRC and NEW_SRC are `src` folders (for example of `git worktree add /tmp/old COMMIT`: then
/tmp/old/src) imported through PYTHONPATH. The model is the peer benchmark's configuration
(bench/compressive_peers.py: d_model 128, 4 layers, 4 heads, d_ff 512, segment 128, memory 128 +
compressed 128 at rate 4, 1-D convolution, attention reconstruction, dropout 0, batch 16); with
`--size shard`, one shard of the reference preset's sharded step (`still lm train --preset reference`:
d_model 256, 6 layers, d_ff 1024, dropout 0.1, vocabulary 86) with 8 rows on one thread.

    train   forward with the memories carried, cross entropy + reconstruction loss, backward, AdamW
    eval    forward + cross entropy in eval mode, no gradients
    each in fp32 and under bf16 autocast; 8 warm-up steps (the memories fill), then the median of
    --steps timed steps (30 for eval). Every measure runs old and new once a round, the order
    alternating from round to round (old then new, new then old, ...), so that a drift in the
    machine's load is not counted against the side that always ran second.

Prints every measurement, then the median over rounds of each and the change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from still.bench import at_least_one, run_script
from still.errors import StillError, fail

WORKER = r"""
import statistics, sys, time
import torch
import torch.nn.functional as F
from still.compressive import CompressiveConfig, CompressiveTransformer

mode, precision, steps, threads, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
torch.manual_seed(0)
if size == "shard":
    from still.config import replace
    from still.recipes.lm import PRESETS
    vocab, rows = 86, 8
    model = CompressiveTransformer(replace(PRESETS["reference"].model, vocab_size=vocab))
else:
    vocab, rows = 65, 16
    model = CompressiveTransformer(CompressiveConfig(
        vocab_size=65, d_model=128, n_layers=4, n_heads=4, d_ff=512, mem_len=128, c_mem_len=128,
        compression_rate=4, compression="conv", compression_loss="attention", dropout=0.0))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
model.train(mode == "train")
state = None

def step():
    global state
    x = torch.randint(0, vocab, (rows, 129))  # (B, L + 1)
    with torch.set_grad_enabled(mode == "train"), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        out = model(x[:, :-1], state)
        state = out.state
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), x[:, 1:].flatten())
        if out.compression_loss is not None:
            loss = loss + out.compression_loss.float()
    if mode == "train":
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

for _ in range(8):
    step()
times = []
for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(statistics.median(times) * 1e3)
"""

MEASURES = [("train", "fp32"), ("train", "bf16"), ("eval", "fp32"), ("eval", "bf16")]


def measure(src: str, mode: str, precision: str, steps: int, threads: int, size: str) -> float:
    env = {**os.environ, "PYTHONPATH": src, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    done = subprocess.run([sys.executable, "-c", WORKER, mode, precision, str(steps), str(threads), size],
                          capture_output=True, text=True, env=env)
    printed = done.stdout.strip().splitlines()
    try:
        if done.returncode == 0 and printed:
            return float(printed[-1])
    except ValueError:
        pass
    # the child's own error, on one line (a probe: CalledProcessError's traceback showed the whole worker
    # script, and the child's error output, with what failed, was captured and never shown)
    said = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    raise StillError(f"the {mode} {precision} measurement of {src} failed (exit {done.returncode}): "
                     + (said[-1] if said else f"no error output; it printed {printed[-1:] or 'nothing'}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old_src", help="the old code's src directory (a git worktree's src)")
    parser.add_argument("new_src", help="the new code's src directory")
    parser.add_argument("--rounds", type=at_least_one, default=3,
                        help="rounds of every measurement, old and new alternating which goes first")
    parser.add_argument("--steps", type=at_least_one, default=12, help="timed training steps (evaluation: 30)")
    parser.add_argument("--threads", type=at_least_one, default=None, help="default 2 (--size shard: 1)")
    parser.add_argument("--size", choices=("peer", "shard"), default="peer",
                        help="the peer benchmark's model, or one shard of the reference preset's step")
    parser.add_argument("--only", nargs="+", choices=[f"{m}-{p}" for m, p in MEASURES], default=None,
                        help="the measurements made (default: all)")
    args = parser.parse_args()
    for src in (args.old_src, args.new_src):  # (else PYTHONPATH finds nothing, and both sides time the installed still)
        if not (Path(src) / "still" / "__init__.py").is_file():
            fail(f"{src} is not a src directory holding still (no {Path(src) / 'still' / '__init__.py'})")
    threads = args.threads or (1 if args.size == "shard" else 2)
    measures = [(m, p) for m, p in MEASURES if args.only is None or f"{m}-{p}" in args.only]
    results: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        for mode, precision in measures:
            sides = (("old", args.old_src), ("new", args.new_src))  # (a probe: old always went first)
            for name, src in sides if r % 2 == 0 else sides[::-1]:
                ms = measure(src, mode, precision, args.steps if mode == "train" else 30, threads, args.size)
                results.setdefault((name, mode, precision), []).append(ms)
                print(f"round {r} {name} {mode} {precision}: {ms:.1f} ms a step", flush=True)
    rows = 8 if args.size == "shard" else 16
    print(f"\n| step (batch {rows} x 128 tokens) | old ms | new ms | change |\n|---|---:|---:|---:|")
    for mode, precision in measures:
        old = statistics.median(results[("old", mode, precision)])
        new = statistics.median(results[("new", mode, precision)])
        print(f"| {mode} {precision} | {old:.1f} | {new:.1f} | {100 * (new / old - 1):+.1f}% |")


if __name__ == "__main__":
    run_script(main)
