"""CIFAR-10 distillation: labml.ai's experiment, with a real batch norm and the paper's scaling.

labml.ai (labml-nn 0.5.1, `labml_nn/distillation/`) trains a VGG-style teacher (blocks
[[64,64],[128,128],[256,256,256],[512,512,512],[512,512,512]], batch norm, a dropout of 0.1 before
every convolution) for 20 epochs, a small VGG-style student ([[32,32],[64,64],[128],[128],[128]],
batch norm, no dropout) alone for 10, and the same student distilled at temperature 5 for 10, all
with Adam at 2.5e-4 on images normalised to [-1, 1] (`Normalize((0.5,) * 3, (0.5,) * 3)`), and
reports test accuracy of 85% (teacher), 80% (student alone) and 82% (distilled). The `labml` preset
is that experiment (a probe: it had trained all three for 32 epochs, put the teacher's dropout
after each block's max-pool, 5 in all, and normalised by CIFAR-10's mean and std, which the
`tiny` preset still does).

Deviations from labml, on purpose: batch norm in eval mode uses running statistics (labml's
teacher and student both normalise with the statistics of the batch at evaluation too: the
teacher's soft targets for an image, and the test accuracies, would depend on the rest of the
batch); the soft term is alpha * T^2 * KL(batchmean) as in Hinton et al. rather than a KL with a
fixed weight; and the models' convolutions have no bias before their batch norm (which subsumes
it; see `still.distill.models`).

With augmentation (random crops after padding with 4 black pixels, as labml's torchvision
`RandomCrop(32, padding=4)` before `Normalize`; horizontal flips) the transfer set changes every
epoch, so the teacher runs online on each augmented batch; without it, its logits are computed
once (`CachedTeacher`).

Each stage records the data set it was trained and evaluated on (image counts and SHA-256 of the
images and labels) beside its settings, so a rerun with another `--data-dir` is refused rather than
reusing stages trained on other data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from still.config import check_fields, replace, save_config, to_dict
from still.data.cifar10 import Cifar10, load_cifar10, normalize
from still.distill.loss import check_temperature, distillation_loss
from still.distill.models import VGG, VGG_STUDENT, VGG_TEACHER, VGGConfig
from still.distill.teachers import CachedTeacher, Teacher
from still.errors import check
from still.recipes.common import (
    check_run_kind,
    check_stages,
    hold_run_folder,
    mark_new_run,
    number,
    other_students,
    plot_curves,
    predict,
    report_whole,
    student_stage,
    train_stage,
)
from still.train import distributed
from still.train.optim import OptimConfig
from still.train.precision import autocast, bf16_slower
from still.train.progress import log
from still.train.results import format_table, write_results
from still.train.seed import check_seed, seed_everything

RESULTS = ("results.json", "results.md", "test_accuracy.png")
"""What a run writes into its folder beside config.json and its stages' folders."""
LABML = {"teacher": 85.0, "student": 80.0, "distilled": 82.0}


