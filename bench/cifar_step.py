"""CIFAR-10 distillation's training steps: still's VGG (convolutions channels-last) against the same
network in NCHW, the layout labml-nn's and torchdistill's CIFAR models keep (neither converts).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/cifar_step.py [--repeats 3] [--steps 10]
        [--precision fp32 bf16] [--stages teacher student distilled] [--out DIR]

The stages of `still distill cifar10`'s labml preset, each step as the recipe runs it (the `Trainer`,
Adam at 2.5e-4, batch 64, random crops and flips):
- teacher: the VGG teacher (about 15M parameters) on the hard labels;
- student: the small VGG on the hard labels;
- distilled: the small VGG with the teacher online (frozen, in eval mode) at T = 5, alpha 0.5.

The images are random, CIFAR-shaped (the real set needs the internet; a step's cost does not depend
on the pixels). For each precision and stage the two layouts start from the same weights and take
turns of `--steps` steps, so that the shared machine's drift hits both alike. Printed: ms a step
(the median over repeats), the median of each repeat's ratio of still's time to NCHW's, and the
FLOP rate of the step's products (convolutions and the linear head, counted by
`torch.utils.flop_counter` from one step; the teacher's forward included in `distilled`) against this
machine's matmul peak in that precision (`still bench peak`'s measurement of it alone, once a repeat).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from still import allocator  # noqa: E402
from still.bench import at_least_one, out_folder, run_script  # noqa: E402
from still.bench.peak import matmul_flops  # noqa: E402
from still.distill.loss import distillation_loss  # noqa: E402
from still.distill.models import VGG, VGG_STUDENT, VGG_TEACHER  # noqa: E402
from still.distill.teachers import Teacher  # noqa: E402
from still.recipes.cifar10 import PRESETS, augment  # noqa: E402
from still.train.loop import IndexBatches, Trainer  # noqa: E402
from still.train.optim import build_optimizer  # noqa: E402
from still.train.precision import autocast  # noqa: E402
from still.train.results import format_table  # noqa: E402

CONFIG = PRESETS["labml"]
IMAGES = 2048
STAGES = ("teacher", "student", "distilled")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def nchw(model: nn.Module) -> nn.Module:
    """A copy of `model` with every 4-d parameter and buffer in PyTorch's default (NCHW) layout."""
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)


