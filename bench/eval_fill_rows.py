"""Evaluation of one long document: whole (one row) against cut into a piece a row (`fill_rows`).

    .venv/bin/python bench/eval_fill_rows.py [--preset reference] [--precision fp32 bf16] [--repeats 2]
    .venv/bin/python bench/eval_fill_rows.py --run runs/lm-one   # a trained run's test split instead

enwik8 and a single text file have one document a split, which `TokenStreams` used to read as one
row. `evaluate_streams` over it, with the default threads and shards (`eval_shards`), as one row and
as `batch_size` rows (`fill_rows=True`): tokens a second, and with `--run` the bits per character
of both (the cut reads each piece without the text before it). Without `--run`: the preset's model,
untrained, over one random document of `--tokens` tokens (the speed does not depend on the weights),
the one row and each cut row reading `--row-tokens` of it: `--tokens` at least the preset's rows x
`--row-tokens` (the default; before 2026-12-07 260,000, where the reference preset's cut rows read
16,250 tokens each against the whole row's 20,480).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from still.bench import at_least_one, run_script
from still.compressive import CompressiveTransformer
from still.compressive.generate import eval_shards, evaluate_streams
from still.data.encoded import load_encoded
from still.data.text import TokenStreams
from still.recipes.lm import PRESETS, load_run
from still.train.precision import autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                        help="the model, untrained (no --run)")
    parser.add_argument("--run", default=None, help="a `still lm train` run directory: its model and test split")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="the precisions measured (default: both)")
    parser.add_argument("--tokens", type=at_least_one, default=None,
                        help="the random document's length (no --run): at least the preset's rows x --row-tokens "
                             "(the default)")
    parser.add_argument("--row-tokens", type=at_least_one, default=20_480,
                        help="tokens a row reads (no --run; the cut reads this many a row, as the whole one)")
    parser.add_argument("--repeats", type=at_least_one, default=2,
                        help="timed evaluations of each; their median counts")
    args = parser.parse_args()
    if args.run:
        config, vocab, model, _ = load_run(args.run)
        docs, _ = load_encoded(config.corpus, byte_level=config.byte_level, splits=("test",), vocab=vocab).split("test")
        segments = None  # the whole split
    else:
        config = PRESETS[args.preset]
        if args.row_tokens < config.segment_len:  # (else no segment: "nothing to evaluate", --row-tokens unnamed)
            parser.error(f"--row-tokens must be at least the preset's segment length ({config.segment_len}), "
                         f"got {args.row_tokens}")
        least = config.batch_size * args.row_tokens  # (a probe: a shorter document gave each cut row less to read)
        if args.tokens is not None and args.tokens < least:
            parser.error(f"--tokens must be at least the preset's {config.batch_size} rows x --row-tokens ({least}) "
                         f"for each cut row to read --row-tokens, as the whole one does, got {args.tokens}")
        model = CompressiveTransformer(replace(config.model, vocab_size=100, dropout=0.0)).eval()
        tokens = args.tokens if args.tokens is not None else least
        docs = [torch.randint(1, 100, (tokens,), generator=torch.Generator().manual_seed(0))]
        segments = args.row_tokens // config.segment_len
    print(f"{'precision':9} {'rows':>4} {'shards':>6} {'tokens':>9} {'tokens/s (median)':>18}  bits")
    for precision in args.precision:
        speeds: dict[bool, list[float]] = {False: [], True: []}
        bits: dict[bool, float] = {}
        for _ in range(args.repeats):
            for fill in (False, True):
                streams = TokenStreams(docs, config.batch_size, config.segment_len, fill_rows=fill)
                shards = eval_shards(model, streams.batch_size, config.segment_len, precision=precision)
                start = time.perf_counter()
                with autocast(precision):
                    result = evaluate_streams(model, streams, max_segments=segments, shards=shards)
                speeds[fill].append(result["tokens"] / (time.perf_counter() - start))
                bits[fill] = result["bits_per_token"]
                rows, tokens = streams.batch_size, result["tokens"]
                print(f"{precision:9} {rows:4d} {shards:6d} {tokens:9d} {speeds[fill][-1]:18,.0f}  "
                      + (f"{bits[fill]:.4f}" if args.run else "-"), flush=True)
        whole, cut = statistics.median(speeds[False]), statistics.median(speeds[True])
        change = f"; bits {bits[True] - bits[False]:+.4f}" if args.run else ""  # (else other tokens)
        print(f"{precision}: cut {cut / whole:.2f}x the whole document's speed{change}")


if __name__ == "__main__":
    run_script(main)
