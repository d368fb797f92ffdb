"""Pieces the recipes share: training one stage in its own directory, prediction, plots."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
import shutil
import signal
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from still.config import changed_settings, save_config
from still.data.text import SPLITS
from still.errors import StillError
from still.train import distributed
from still.train.checkpoint import list_checkpoints, newest_config, written_here
from still.train.io import atomic_write_new_bytes, atomic_write_text, printable, temporary_of
from still.train.loop import IndexBatches, Trainer, TrainState, deferred_signals
from still.train.optim import OptimConfig, build_optimizer, build_scheduler
from still.train.progress import log

RUN_KINDS = {"language-model": ("still.recipes.lm", "LMConfig"),
             "distill mnist": ("still.recipes.mnist", "MnistConfig"),
             "distill cifar10": ("still.recipes.cifar10", "Cifar10Config")}
"""The kinds of run directory, by the config class each keeps in its config.json."""


def check_run_kind(run_dir: Path, kind: str, writes: Collection[str] = ()) -> None:
    """Refuse (exit 2, nothing touched) a run directory that holds another kind of run (its
    config.json is another recipe's config): one recipe run into another's directory would replace
    its config.json and results. (Stage directories' own checks cannot see it: the recipes keep
    their stages in different places.) A directory that is a stage of a run in the folder above
    it (a distillation's teacher, say) is refused too: a run of its own there would be one of that
    run's stages, and `--overwrite` would delete the stage. So is a run's checkpoints folder, one
    inside it, and a run folder whose checkpoints folder holds a run: that folder is for the run's
    checkpoints alone, which its rotation and `--overwrite` delete (a run inside, named `ckpt-...`,
    would be taken for one; probes: `--overwrite` deleted the folder whole, and the run inside).

    `writes`: the names (patterns) of what the run writes into the directory, for a run that will:
    a directory that holds no run of still's but files of those names is refused, with `--overwrite`
    too (a probe: a user's config.json and results.md were written over; they are not still's to
    delete either)."""
    place = run_dir.resolve()  # (where the files would go: through symbolic links, `..` taken)
    for folder in (place, *place.parents):
        if folder.name == "checkpoints" and _still_run(folder.parent):
            raise StillError(f"{run_dir} is {'inside ' if folder != place else ''}the checkpoints folder of "
                             f"{_whose(folder.parent)}, which is for its checkpoints alone: choose another directory")
    checkpoints = run_dir / "checkpoints"
    nested = sorted(path.name for path in (checkpoints.iterdir() if checkpoints.is_dir() else ())
                    if path.is_dir() and not path.name.startswith(("ckpt-", ".ckpt-")) and _still_run(path))
    if nested:
        raise StillError(f"{checkpoints} holds a run ({nested[0]}), where this run's checkpoints alone go: move it "
                         "out, or choose another directory")
    if not (place / "config.json").exists() and (place / "stage.json").exists():
        # a stage of a run in the folder above (a distillation's teacher ...): where `run_dir` leads, not
        # as typed (a probe: `--out .` in the teacher's folder, `teacher/checkpoints/..`, a link, deleted it)
        owner = run_kind(place.parent)
        if owner is not None:
            raise StillError(f"{run_dir} is the {place.name} stage of the {owner} run in {place.parent}, "
                             f"not a {kind} run: choose another directory")
    data = _json_object(place / "config.json")
    if data is not None and not _fits(data, kind):
        for other in RUN_KINDS:
            if other != kind and _fits(data, other):
                raise StillError(f"{run_dir} holds a {other} run, not a {kind} run: choose another directory")
    if not writes or not place.is_dir() or (data is not None and _fits(data, kind)) or _holds_stages(place, kind):
        return  # no run to write, no folder yet, or one of still's (no readable config: its stages or checkpoints)
    theirs = sorted(path.name for path in place.iterdir()
                    if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in writes)
                    and not (path.name == "checkpoints" and path.is_dir() and not any(path.iterdir())))  # (nothing
    # to lose in an empty one, made for the run, or a link to one on another disk)
    if theirs:
        raise StillError(f"{run_dir} holds no run of still's, but {', '.join(theirs)}, which a run there writes (or "
                         "--overwrite deletes): move them out, or choose another directory")


STAGE_NAMES = {"distill mnist": ("teacher", "baseline", "student-*"),
               "distill cifar10": ("teacher", "student", "distilled-*")}
"""The stage folders of each distillation's run folder, by name."""


def _holds_stages(folder: Path, kind: str) -> bool:
    """Whether `folder` holds a run of `kind` of still's with no config.json (an older still's): a
    stage.json of still's of its own (a language model's), or in its stage folders (`STAGE_NAMES`, a
    distillation's); or still's checkpoints. (A probe: any folder with a stage.json counted, so a
    user's folder of language-model runs, their own results.md and config.json beside, was written over.)"""
    if kind in STAGE_NAMES:
        stages = any(_stills_stage(path) for path in folder.iterdir()
                     if path.is_dir() and any(fnmatch.fnmatchcase(path.name, name) for name in STAGE_NAMES[kind]))
    else:
        stages = _stills_stage(folder)
    return stages or bool(list_checkpoints(folder / "checkpoints"))


DIGESTS = ("corpus_sha256", "split_sha256", "vocab_sha256")
"""What a language model's stage.json records of its text beside its settings."""


def _json_object(path: Path) -> dict | None:
    """A config.json's or stage.json's data (None: none there, or none readable as a JSON object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stills_settings(data: dict) -> bool:
    """Whether a stage.json's data is still's: a language model's run folder's (its config, `_fits`,
    and the digests of its text) or a distillation stage's (what `train_stage` records: a model, its
    optimizer and epochs, and more)."""
    return (_fits({key: value for key, value in data.items() if key not in DIGESTS}, "language-model")
            or ({"model", "optim", "epochs"} <= set(data)
                and isinstance(data["model"], dict) and isinstance(data["optim"], dict)))


def _stills_stage(folder: Path) -> bool:
    """Whether `folder` holds a stage.json of still's (`_stills_settings`; a probe: a user's own, as
    {"env": "prod"}, made their folder a run of still's, to be written over)."""
    data = _json_object(folder / "stage.json")
    return data is not None and _stills_settings(data)


def _whose(folder: Path) -> str:
    """A folder of still's (`_still_run`) in words: "the run in <folder>", or where it is a stage of
    one (a distillation's teacher), "the teacher stage of the run in <the folder above>"."""
    if run_kind(folder) is None and run_kind(folder.parent) is not None:
        return f"the {folder.name} stage of the run in {folder.parent}"
    return f"the run in {folder}"


_CORE = {"language-model": {"preset", "model", "optim", "corpus", "byte_level", "batch_size", "segment_len", "steps",
                              "eval_every", "eval_segments", "seed"},
         "distill mnist": {"preset", "teacher", "student", "teacher_optim", "student_optim", "teacher_epochs",
                           "student_epochs", "batch_size", "jitter", "temperatures", "alpha", "omit_digit",
                           "train_subset", "test_subset", "seed"},
         "distill cifar10": {"preset", "teacher", "student", "optim", "epochs", "batch_size", "temperature", "alpha",
                             "augment", "seed"}}
"""The settings that every still's config.json of each kind holds: its config's fields in the first
still (fields are only ever added; config.json holds them all)."""


def _fits(data: dict, kind: str) -> bool:
    """Whether a config.json's data is a config of `kind`: its keys among that config's fields, and
    all of those every still wrote (a probe: a user's `{}`, or `{"batch_size": 64}`, was taken for a
    run of every kind, and written over)."""
    import dataclasses
    import importlib

    module, cls = RUN_KINDS[kind]
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    return _CORE[kind] <= set(data) <= fields


def _still_run(folder: Path) -> bool:
    """Whether `folder` holds a run of still's (a config.json of one of `RUN_KINDS`) or a stage of one."""
    return run_kind(folder) is not None or _stills_stage(folder)


def run_kind(run_dir: Path) -> str | None:
    """Which kind of run (`RUN_KINDS`) the directory holds, by its config.json; None where it holds
    none that one kind's config alone fits."""
    data = _json_object(run_dir / "config.json")
    kinds = [kind for kind in RUN_KINDS if data is not None and _fits(data, kind)]
    return kinds[0] if len(kinds) == 1 else None


def check_stage_config(stage_dir: Path, config: dict[str, Any], overwrite: bool = False,
                       defaults: dict[str, Any] | None = None, unrecorded: dict[str, str] | None = None,
                       files: Sequence[str] = ()) -> None:
    """A stage directory holds one config: refuse (exit 2, nothing touched) to mix another into it.

    With `overwrite`, a stage whose settings changed is deleted and started again. `defaults`: the
    config's defaults; a top-level setting the stage's config lacks (a run made before the setting
    existed) counts as at its default. `unrecorded`: top-level settings with no default, each with
    what it records (CIFAR-10's "data": "its data set"): a stage that lacks one was made before it
    was recorded, and cannot be told to match; it is refused saying so. `files`: what still writes
    there, which `--overwrite` deletes (`STAGE_FILES`, a language model's run folder's, unless given).
    """
    path = stage_dir / "stage.json"
    if _to_start_again(stage_dir, config, overwrite, defaults, unrecorded):
        _start_again(stage_dir, files or STAGE_FILES)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")  # (not again where it holds them)


def _to_start_again(stage_dir: Path, config: dict[str, Any], overwrite: bool, defaults: dict[str, Any] | None = None,
                    unrecorded: dict[str, str] | None = None) -> bool:
    """Whether `check_stage_config` starts the stage in `stage_dir` again (`overwrite`, and other
    settings there, or unreadable ones); its refusals (exit 2), nothing touched."""
    recorded = _recorded_settings(stage_dir, overwrite)
    if recorded is not None:
        existing, where = recorded
        if defaults:
            existing = {k: defaults[k] for k in config if k not in existing and k in defaults} | existing
        lacking = [what for k, what in (unrecorded or {}).items() if k in config and k not in existing]
        if lacking and not overwrite:
            raise StillError(f"{stage_dir} was written by an older still that did not record {', '.join(lacking)}, "
                             "so whether it matches this run is unknown; choose another --out, or pass --overwrite "
                             "to train it again")
        if existing == config:
            return False
        if not overwrite:
            changed = changed_settings(existing, config)
            raise StillError(f"{stage_dir} holds a run with different settings ({', '.join(changed)}{where}); "
                             "choose another --out, or pass --overwrite to start it again")
    elif not (overwrite and (stage_dir / "stage.json").exists()):
        return False  # (a new stage; an unreadable stage.json, let through by `_recorded_settings`, starts again)
    if stage_dir.is_symlink():  # (`_start_again` deletes in it: not through a link, whose target may be anything)
        raise StillError(f"{stage_dir} is a symbolic link (to {os.readlink(stage_dir)}): --overwrite does not delete "
                         "what it points to; give that folder itself, or remove the link")
    return True


def check_stages(out: Path, stages: dict[str, dict[str, Any]], overwrite: bool,
                 unrecorded: dict[str, str] | None = None) -> None:
    """Refuse (exit 2, nothing touched) what `train_stage` would refuse of each of a run's stages (by
    folder name in run folder `out`, each with its settings) as it came to it: called before the run
    writes or deletes anything (a probe: a distillation's `--overwrite` refused at a student's folder,
    which held a run of its own, had removed the results of the run there and replaced its config.json
    already: `mark_new_run`), and before any stage trains."""
    def check() -> None:
        for name, config in stages.items():
            _not_a_run(out, name)
            _to_start_again(out / name, config, overwrite, unrecorded=unrecorded)

    distributed.current().on_main(check)


def _not_a_run(out: Path, name: str) -> None:
    """Refuse a stage folder that holds a run of its own (given this run's folder above it: the
    stage's `--overwrite` would delete it)."""
    other = run_kind(out / name)
    if other is not None:
        raise StillError(f"{out / name} holds a {other} run, not the {name} stage of the run in {out}: "
                         "choose another --out")


STAGE_FILES = ("checkpoints", "stage.json", "config.json", "vocab.json", "results.json", "results.md", "curves.png",
               *(f"eval-{split}{end}" for split in SPLITS for end in (".json", ".md", "-by-position.png")))
"""What still writes into a language model's run folder: what `--overwrite` deletes to start the run
again (with the temporaries of their writes: `_temporary`). `still lm eval`'s files by their splits'
names (a probe: `eval-*.md` took a user's eval-plan.md)."""

DISTILL_STAGE_FILES = ("checkpoints", "stage.json")
"""What still writes into a distillation's stage folder (teacher/ ...): its checkpoints and settings
alone (a probe: `STAGE_FILES` there deleted a user's config.json, results.md, ... in teacher/)."""


def _temporary(path: Path, files: Sequence[str]) -> bool:
    """Whether `path` is a file `atomic_write` left half-written (`temporary_of`) of a file named in
    `files` (a probe: `.*.tmp` took a user's .draft.tmp, and a folder .work.tmp/ whole)."""
    found = temporary_of(path.name)
    return (found is not None and path.is_file() and not path.is_symlink()
            and any(fnmatch.fnmatchcase(found[0], pattern) for pattern in files))


def _start_again(stage_dir: Path, files: Sequence[str] = STAGE_FILES) -> None:
    """Start a stage again for --overwrite: delete what still wrote there (`files`), and only
    that: files of the user's, and a run in a folder inside it (which may be training now), stay;
    so does what still did not write in its checkpoints folder (`written_here`; a probe: a run
    deeper in it, and a user's model.pt, were deleted with the folder), and the folder with them.
    Not through a symbolic link (`_to_start_again` refuses one first); but a `checkpoints` link (to a
    bigger disk) stays, its checkpoints of still's deleted. The folder itself stays: a run folder's lock
    (`hold_run_folder`) is held on it."""
    kept = []
    # what marks the folder as still's last (a review: killed between stage.json and vocab.json, it was
    # left as a folder of no run's holding vocab.json, which every later run refused)
    last = {"checkpoints": 1, "config.json": 2, "stage.json": 3}
    for path in sorted(stage_dir.iterdir(), key=lambda path: (last.get(path.name, 0), path.name)):
        if _temporary(path, files):
            path.unlink()
        elif not any(fnmatch.fnmatchcase(path.name, pattern) for pattern in files):
            kept.append(path.name)
        elif path.name == "checkpoints" and path.is_symlink():  # (to a bigger disk, say: a probe, the link went,
            # and the new run's checkpoints with it to this disk) the link stays, still's checkpoints there go
            if path.is_dir():
                kept += [f"{path.name}/{name}" for name in _empty_checkpoints(path, remove=False)]
            log(f"--overwrite: kept the symbolic link {printable(str(path))} (to {printable(os.readlink(path))})"
                + (", and deleted still's checkpoints in it" if path.is_dir() else ""))
        elif path.name == "checkpoints" and path.is_dir():
            kept += [f"{path.name}/{name}" for name in _empty_checkpoints(path)]
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if kept:
        log(f"--overwrite: left what still did not write in {printable(str(stage_dir))}: {', '.join(sorted(kept))}")


def _empty_checkpoints(folder: Path, remove: bool = True) -> list[str]:
    """Delete what still wrote in checkpoints folder `folder` (`written_here`), then (`remove`) the
    folder where nothing else is left; the names of what is left."""
    kept = []
    for path in sorted(folder.iterdir()):
        if not written_here(path.name):
            kept.append(path.name)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if not kept and remove:
        folder.rmdir()
    return kept


@contextlib.contextmanager
def hold_run_folder(out: Path) -> Iterator[None]:
    """Hold run folder `out` (made if missing) while this process trains into it: a second still
    training into it at the same time is refused (exit 2, nothing touched), where it would do all of
    the first one's work again beside it. The lock is the folder's own (`flock`), which the
    operating system lets go when the process ends, however it ends. Under torchrun rank 0 holds it,
    and every rank is told whether it could (a rank refused alone left the others waiting for it
    until torchrun's timeout). The folders it made stay only where the run wrote into them. On a
    file system that takes no locks (some network ones) the run goes on without."""
    import fcntl

    if out.is_symlink() and not out.exists():
        raise StillError(f"{printable(str(out))} is a symbolic link to {printable(os.readlink(out))}, which does not "
                         "exist: make that folder, or choose another --out")
    dist = distributed.setup()
    made: list[Path] = []  # (innermost first)
    fd = None

    def hold() -> None:
        nonlocal fd
        # the folders this makes, one by one, as they are (a probe: `N/x/../run`, named as typed, left N and N/x)
        for folder in reversed((out, *out.parents)):
            if not folder.exists():
                with contextlib.suppress(FileExistsError):  # (made by another process meanwhile)
                    folder.mkdir()
                    made.insert(0, folder.resolve())
        if not out.is_dir():
            out.mkdir()  # (a file there: its error, as before)
        fd = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StillError(f"{printable(str(out))} is in use: another still process is training into it now; "
                             "wait for it to end, or choose another --out") from None
        except OSError:
            pass  # (no locks on this file system)

    try:
        dist.on_main(hold)
        yield
    finally:
        if fd is not None:
            os.close(fd)
        for folder in made:  # (a run refused before it wrote anything leaves none behind)
            with contextlib.suppress(OSError):  # (not empty: the run wrote into it)
                folder.rmdir()


@contextlib.contextmanager
def report_whole() -> Iterator[None]:
    """Write a run's report (results.json, results.md, its plot, config.json) with SIGINT and SIGTERM
    deferred to its end (a probe: one between two writes left results.json of this command beside
    results.md and the plot of the one before). The signal then goes to the handler it would have
    met (the command stops, exit 130 or 143, its report whole); a second SIGINT still stops at once."""
    with deferred_signals() as received:
        yield
    if received:
        signal.raise_signal(received[0])


def mark_new_run(out: Path, config: Any, kind: str, overwrite: bool = False, results: Sequence[str] = ()) -> None:
    """A run folder that holds no run yet takes its config.json at once (the run writes it again as
    it ends): a run interrupted before its end is still told from another recipe's, whose
    `check_run_kind` reads it, and `--overwrite` elsewhere cannot take its stages for its own. (A
    folder that holds stages but no config.json was made by an older still, and is left as it was:
    the run marks it as it ends.) With `overwrite`, a folder that holds a run of this recipe takes
    this run's config.json at once too, and the `results` files of the run there before are
    removed: an interrupted overwrite left that run's table and settings beside the new stages."""
    def mark() -> None:
        if overwrite and (out / "config.json").exists():
            for name in results:
                (out / name).unlink(missing_ok=True)
            save_config(config, out / "config.json")
        elif not ((out / "config.json").exists() or _holds_stages(out, kind)):  # (a probe: any subfolder's
            # stage.json, a language model's beside it, left an interrupted distillation unmarked)
            save_config(config, out / "config.json")

    distributed.current().on_main(mark)


def _recorded_settings(stage_dir: Path, overwrite: bool) -> tuple[dict[str, Any], str] | None:
    """The settings a stage directory was made with, and where they were read if not stage.json: its
    stage.json, or where that is gone (deleted by hand, or left out of a copy of the run) the config
    its newest checkpoint carries, which the run would otherwise resume from whatever the settings
    now. None: nothing recorded (a new stage). A stage.json that cannot be read is refused (exit 2),
    unless `overwrite` starts the stage again (then None)."""
    path = stage_dir / "stage.json"
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(existing, dict):
                raise ValueError(f"a JSON {type(existing).__name__}, not an object")
        except (OSError, ValueError) as e:
            if overwrite:
                return None
            raise StillError(f"cannot read {path} ({e}), which says what the stage in {stage_dir} was trained "
                             "with: choose another --out, or pass --overwrite to start it again") from None
        if not _stills_settings(existing):  # (--overwrite would delete the files beside it: not still's either)
            raise StillError(f"{path} is not still's (it records no run's settings): move it out, or choose "
                             "another --out")
        return existing, ""
    found = newest_config(stage_dir / "checkpoints")  # (a damaged one passed over: the resume sets it aside)
    if found is None:
        return None
    checkpoint, recorded = found
    return recorded, f", as its checkpoint {checkpoint.name} records them: its stage.json is missing"


def train_stage(name: str, out: Path, model: nn.Module, optim: OptimConfig, epochs: int, n: int, batch_size: int,
                loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                evaluate: Callable[[nn.Module], dict[str, Any]] | None, seed: int, stage_config: dict[str, Any],
                post_step: Callable[[], None] | None = None, overwrite: bool = False,
                keep: int = 2, unrecorded: dict[str, str] | None = None,
                precision: str = "fp32") -> tuple[TrainState, float]:
    """Train `model` on shuffled index batches of a data set of size `n`, checkpointing (and
    resuming, or loading a finished run) in `out/name`. Returns the final state and the stage's
    training seconds: every epoch's, in this command and the pieces before it (a resumed or loaded
    stage counts its whole training, not this command's part), evaluation not included.

    Under torchrun, data parallel: every rank draws the same global batches and trains on its own
    share of each (DistributedDataParallel averages the gradients; `loss_fn` returns the mean over
    the indices it is given, re-weighted here so that uneven shares still give the global mean).
    Each rank but rank 0 then draws its augmentation and dropout from a torch stream of its own.
    `precision`: the `Trainer`'s (bf16: its steps and `evaluate` under bf16 autocast)."""
    stage_dir = out / name
    model.to(distributed.process_device())  # built on the CPU (the same initial weights on every device)
    dist = distributed.current()

    def check() -> None:
        _not_a_run(out, name)
        check_stage_config(stage_dir, stage_config, overwrite, unrecorded=unrecorded, files=DISTILL_STAGE_FILES)

    dist.on_main(check)
    if dist.rank:  # the same weights everywhere (built above), a different stream of crops, flips, jitter and
        # dropout per rank, as in run_lm (a probe: every rank drew rank 0's); rank 0 keeps one process's stream
        torch.manual_seed(seed + 1_000_003 * dist.rank)
    batches = IndexBatches(n, batch_size, seed=seed)
    optimizer = build_optimizer(model.parameters(), optim)
    scheduler = build_scheduler(optimizer, optim, epochs * len(batches))
    net = model if not dist.enabled else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.device] if dist.device.type == "cuda" else None)

    def shard_loss(_, indices: torch.Tensor) -> torch.Tensor:  # one process: all of them, weight 1
        mine = torch.tensor_split(indices, dist.world)[dist.rank]
        if not len(mine):  # a last batch of fewer rows than ranks left this one none (its mean over no rows
            # would be NaN): it still runs a forward and backward, for DDP's all-reduce, on one row weighted 0
            return loss_fn(net, indices[:1]) * 0.0
        return loss_fn(net, mine) * (len(mine) * dist.world / len(indices))

    trainer = Trainer(model, shard_loss, optimizer, scheduler, grad_clip=optim.grad_clip, post_step=post_step,
                      evaluate=evaluate, checkpoint_dir=stage_dir / "checkpoints", config=stage_config, desc=name,
                      keep=keep, dist=dist, precision=precision)
    state = trainer.fit(batches, epochs)
    return state, sum(record["seconds"] for record in state.history)


