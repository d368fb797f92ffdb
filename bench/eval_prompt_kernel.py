"""Evaluation of a few rows: the hand-written prompt attention against PyTorch's, in one process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/eval_prompt_kernel.py [--preset reference] [--rows 1 4]

A scorer of at most `LAYERWISE_ROWS` rows a segment on the CPU takes several segments a call
(`StreamScorer.chunk`, through `prefill`); their attention runs through `native.prompt_attention`
(`written=True`, the default) or PyTorch's (`written=False`). The preset's model, untrained, over
random tokens (the speed does not depend on the weights), the two alternating `--repeats` times:
tokens a second (median) and the ratio, and how far apart the summed losses are.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from still.bench import at_least_one, run_script
from still.compressive import CompressiveTransformer
from still.compressive.generate import LAYERWISE_ROWS, StreamScorer
from still.recipes.lm import PRESETS
from still.train.precision import autocast


def score(model, tokens: torch.Tensor, segment_len: int, written: bool, precision: str) -> tuple[float, float]:
    """tokens (B, n + 1) scored from no memories -> (tokens a second, the summed loss in nats)."""
    rows, n = tokens.shape[0], tokens.shape[1] - 1
    inputs, targets = tokens[:, :n], tokens[:, 1:]  # (a span past n would read the last target as an input)
    with torch.no_grad(), autocast(precision):
        with StreamScorer(model, rows, 1, segment_len, written=written) as warm:  # (the library, the plans)
            span = warm.chunk * segment_len
            warm(inputs[:, :span], targets[:, :span])
        total = 0.0
        with StreamScorer(model, rows, 1, segment_len, written=written) as scorer:
            start = time.perf_counter()
            for s in range(0, n, span):
                total += scorer(inputs[:, s : s + span], targets[:, s : s + span]).double().sum().item()
            seconds = time.perf_counter() - start
    return rows * n / seconds, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference", help="the model (untrained)")
    parser.add_argument("--rows", type=at_least_one, nargs="+", default=[1, 4],
                        help="rows a segment (at most 512 / segment: 8 at quick and ablation, 4 at reference)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="the precisions measured (default: both)")
    parser.add_argument("--tokens", type=at_least_one, default=8192, help="tokens a row reads")
    parser.add_argument("--repeats", type=at_least_one, default=3, help="alternations; their median counts")
    args = parser.parse_args()
    config = PRESETS[args.preset]
    most = LAYERWISE_ROWS // config.segment_len
    if max(args.rows) > most:  # (a probe: both arms then ran PyTorch's attention, "1.00x" as if compared)
        parser.error(f"--rows {max(args.rows)}: at most {most} at the {args.preset} preset ({LAYERWISE_ROWS} / its "
                     f"segment of {config.segment_len}); more rows take a segment a call, without the kernel")
    model = CompressiveTransformer(replace(config.model, vocab_size=100, dropout=0.0)).eval()
    print(f"{'rows':>4} {'precision':9} {'PyTorch tok/s':>14} {'written tok/s':>14} {'ratio':>6}  loss difference")
    for rows in args.rows:
        tokens = torch.randint(1, 100, (rows, args.tokens + 1), generator=torch.Generator().manual_seed(0))
        for precision in args.precision:
            speeds: dict[bool, list[float]] = {False: [], True: []}
            losses = {}
            for _ in range(args.repeats):
                for written in (False, True):
                    speed, losses[written] = score(model, tokens, config.segment_len, written, precision)
                    speeds[written].append(speed)
            torch_speed, written_speed = statistics.median(speeds[False]), statistics.median(speeds[True])
            difference = abs(losses[True] - losses[False]) / abs(losses[False])
            print(f"{rows:4d} {precision:9} {torch_speed:14,.0f} {written_speed:14,.0f} "
                  f"{written_speed / torch_speed:5.2f}x  {difference:.1e} of the total", flush=True)


if __name__ == "__main__":
    run_script(main)
