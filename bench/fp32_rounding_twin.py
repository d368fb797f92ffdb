"""`still lm train` in fp32 with one change that leaves the arithmetic's result the same but not its
rounding: the keys and values of the memories come from one product and then layout copies
(`attention.HEADS_MAJOR_PROJECTION = False`) instead of the batched heads-major product. The two
paths' gradients differ by about 4e-8 of their size (float32 rounding; a bf16 step's lies about 0.05
from fp32's). Training the same seed both ways measures how far apart two fp32 runs land after
2,000 steps from rounding alone: the floor under any bf16-against-fp32 comparison of single runs.

    python bench/fp32_rounding_twin.py lm train --preset reference --seed 0 --out runs/floor-fp32-seed0

takes `still lm train`'s options (the precision must stay fp32) and records the change in the run's
`results.json` (`meta.rounding_twin`). docs/results/shakespeare.md, session 25.
"""

import json
import sys
from pathlib import Path

import still.compressive.attention as attention
from still.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--precision" in args and args[args.index("--precision") + 1] != "fp32":
        sys.exit("error: the rounding twin is an fp32 run (--precision fp32 or none)")
    if "--out" not in args:
        sys.exit("error: give the twin its own run directory (--out DIR)")
    attention.HEADS_MAJOR_PROJECTION = False
    main(args)
    results = Path(args[args.index("--out") + 1]) / "results.json"
    record = json.loads(results.read_text())
    record["meta"]["rounding_twin"] = "HEADS_MAJOR_PROJECTION=False"
    results.write_text(json.dumps(record, indent=2) + "\n")
