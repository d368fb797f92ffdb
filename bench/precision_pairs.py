"""Pairs of `still lm train` runs of the same seed: each pair's difference in bits per character,
and the differences' mean, spread and standard error, group by group.

    .venv/bin/python bench/precision_pairs.py \
        --group "bf16 - fp32" runs/bf16-seed2:runs/fp32-seed2 runs/bf16-seed3:runs/fp32-seed3 \
        --group "fp32 twin - fp32" runs/twin-seed2:runs/fp32-seed2 runs/twin-seed3:runs/fp32-seed3

Each pair is A:B, two run directories whose `results.json` has the row of a finished run; the
difference is A - B. B may be several runs of the seed joined by `+` (A:B1+B2): the difference is
then A less their mean (a bf16 run against two fp32 runs that differ only in rounding). Pairs
should differ in one thing: a bf16 run against its fp32 twin, or an fp32 run against the same seed
with only its rounding changed (`bench/fp32_rounding_twin.py`), which measures how far apart runs
land when nothing but rounding separates them. Runs whose settings other than the precision (and
the output folder) differ are refused.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from still.bench import run_script
from still.errors import StillError

SPLITS = ("valid_bpc", "test_bpc")


def load(run: str) -> dict:
    """A finished `still lm train` run's first row and settings; a results.json that cannot be read, or
    holds no such row (a distillation's, say), refused naming it (a probe: JSONDecodeError and KeyError
    tracebacks)."""
    path = Path(run) / "results.json"
    if not path.is_file():
        raise StillError(f"{path}: no results (is the run finished?)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # (a truncated file; bytes that are not UTF-8)
        raise StillError(f"cannot read {path} ({e})") from None
    rows = record.get("rows") if isinstance(record, dict) else None
    meta = record.get("meta") if isinstance(record, dict) else None
    row = rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}
    config = meta.get("config") if isinstance(meta, dict) else None
    lacking = [split for split in SPLITS if not isinstance(row.get(split), (int, float))]
    if lacking or not isinstance(config, dict):
        raise StillError(f"{path} holds no finished `still lm train` run's results ("
                         + (f"no {' or '.join(lacking)} in its first row" if lacking else "no meta.config") + ")")
    return {"row": row, "config": config}


def comparable(a: dict, b: dict) -> list[str]:
    """The settings, other than the precision, in which two runs differ."""
    return sorted(k for k in set(a["config"]) | set(b["config"])
                  if k != "precision" and a["config"].get(k) != b["config"].get(k))


def summary(diffs: list[float], tolerance: float) -> str:
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return f"n 1, difference {mean:+.4f}"
    sd = statistics.stdev(diffs)
    rms = math.sqrt(statistics.fmean(d * d for d in diffs))
    outside = sum(abs(d) > tolerance for d in diffs)
    return (f"n {n}, mean {mean:+.4f}, SD {sd:.4f}, SE {sd / math.sqrt(n):.4f}, RMS {rms:.4f}, "
            f"largest |difference| {max(abs(d) for d in diffs):.4f}, outside {tolerance}: {outside} of {n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "A:B"),
                        help="a name, then the group's pairs of run directories A:B")
    parser.add_argument("--tolerance", type=float, default=0.01, help="count the pairs further apart")
    args = parser.parse_args()
    groups = []  # every pair read and checked before anything is printed
    for name, *pairs in args.group:
        if not pairs:
            parser.error(f"group {name!r} has no pairs")
        loaded = []
        for pair in pairs:
            if pair.count(":") != 1:
                parser.error(f"{pair!r}: a pair is A:B, two run directories")
            a_dir, b_dirs = pair.split(":")
            a, bs = load(a_dir), [(b_dir, load(b_dir)) for b_dir in b_dirs.split("+")]
            for b_dir, b in bs:
                differ = comparable(a, b)
                if differ:
                    raise StillError(f"{a_dir} and {b_dir} differ in {', '.join(differ)} (not a pair)")
            loaded.append((a_dir, a, bs))
        groups.append((name, loaded))
    for name, loaded in groups:
        print(f"\n{name}\n")
        print("| seed | A | B | A valid | B valid | A - B | A test | B test | A - B |")  # B: the mean of B's runs
        print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
        diffs: dict[str, list[float]] = {split: [] for split in SPLITS}
        for a_dir, a, bs in loaded:
            cells = []
            for split in SPLITS:
                b_value = statistics.fmean(b["row"][split] for _, b in bs)
                d = a["row"][split] - b_value
                diffs[split].append(d)
                cells += [f"{a['row'][split]:.4f}", f"{b_value:.4f}", f"{d:+.4f}"]
            b_names = " + ".join(Path(b_dir).name for b_dir, _ in bs)
            print(f"| {a['config'].get('seed', '-')} | {Path(a_dir).name} | {b_names} | " + " | ".join(cells) + " |")
        print()
        for split in SPLITS:
            print(f"{split}: {summary(diffs[split], args.tolerance)}")


if __name__ == "__main__":
    run_script(main)