def stage_loss(stage: str, x: torch.Tensor, y: torch.Tensor, teacher: Teacher | None):
    """The recipe's loss of `stage` (`run_cifar10`'s `ce_loss` and online `distill_loss`)."""
    if stage != "distilled":
        return lambda model, idx: F.cross_entropy(model(augment(x[idx], CONFIG.normalization)), y[idx])

    def distill(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        batch = augment(x[idx], CONFIG.normalization)
        return distillation_loss(model(batch), y[idx], temperature=CONFIG.temperature, alpha=CONFIG.alpha,
                                 teacher_log_probs=teacher.log_probs(batch, CONFIG.temperature))

    return distill


def step_flops(loss_fn, model: nn.Module, precision: str) -> float:
    """Products' FLOPs of one step's loss and backward (a copy of the model, one batch)."""
    model = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        with autocast(precision, torch.device("cpu")):  # (the backward outside it, as in the `Trainer`)
            loss = loss_fn(model, torch.arange(CONFIG.batch_size))
        loss.backward()
    return float(counter.get_total_flops())


class Runner:
    """One layout's trainer, run `steps` batches at a time: each `fit` to one more "epoch" goes on
    from the last, with the same model and optimizer state."""

    def __init__(self, model: nn.Module, loss_fn, precision: str, batches: list[torch.Tensor], steps: int):
        self.chunks = [batches[i : i + steps] for i in range(0, len(batches), steps)]
        optimizer = build_optimizer(model.parameters(), CONFIG.optim)
        self.trainer = Trainer(model, loss_fn, optimizer, precision=precision, log=lambda message: None)
        self.done = 0

    def turn(self) -> float:
        start = time.perf_counter()
        self.trainer.fit(lambda epoch: self.chunks[epoch], self.done + 1)
        self.done += 1
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--repeats", type=at_least_one, default=3,
                        help="timed turns of each layout; their median counts")
    parser.add_argument("--steps", type=at_least_one, default=10, help="training steps a turn")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="the precisions to time (bf16: the recipe's autocast)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="the recipe's stages to time")
    parser.add_argument("--threads", type=at_least_one, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--out", type=out_folder, default=None, help="write results.json and results.md here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("STILL_PROGRESS", "0")
    kept = allocator.keep_freed_memory()  # as the `still` command runs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(IMAGES, 3, 32, 32, generator=g)  # (N, 3, 32, 32), normalised-looking
    y = torch.randint(0, 10, (IMAGES,), generator=g)
    torch.manual_seed(0)
    teacher = VGG(VGG_TEACHER)
    # (frozen copies: a Teacher freezes its model in place; weights as trained would be: random here)
    teachers = {"still": Teacher(copy.deepcopy(teacher)), "NCHW": Teacher(nchw(teacher))}
    torch.manual_seed(1)
    student = VGG(VGG_STUDENT)
    batches = IndexBatches(IMAGES, CONFIG.batch_size, seed=0)(0)
    needed = args.steps * (args.repeats + 1)
    batches = (batches * (needed // len(batches) + 1))[:needed]  # (a turn of warm-up, then the repeats')

    rows, times, peaks = [], {}, {p: [] for p in args.precision}
    for precision in args.precision:
        for stage in args.stages:
            model = teacher if stage == "teacher" else student
            layouts = {"still": copy.deepcopy(model), "NCHW": nchw(model)}
            runners = {name: Runner(m, stage_loss(stage, x, y, teachers[name]), precision, batches, args.steps)
                       for name, m in layouts.items()}
            flops = step_flops(stage_loss(stage, x, y, teachers["still"]), model, precision)
            for runner in runners.values():  # (untimed: the first turn builds what later ones reuse)
                runner.turn()
            spent = {name: [] for name in runners}
            for repeat in range(args.repeats):
                peaks[precision].append(matmul_flops(DTYPES[precision], 2048, 3, torch.device("cpu")))
                order = list(runners) if repeat % 2 == 0 else list(runners)[::-1]
                for name in order:
                    spent[name].append(runners[name].turn() / args.steps)
            times[f"{precision} {stage}"] = spent
            still_ms = statistics.median(spent["still"])
            nchw_ms = statistics.median(spent["NCHW"])
            rate = flops / still_ms
            ratio = statistics.median(s / n for s, n in zip(spent["still"], spent["NCHW"]))
            rows.append({"precision": precision, "stage": stage, "GFLOP a step": round(flops / 1e9, 1),
                         "still ms": round(still_ms * 1e3, 1), "NCHW ms": round(nchw_ms * 1e3, 1),
                         "still vs NCHW": f"{ratio:.3f}x",
                         "still GFLOP/s": round(rate / 1e9, 1),
                         "of its precision's peak": f"{rate / statistics.median(peaks[precision]):.1%}"})
            print(f"{precision} {stage}: still {still_ms * 1e3:.1f} ms, NCHW {nchw_ms * 1e3:.1f} ms a step", flush=True)

    peak_text = "; ".join(f"{p} matmul peak (median) {statistics.median(v) / 1e9:.1f} GFLOP/s"
                          for p, v in peaks.items())
    header = (f"random CIFAR-shaped images; batch {CONFIG.batch_size}; {args.steps} steps a turn; "
              f"repeats {args.repeats}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
              f"{platform.processor() or platform.machine()}; {peak_text}; "
              f"malloc {'keeping freed memory (still.allocator)' if kept else 'glibc defaults'}; "
              f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    table = format_table(rows, title="CIFAR-10 recipe steps (labml preset's VGGs): still's channels-last "
                                     "convolutions against NCHW (still vs NCHW: time ratio, lower is faster)")
    print(header)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(f"{header}\n\n{table}\n")
        (args.out / "results.json").write_text(json.dumps({"header": header, "rows": rows, "seconds_a_step": times},
                                                          indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
