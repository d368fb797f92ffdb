"""Time one decoding step at batch 1: the hand-written step against the ahead-of-time compiled one.

    OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000 .venv/bin/python bench/decode_steps.py [--preset peer reference]

For each preset (`peer`: the peer benchmark's d_model 128 x 4 layers, vocabulary 65; `reference`:
d_model 256 x 6 layers, vocabulary 256; memories 128 and 128 compressed at rate 4, both full after a
512-token prompt) and each stored dtype (fp32, bf16 matrices and keys), a `Decoder` with
`compile=True` runs `step_sample` (the step and the draw, what `generate` calls) with the
hand-written step (`still.compressive.native`) and with the step compiled ahead of time
(`still.train.aot`, `native=False`), alternating, in one process: microseconds a token (median of
`--rounds` rounds of `--steps` steps, compressions included: one step in 4 compresses). The weights
are untrained unless `--run` names a `still lm train` run directory, whose trained model is timed
instead of the presets: the hand-written step's time depends on the weights, since it reads the
feed-forward's second matrix only for the hidden units that are not zero (about half of them in an
untrained model, 81-89% zeros in trained ones at the reference preset; docs/performance.md, session 26).
`--tune '-march=x86-64-v3'` builds the hand-written step as for a processor without AVX-512 (AVX2 with
FMA), `--tune ''` untuned (docs/performance.md, session 33).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

from still.bench import at_least_one, run_script  # noqa: E402
from still.compressive.decode import Decoder  # noqa: E402
from still.compressive.model import CompressiveConfig, CompressiveTransformer  # noqa: E402
from still.compressive.sampling import Sampling  # noqa: E402

PRESETS = {
    "peer": dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, d_ff=512),
    "reference": dict(vocab_size=256, d_model=256, n_layers=6, n_heads=8, d_ff=1024),
}
MEMORY = dict(mem_len=128, c_mem_len=128, compression_rate=4)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def per_token(decoder: Decoder, steps: int) -> float:
    """µs a token over `steps` sampled steps."""
    sampling, token, uniform = Sampling(), torch.zeros(1, dtype=torch.long), torch.full((1, 1), 0.5)
    start = time.perf_counter()
    for _ in range(steps):
        token = decoder.step_sample(token, uniform, sampling)
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", choices=tuple(PRESETS), default=list(PRESETS),
                        help="the models timed, untrained (default: all)")
    parser.add_argument("--steps", type=at_least_one, default=400, help="tokens a timed round")
    parser.add_argument("--rounds", type=at_least_one, default=7,
                        help="timed rounds of each step, alternating; their median counts")
    parser.add_argument("--run", help="a `still lm train` run directory: time its trained model instead")
    parser.add_argument("--tune", help="build the hand-written step with these flags instead of -march=native, "
                        "as for another processor: '-march=x86-64-v3' (AVX2 with FMA, no AVX-512), '' (untuned); "
                        "the step compiled ahead of time keeps this machine's instructions")
    args = parser.parse_args()
    if args.tune is not None:
        from still.compressive import native

        native.TUNE = tuple(args.tune.split())
    tune = "" if args.tune is None else f", hand-written step built with {args.tune!r}"
    trained = None
    if args.run:  # (read before the table's header: a run that cannot be read is said alone)
        from still.recipes.lm import load_run

        trained = load_run(args.run)[2]
    print(f"machine: {_cpu()}{tune}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}; "
          f"torch {torch.__version__}; {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    print(f"{'preset':10s} {'stored':7s} {'hand-written':>14s} {'ahead of time':>14s} {'ratio':>7s}  (µs a token)")
    for preset in [args.run] if args.run else args.preset:
        torch.manual_seed(0)
        if trained is not None:
            model = trained
            preset = os.path.basename(os.path.normpath(args.run))
        else:
            model = CompressiveTransformer(CompressiveConfig(**PRESETS[preset], **MEMORY)).eval()
        with torch.no_grad():
            state = None
            for segment in torch.randint(0, model.config.vocab_size, (1, 512)).split(128, dim=1):
                state = model(segment, state).state
        for dtype in (torch.float32, torch.bfloat16):
            decoders = {native: Decoder(model, state, batch=1, compile=True, dtype=dtype, native=native)
                        for native in (True, False)}
            if decoders[True].native is None:
                sys.exit("the hand-written step is unavailable here (see the message above)")
            decoders[False].prepare(Sampling())
            times: dict[bool, list[float]] = {True: [], False: []}
            for decoder in decoders.values():
                per_token(decoder, max(1, args.steps // 4))  # warm (a step at least: --steps 1 to 3 divided by 0)
            for _ in range(args.rounds):
                for native, decoder in decoders.items():
                    times[native].append(per_token(decoder, args.steps))
            native, compiled = statistics.median(times[True]), statistics.median(times[False])
            name = "fp32" if dtype == torch.float32 else "bf16"
            print(f"{preset:10s} {name:7s} {native:14.1f} {compiled:14.1f} {compiled / native:6.2f}x", flush=True)


if __name__ == "__main__":
    run_script(main)
