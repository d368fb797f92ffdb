"""Distillation against labml-nn and torchdistill: one student epoch on MNIST with an online teacher.

    bash bench/setup_peers.sh
    OMP_WAIT_POLICY=PASSIVE .venv-bench/bin/python bench/distill_peers.py [--repeats 3] [--out DIR]

The same models in every implementation, built once and copied: the paper's teacher 784-1200-1200-10
(`still.distill.models.MLP`, in eval mode, frozen) and student 784-800-800-10, batch 128, SGD (lr
0.1, momentum 0.9, Nesterov), temperature 20, 90% of the loss on the soft targets. Each epoch starts
from the same student weights. What is timed, per implementation:

- `epoch`: one epoch over the 60,000 training images through the implementation's own data path:
  still's `Trainer` over `IndexBatches` (a batch gathered from the tensors in memory); torchdistill's
  `DistillationBox` over the loader it builds from its configuration (a `DataLoader` over its
  `BaseDatasetWrapper` of a `TensorDataset`, as its users feed it); labml-nn's step over the
  `DataLoader(dataset, batch_size, shuffle=True)` that its MNIST and CIFAR-10 configurations build
  (here over a `TensorDataset`: its own reads each image through torchvision, which is not installed);
- `steps`: the same implementation's training step over the same batches, gathered from the tensors
  in memory by the same indices, so that the data path is taken out.

The implementations:
- still: `Trainer` with `distillation_loss` and `Teacher`, as `still distill mnist` runs them (and,
  as a row of its own, `CachedTeacher`: the teacher's logits computed once, which the peers lack);
- torchdistill 1.1.5: `DistillationBox` built from a configuration as its examples write it
  (`WeightedSumLoss` of one `KDLoss` on the models' outputs, teacher frozen), its epoch loop as its
  examples' `train_one_epoch` (`forward_process`, `post_forward_process`) without their metric logger;
- labml-nn 0.5.1: `labml_nn.distillation.Configs.step` mirrored (its losses: `KLDivLoss(log_target=True)`
  with the default element mean, cross entropy, a weighted sum; its accuracy count; backward, step,
  zero_grad), leaving out its `tracker` calls, which log to an experiment it has not created here.
  Its weights are set so that its loss equals Hinton's, `alpha T^2 KL(batchmean) + (1 - alpha) CE`:
  the soft targets' weight `alpha T^2 C` (its KL is a mean over the C classes too).

Every implementation runs in this one process with glibc's malloc keeping the memory it frees, as
the `still` command sets it (`still.allocator.keep_freed_memory`; the Compressive Transformer peer
benchmark gives every implementation the same): otherwise freed blocks of a few MB go back to the
system and come back as fresh pages, faulted in inside the next step's products. `--glibc-default`
leaves glibc's defaults.

Before timing, each implementation's loss on one batch, with the same weights, is checked against
`still.distill.loss.distillation_loss` (printed; a difference over 1e-5 relative stops the run).
In each repeat, `epoch` and then `steps`, every implementation running that measure at once: they
take turns, CHUNK (20) steps each, so that the shared machine's drift hits each alike; each one's
time is the sum of its turns (still, whose two measures run the same loop, runs in both). The table
gives the median over repeats of each one's time, and of its ratio to still's online teacher in the
same measure and repeat.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from importlib import metadata  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler, TensorDataset  # noqa: E402

from still import allocator  # noqa: E402
from still.bench import at_least_one, out_folder, run_script  # noqa: E402
from still.distill.loss import distillation_loss  # noqa: E402
from still.distill.models import MLP, MLPConfig  # noqa: E402
from still.distill.teachers import CachedTeacher, Teacher  # noqa: E402
from still.train.loop import IndexBatches, Trainer  # noqa: E402
from still.train.results import format_table  # noqa: E402

TEMPERATURE, ALPHA, BATCH, LR = 20.0, 0.9, 128, 0.1
CHUNK = 20  # steps of one implementation before the next one's turn


def load_data() -> tuple[torch.Tensor, torch.Tensor, str]:
    from still.data.mnist import load_mnist

    data = load_mnist()  # (fetched into the cache where it is not there yet)
    return data.train_x, data.train_y, f"MNIST ({len(data.train_x):,} training images)"


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True)


# ----------------------------------------------------------------------------- still


class Still:
    name = "still"

    def __init__(self, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, cached: bool = False):
        self.x, self.y = x, y
        self.teacher = CachedTeacher.build(Teacher(teacher), x) if cached else Teacher(teacher)
        self.cached = cached
        if cached:
            self.name = "still, cached logits"

    def loss_fn(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        x = self.x[idx]
        soft = self.teacher.log_probs(idx if self.cached else x, TEMPERATURE)
        return distillation_loss(model(x), self.y[idx], temperature=TEMPERATURE, alpha=ALPHA, teacher_log_probs=soft)

    def loss(self, student: nn.Module, idx: torch.Tensor) -> float:
        return float(self.loss_fn(student, idx).detach())

    def run(self, student: nn.Module, batches: list[torch.Tensor], own_data: bool) -> Iterator[None]:
        # (its own data path is the index batches: `steps` and `epoch` are the same loop) The trainer
        # runs the epoch a chunk at a time: each `fit` to one more "epoch" of CHUNK batches goes on
        # from the last, with the same student, optimizer and momentum.
        chunks = [batches[i : i + CHUNK] for i in range(0, len(batches), CHUNK)]
        trainer = Trainer(student, self.loss_fn, sgd(student), desc=self.name, log=lambda message: None)
        for done in range(len(chunks)):
            trainer.fit(lambda epoch: chunks[epoch], done + 1)
            yield


# ----------------------------------------------------------------------------- torchdistill


def import_torchdistill() -> list[str]:
    """torchdistill, importable without torchvision (its model zoo subclasses torchvision's blocks at
    import; nothing here builds those models)."""
    notes = []
    try:
        import torchvision  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torchvision")
        stub.models = types.ModuleType("torchvision.models")
        for sub, names in (("resnet", ("BasicBlock", "Bottleneck", "ResNet", "conv1x1", "conv3x3")),
                           ("densenet", ("_DenseBlock", "_Transition", "_DenseLayer", "DenseNet"))):
            module = types.ModuleType(f"torchvision.models.{sub}")
            for attr in names:
                setattr(module, attr, type(attr, (nn.Module,), {}))
            setattr(stub.models, sub, module)
            sys.modules[f"torchvision.models.{sub}"] = module
        stub.datasets = types.ModuleType("torchvision.datasets")  # (its dataset registry lists this at import)
        sys.modules["torchvision"], sys.modules["torchvision.models"] = stub, stub.models
        sys.modules["torchvision.datasets"] = stub.datasets
        notes.append("torchdistill: stubbed `torchvision` (not installed: there is no CPU build here); its "
                     "model zoo subclasses torchvision's blocks and its dataset registry lists torchvision's "
                     "data sets at import; neither is used here")
    import torchdistill  # noqa: F401

    return notes


class TorchDistill:
    name = "torchdistill"

    def __init__(self, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor):
        from torchdistill.common.constant import def_logger

        def_logger.setLevel("WARNING")  # (it logs each model and loss it builds)
        self.teacher, self.x, self.y = teacher, x, y
        self.dataset = TensorDataset(x, y)

    def box(self, student: nn.Module):
        from torchdistill.core.distillation import DistillationBox

        config = {
            "num_epochs": 1,
            "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                                  "kwargs": {"batch_size": BATCH, "num_workers": 0, "drop_last": False}},
            "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False,
                        "forward_hook": {"input": [], "output": []}, "wrapper": None},
            "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [],
                        "forward_hook": {"input": [], "output": []}, "requires_grad": True, "wrapper": None,
                        "frozen_modules": []},
            "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": 0.9, "nesterov": True}},
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
                "criterion": {"key": "KDLoss", "kwargs": {
                    "student_module_path": ".", "student_module_io": "output",
                    "teacher_module_path": ".", "teacher_module_io": "output",
                    "temperature": TEMPERATURE, "alpha": 1 - ALPHA, "reduction": "batchmean"}},
                "weight": 1.0}}}},
        }
        box = DistillationBox(self.teacher, student, {"train": self.dataset}, config, torch.device("cpu"),
                              None, False, 1)
        box.pre_epoch_process(epoch=0)
        return box

    def loss(self, student: nn.Module, idx: torch.Tensor) -> float:
        return float(self.box(student).forward_process(self.x[idx], self.y[idx], {}))

    def run(self, student: nn.Module, batches: list[torch.Tensor], own_data: bool) -> Iterator[None]:
        box = self.box(student)
        # (own data: its examples' train_one_epoch)
        loader = box.train_data_loader if own_data else ((self.x[idx], self.y[idx], {}) for idx in batches)
        for i, (sample_batch, targets, supp_dict) in enumerate(loader, 1):
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            if i % CHUNK == 0:
                yield


# ----------------------------------------------------------------------------- labml-nn


class Labml:
    """labml_nn.distillation.Configs.step, its training branch, without the tracker."""

    name = "labml-nn"

    def __init__(self, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor):
        from labml_nn.helpers.metrics import Accuracy

        self.teacher, self.x, self.y = teacher, x, y
        # (reduction "mean": over batch and classes; PyTorch warns of it at every call, once shown here)
        self.kl_div_loss = nn.KLDivLoss(log_target=True)
        self.loss_func = nn.CrossEntropyLoss()
        self.soft_targets_weight = ALPHA * TEMPERATURE**2 * 10  # (x C: its KL is an element mean)
        self.label_loss_weight = 1 - ALPHA
        self.accuracy = Accuracy()
        self.accuracy.set_state(self.accuracy.create_state())  # (what its trainer does at an epoch's start)

    def forward(self, model: nn.Module, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        model.train(True)
        self.teacher.eval()
        with torch.no_grad():
            large_logits = self.teacher(data)
        output = model(data)
        soft_targets = F.log_softmax(large_logits / TEMPERATURE, dim=-1)
        soft_prob = F.log_softmax(output / TEMPERATURE, dim=-1)
        soft_targets_loss = self.kl_div_loss(soft_prob, soft_targets)
        label_loss = self.loss_func(output, target)
        loss = self.soft_targets_weight * soft_targets_loss + self.label_loss_weight * label_loss
        self.accuracy(output, target)
        return loss

    def loss(self, student: nn.Module, idx: torch.Tensor) -> float:
        return float(self.forward(student, self.x[idx], self.y[idx]))

    def run(self, student: nn.Module, batches: list[torch.Tensor], own_data: bool) -> Iterator[None]:
        optimizer = sgd(student)
        loader = (DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH, shuffle=True) if own_data
                  else ((self.x[idx], self.y[idx]) for idx in batches))
        for i, (data, target) in enumerate(loader, 1):
            loss = self.forward(student, data, target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i % CHUNK == 0:
                yield


# ----------------------------------------------------------------------------- the measure


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=at_least_one, default=3, help="timed epochs of each; their median counts")
    parser.add_argument("--threads", type=at_least_one, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--out", type=out_folder, default=None, help="write results.json and results.md here")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's malloc settings as they are (default: keep freed memory, as `still` does)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("STILL_PROGRESS", "0")
    missing = [d for d in ("torchdistill", "labml-nn") if version(d) == "not installed"]
    if missing:
        parser.error(f"{', '.join(missing)} not installed here: run `bash bench/setup_peers.sh` and this "
                     "script with .venv-bench/bin/python")
    kept = not args.glibc_default and allocator.keep_freed_memory()
    notes = import_torchdistill()
    x, y, source = load_data()
    torch.manual_seed(0)
    teacher = MLP(MLPConfig(hidden=(1200, 1200), dropout_input=0.2, dropout_hidden=0.5, max_norm=3.5)).eval()
    teacher.requires_grad_(False)
    start = time.perf_counter()
    impls = [Still(teacher, x, y), Still(teacher, x, y, cached=True), TorchDistill(teacher, x, y), Labml(teacher, x, y)]
    cache_seconds = time.perf_counter() - start  # (the cached teacher's logits, computed once)
    student0 = MLP(MLPConfig(hidden=(800, 800)))

    # the same loss, with the same weights, on one batch
    idx = torch.arange(BATCH)
    losses = {impl.name: impl.loss(copy.deepcopy(student0), idx) for impl in impls}
    want = losses["still"]
    for name, got in losses.items():
        if abs(got - want) > 1e-5 * abs(want):
            raise SystemExit(f"{name}'s loss on the first batch is {got!r}, still's {want!r}: not the same loss")

    warm = IndexBatches(len(x), BATCH, seed=1_000)(0)[:CHUNK]
    for impl in impls:  # (untimed: each one's first steps build what later steps reuse)
        for _ in impl.run(copy.deepcopy(student0), warm, own_data=False):
            pass
    times: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        batches = IndexBatches(len(x), BATCH, seed=repeat)(0)
        for measure in ("epoch", "steps"):
            # (still's own data path is these batches: its `epoch` and `steps` run the same loop, each
            # beside the others' of that measure, to which it is compared)
            running = {impl.name: impl.run(copy.deepcopy(student0), batches, own_data=measure == "epoch")
                       for impl in impls}
            spent = dict.fromkeys(running, 0.0)
            torch.manual_seed(repeat)
            while running:  # CHUNK steps of each in turn, so that the machine's drift hits each alike
                for name, steps in list(running.items()):
                    start = time.perf_counter()
                    finished = next(steps, StopIteration) is StopIteration
                    spent[name] += time.perf_counter() - start
                    if finished:
                        del running[name]
            for name, seconds in spent.items():
                times.setdefault((name, measure), []).append(seconds)

    def ratio(name: str, measure: str) -> str:  # (the median of each repeat's ratio to still's, same measure)
        pairs = zip(times[name, measure], times["still", measure])
        return f"{statistics.median(t / still for t, still in pairs):.3f}x"

    rows = []
    for impl in impls:
        epoch, steps = times[impl.name, "epoch"], times[impl.name, "steps"]
        rows.append({"implementation": impl.name, "loss on batch 0": f"{losses[impl.name]:.6f}",
                     "epoch s": round(statistics.median(epoch), 2),
                     "samples/s": round(len(x) / statistics.median(epoch)),
                     "epoch vs still": ratio(impl.name, "epoch"), "steps s": round(statistics.median(steps), 2),
                     "steps vs still": ratio(impl.name, "steps")})
    header = (f"data: {source}; batch {BATCH}; T {TEMPERATURE:g}; alpha {ALPHA}; {torch.get_num_threads()} threads; "
              f"torch {torch.__version__}; torchdistill {version('torchdistill')}; labml-nn {version('labml-nn')}; "
              f"{platform.processor() or platform.machine()}; repeats {args.repeats}; "
              f"malloc {'keeping freed memory (still.allocator)' if kept else 'glibc defaults'}; "
              f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    table = format_table(rows, title="One distillation epoch, student 784-800-800-10, teacher 784-1200-1200-10 "
                                     "(vs still: time over still's online-teacher time in the same measure "
                                     "and repeat; lower is faster)")
    print(header)
    print(table)
    print(f"still's cached logits: computed once in {cache_seconds:.2f} s (not in its epoch)")
    for note in notes:
        print(note)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(f"{header}\n\n{table}\n")
        (args.out / "results.json").write_text(json.dumps(
            {"header": header, "rows": rows, "times": {f"{k[0]} {k[1]}": v for k, v in times.items()},
             "cache_seconds": cache_seconds, "notes": notes}, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
