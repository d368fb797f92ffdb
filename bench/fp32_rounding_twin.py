"""`still lm train` in fp32 with one change that leaves the arithmetic's result the same but not its
rounding: the keys and values of the memories come from one product and then layout copies
(`attention.HEADS_MAJOR_PROJECTION = False`) instead of the batched heads-major product. The two
paths' gradients differ by about 4e-8 of their size (float32 rounding; a bf16 step's lies about 0.05
from fp32's). Training the same seed both ways measures how far apart two fp32 runs land after
2,000 steps from rounding alone: the floor under any bf16-against-fp32 comparison of single runs.

That 4e-8 was machine B's (an Intel Xeon with AMX). Where both paths round alike, the twin trains
bit for bit as the plain run and its floor reads 0 (a probe: on an AMD EPYC, Zen 4, every shape
tried, 1 and 2 threads). So before training the script runs one step of the run's model at its
shapes (a shard's rows, the segment, the memories full, a shard's threads) both ways, and where no
gradient differs in a single bit it refuses (exit 2) to train a twin that is no twin.

    python bench/fp32_rounding_twin.py lm train --preset reference --seed 0 --out runs/floor-fp32-seed0

takes `still lm train`'s options (the precision must stay fp32, and the model needs memories) and
records the change in the run's `results.json` (`meta.rounding_twin`). docs/results/shakespeare.md,
session 25.

The run folder is marked as a twin's (`rounding_twin.txt`) before training starts, and only a
folder so marked (or one that holds no run yet) is trained or resumed here: a plain run's folder is
refused, where the script found the finished run, trained nothing and marked its results a twin's
(a twin difference of zero). A twin's folder resumed by a plain `still lm train`, though, goes on
with the other projection and nothing here can see it: resume a twin with this script only.
"""

import json
import sys
from pathlib import Path

import click
import torch
import torch.nn.functional as F

import still.compressive.attention as attention
from still.cli import cli, main as still_main
from still.compressive import CompressiveTransformer
from still.errors import fail
from still.recipes.lm import PRESETS, with_overrides
from still.train.shards import default_shards


def train_options(args: list[str]) -> dict:
    """`still lm train`'s own reading of `args` ("lm train" and its options): its parameters."""
    if args[:2] != ["lm", "train"]:
        fail("give `lm train` and its options, as to `still`")
    try:
        return cli.commands["lm"].commands["train"].make_context("still lm train", args[2:]).params
    except click.ClickException as e:
        e.show()
        sys.exit(2)


MARKER = "rounding_twin.txt"
"""In a twin's run folder, from its start: what the twin changes."""
CHANGE = "HEADS_MAJOR_PROJECTION=False"
RUN_FILES = ("stage.json", "config.json", "checkpoints", "results.json")
"""What `still lm train` writes into a run folder: any of them, and a run is there."""


def mark_twin(out: Path) -> None:
    """Mark `out` as a twin's run folder before training: refuse (exit 2) one that holds a run not
    started as a twin (a probe: a finished plain run of the same settings was reported as its own twin,
    trained by nothing)."""
    if out.exists() and not out.is_dir():
        fail(f"{out} is a file, not a run directory")
    if (out / MARKER).is_file():
        return  # a twin's own folder: resumed, or reported if finished
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held:
        fail(f"{out} holds a run not started as a rounding twin ({', '.join(held)}; no {MARKER}): "
             "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(CHANGE + "\n")


def step_shapes(options: dict) -> tuple:
    """The model config, a shard's rows, the segment length and a shard's intra-op threads of the run
    `options` (`still lm train`'s parameters) starts, as `lm train` and `train_lm` make them (the
    vocabulary left at 256: its size changes the embedding, not the memories' projection)."""
    config = with_overrides(
        PRESETS[options["preset"]],
        model={"mem_len": options["mem_len"], "c_mem_len": options["c_mem_len"],
               "compression_rate": options["compression_rate"], "compression": options["compression"],
               "compression_loss": options["compression_loss"], "pre_norm": False if options["post_norm"] else None,
               "dropout": options["dropout"]},
        batch_size=options["batch_size"], segment_len=options["segment_len"], seed=options["seed"])
    threads = options["threads"] or (1 if options["deterministic"] else torch.get_num_threads())
    shards = options["shards"] or default_shards("cpu", config.batch_size, threads)
    return (config.model, max(1, config.batch_size // shards), config.segment_len,
            threads if shards == 1 else max(1, threads // shards), config.seed)


def gradients_move(model_config, rows: int, segment: int, threads: int, seed: int) -> bool:
    """Whether `CHANGE` moves any bit of any gradient of one training step (LM and compression loss,
    the same dropout masks) of a model of `model_config` over `rows` x `segment` tokens, after
    segments that fill its memories, on `threads` intra-op threads."""
    torch.manual_seed(seed)
    model = CompressiveTransformer(model_config).train()
    m = model_config
    fill = -(-m.mem_len // segment) + (-(-m.c_mem_len * m.compression_rate // segment) if m.c_mem_len else 0)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(m.vocab_size, (rows, (fill + 1) * segment + 1), generator=generator)  # (rows, T)
    inputs, targets = tokens[:, fill * segment:-1], tokens[:, fill * segment + 1:]  # (rows, L) each
    before, flag = torch.get_num_threads(), attention.HEADS_MAJOR_PROJECTION
    gradients = []
    try:
        torch.set_num_threads(threads)
        state = None
        with torch.no_grad():  # (the memories' contents do not matter, their lengths do)
            for i in range(fill):
                state = model(tokens[:, i * segment:(i + 1) * segment], state).state
        for heads_major in (True, False):
            attention.HEADS_MAJOR_PROJECTION = heads_major
            torch.manual_seed(seed)  # the same dropout masks both ways
            model.zero_grad(set_to_none=True)
            out = model(inputs, state)
            loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())  # (rows*L, V) vs (rows*L,)
            (loss + out.compression_loss if out.compression_loss is not None else loss).backward()
            gradients.append([p.grad for p in model.parameters()])
    finally:
        torch.set_num_threads(before)
        attention.HEADS_MAJOR_PROJECTION = flag
    return any((a is None) != (b is None) or (a is not None and not torch.equal(a, b)) for a, b in zip(*gradients))


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    options = train_options(args)
    if options["precision"] not in (None, "fp32"):
        fail("the rounding twin is an fp32 run (--precision fp32 or none)")
    mem_len = options["mem_len"] if options["mem_len"] is not None else PRESETS[options["preset"]].model.mem_len
    if mem_len == 0:  # the changed path projects the memories' keys and values
        fail("the rounding twin changes how the memories are projected: it needs a memory (--mem-len > 0)")
    if options["out"] is None:
        fail("give the twin its own run directory (--out DIR)")
    out = Path(options["out"])
    model_config, rows, segment, threads, seed = step_shapes(options)
    if not gradients_move(model_config, rows, segment, threads, seed):  # (a probe: twins bit-identical to plain runs)
        fail(f"{CHANGE} changes no gradient of this run's model here (one step of {rows} rows x {segment} tokens, "
             f"memories full, {threads} thread{'s' if threads != 1 else ''}): its twin would train bit for bit as "
             "the plain run, a rounding floor of 0; no twin to train on this machine")
    mark_twin(out)
    attention.HEADS_MAJOR_PROJECTION = False
    still_main(args)
    results = out / "results.json"
    record = json.loads(results.read_text())
    record["meta"]["rounding_twin"] = CHANGE
    results.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
