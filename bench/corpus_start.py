"""What a run pays for its corpus: read and encoded at every start, or encoded once and mapped.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/corpus_start.py [--megabytes 400] [--processes 2] [--repeats 3]

A PG-19 folder made up for the measure, in a temporary folder: `--megabytes` of books of 500 KB cut
from Shakespeare's training plays at random places (the bundled corpus: `make data`). Each measure
starts fresh processes and times `still.data.encoded.load_encoded` in them, as `still lm train` calls
it (Python's start and imports not counted):
- `in memory`: `STILL_CORPUS_CACHE=off`, read, the vocabulary built and every split encoded, what
  every start and every torchrun process did before the cache;
- `first`: the same, and the entry written, then mapped;
- `mapped`: a current entry mapped;
- `mapped, cold`: the same with the entry's files first dropped from the page cache
  (`posix_fadvise(DONTNEED)`), as at a start after the pages were evicted or the machine restarted.
Each process reports what `load_encoded` added to its peak resident memory; then it reads every
training id once (their sum: a pass of training reads them all) and reports what the corpus added to
its anonymous memory (`/proc/self/smaps_rollup`, less what the process held before `load_encoded`):
a mapped entry's pages are resident once read, but they are the page cache's, shared by every
process that maps them and given back under pressure, where anonymous memory is the process's own.
`--processes N` starts N processes at once, as torchrun's on one machine, for `in memory` and
`mapped`; the table gives the median of `--repeats` rounds (each in fresh processes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from still.bench import at_least_one, run_script


def make_corpus(folder: Path, megabytes: int, seed: int = 0) -> str:
    from still.data.text import load_shakespeare

    plays = "".join(d.text for d in load_shakespeare().train)
    rng, size = random.Random(seed), 500_000
    books = max(3, megabytes * 2)
    for split, count in (("train", books - 2 * max(1, books // 100)), ("validation", max(1, books // 100)),
                         ("test", max(1, books // 100))):
        (folder / split).mkdir(parents=True)
        for i in range(count):
            start = rng.randrange(len(plays) - size)
            (folder / split / f"{i:05d}.txt").write_text(plays[start : start + size], encoding="utf-8")
    return f"pg19:{folder}"


def memory() -> tuple[float, float]:
    """This process's resident and anonymous memory now (MB)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        fields[key.rstrip(":")] = int(value)
    return fields["Rss"] / 1024, fields["Anonymous"] / 1024


def child(name: str) -> None:
    import torch

    from still.data.encoded import load_encoded

    resident, anonymous = memory()  # (Python, PyTorch and still imported: not the corpus's)
    start = time.perf_counter()
    corpus = load_encoded(name)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - resident
    total = sum(int(d.sum(dtype=torch.int64)) for d in corpus.split("train")[0])
    print(json.dumps({"seconds": seconds, "mapped": corpus.entry is not None, "checksum": total,
                      "peak_mb": peak, "anonymous_mb": memory()[1] - anonymous}))


def evict(folder: Path) -> None:
    """Drop every file under `folder` from the page cache (clean pages only: the entry's files are
    flushed to disk when written)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(name: str, processes: int, env: dict[str, str]) -> list[dict]:
    started = [subprocess.Popen([sys.executable, __file__, "--child", name], env=env, stdout=subprocess.PIPE,
                                text=True) for _ in range(processes)]
    results = []
    for p in started:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a measuring process failed ({p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=at_least_one, default=400, help="the made-up corpus's size")
    parser.add_argument("--processes", type=at_least_one, default=2,
                        help="processes at once for `in memory` and `mapped`")
    parser.add_argument("--repeats", type=at_least_one, default=3, help="rounds; the table gives their medians")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    from still.train.results import format_table

    work = Path(tempfile.mkdtemp(prefix="still-corpus-start-"))
    try:
        name = make_corpus(work / "pg", args.megabytes)
        characters = sum(p.stat().st_size for p in (work / "pg").rglob("*.txt"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "STILL_PROGRESS": "0"}
        off, cached = {**env, "STILL_CORPUS_CACHE": "off"}, {**env, "STILL_CORPUS_CACHE": str(work / "corpora")}
        rounds: dict[str, list[list[dict]]] = {}
        for _ in range(args.repeats):
            shutil.rmtree(work / "corpora", ignore_errors=True)
            rounds.setdefault("in memory", []).append(run(name, args.processes, off))
            rounds.setdefault("first", []).append(run(name, 1, cached))
            rounds.setdefault("mapped", []).append(run(name, args.processes, cached))
            evict(work / "corpora")
            rounds.setdefault("mapped, cold", []).append(run(name, args.processes, cached))
        checksums = {r["checksum"] for rs in rounds.values() for round_ in rs for r in round_}
        assert len(checksums) == 1, "the measures read different ids"
        rows = []
        for measure, rs in rounds.items():
            assert all(r["mapped"] == (measure != "in memory") for round_ in rs for r in round_)
            def median(of, over=max, rs=rs):
                return statistics.median(over(r[of] for r in round_) for round_ in rs)

            rows.append({"measure": measure, "processes": len(rs[0]), "seconds": round(median("seconds"), 2),
                         "peak MB added loading, a process": round(median("peak_mb")),
                         "anonymous MB added, all processes": round(median("anonymous_mb", sum))})
        print(f"{characters / 1e6:,.0f} MB of books ({name}); medians of {args.repeats} rounds; seconds: "
              "the slowest process's load_encoded")
        print(format_table(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_script(main)
