"""Samples per second of one student epoch on MNIST: plain (hard labels), distilled with an online
teacher (the teacher runs on every batch), and distilled with cached teacher logits.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/distill_throughput.py [--repeats 3] [--threads 2]

Networks of the paper: teacher 784-1200-1200-10, student 784-800-800-10; batch 128; the same
training loop as `still distill mnist`. Prints medians over the repeats and the ratios, measured
in one run. Uses the real MNIST if it is in the cache, random data of the same shape otherwise.

MFU: the matrix-product FLOPs of an epoch (the student's forward and backward, and the online
teacher's forward where it runs: counted from shapes by `torch.utils.flop_counter` on one full
batch, and per sample times the epoch's samples, so that a last, partial batch counts its own rows)
over the median epoch time, against the machine's fp32 matmul peak measured in the same run
(`still bench peak`'s measurement, once a repeat).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from still.bench import at_least_one, run_script  # noqa: E402
from still.bench.peak import peak  # noqa: E402
from still.distill.loss import distillation_loss  # noqa: E402
from still.distill.models import MLP, MLPConfig  # noqa: E402
from still.distill.teachers import CachedTeacher, Teacher  # noqa: E402
from still.train.loop import IndexBatches, Trainer  # noqa: E402
from still.train.results import format_table  # noqa: E402


def load_data() -> tuple[torch.Tensor, torch.Tensor, str]:
    from still.data.cache import cache_dir
    from still.data.mnist import MNIST_FILE, load_mnist

    if MNIST_FILE.path(cache_dir()).is_file():
        data = load_mnist()
        return data.train_x, data.train_y, "MNIST (60,000 training images)"
    g = torch.Generator().manual_seed(0)
    return torch.rand(60000, 784, generator=g), torch.randint(0, 10, (60000,), generator=g), "random, MNIST-shaped"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--repeats", type=at_least_one, default=3, help="timed epochs of each; their median counts")
    parser.add_argument("--threads", type=at_least_one, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--batch-size", type=at_least_one, default=128, help="examples a training step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("STILL_PROGRESS", "0")
    x, y, source = load_data()
    n = len(x)
    torch.manual_seed(0)
    teacher = Teacher(MLP(MLPConfig(hidden=(1200, 1200), dropout_input=0.2, dropout_hidden=0.5, max_norm=3.5)))
    temperature, alpha = 20.0, 0.9

    start = time.perf_counter()
    cached = CachedTeacher.build(teacher, x)
    cache_seconds = time.perf_counter() - start

    def online(m, xb, yb):  # (the batch gathered once, for the teacher and the student)
        return distillation_loss(m(xb), yb, temperature=temperature, alpha=alpha,
                                 teacher_log_probs=teacher.log_probs(xb, temperature))

    losses = {
        "plain student (hard labels)": lambda m, idx: F.cross_entropy(m(x[idx]), y[idx]),
        "distilled, online teacher": lambda m, idx: online(m, x[idx], y[idx]),
        "distilled, cached logits": lambda m, idx: distillation_loss(
            m(x[idx]), y[idx], temperature=temperature, alpha=alpha,
            teacher_log_probs=cached.log_probs(idx, temperature)),
    }
    times: dict[str, list[float]] = {k: [] for k in losses}
    flops = {name: step_flops(loss_fn, x, args.batch_size) for name, loss_fn in losses.items()}
    peaks: list[float] = []
    for repeat in range(args.repeats):
        peaks.append(peak()["fp32"])
        for name, loss_fn in losses.items():  # interleaved, so drifts in machine load hit all alike
            torch.manual_seed(repeat)
            student = MLP(MLPConfig(hidden=(800, 800)))
            optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True)
            trainer = Trainer(student, loss_fn, optimizer, desc=name)
            start = time.perf_counter()
            trainer.fit(IndexBatches(n, args.batch_size, seed=repeat), 1)
            times[name].append(time.perf_counter() - start)

    plain = statistics.median(times["plain student (hard labels)"])
    peak_fp32 = statistics.median(peaks)
    # FLOPs are linear in the rows: an epoch's are a sample's times its samples. (Full batches times the
    # steps counted the partial last batch as a whole one: at --batch-size 40000, 80,000 samples an epoch
    # of 60,000, and an MFU of 102.6%.)
    per_sample = {name: step / min(args.batch_size, n) for name, step in flops.items()}
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        achieved = per_sample[name] * n / median
        rows.append({"epoch": name, "seconds (median)": round(median, 2), "samples/s": round(n / median),
                     "time vs plain": f"{median / plain:.2f}x", "MFLOP a step": round(flops[name] / 1e6, 1),
                     "GFLOP/s": round(achieved / 1e9, 1), "MFU": f"{achieved / peak_fp32:.1%}"})
    print(f"data: {source}; batch {args.batch_size}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}; repeats {args.repeats}; fp32 matmul peak (median) "
          f"{peak_fp32 / 1e9:.1f} GFLOP/s")
    print(format_table(rows, title="One student epoch (784-800-800-10), teacher 784-1200-1200-10"))
    print(f"computing the cached logits once: {cache_seconds:.2f} s ({n / cache_seconds:.0f} samples/s)")


def step_flops(loss_fn, x: torch.Tensor, batch_size: int) -> float:
    """Matrix-product FLOPs of one training step's loss and backward (a fresh student, one batch)."""
    student = MLP(MLPConfig(hidden=(800, 800)))
    with FlopCounterMode(display=False) as counter:
        loss_fn(student, torch.arange(min(batch_size, len(x)))).backward()
    return float(counter.get_total_flops())


if __name__ == "__main__":
    run_script(main)
