"""The Compressive Transformer at the `reference` preset against this machine's limit.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/reference_speed.py [--repeats 3] [--steps 6] [--model peer]

Model of `still lm train --preset reference` (d_model 256, 6 layers, 4 heads, d_ff 1024, segment
128, mem 128, compressed mem 128 at rate 4, 1-D convolution, attention-reconstruction loss, dropout
0.1), vocabulary 86 (Shakespeare's), batch 16. `--model peer`: the same with the model of
bench/compressive_peers.py (d_model 128, 4 layers, d_ff 512), where a bf16 decoding step's matrices
and keys fit the cores' caches. In one run, interleaved, medians over repeats:

    train fp32 / bf16   tokens/s of the recipe's own step (`still.train.loop.Trainer` with the
                        recipe's loss: memories carried, LM + reconstruction loss, backward, the two
                        clip groups, Adam), after warm-up segments that fill both memories; "2
                        shards": the step split across two threads, one intra-op thread each, as
                        `still lm train` runs it by default on a CPU (`still.train.shards`)
    MFU                 model FLOP/s (matmul and convolution FLOPs of one step, forward + backward,
                        counted from shapes by torch.utils.flop_counter: the products the step
                        runs, counted with the attention kernels off (bf16 and, since session 30,
                        fp32), which make the same products out of the counter's sight, less the
                        terms the causal mask zeroes, which they skip) / the machine's matmul peak
                        in the same precision, measured in the same run (`still bench peak`)
    compile             (not by default) training with `still lm train --compile`: each layer's
                        feed-forward block compiled by torch.compile during the warm-up steps
    MFU, 3x fwd         the same with the step's FLOPs counted as 3x its forward's (the convention
                        of PaLM's and nanoGPT's MFU: a backward costs twice the forward); it does not
                        change when the backward skips a gradient nothing needs (the memories' rows,
                        docs/performance.md, session 13), which lowers the first count
    eval batch 16, 2, 1 tokens/s of forward + cross entropy with memories carried, eval mode
                        (`still.compressive.generate.StreamScorer`, as `still lm eval`: batches 1
                        and 2 unsharded take 8 segments a call, a layer at a time); "2 shards":
                        the rows split across two threads, one intra-op thread each
    generate batch 1    tokens/s of `generate` after a 512-token prompt (the prompt not counted),
                        the median of --gen-runs generations (3) after an untimed one, eager and
                        with --compile (compiled in the untimed warm-up); bf16: under
                        autocast, so the compiled steps read bf16 matrices and keys
    read limit          a decoding step reads every matrix and key of the model for one token: its
                        bytes (the decoder's matrices, biases and key/value buffers; one row of the
                        embedding; the compression's weights as often as the step reads them) against
                        the machine's read bandwidth at that size (the median time of `sum` over a
                        tensor of as many bytes, all threads, in the same run) give the most tokens/s
                        any step could reach here (for the compiled rows, whose step it counts).
                        The hand-written step (since session 26) reads the feed-forward's second
                        matrix only for hidden units that are not zero (about half of them in these
                        untrained weights): counted at the share of them not zero over the prompt.

On a GPU (chosen by itself, as `still lm train` chooses) the same measures run there, with the clock
read after the GPU's queued work, the peak measured on it, and without the measures of two CPU shards
(`compile` then compiles the unsharded step).

Prints a table; `--out DIR` also writes reference_speed.json and .md there. A measure that fails
is not run again: its error goes in a last table (and the exit code is 1) and the others still run.
Off the CPU, a `--compile` generation row whose step could not be compiled says that it ran eagerly.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from still.bench import at_least_one, out_folder, run_script  # noqa: E402
from still.bench.peak import device_name, peak  # noqa: E402
from still.compressive import native  # noqa: E402
from still.compressive.decode import Decoder  # noqa: E402
from still.compressive.generate import StreamScorer, generate  # noqa: E402
from still.compressive.model import CompressiveTransformer  # noqa: E402
from still.config import replace  # noqa: E402
from still.recipes.lm import PRESETS  # noqa: E402
from still.train import aot  # noqa: E402
from still.train.distributed import default_device  # noqa: E402
from still.train.loop import Trainer  # noqa: E402
from still.train.optim import build_optimizer  # noqa: E402
from still.train.precision import autocast  # noqa: E402
from still.train.results import format_table  # noqa: E402

try:
    from still.compressive.attention import kernels_off
except ImportError:  # a still from before session 29 (an A/B through PYTHONPATH): no kernels to turn off
    kernels_off = contextlib.nullcontext

VOCAB = 86
DEVICE = default_device()  # a GPU where there is one, as `still lm train` chooses
MODELS = {"reference": {}, "peer": dict(d_model=128, n_layers=4, d_ff=512)}  # changes to the preset's model
model_changes: dict = MODELS["reference"]  # set by --model


def sync() -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so that a clock read after it counts it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def make_model(seed: int = 0) -> CompressiveTransformer:
    torch.manual_seed(seed)
    return CompressiveTransformer(replace(PRESETS["reference"].model, vocab_size=VOCAB, **model_changes)).to(DEVICE)


def stream(batch: int, segments: int, length: int, seed: int) -> torch.Tensor:
    tokens = torch.randint(VOCAB, (batch, segments * length + 1), generator=torch.Generator().manual_seed(seed))
    return tokens.to(DEVICE)


def train_rate(precision: str, steps: int, warmup: int, seed: int, shards: int = 1, compile: bool = False
               ) -> tuple[float, tuple[float, float] | None]:
    """(tokens/s, (FLOPs of one step, FLOPs of its forward)) of the recipe's training step; with
    `shards`, the step split across that many threads as `still lm train` does by default
    (`still.train.shards`), whose FLOPs are not counted (the counter sees one thread; the split
    changes no product's total)."""
    config = PRESETS["reference"]
    model = make_model(seed)
    if compile:  # `still lm train --compile`: compiled during the warm-up steps
        model.compile_feed_forward()
    optimizer = build_optimizer(model.parameters(), config.optim)
    b, l = config.batch_size, config.segment_len
    data = stream(b, warmup + steps + 1, l, seed)
    memory = [None] * shards  # each shard's
    forward_flops: list[float] = []  # filled by the counted step

    def loss_fn(net, i, shard=None):
        rows, index, share = (shard.rows(b), shard.index, shard.fraction) if shard else (slice(None), 0, 1.0)
        inputs, targets = data[rows, i * l : (i + 1) * l], data[rows, i * l + 1 : (i + 1) * l + 1]
        with FlopCounterMode(display=False) if counting else contextlib.nullcontext() as counter:
            out = net(inputs, memory[index])
            lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
            loss = (lm + out.compression_loss if out.compression_loss is not None else lm) * share
        if counting:
            forward_flops.append(counter.get_total_flops())
        memory[index] = out.state.detach()
        return loss

    counting = False

    groups = [model.model_parameters(), model.compressor_parameters()]
    trainer = Trainer(model, loss_fn, optimizer, grad_clip=config.optim.grad_clip, clip_groups=groups,
                      precision=precision, shards=shards, log=lambda _: None)
    model.train()
    for i in range(warmup):
        trainer._step(i)
    assert memory[0].memory_len == 128 and memory[0].compressed_len == 128
    sync()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        trainer._step(i)
    sync()
    seconds = time.perf_counter() - start
    if shards > 1 or compile:  # the FLOPs of the same step uncompiled and unsharded are counted apart
        trainer.close()
        return steps * b * l / seconds, None
    counting = True
    with kernels_off(), FlopCounterMode(display=False) as counter:  # PyTorch's products, which the kernels make
        trainer._step(warmup + steps)
    return steps * b * l / seconds, (counter.get_total_flops(), forward_flops[0])


@torch.no_grad()
def eval_rate(precision: str, batch: int, steps: int, warmup: int, seed: int, shards: int = 1) -> float:
    """Tokens/s of `StreamScorer` (what `still lm eval` runs its segments through), `shards` CPU
    threads, `scorer.chunk` consecutive segments a call as `evaluate_streams` gives them (a few rows
    on the CPU: a layer at a time); `warmup` and `steps` rounded up to whole calls."""
    model = make_model(seed).eval()
    l = PRESETS["reference"].segment_len
    start = 0.0
    with autocast(precision, DEVICE), StreamScorer(model, batch, shards, segment_len=l) as scorer:
        k = scorer.chunk
        warm, timed = -(-warmup // k), -(-steps // k)  # calls
        data = stream(batch, (warm + timed) * k, l, seed)
        for call in range(warm + timed):
            if call == warm:
                sync()
                start = time.perf_counter()
            first = call * k * l
            scorer(data[:, first : first + k * l], data[:, first + 1 : first + k * l + 1])
    sync()
    return timed * k * batch * l / (time.perf_counter() - start)


def compiled_steps() -> bool:
    """Whether the decoding steps compiled ahead of time so far all loaded (off the CPU, where a
    failed compile runs the step eagerly, and says so, instead of stopping)."""
    return all(package is not None for package in aot._LOADED.values())


@torch.no_grad()
def generate_rate(precision: str, new_tokens: int, compile: bool, seed: int, runs: int = 3) -> float:
    """New tokens/s at batch 1 after a 512-token prompt (the prompt not counted): the median of `runs`
    generations after an untimed one (the warm-up, and the compile)."""
    model = make_model(seed).eval()
    prompt = stream(1, 4, 128, seed)[:, :512]
    with autocast(precision, DEVICE):
        times = []
        for _ in range(runs + 1):
            tokens = generate(model, prompt, new_tokens, segment_len=128, generator=torch.Generator().manual_seed(seed),
                              compile=compile)
            next(tokens)  # the prompt's forward pass and the first sample
            sync()
            start = time.perf_counter()
            n = 1 + sum(1 for _ in tokens)
            sync()
            times.append(time.perf_counter() - start)
            assert n == new_tokens
    return (new_tokens - 1) / statistics.median(times[1:])


@torch.no_grad()
def hidden_units_used(model: CompressiveTransformer, tokens: torch.Tensor) -> list[float]:
    """Per layer, the share of the feed-forward's hidden units that are not zero after the ReLU,
    over `tokens` (1, P) fed through the model in segments of 128 (eval mode)."""
    seen: dict[int, list[float]] = {i: [] for i in range(len(model.layers))}
    hooks = [layer.feed_forward.down.register_forward_pre_hook(
        lambda _, args, i=i: seen[i].append(float((args[0] != 0).float().mean())))
        for i, layer in enumerate(model.layers)]
    try:
        state = None
        for start in range(0, tokens.shape[1], 128):
            state = model(tokens[:, start : start + 128], state).state
    finally:
        for hook in hooks:
            hook.remove()
    return [statistics.mean(seen[i]) for i in sorted(seen)]


def step_bytes(precision: str) -> float:
    """Bytes a compiled decoding step reads at batch 1, on average over the tokens: every tensor of
    the decoder's, but one row of the embedding, the compression's taps once every c tokens (the
    hand-written step: once every c x groups tokens, the compressions of `groups` compressing steps
    computed together, and the feed-forward's second matrix only for the hidden units that are not
    zero, their share measured over the generation's prompt), and not the layer inputs (c rows of
    them once every c tokens)."""
    model = make_model().eval()
    decoder = Decoder(model, None, 1, compile=True, dtype=torch.bfloat16 if precision == "bf16" else None)
    groups = decoder.native.groups if decoder.native is not None else 1
    share = {"embedding": 1 / decoder.weights["embedding"].shape[0]}
    share |= {name: 1 / (decoder.rate * groups) for name in decoder.weights if name.endswith(".taps")}
    if decoder.native is not None:
        with autocast(precision, DEVICE):
            used = hidden_units_used(model, stream(1, 4, 128, 0)[:, :512])
        share |= {f"{i}.down.weight": part for i, part in enumerate(used)}
    tensors = ([(t, share.get(name, 1.0)) for name, t in decoder.weights.items()]
               + [(decoder.keys, 1.0), (decoder.values, 1.0)])
    return sum(t.numel() * t.element_size() * part for t, part in tensors)


def read_bandwidth(nbytes: float, calls: int = 50) -> float:
    """Bytes/s of `sum` over an fp32 tensor of `nbytes` (median of `calls`, after as many warm-ups)."""
    x = torch.randn(int(nbytes) // 4, device=DEVICE)
    times = []
    for i in range(2 * calls):
        sync()
        start = time.perf_counter()
        x.sum()
        sync()
        if i >= calls:
            times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=at_least_one, default=3, help="repeats of every measure; their median counts")
    parser.add_argument("--steps", type=at_least_one, default=6, help="timed training steps per repeat")
    parser.add_argument("--threads", type=at_least_one, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--new-tokens", type=at_least_one, default=256, help="tokens a timed generation")
    parser.add_argument("--gen-runs", type=at_least_one, default=3,
                        help="timed generations per repeat, after an untimed one; their median counts")
    parser.add_argument("--measures", nargs="+", choices=("train", "eval", "generate", "compile"),
                        default=["train", "eval", "generate"],
                        help="which groups of measures (default: all but compile, training with --compile)")
    parser.add_argument("--model", choices=sorted(MODELS), default="reference",
                        help="the reference preset's model, or the peer benchmark's smaller one (same segment, "
                             "memories and batch)")
    parser.add_argument("--out", type=out_folder, default=None, help="also write the results (JSON and markdown) here")
    args = parser.parse_args()
    global model_changes
    model_changes = MODELS[args.model]
    if args.threads:
        torch.set_num_threads(args.threads)
    # on a CPU the step split across two threads, as `still lm train` runs it there; a GPU, one stream.
    # With one thread (--threads 1) no row is split: two shards would run on two threads, and their MFU
    # be read against one thread's peak (a probe saw 109%)
    two_shards = DEVICE.type == "cpu" and torch.get_num_threads() >= 2
    if DEVICE.type == "cpu" and not two_shards:
        print("one thread: the rows of 2 shards (two threads) are left out", flush=True)
    shards, sharded = (2, ", 2 shards") if two_shards else (1, "")
    measures = {
        "train fp32": lambda r: train_rate("fp32", args.steps, 6, r),
        "train bf16": lambda r: train_rate("bf16", args.steps, 6, r),
        "train fp32, 2 shards": lambda r: train_rate("fp32", args.steps, 6, r, shards=2),
        "train bf16, 2 shards": lambda r: train_rate("bf16", args.steps, 6, r, shards=2),
        f"compile fp32{sharded}": lambda r: train_rate("fp32", args.steps, 6, r, shards=shards, compile=True),
        f"compile bf16{sharded}": lambda r: train_rate("bf16", args.steps, 6, r, shards=shards, compile=True),
        "eval fp32, batch 16": lambda r: eval_rate("fp32", 16, args.steps, 4, r),
        "eval bf16, batch 16": lambda r: eval_rate("bf16", 16, args.steps, 4, r),
        "eval fp32, batch 16, 2 shards": lambda r: eval_rate("fp32", 16, args.steps, 4, r, shards=2),
        "eval bf16, batch 16, 2 shards": lambda r: eval_rate("bf16", 16, args.steps, 4, r, shards=2),
        "eval fp32, batch 2": lambda r: eval_rate("fp32", 2, 4 * args.steps, 4, r),
        "eval fp32, batch 2, 2 shards": lambda r: eval_rate("fp32", 2, 4 * args.steps, 4, r, shards=2),
        "eval bf16, batch 2": lambda r: eval_rate("bf16", 2, 4 * args.steps, 4, r),
        "eval bf16, batch 2, 2 shards": lambda r: eval_rate("bf16", 2, 4 * args.steps, 4, r, shards=2),
        "eval fp32, batch 1": lambda r: eval_rate("fp32", 1, 4 * args.steps, 4, r),
        "eval bf16, batch 1": lambda r: eval_rate("bf16", 1, 4 * args.steps, 4, r),
        "generate fp32, batch 1": lambda r: generate_rate("fp32", args.new_tokens, False, r, args.gen_runs),
        "generate fp32, batch 1, --compile": lambda r: generate_rate("fp32", args.new_tokens, True, r, args.gen_runs),
        "generate bf16, batch 1, --compile": lambda r: generate_rate("bf16", args.new_tokens, True, r, args.gen_runs),
    }
    measures = {k: v for k, v in measures.items() if k.split()[0] in args.measures
                and (two_shards or "shards" not in k)}
    rates: dict[str, list[float]] = {k: [] for k in measures}
    flops: dict[str, tuple[float, float]] = {}  # (a step's, its forward's)
    peaks: list[dict] = []
    failed: dict[str, str] = {}  # measure: its error (it is not run again)
    eager: dict[str, str] = {}  # a --compile row whose step was not compiled: why
    generating = "generate" in args.measures
    read_bytes = {precision: step_bytes(precision) for precision in ("fp32", "bf16")} if generating else {}
    bandwidths: dict[str, list[float]] = {precision: [] for precision in read_bytes}
    for repeat in range(args.repeats):
        peaks.append(peak())
        for precision, nbytes in read_bytes.items():
            bandwidths[precision].append(read_bandwidth(nbytes))
        for name, measure in measures.items():
            if name in failed:
                continue
            try:
                value = measure(repeat)
            except Exception as e:  # noqa: BLE001 - one measure's failure is reported; the others still run
                failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                traceback.print_exc()
                print(f"repeat {repeat}: {name}: FAILED ({failed[name]})", flush=True)
                continue
            if isinstance(value, tuple):
                value, step_flops = value
                if step_flops is not None:
                    flops[name] = step_flops
            if name.startswith("generate") and "--compile" in name and DEVICE.type != "cpu" and not compiled_steps():
                eager[name] = "the step ran eagerly: compiling it failed (above)"
            rates[name].append(value)
            print(f"repeat {repeat}: {name}: {value:.0f} tok/s", flush=True)
    rates = {name: values for name, values in rates.items() if values}
    peak_fp32 = statistics.median(p["fp32"] for p in peaks)
    peak_bf16 = statistics.median(p["bf16"] for p in peaks)
    tokens_per_step = PRESETS["reference"].batch_size * PRESETS["reference"].segment_len
    rows = []
    for name, values in rates.items():
        rate = statistics.median(values)
        row = {"measure": name + (f" ({eager[name]})" if name in eager else ""), "tokens/s": round(rate),
               "min": round(min(values)), "max": round(max(values))}
        # a sharded or compiled step: the same products
        counted = flops.get(name.removesuffix(", 2 shards").replace("compile", "train"))
        if name.startswith(("train", "compile")) and counted is not None:
            step_flops, forward_flops = counted
            achieved = step_flops / tokens_per_step * rate
            peak_here = peak_bf16 if "bf16" in name else peak_fp32
            row["GFLOP/s"] = round(achieved / 1e9, 1)
            row["MFU"] = f"{achieved / peak_here:.1%}"
            row["MFU, 3x fwd"] = f"{3 * forward_flops / tokens_per_step * rate / peak_here:.1%}"
        rows.append(row)
    median = {k: statistics.median(v) for k, v in rates.items()}
    wanted = {
        "train bf16 / fp32": ("train bf16", "train fp32"),
        "train bf16 / fp32 (2 shards)": ("train bf16, 2 shards", "train fp32, 2 shards"),
        "train bf16, 2 shards / train fp32": ("train bf16, 2 shards", "train fp32"),
        "train fp32: 2 shards / 1": ("train fp32, 2 shards", "train fp32"),
        "train bf16: 2 shards / 1": ("train bf16, 2 shards", "train bf16"),
        f"train --compile / eager (fp32{sharded})": (f"compile fp32{sharded}", f"train fp32{sharded}"),
        f"train --compile / eager (bf16{sharded})": (f"compile bf16{sharded}", f"train bf16{sharded}"),
        "eval bf16 / fp32 (batch 16)": ("eval bf16, batch 16", "eval fp32, batch 16"),
        "eval fp32: 2 shards / 1 (batch 16)": ("eval fp32, batch 16, 2 shards", "eval fp32, batch 16"),
        "eval bf16: 2 shards / 1 (batch 16)": ("eval bf16, batch 16, 2 shards", "eval bf16, batch 16"),
        "eval fp32: 2 shards / 1 (batch 2)": ("eval fp32, batch 2, 2 shards", "eval fp32, batch 2"),
        "eval bf16: 2 shards / 1 (batch 2)": ("eval bf16, batch 2, 2 shards", "eval bf16, batch 2"),
        "generate / eval at batch 1 (fp32, eager)": ("generate fp32, batch 1", "eval fp32, batch 1"),
        "generate / eval at batch 1 (fp32, --compile)": ("generate fp32, batch 1, --compile", "eval fp32, batch 1"),
        "generate / eval at batch 1 (bf16, --compile)": ("generate bf16, batch 1, --compile", "eval bf16, batch 1"),
        "generate bf16 / fp32 (--compile)": ("generate bf16, batch 1, --compile", "generate fp32, batch 1, --compile"),
    }
    ratios = {k: median[a] / median[b] for k, (a, b) in wanted.items() if a in median and b in median}
    # each repeat's own ratio (its two measures minutes apart at most): on a machine whose speed moves
    # with its neighbours, how far one repeat's reading can lie from another's
    by_repeat = {k: [x / y for x, y in zip(rates[a], rates[b])] for k, (a, b) in wanted.items() if k in ratios}
    waiting = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}" + (
        f", GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}" if os.environ.get("GOMP_SPINCOUNT") else "")
    where = f"{torch.get_num_threads()} threads" if DEVICE.type == "cpu" else str(DEVICE)
    # what bf16 training's attention kernels run on (a still before session 31 through PYTHONPATH: not said)
    products = getattr(native, "attention_products", lambda: None)() if DEVICE.type == "cpu" else None
    if products is not None:
        where += f" (bf16 attention kernels on {products})"
    shape = replace(PRESETS["reference"].model, **model_changes)
    size = "reference preset" if args.model == "reference" else "reference preset with the peer benchmark's model"
    title = (f"{size} (d_model {shape.d_model} x {shape.n_layers}), {device_name(DEVICE)}, {where}, "
             f"{waiting}, torch "
             f"{torch.__version__}; matmul peak (median of {args.repeats}) fp32 {peak_fp32 / 1e9:.1f} GFLOP/s, bf16 "
             f"{peak_bf16 / 1e9:.1f} GFLOP/s; medians of {args.repeats} repeats, load average at the end "
             f"{os.getloadavg()[0]:.2f}")
    table = format_table(rows, title=title) + "\n" + format_table(
        [{"ratio": k, "value": f"{v:.2f}x",
          "per repeat": f"{min(by_repeat[k]):.2f}-{max(by_repeat[k]):.2f}x" if len(by_repeat[k]) > 1 else "-"}
         for k, v in ratios.items()], title="Ratios of the medians (and the range of each repeat's own ratio)")
    limits = []
    for name in (n for n in median if n.startswith("generate") and "--compile" in n):  # the step it describes
        precision = "bf16" if "bf16" in name else "fp32"
        bandwidth = statistics.median(bandwidths[precision])
        bound = bandwidth / read_bytes[precision]
        limits.append({"measure": name, "MB a token": round(read_bytes[precision] / 1e6, 2),
                       "read GB/s": round(bandwidth / 1e9, 1), "limit tok/s": round(bound),
                       "tokens/s": round(median[name]), "of the limit": f"{median[name] / bound:.0%}"})
    if limits:
        table += "\n" + format_table(limits, title="Generation against the read limit (a step reads every matrix "
                                                   "and key once; read bandwidth at that size, median)")
    if failed:
        table += "\n" + format_table([{"measure": k, "error": v} for k, v in failed.items()], title="Failed measures")
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "reference_speed.md").write_text(table + "\n")
        (args.out / "reference_speed.json").write_text(json.dumps(
            {"rows": rows, "ratios": ratios, "ratios_by_repeat": by_repeat, "rates": rates, "flops_per_step": flops,
             "peaks": peaks, "read_limits": limits, "read_bandwidths": bandwidths, "failed": failed,
             "ran_eagerly": eager}, indent=1) + "\n")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    run_script(main)