@dataclass(frozen=True)
class Cifar10Config:
    preset: str = "labml"
    teacher: VGGConfig = VGG_TEACHER
    student: VGGConfig = VGG_STUDENT
    optim: OptimConfig = OptimConfig(name="adam", lr=2.5e-4, schedule="constant")
    epochs: int = 10
    """Epochs of the students' runs (alone and distilled), and of the teacher's where `teacher_epochs`
    is None."""
    teacher_epochs: int | None = None
    """Epochs of the teacher's run (labml: 20). None: `epochs`, as a config.json written before this
    setting meant."""
    batch_size: int = 64
    temperature: float = 5.0
    alpha: float = 0.5
    """Weight of the soft-target term (1 - alpha on the hard labels)."""
    augment: bool = True
    """Random crops and flips; when off, the teacher's logits are computed once."""
    normalization: Literal["mean_std", "half"] = "mean_std"
    """How the pixels are standardised (`still.data.cifar10.NORMALIZATIONS`): "mean_std", by CIFAR-10's
    per-channel mean and std; "half", (x - 0.5) / 0.5 (labml's). The default is what a config.json
    written before this setting meant."""
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: training and evaluation under bf16 autocast (float32 weights, optimizer state and losses;
    cached teacher logits computed in float32)."""

    def __post_init__(self) -> None:
        check_fields(self)  # values of the annotated types; lists given for tuples stored as tuples
        check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        check(self.teacher_epochs is None or self.teacher_epochs > 0,
              f"teacher_epochs must be > 0 (or None: epochs), got {self.teacher_epochs}")
        check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        check_seed(self.seed)
        check_temperature(self.temperature)
        check(0 <= self.alpha <= 1, f"alpha (the weight of the soft-target term) must be in [0, 1], got {self.alpha}")
        for name, model in (("teacher", self.teacher), ("student", self.student)):  # what CIFAR-10's data can feed
            check(model.in_channels == 3, f"the {name}'s in_channels must be 3 (CIFAR-10's colours), "
                                          f"got {model.in_channels}")
            check(model.classes == 10, f"the {name}'s classes must be 10 (CIFAR-10's), got {model.classes}")
            check(len(model.blocks) <= 5, f"the {name} has {len(model.blocks)} blocks, each halving the image: "
                                          "at most 5 fit CIFAR-10's 32x32")

    @property
    def teacher_run_epochs(self) -> int:
        """The teacher's epochs: `teacher_epochs`, or `epochs` where it is None."""
        return self.epochs if self.teacher_epochs is None else self.teacher_epochs


PRESETS = {
    # (teacher_epochs and normalization are not the config's defaults: those keep older config.json files' meaning)
    "labml": Cifar10Config(teacher_epochs=20, normalization="half"),
    # minutes on a CPU; for trying the recipe and for its tests
    "tiny": Cifar10Config(preset="tiny", teacher=VGGConfig(blocks=((16,), (32,)), dropout=0.1),
                          student=VGGConfig(blocks=((8,), (16,))), epochs=2, batch_size=32, augment=False),
}


def with_overrides(config: Cifar10Config, **overrides: Any) -> Cifar10Config:
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def augment(images: torch.Tensor, normalization: str = "mean_std") -> torch.Tensor:
    """Random 32x32 crops of the images, normalised by `normalization`, padded by 4 black pixels (the
    normalised value of a 0 pixel, -mean/std per channel: labml pads the raw image with 0 before
    normalising), and random horizontal flips. (B, 3, 32, 32)."""
    batch, device = images.shape[0], images.device
    black = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), normalization)  # (1, 3, 1, 1)
    black = black.to(device, images.dtype)
    padded = black.expand(batch, 3, 40, 40).clone()  # (B, 3, 40, 40)
    padded[:, :, 4:36, 4:36] = images
    # drawn on the CPU wherever the images are: a seed gives the same crops and flips on every device
    dy = torch.randint(0, 9, (batch, 1)).to(device)
    dx = torch.randint(0, 9, (batch, 1)).to(device)
    ar = torch.arange(32, device=device)
    rows = (dy + ar)[:, None, :, None]  # (B, 1, 32, 1)
    cols = (dx + ar)[:, None, None, :]  # (B, 1, 1, 32)
    out = padded[torch.arange(batch, device=device)[:, None, None, None],
                 torch.arange(3, device=device)[None, :, None, None], rows, cols]
    flip = (torch.rand(batch) < 0.5).to(device)
    out[flip] = out[flip].flip(-1)
    return out  # (B, 3, 32, 32)


def _labml(config: Cifar10Config, model: str) -> float | None:
    """labml's result for a row (`LABML`'s key) where the row's experiment is labml's: its models,
    their epochs, optimiser, batch size, augmentation and normalisation, and for the distilled
    student its temperature and alpha, as in labml's preset (any seed or precision). None otherwise
    (a probe: its 82, at T=5 after 10 epochs, stood beside a run of --epochs 1, or of --temperature 2)."""
    labml = PRESETS["labml"]
    compared = {"teacher": ("teacher", "teacher_run_epochs"), "student": ("student", "epochs"),
                "distilled": ("teacher", "teacher_run_epochs", "student", "epochs", "temperature", "alpha")}[model]
    same = all(getattr(config, f) == getattr(labml, f)
               for f in ("optim", "batch_size", "augment", "normalization", *compared))
    return LABML[model] if same else None