def number(value: float) -> str:
    """A setting that names a stage or a table row (a temperature): `:g`'s six significant digits
    where they give the value back (20, 0.5, 1e-05), else all of its digits (5.0000001): two
    settings never share a name."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def student_stage(out: Path, name_of: Callable[[Callable[[float], str]], str], temperature: float,
                  alpha: float) -> str:
    """A student's stage folder: `name_of(number)`, or `name_of` with `:g`'s six digits where that
    names another folder, one holding this temperature's and alpha's student: stills before session
    53 named a stage so, and a rerun in their run folder trained that student again beside it (a
    review probe: T 0.1234567's stage T0.123457)."""
    name, legacy = name_of(number), name_of(lambda value: f"{value:g}")
    if legacy != name:
        try:
            settings = json.loads((out / legacy / "stage.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return name
        if isinstance(settings, dict) and (settings.get("temperature"), settings.get("alpha")) == (temperature, alpha):
            return legacy
    return name


def finished_stages(out: Path, prefix: str, shown: Collection[str]) -> dict[str, dict[str, Any]]:
    """The settings (stage.json's) of each finished stage in run folder `out` whose folder name
    starts with `prefix`, other than those `shown`, by folder name: the students of earlier commands
    that this command's table leaves out (another temperature, say). A stage whose settings or newest
    checkpoint cannot be read, or that never finished, is passed over."""
    found = {}
    for folder in sorted(out.glob(f"{glob.escape(prefix)}*")):
        if folder.name in shown or not folder.is_dir():
            continue
        try:
            settings = json.loads((folder / "stage.json").read_text(encoding="utf-8"))
            newest = list_checkpoints(folder / "checkpoints")[-1]
            state = json.loads((newest / "state.json").read_text(encoding="utf-8"))["state"]
            if state["finished"] and state["epoch"] >= settings["epochs"]:
                found[folder.name] = settings
        except (OSError, ValueError, IndexError, KeyError, TypeError):
            continue
    return found


def other_students(out: Path, prefix: str, shown: Collection[str], settings: dict[str, Any],
                   named: dict[str, Callable[[Any], str]]) -> tuple[list[str], list[float]]:
    """The finished students in run folder `out` (stages named `prefix`...) that this command's
    table leaves out (`shown`: its students' stages; a probe: a second command's table alone was left,
    with nothing said of the first's students). A label for each, like a table row's ("distilled
    T=1"), then each of the `named` settings in which it differs from this command's students
    (`settings`: theirs, but for the temperature) in `named`'s words, then any others by name; and
    the temperatures of those that differ in their temperature alone: one command with this
    command's temperatures and theirs tabulates them together (loading them)."""
    labels, temperatures = [], []
    found = [s for s in finished_stages(out, prefix, shown).values() if isinstance(s.get("temperature"), (int, float))]
    for other in sorted(found, key=lambda s: s["temperature"]):
        words = [say(other.get(key)) for key, say in named.items() if other.get(key) != settings.get(key)]
        rest = changed_settings(other, {**settings, "temperature": other["temperature"],
                                        **{key: other.get(key) for key in named}})
        labels.append(", ".join([f"distilled T={number(other['temperature'])}", *words])
                      + (f" (trained with other {', '.join(rest)})" if rest else ""))
        if not words and not rest:
            temperatures.append(other["temperature"])
    return labels, temperatures


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 5000,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of `model` (in eval mode) over `x`, in chunks."""
    model.eval()
    outs = []
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        outs.append(model(transform(chunk) if transform else chunk).float())
    return torch.cat(outs)


def plot_curves(path: Path, curves: Sequence[tuple[str, Sequence[float], Sequence[float]]], *,
                xlabel: str, ylabel: str, title: str, logy: bool = False, logx: bool = False,
                hlines: Sequence[tuple[str, float]] = ()) -> None:
    """Draw (label, xs, ys) curves, and dashed reference lines (label, y) in the same colours, into a PNG.
    A file that holds this PNG's bytes already is left as it is (a finished run run again: on
    read-only media too; a probe: rewritten each time)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, xs, ys in curves:
        ax.plot(xs, ys, label=printable(label), marker="o" if len(xs) < 30 else None,
                markersize=3 if len(xs) > 1 else 7)
    for i, (label, value) in enumerate(hlines):
        ax.axhline(value, linestyle="--", linewidth=0.8, color=f"C{i}", alpha=0.7, label=printable(label))
    if logy:  # labelled 100, 200, 300, 500, ... as plain numbers (not 3x10^2), where counts are read off
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ys = [y for _, _, values in curves for y in values if y > 0] + [y for _, y in hlines if y > 0]
        narrow = bool(ys) and max(ys) < 10 * min(ys)  # within a decade: more labels, else too few show
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0) if narrow
                                              else (1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    if logx:
        ax.set_xscale("log")
    elif all(float(x).is_integer() for _, xs, _ in curves for x in xs):  # epochs, steps: no ticks between
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(printable(xlabel))  # (a file name's undecodable bytes as \xNN: a surrogate has no glyph)
    ax.set_ylabel(printable(ylabel))
    ax.set_title(printable(title))
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png")  # (the same bytes for the same curves: no date in its metadata)
    finally:
        plt.close(fig)
    atomic_write_new_bytes(path, png.getvalue())
