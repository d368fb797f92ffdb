"""`still lm train` in fp32 with one change that leaves the arithmetic's result the same but not its
rounding: the keys and values of the memories come from one product and then layout copies
(`attention.HEADS_MAJOR_PROJECTION = False`) instead of the batched heads-major product. The two
paths' gradients differ by about 4e-8 of their size (float32 rounding; a bf16 step's lies about 0.05
from fp32's). Training the same seed both ways measures how far apart two fp32 runs land after
2,000 steps from rounding alone: the floor under any bf16-against-fp32 comparison of single runs.

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

import still.compressive.attention as attention
from still.cli import cli, main as still_main
from still.errors import fail
from still.recipes.lm import PRESETS


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
    mark_twin(out)
    attention.HEADS_MAJOR_PROJECTION = False
    still_main(args)
    results = out / "results.json"
    record = json.loads(results.read_text())
    record["meta"]["rounding_twin"] = CHANGE
    results.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