def _stage_model(model: VGGConfig) -> dict[str, Any]:
    """A model's settings as its stage records them: `dropout_at` only where not "pool", as stages
    written before the setting existed have them (their dropouts were after the pools)."""
    settings = to_dict(model)
    if settings["dropout_at"] == "pool":
        del settings["dropout_at"]
    return settings


UNRECORDED = {"data": "its data set"}  # (recorded since session 37: older stages cannot be told to match)


def data_identity(data: Cifar10) -> dict[str, Any]:
    """What the stages record of their data set: the numbers of training and test images, and a
    SHA-256 of each split's images and labels (about 0.1 s for the whole of CIFAR-10)."""

    def sha256(*tensors: torch.Tensor) -> str:
        digest = hashlib.sha256()
        for tensor in tensors:
            digest.update(tensor.contiguous().numpy())
        return digest.hexdigest()

    return {"train_images": len(data.train_x), "train_sha256": sha256(data.train_x, data.train_y),
            "test_images": len(data.test_x), "test_sha256": sha256(data.test_x, data.test_y)}


def run_cifar10(config: Cifar10Config, data_dir: str | Path, out: str | Path, overwrite: bool = False,
                print_table: bool = True) -> dict[str, Any]:
    out = Path(out)
    check_run_kind(out, "distill cifar10", ("config.json", *RESULTS))
    with hold_run_folder(out):
        return _run_cifar10(config, data_dir, out, overwrite, print_table)


def _run_cifar10(config: Cifar10Config, data_dir: str | Path, out: Path, overwrite: bool,
                 print_table: bool) -> dict[str, Any]:
    data = load_cifar10(data_dir)
    device = distributed.process_device()  # the data set moves there once (614 MB of training images in fp32)
    train_x = normalize(data.train_x, config.normalization).to(device)  # (N, 3, 32, 32) float32
    test_x = normalize(data.test_x, config.normalization).to(device)
    train_y, test_y = data.train_y.to(device), data.test_y.to(device)
    n = len(train_x)

    def batch_x(idx: torch.Tensor) -> torch.Tensor:
        x = train_x[idx]
        return augment(x, config.normalization) if config.augment else x

    def evaluate(model: nn.Module) -> dict[str, Any]:  # (the trainer calls it under its autocast; below, it is ours)
        with autocast(config.precision, device):
            logits = predict(model, test_x, batch_size=500)
        return {"test_accuracy": round(100 * float((logits.argmax(-1) == test_y).float().mean()), 2)}

    def ce_loss(model, idx):
        return F.cross_entropy(model(batch_x(idx)), train_y[idx])

    common = {"optim": to_dict(config.optim), "epochs": config.epochs, "batch_size": config.batch_size,
              "augment": config.augment, "seed": config.seed, "data": data_identity(data),
              **({"precision": config.precision} if config.precision != "fp32" else {}),  # (see run_mnist)
              # (as precision: recorded where not the default, so the stages written before it still match)
              **({"normalization": config.normalization} if config.normalization != "mean_std" else {})}
    if (slower := bf16_slower(config.precision, device)) and distributed.current().main:
        log(f"--precision bf16: {slower}")
    # (+ 0.0: alpha -0.0 is 0's stage; `number`: T 5.0000001 is not T5's)
    name = student_stage(out, lambda written: (f"distilled-T{written(config.temperature)}"
                                               f"-a{written(config.alpha + 0.0)}"), config.temperature, config.alpha)
    teacher_cfg = {**common, "model": _stage_model(config.teacher), "epochs": config.teacher_run_epochs}
    student_cfg = {"model": _stage_model(config.student), **common}
    distilled_cfg = {**student_cfg, "temperature": config.temperature, "alpha": config.alpha, "teacher": teacher_cfg}
    check_stages(out, {"teacher": teacher_cfg, "student": student_cfg, name: distilled_cfg}, overwrite, UNRECORDED)
    mark_new_run(out, config, "distill cifar10", overwrite, RESULTS)
    rows, curves, seconds = [], [], {}

    seed_everything(config.seed)
    teacher = VGG(config.teacher)
    state, seconds["teacher"] = train_stage("teacher", out, teacher, config.optim, config.teacher_run_epochs, n,
                                            config.batch_size, ce_loss, evaluate, config.seed, teacher_cfg,
                                            overwrite=overwrite, unrecorded=UNRECORDED, precision=config.precision)
    rows.append({"model": "teacher", **evaluate(teacher), "labml": _labml(config, "teacher")})
    curves.append(("teacher", state.history))

    seed_everything(config.seed + 1)
    student = VGG(config.student)
    state, seconds["student"] = train_stage("student", out, student, config.optim, config.epochs, n, config.batch_size,
                                            ce_loss, evaluate, config.seed + 1, student_cfg, overwrite=overwrite,
                                            unrecorded=UNRECORDED, precision=config.precision)
    rows.append({"model": "student alone", **evaluate(student), "labml": _labml(config, "student")})
    curves.append(("student alone", state.history))

    frozen = Teacher(teacher)
    # (cached in fp32 whatever the precision, as in run_mnist; an online teacher runs in the step's precision)
    cached = None if config.augment else CachedTeacher.build(frozen, train_x).to(device)

    def distill_loss(model, idx):
        if cached is not None:
            x, targets = train_x[idx], cached.log_probs(idx, config.temperature)
        else:
            x = batch_x(idx)
            targets = frozen.log_probs(x, config.temperature)  # online: the augmented batch
        return distillation_loss(model(x), train_y[idx], temperature=config.temperature, alpha=config.alpha,
                                 teacher_log_probs=targets)

    seed_everything(config.seed + 1)
    distilled = VGG(config.student)
    state, seconds[name] = train_stage(name, out, distilled, config.optim, config.epochs, n, config.batch_size,
                                       distill_loss, evaluate, config.seed + 1, distilled_cfg, overwrite=overwrite,
                                       unrecorded=UNRECORDED, precision=config.precision)
    rows.append({"model": f"distilled T={number(config.temperature)}", **evaluate(distilled),
                 "labml": _labml(config, "distilled")})
    curves.append(("distilled", state.history))

    title = (f"CIFAR-10 test accuracy (%), preset {config.preset}, {len(test_y)} test images, "
             f"alpha {number(config.alpha + 0.0)}, epochs {config.teacher_run_epochs} (teacher) and "
             f"{config.epochs} (students)"  # (a probe: the table could not tell --epochs 1 from the preset's)
             + (f", {config.precision}" if config.precision != "fp32" else ""))
    meta = {"config": to_dict(config), "seconds": {k: round(v, 1) for k, v in seconds.items()}, "labml": LABML}
    if not distributed.current().main:  # rank 0 writes and prints
        return {"rows": rows, "meta": meta, "table": None}
    labels, _ = other_students(out, "distilled-", {name}, {**distilled_cfg, "temperature": None},
                               {"alpha": lambda alpha: f"alpha {number(alpha)}"})
    note = None
    if labels:  # (each command's table holds its student, as in run_mnist; one temperature a command here)
        meta["other_students"] = labels
        note = (f"{out} also holds finished students not in this table: {'; '.join(labels)} (each is in the "
                "table of a command with its --temperature and --alpha)")
        log(note)
    # labml's numbers are for its experiment: beside another's they would read as a target
    columns = ["model", "test_accuracy"] + (["labml"] if any(row["labml"] is not None for row in rows) else [])
    table = format_table(rows, columns, title)
    if print_table:  # (before the files, as in run_mnist)
        print(table)
    with report_whole():
        save_config(config, out / "config.json")
        write_results(out, "results", rows, columns=columns, title=title, meta=meta, note=note)
        plot_curves(out / "test_accuracy.png",
                    [(label, [h["epoch"] for h in hist], [h["test_accuracy"] for h in hist])
                     for label, hist in curves],
                    xlabel="epoch", ylabel="test accuracy (%)", title=f"CIFAR-10, preset {config.preset}")
    if print_table:
        print(f"written to {out}/results.json, results.md and test_accuracy.png")
    return {"rows": rows, "meta": meta, "table": table}
