"""A training loop that knows nothing about the model.

The caller supplies the model, a `loss_fn(model, batch) -> loss` and a function that yields the
batches of an epoch; the loop does the rest: optimizer and scheduler steps, gradient clipping,
a finite-loss check before every step, per-epoch evaluation, progress bars, and checkpoints that
resume exactly (model, optimizer, scheduler, RNG states, epoch and position within the epoch,
history).

Resuming relies on `batches(epoch)` being a pure function of the epoch (see `IndexBatches`): the
loop skips the batches already done in the interrupted epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import numbers
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from still.config import changed_settings
from still.errors import StillError, TrainingDiverged, TrainingInterrupted, whole
from still.layers import thread_generator
from still.train import checkpoint as ckpt
from still.train.distributed import Dist
from still.train.precision import autocast, check_precision
from still.train.progress import log as default_log, progress
from still.train.seed import rng_state, set_rng_state
from still.train.shards import Shard, ShardPool


@contextlib.contextmanager
def deferred_signals():
    """Record SIGINT/SIGTERM instead of dying mid-step; a second SIGINT interrupts at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _takes_keyword(fn: Callable, name: str) -> bool:
    """Whether `fn` takes keyword `name` (or any keywords); True where its signature cannot be read."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.kind == p.VAR_KEYWORD
               for p in parameters)


@dataclass
class TrainState:
    step: int = 0
    """Batches trained on: optimizer steps taken plus those skipped (on_nonfinite="skip"). Checkpoints
    are numbered by it, and `checkpoint_every_steps` counts it."""
    epoch: int = 0
    """Epochs completed."""
    batch: int = 0
    """Batches completed within the current epoch."""
    finished: bool = False
    skipped_steps: int = 0
    """Steps skipped because the loss or the gradient norm was not finite (with on_nonfinite="skip")."""
    epoch_skipped: int = 0
    """Of them, those in the current epoch (its mean loss is over the others)."""
    epoch_loss_sum: float = 0.0
    """Sum of the losses of the batches done in the current epoch (for a mid-epoch resume)."""
    epoch_seconds: float = 0.0
    """Seconds spent training in the current epoch before its last checkpoint: a mid-epoch resume
    adds its own, so an epoch's `seconds` counts every piece of it."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per completed epoch: epoch, train_loss (NaN when every step of the epoch was
    skipped), seconds, and the evaluation metrics."""


@dataclass(frozen=True)
class IndexBatches:
    """Shuffled mini-batches of indices into a dataset of `n` items, a pure function of the epoch."""

    n: int
    batch_size: int
    seed: int = 0
    drop_last: bool = False

    def __post_init__(self) -> None:
        # (the seed's high: `__call__`'s seed * 1,000,003 + epoch stays in int64)
        for name, low, high in (("n", 0, None), ("batch_size", 1, None), ("seed", 0, 2**40)):
            value = getattr(self, name)  # (a review probe: a seed of 1.5, None or 2**60 failed at the first epoch)
            if not whole(value) or value < low or (high is not None and value > high):
                raise StillError(f"IndexBatches.{name} must be an int >= {low}" + (" and <= 2**40" if high else "")
                                 + f", got {value!r}")
            object.__setattr__(self, name, int(value))

    def __len__(self) -> int:
        # (whole numbers: n / 10**400 is 0.0, and a review probe's run had no batches)
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __call__(self, epoch: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=generator)
        # (a batch of all n where batch_size exceeds them: a probe's 2**63 overflowed `split`)
        return list(perm.split(min(self.batch_size, max(self.n, 1))))[: len(self)]


class Trainer:
    """Runs `loss_fn` over batches, steps the optimizer, evaluates and checkpoints.

    Args:
        model: any `nn.Module`; only its parameters, `train()`/`eval()` and state dict are used.
        loss_fn: `loss_fn(model, batch) -> scalar loss`.
        optimizer, scheduler: as built by `still.train.optim`; the scheduler is stepped per batch.
        grad_clip: clip the global gradient norm (None: off; the norm is still computed, for the
            finiteness check).
        clip_groups: parameter groups whose gradient norms are clipped separately (default: one
            group of all parameters); any iterables, generators included (kept as lists). A
            parameter in none is not clipped, but its gradient is checked for finiteness too.
        state_tensors, load_state_tensors: save and restore extra state (a language model's
            memories, say) with every checkpoint.
        post_step: called after every optimizer step (for weight constraints such as max-norm).
        evaluate: `evaluate(model) -> dict of metrics`, run after every epoch in eval mode. Values
            must be JSON data; one-element tensors and NumPy scalars are turned into Python numbers.
        checkpoint_dir: where to save; `fit` resumes from the newest valid checkpoint there.
        checkpoint_every: save every this many epochs (and always at the end).
        checkpoint_every_steps: also save every this many steps (mid-epoch; `TrainState.step`).
        config: JSON data (`still.config.to_dict` of a config) written into every checkpoint;
            checked here, not at the first save.
        keep: how many checkpoints to keep (0: all).
        on_nonfinite: "stop" (default) raises `TrainingDiverged` before the optimizer step when the
            loss or the gradient norm is NaN or infinite; "skip" drops that step and counts it. A
            metric of `evaluate` that is a NaN or infinite float raises it in either mode.
        desc: the progress bar's label.
        precision: "fp32", or "bf16" to run `loss_fn` and `evaluate` under bf16 autocast (the
            parameters, gradients and optimizer state stay in float32).
        dist: the process group of a data-parallel run (`still.train.distributed`). The caller wraps
            the model in DistributedDataParallel inside `loss_fn` and gives each rank its share of
            every batch; the loop keeps the ranks in step: a non-finite loss anywhere stops (or skips)
            everywhere, a signal on any rank interrupts all at the same step, `state_tensors` is
            called on every rank (it may gather) and rank 0 alone writes checkpoints and logs.
        shards: split every step across this many threads (`still.train.shards`; CPU only, not
            with `dist`): `loss_fn(model, batch, shard=Shard(i, shards))` runs the forward of shard
            i's rows and returns their share of the batch's loss (their mean times
            `shard.fraction`), each shard's backward runs in its thread, and the gradients add up
            (with more than two shards, in shard order from a buffer of gradients each: reproducible);
            then clipping, the optimizer, the scheduler and `post_step` run on one of the threads.
            Each shard's `still.layers.dropout` draws from its own generator, seeded at every step
            from the global one, so a run resumes exactly; PyTorch's own dropout modules would draw
            from the global generator in whichever order the threads reach them.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 optimizer: torch.optim.Optimizer, scheduler: Any = None, *, grad_clip: float | None = None,
                 clip_groups: Iterable[Iterable[nn.Parameter]] | None = None,
                 state_tensors: Callable[[], dict[str, torch.Tensor]] | None = None,
                 load_state_tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
                 post_step: Callable[[], None] | None = None,
                 evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1,
                 checkpoint_every_steps: int | None = None,
                 config: dict[str, Any] | None = None, keep: int = 2, desc: str = "train",
                 on_nonfinite: str = "stop", precision: str = "fp32", dist: Dist | None = None,
                 shards: int = 1, log: Callable[[str], None] = default_log) -> None:
        if grad_clip is not None and not (isinstance(grad_clip, numbers.Real) and not isinstance(grad_clip, bool)
                                          and 0 < grad_clip < math.inf):  # (-1 would turn every step uphill)
            raise StillError(f"grad_clip must be a finite number > 0 or None, got {grad_clip!r}")
        if not (whole(checkpoint_every) and checkpoint_every >= 1):
            raise StillError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
        if checkpoint_every_steps is not None and not (whole(checkpoint_every_steps)
                                                       and checkpoint_every_steps >= 1):
            raise StillError(f"checkpoint_every_steps must be an int >= 1 or None, got {checkpoint_every_steps!r}")
        if not (whole(keep) and keep >= 0):
            raise StillError(f"keep must be an int >= 0 (0: every checkpoint), got {keep!r}")
        # (probes: a function for the model, None for the optimizer were AttributeErrors at the first step)
        if not isinstance(model, nn.Module):
            raise StillError(f"model must be a torch.nn.Module, got a {type(model).__name__}")
        if not callable(loss_fn):
            raise StillError(f"loss_fn must be a function of (model, batch), got a {type(loss_fn).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise StillError(f"optimizer must be a torch.optim.Optimizer, got a {type(optimizer).__name__}")
        own = {id(p) for p in model.parameters()}
        if own and not any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            raise StillError("the optimizer holds none of the model's parameters: it would train nothing (was it "
                             "made for another model, or for a copy of this one?)")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # (its `step` takes a metric; the trainer steps its scheduler after every batch, with none)
            raise StillError("scheduler: ReduceLROnPlateau steps on a metric, the trainer's scheduler after every "
                             "batch without one; step it yourself from `evaluate`, or give a schedule over steps")
        self.scheduler = scheduler
        self.grad_clip = float(grad_clip) if grad_clip is not None else None
        # as lists: a generator such as `model.head.parameters()` would be used up by the first step
        groups = None if clip_groups is None else list(clip_groups)
        # (a probe: `clip_groups=model.parameters()`, a flat list, made groups of each weight's rows,
        # which have no gradient: nothing was clipped, and the run diverged)
        if groups is not None and any(isinstance(group, torch.Tensor) for group in groups):
            groups = [[]]  # (refused below)
        self.clip_groups = [list(group) for group in groups] if groups is not None else None
        for group in self.clip_groups or []:
            if not group or not all(id(p) in own for p in group):
                raise StillError("clip_groups must be groups (lists) of the model's parameters, such as "
                                 "[model.body.parameters(), model.head.parameters()]; for one group of them "
                                 "all, leave it out")
        # the parameters in no clip group: not clipped, but their gradients' norm is checked all the same
        grouped = {id(p) for group in self.clip_groups or [] for p in group}
        self._outside_clip_groups = [p for p in model.parameters() if id(p) not in grouped] if self.clip_groups else []
        self.state_tensors = state_tensors
        self.load_state_tensors = load_state_tensors
        self.post_step = post_step
        self.evaluate = evaluate
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_every_steps = int(checkpoint_every_steps) if checkpoint_every_steps is not None else None
        self.config = _check_json_config(config or {})
        self.keep = int(keep)
        if on_nonfinite not in ("stop", "skip"):
            raise StillError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        check_precision(precision)
        self.precision = precision
        self.device = next(iter(model.parameters()), torch.empty(0)).device
        self.desc = desc
        self.dist = dist or Dist()
        if not (whole(shards) and shards >= 1):
            raise StillError(f"shards must be a whole number >= 1, got {shards!r}")
        if shards > 1 and (self.dist.enabled or self.device.type != "cpu"):
            raise StillError(f"shards ({shards}) split a step across CPU threads: not with "
                             + ("several processes (torchrun)" if self.dist.enabled else f"a model on {self.device}"))
        if shards > 1 and not _takes_keyword(loss_fn, "shard"):
            raise StillError(f"shards ({shards}): loss_fn must take a `shard` keyword (loss_fn(model, batch, "
                             "shard=...)), whose rows it computes (still.train.shards)")
        self.shards = int(shards)
        self._pool: ShardPool | None = None
        self.log = log if self.dist.main else (lambda message: None)
        self.state = TrainState()
        self.loaded_finished = False
        """True when `fit` found the run already finished and only loaded it."""
        self._saved: Path | None = None  # the newest checkpoint this trainer wrote
        self._epoch_rng: dict | None = None  # the RNG states as this epoch began (`_epoch_batches`)
        self._resume_epoch_rng: dict | None = None  # those of the checkpoint resumed from, for its epoch
        self._continuing = False  # resumed, until the first epoch's batches are made
        self._saved_world: int | None = None  # the processes that wrote the checkpoint resumed from
        self._saved_shards: int | None = None  # and the shards they split a step into (None: not recorded)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0; the others return None once it is written)."""
        if self.checkpoint_dir is None:
            raise StillError("this trainer has no checkpoint_dir")
        extra = self.state_tensors() if self.state_tensors is not None else None  # on every rank: it may gather
        rng = {**self._ranks_rng(rng_state()), "shards": self.shards}
        if self._epoch_rng is not None:
            rng["epoch_start"] = self._ranks_rng(self._epoch_rng)
        path = None
        if self.dist.main:
            path = self._saved = ckpt.save_checkpoint(
                self.checkpoint_dir, self.state.step,
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
                rng=rng, state=asdict(self.state), config=self.config, keep=self.keep, extra_tensors=extra,
                optimizer_class=_class_name(self.optimizer))
        self.dist.barrier()
        return path

    def _ranks_rng(self, rng: dict) -> dict:
        """`rng` (this process's `rng_state()`) with, under data parallelism, every rank's torch
        generators (each rank draws its own dropout masks)."""
        if self.dist.enabled:
            rng = {**rng, "torch_ranks": self.dist.gather_list(rng["torch"])}
            if self.dist.device.type == "cuda":
                rng["cuda_ranks"] = self.dist.gather_list(rng["cuda"][self.dist.device.index or 0])
        return rng

    def _check_savable(self) -> None:
        """Before the first step: a `StillError` for what `save` could not write, where it would
        otherwise end the run at its first checkpoint, an epoch's work later."""
        ckpt.check_savable(self.model.state_dict(), self.optimizer.state_dict(),
                           self.scheduler.state_dict() if self.scheduler is not None else None)
        if self.state_tensors is not None:  # (what a checkpoint's extra tensors would hold; it may gather)
            extra = self.state_tensors()
            bad = (f"a {type(extra).__name__}" if not isinstance(extra, dict) else
                   next((f"{k!r}: a {type(v).__name__}" for k, v in extra.items()
                         if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None))
            if bad is not None:
                raise StillError(f"state_tensors must return a dict of names to tensors (for the checkpoints); "
                                 f"got {bad}")

        def make() -> None:
            try:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StillError(f"cannot make the checkpoint folder {self.checkpoint_dir}: "
                                 f"{e.strerror or e}") from None

        self.dist.on_main(make)

    def _check_writable(self) -> None:
        """A `StillError` where the checkpoint folder takes no files (read-only media, its mode): a
        probe's run trained an epoch, then ended in an OSError at its first checkpoint."""
        try:
            with tempfile.TemporaryFile(dir=self.checkpoint_dir):
                pass
        except OSError as e:
            raise StillError(f"cannot write checkpoints into {self.checkpoint_dir}: {e.strerror or e}") from None

    def restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """Load a checkpoint: weights, optimizer, scheduler, RNG states, `state`, extra tensors. The
        weights and the optimizer state are both checked to fit before either is loaded: a changed
        model or optimizer is named, and leaves the model and the optimizer as they were."""
        source = str(checkpoint.path)
        try:
            self._restore(checkpoint, source)
        except StillError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            # (a checkpoint verifies against its manifest: what reaches here was written otherwise)
            raise StillError(f"cannot resume from {source}: its training state does not read "
                             f"({type(e).__name__}: {e})") from None

    def _restore(self, checkpoint: ckpt.Checkpoint, source: str) -> None:
        # what could be refused is read before anything loads, and the RNG states, the optimizer's and
        # the schedule's are put back if anything after them is: a refusal leaves the trainer as it was
        # (probes: a checkpoint's bad counters, or weights of another kind of number, were named with
        # its moments and RNG states already loaded)
        state = _train_state(checkpoint.state.get("state"), source, checkpoint.step)
        # (a probe: Adam's moments loaded into Adamax, which failed at its first step for want of
        # exp_inf; into AdamW, RAdam, or Adam from AdamW, they loaded unsaid, with the saved one's
        # decay. Older checkpoints name no class: for them, the state's checks below alone.)
        theirs, ours = checkpoint.state.get("optimizer_class"), _class_name(self.optimizer)
        # (by the class's own name: its module's path may move between PyTorch's versions, or be __main__)
        if isinstance(theirs, str) and theirs.rpartition(".")[2] != ours.rpartition(".")[2]:
            raise StillError(f"{source} was saved by another optimizer, {theirs}, than this one, {ours}: resume "
                             "with the one that saved it, or start a new run")
        rng = ckpt.rng_state_of(checkpoint)
        own = self.model.state_dict()
        if own.keys() != checkpoint.model.keys() or any(own[k].shape != w.shape for k, w in checkpoint.model.items()):
            ckpt.load_model_weights(self.model, checkpoint.model, source=source)  # raises, naming what differs
        previous_rng, previous_optimizer = rng_state(), self.optimizer.state_dict()
        previous_scheduler = self.scheduler.state_dict() if self.scheduler is not None else None
        try:
            for states in (rng.get("epoch_start"), rng) if rng is not None else ():
                if states is not None:  # (the epoch's start too, to see that it reads; the checkpoint's stay)
                    set_rng_state(states)
                    self._restore_rank_rng(states)
            opt_state = ckpt.optimizer_state(checkpoint)
            if opt_state is not None:
                self._load_optimizer_state(opt_state, source)
            if self.scheduler is not None and "scheduler" in checkpoint.state:
                self.scheduler.load_state_dict(checkpoint.state["scheduler"])
            # last: it checks every weight (another kind of number, say) before it copies any
            ckpt.load_model_weights(self.model, checkpoint.model, source=source)
        except BaseException:  # (a probe: weights refused for their kind left the moments and RNG loaded)
            set_rng_state(previous_rng)
            self.optimizer.load_state_dict(previous_optimizer)
            if previous_scheduler is not None:
                self.scheduler.load_state_dict(previous_scheduler)
            raise
        self._resume_epoch_rng = rng.get("epoch_start") if rng is not None else None
        self._saved_world = len(rng.get("torch_ranks") or [None]) if rng is not None else None
        self._saved_shards = rng.get("shards") if rng is not None else None
        self.state = state
        if self.load_state_tensors is not None:
            self.load_state_tensors(checkpoint.extra_tensors())

    def _load_optimizer_state(self, saved: dict, source: str) -> None:
        """Load `saved` into the optimizer; where it does not fit (another optimizer saved it), put
        the optimizer's own state back and raise a StillError naming both."""
        current = self.optimizer.state_dict()  # references to the tensors, not copies
        problem = None
        try:
            self.optimizer.load_state_dict(saved)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:  # SGD's state into Adam: KeyError 'step'
            problem = f"{type(e).__name__}: {e}"
        else:  # Adam's into SGD loads, and fails at the first step: no "momentum" in its groups
            lacking = sorted({key for before, after in zip(current["param_groups"], self.optimizer.param_groups)
                              for key in before.keys() - after.keys()})
            if lacking:
                problem = f"the loaded parameter groups lack {', '.join(lacking)}"
        if problem is None:
            problem = _misshapen_state(self.optimizer)
        if problem is None:
            self._state_in_parameter_layout()
            return
        self.optimizer.load_state_dict(current)
        theirs = {key for group in saved["param_groups"] for key in group}
        ours = {key for group in current["param_groups"] for key in group}
        raise StillError(f"the optimizer state in {source} does not fit this optimizer, "
                         f"{type(self.optimizer).__name__} ({problem}); hyper-parameters only in the checkpoint: "
                         f"{', '.join(sorted(theirs - ours)) or '-'}; only in this optimizer: "
                         f"{', '.join(sorted(ours - theirs)) or '-'}. Was the optimizer changed? Resume with the "
                         "one that saved it, or start a new run")

    def _state_in_parameter_layout(self) -> None:
        """Per-parameter state tensors (moments) in their parameter's memory layout. Checkpoints hold
        them contiguous and `load_state_dict` keeps that, where a fresh optimizer makes them like the
        parameter (channels-last convolution weights, say); PyTorch 2.13's fused Adam on the CPU
        walks the moments as if they had the parameter's strides, so a resumed run would mix up the
        moments' elements."""
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    def _restore_rank_rng(self, rng: dict) -> None:
        """This rank's own torch generators, where the checkpoint has them (written by several ranks).
        Resumed on as many ranks, a run draws what it would have drawn uninterrupted; a rank the
        checkpoint has no state for gets a stream derived from rank 0's and its own rank number."""
        rank, device = self.dist.rank, self.dist.device
        cpu = rng.get("torch_ranks")
        cuda = rng.get("cuda_ranks") if device.type == "cuda" else None
        if cpu:
            if rank < len(cpu):
                torch.set_rng_state(cpu[rank])
            else:
                digest = hashlib.sha256(cpu[0].numpy().tobytes() + f"rank {rank}".encode()).digest()
                torch.manual_seed(int.from_bytes(digest[:8], "little"))  # also reseeds the GPUs
        if cuda and rank < len(cuda):
            torch.cuda.set_rng_state(cuda[rank], device)

    def resume(self) -> bool:
        """Restore from the newest valid checkpoint in `checkpoint_dir`; True if there was one."""
        if self.checkpoint_dir is None:
            return False
        checkpoint = ckpt.latest_checkpoint(self.checkpoint_dir, log=self.log, set_aside=self.dist.main)
        if checkpoint is None:
            return False
        # (a NaN, unequal to itself, said "other settings" on every resume)
        if checkpoint.config and self.config and not _same(checkpoint.config, self.config):
            # (the recipes refuse this themselves: a Trainer knows nothing of which settings matter)
            self.log(f"{self.desc}: {checkpoint.path.name} was saved with other settings "
                     f"({', '.join(changed_settings(checkpoint.config, self.config))}); resuming from it, "
                     "and this run's are written from now on")
        self.restore(checkpoint)
        return True

    # ------------------------------------------------------------------ training

    def _nonfinite(self, what: str, value: torch.Tensor) -> None:
        if self.on_nonfinite == "skip":
            self.state.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.log(f"{self.desc}: {what} is {value.item()} at step {self.state.step}: step skipped "
                     f"({self.state.skipped_steps} so far)")
            return
        raise TrainingDiverged(f"{self.desc}: {what} is {value.item()} at step {self.state.step}; stopped before the "
                               "optimizer step, so the checkpoints on disk are finite (lower the learning rate?)")

    def _check_metrics(self, metrics: dict[str, Any]) -> None:
        """A metric that is NaN or infinite stops the run, in either `on_nonfinite` mode: every
        step's loss and gradient norm were finite, yet the weights they led to no longer give finite
        outputs (a learning rate far too large), and no step skipped can mend them. Raised before
        the epoch's checkpoint is saved: the newest on disk is the last sound one."""
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                steps = ("every step's loss and gradient norm were finite" if not self.state.skipped_steps else
                         f"the steps taken had finite losses and gradient norms ({self.state.skipped_steps} skipped "
                         "for ones that were not)")
                raise TrainingDiverged(
                    f"{self.desc}: {key} is {value} after step {self.state.step}, though {steps}: the weights no "
                    "longer give finite outputs; stopped before saving them (lower the learning rate?)")

    def _shard_loss(self, batch: Any, shard: Shard, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + shard.index)
        with thread_generator(generator), autocast(self.precision, self.device):
            return _checked_loss(self.loss_fn(self.model, batch, shard=shard))

    def _step(self, batch: Any) -> torch.Tensor | None:
        """One optimizer step; None if it was skipped (a non-finite loss or gradient norm)."""
        if self.shards > 1:
            if self._pool is None:
                self._pool = ShardPool(self.shards)
            seed = int(torch.randint(2**62, ()))  # from the global generator: checkpointed, resumed
            shards = [Shard(i, self.shards) for i in range(self.shards)]
            losses = self._pool.map(self._shard_loss, [batch] * self.shards, shards, [seed] * self.shards)
            loss = torch.stack([shard_loss.detach() for shard_loss in losses]).sum()
        else:
            with autocast(self.precision, self.device):
                loss = _checked_loss(self.loss_fn(self.model, batch))
        self.optimizer.zero_grad(set_to_none=True)
        if self.shards > 1:
            if self.shards == 2:  # each shard's backward in its thread, into the shared .grad: a + b is b + a
                self._pool.map(torch.Tensor.backward, losses)
            else:  # each shard's gradients apart, then added in shard order: the same sum on every run
                self._add_in_order(self._pool.map(self._gradients, losses))
            # then the update on one worker, whose single intra-op thread wakes no other: clipping and
            # the fused Adam at the reference preset took 11 ms on one thread against 18 on two
            nonfinite = self._pool.run(lambda: self._update(loss))
        else:
            loss.backward()
            nonfinite = self._update(loss)
        if nonfinite is not None:
            return self._nonfinite(*nonfinite)
        return loss.detach()

    def _gradients(self, loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """A shard's gradients of every trainable parameter (None: unused), in its own buffers."""
        return torch.autograd.grad(loss, self._trainable(), allow_unused=True)

    def _add_in_order(self, per_shard: list[tuple[torch.Tensor | None, ...]]) -> None:
        """Each parameter's `.grad` = the shards' gradients added in shard order, ((g0 + g1) + g2) + ...
        (floating-point addition does not associate: accumulating in the order the threads finish
        would change the last bits from run to run)."""
        for i, param in enumerate(self._trainable()):
            parts = [grads[i] for grads in per_shard if grads[i] is not None]
            if parts:  # a buffer of the parameter's layout (a gradient may be an expanded view)
                param.grad = torch.empty_like(param).copy_(parts[0])
                for part in parts[1:]:
                    param.grad.add_(part)

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _update(self, loss: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Clip the gradients, step the optimizer and the scheduler; where the loss or a gradient norm
        is not finite, nothing is stepped and what and its value are returned instead. The loss and
        the norms are read from the device once, together (on a GPU each read waits for the queued
        work: one read a step instead of one for the loss and one a clip group). Without clipping,
        the global gradient norm is computed all the same: a finite loss can have NaN gradients
        (sqrt at 0), and one such step would make every weight NaN."""
        norms = []
        if self.grad_clip is not None:
            for group in self.clip_groups or [list(self.model.parameters())]:
                norms.append(torch.nn.utils.clip_grad_norm_(group, self.grad_clip))
        # what no clipping measured: without clipping, every gradient
        unclipped = self.model.parameters() if self.grad_clip is None else self._outside_clip_groups
        grads = [p.grad for p in unclipped if p.grad is not None]
        if grads:
            norms.append(_total_norm(grads))
        finite = torch.isfinite(torch.stack([loss.detach().float(), *(norm.float() for norm in norms)]))
        if self.dist.enabled:  # every rank takes the same branch
            finite = self.dist.all_min(finite.to(torch.int32)).bool()
        finite = finite.tolist()
        if not finite[0]:
            return "the loss", loss
        for norm_finite, norm in zip(finite[1:], norms):
            if not norm_finite:
                return "the gradient norm", norm
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.post_step is not None:
            self.post_step()
        return None

    def close(self) -> None:
        """End the shard workers, if any (`fit` does at its end; a later step starts them again)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def fit(self, batches: Callable[[int], Iterable[Any]], epochs: int) -> TrainState:
        """Train until `epochs` epochs are done, resuming from a checkpoint if one exists.

        `batches(epoch)` gives that epoch's batches (an iterable; `IndexBatches` is one), each
        passed to `loss_fn`: a function of the epoch, so that a resumed run meets the same batches.
        SIGINT and SIGTERM finish the current step, save a checkpoint (when there is a
        checkpoint_dir) and raise `TrainingInterrupted`; one that arrives after the last step (in
        the last evaluation, say) raises it too, once the finished run is saved. The model trains in
        training mode, but for the submodules the caller put in eval mode while the model was in
        training mode (a frozen backbone whose batch-norm statistics must not move), which stay in
        eval mode; it is left in eval mode, and a later `fit` of it (by this trainer or another)
        keeps the same submodules frozen. With a checkpoint_dir, what a checkpoint could not hold (a
        model state entry that is not a tensor, a tensor learning rate) is refused before the first
        step.
        """
        if not callable(batches):
            raise StillError(f"batches must be a function of the epoch giving its batches (such as IndexBatches), "
                             f"got {type(batches).__name__}")
        if not (whole(epochs) and epochs >= 0):
            raise StillError(f"epochs must be an int >= 0, got {epochs!r}")
        try:
            with deferred_signals() as received:
                state = self._fit(batches, int(epochs), received)
                # a signal while a finished run loaded (one in training or an evaluation raised at its
                # step or its epoch's end): the run is done and saved, and the caller asked to stop
                signum = self._agree_on_signals(received)
                if signum:
                    raise TrainingInterrupted(signum, self.state.step, self._saved)
                return state
        finally:
            self.close()

    def _epoch_batches(self, batches: Callable[[int], Iterable[Any]], epoch: int) -> tuple[Iterator[Any], int | None]:
        """An iterator over `batches(epoch)` past the `state.batch` already trained, and their number
        where known. The RNG states as the epoch begins are kept for the checkpoints; a run resumed
        within an epoch makes its batches from the states its checkpoint kept of the epoch's start
        and then goes on from the checkpoint's own: a `DataLoader(shuffle=True)` draws its order
        from the global generator as it starts, and from the checkpoint's states it would draw
        another order than the epoch's first part had (some examples twice, others never)."""
        resumed = self._resume_epoch_rng if self.state.batch else None
        self._resume_epoch_rng = None
        continuing, self._continuing = self._continuing, False
        if continuing and self.state.batch and resumed is None:
            self.log(f"{self.desc}: its checkpoint (an older still's) keeps no RNG states of its epoch's start: "
                     "where the batches are drawn from the global generator (a shuffling DataLoader), the rest of "
                     f"epoch {epoch + 1} is not the uninterrupted run's")
        now = None
        if resumed is not None:
            now = rng_state()
            set_rng_state(resumed)
            self._restore_rank_rng(resumed)
        # (a checkpoint of a run resumed within an epoch from an older checkpoint keeps no epoch start)
        self._epoch_rng = rng_state() if resumed is not None or not self.state.batch else None
        epoch_batches = batches(epoch)
        if continuing and epoch > 0 and getattr(epoch_batches, "persistent_workers", False):
            # (its first iterator draws the workers' base seed from the global generator, which the
            # uninterrupted run drew once, in its first epoch: the order drawn after it differs, a probe)
            self.log(f"{self.desc}: a DataLoader with persistent workers draws its workers' seeds once, in its "
                     f"first epoch: resumed in epoch {epoch + 1}, its order and its workers' random numbers are not "
                     "the uninterrupted run's (persistent_workers=False resumes exactly)")
        total = len(epoch_batches) if isinstance(epoch_batches, Sized) else None
        try:
            iterator = iter(epoch_batches)
        except TypeError:
            raise StillError(f"batches({epoch}) must give an iterable of batches, "
                             f"got {type(epoch_batches).__name__}") from None
        for _ in range(self.state.batch):  # (the order drawn as the first batch is: the skipped ones are made)
            if next(iterator, _END) is _END:
                break
        if now is not None:
            set_rng_state(now)  # (this rank's own streams, as `restore` set them)
        return iterator, total

    def _agree_on_signals(self, received: list[int]) -> int:
        """The signal to stop at, 0 for none: under torchrun the largest any rank had received when
        they agreed, so that every rank stops at the same point. Callers act on this, not on
        `received`: a signal that arrives while its rank waits in the agreement is in its `received`
        by the time the agreement returns, and acting on that list took that rank alone into the
        checkpoint's collectives (a probe: gloo's "Connection closed by peer", no checkpoint); it
        is agreed on at the next point instead."""
        mine = received[0] if received else 0
        if not self.dist.enabled:
            return mine
        return -int(self.dist.all_min(torch.tensor([-mine], device=self.device)))

    def _fit(self, batches: Callable[[int], Iterable[Any]], epochs: int, received: list[int]) -> TrainState:
        # the submodules the caller froze in eval mode (where the model itself is in training mode)
        if self.model.training:
            frozen = [m for m in self.model.modules() if not m.training]
            _FROZEN[self.model] = weakref.WeakSet(frozen)
        else:  # in eval mode, as a fit leaves it: what was frozen then stays frozen
            frozen = list(_FROZEN.get(self.model, ()))
        if self.checkpoint_dir is not None:
            self._check_savable()

        def train_mode() -> None:
            self.model.train()
            for module in frozen:
                module.eval()

        resumed = self._continuing = self.resume()
        self.dist.check_same(self.state.step, "the step they start at", "every process must read the same checkpoint "
                             "folder (on several machines, a file system they share)")
        if resumed:
            if self.state.finished and self.state.epoch >= epochs:
                self.log(f"{self.desc}: loaded the finished run from {self.checkpoint_dir}")
                self.loaded_finished = True
                self.model.eval()
                return self.state
            # (probes: a run resumed on another number of processes, or of shards, said nothing of it)
            other = ""
            if self._saved_world not in (None, self.dist.world):
                other = (f" (written by {self._saved_world} process{'es' if self._saved_world > 1 else ''}, resumed "
                         f"on {self.dist.world}: dropout and other random draws go on otherwise than on as many)")
            elif self._saved_shards not in (None, self.shards):
                other = (f" (written with {self._saved_shards} shard{'s' if self._saved_shards > 1 else ''} a step, "
                         f"resumed with {self.shards}: dropout and other random draws go on otherwise than with as "
                         "many)")
            # (the step the interrupt's message named; a probe read "epoch 1, batch 2" of a 2-batch epoch)
            done = self.state.batch
            where = (f"at the start of epoch {self.state.epoch + 1}" if not done else
                     f"in epoch {self.state.epoch + 1}, {done} batch{'es' if done > 1 else ''} of it done")
            self.log(f"{self.desc}: resuming from step {self.state.step}, {where}{other}")
            self.state.finished = False
        if self.checkpoint_dir is not None:  # (not before: a finished run loads from read-only media)
            self.dist.on_main(self._check_writable)
        for epoch in range(self.state.epoch, epochs):
            train_mode()
            epoch_batches, total = self._epoch_batches(batches, epoch)
            start = time.perf_counter() - self.state.epoch_seconds  # (a resumed epoch's earlier pieces)
            loss_sum = torch.tensor(self.state.epoch_loss_sum, dtype=torch.float64, device=self.device)
            bar = progress(epoch_batches, enabled=self.dist.main, total=total, initial=self.state.batch,
                           desc=f"{self.desc} {epoch + 1}/{epochs}", unit="batch")
            for batch in bar:
                loss = self._step(batch)
                if loss is not None:
                    loss_sum += loss
                else:
                    self.state.epoch_skipped += 1
                self.state.step += 1
                self.state.batch += 1
                signum = self._agree_on_signals(received)
                if signum or (self.checkpoint_dir is not None and self.checkpoint_every_steps
                              and self.state.step % self.checkpoint_every_steps == 0):
                    # every rank's steps so far (the ranks' mean loss a step, summed): a run resumed on
                    # any number of ranks adds its own to it
                    shared = self.dist.all_sum(loss_sum) / self.dist.world if self.dist.enabled else loss_sum
                    self.state.epoch_loss_sum = shared.item()
                    self.state.epoch_seconds = time.perf_counter() - start
                    saved = self.save() if self.checkpoint_dir is not None else None
                    if signum:
                        bar.close()
                        raise TrainingInterrupted(signum, self.state.step, saved)
            seconds = time.perf_counter() - start
            if not self.state.batch:  # (a DataLoader with drop_last and fewer examples than a batch, a spent
                # generator given again: epochs of no steps "trained" to NaN losses, the weights untouched)
                raise StillError(f"batches({epoch}) gave no batches: epoch {epoch + 1} would train nothing")
            if self.dist.enabled:
                loss_sum = self.dist.all_sum(loss_sum) / self.dist.world
            done = self.state.batch - self.state.epoch_skipped  # the mean over the steps taken
            train_loss = (loss_sum / done).item() if done else math.nan  # NaN: every step skipped, not a loss of 0
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": round(seconds, 3)}
            if self.evaluate is not None:
                self.model.eval()
                with torch.no_grad(), autocast(self.precision, self.device):
                    metrics = _json_metrics(self.evaluate(self.model))
                train_mode()
                self._check_metrics(metrics)
                record.update(metrics)
            self.state.history.append(record)
            self.log(f"{self.desc} {epoch + 1}/{epochs}: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "epoch"))
            self.state.epoch = epoch + 1
            self.state.batch = 0
            self.state.epoch_skipped = 0
            self.state.epoch_loss_sum = 0.0
            self.state.epoch_seconds = 0.0
            self.state.finished = self.state.epoch >= epochs
            signum = self._agree_on_signals(received)  # (one in the evaluation: the run stops here, not a step later)
            if self.checkpoint_dir is not None and (signum or self.state.finished
                                                    or self.state.epoch % self.checkpoint_every == 0):
                self.save()
            if signum:
                self.model.eval()
                raise TrainingInterrupted(signum, self.state.step, self._saved)
        self.state.finished = True
        self.model.eval()
        return self.state


def _class_name(optimizer: torch.optim.Optimizer) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


_COUNTERS = ("step", "epoch", "batch", "finished")  # what a checkpoint's training state must say


def _train_state(saved: object, source: str, step: int) -> TrainState:
    """A checkpoint's `TrainState`, its entries checked: every counter there and of its type, none
    unknown, and its step the checkpoint's own (a counter left out would restart the run at 0)."""
    fields = set(TrainState.__dataclass_fields__)
    where = f"{source}/state.json's training state"
    if not isinstance(saved, dict):
        raise StillError(f"{where} is missing or not an object")
    unknown, missing = sorted(set(saved) - fields), [k for k in _COUNTERS if k not in saved]
    if unknown or missing:
        said = ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"has unknown {', '.join(unknown)}"]
                                                                       if unknown else [])
        raise StillError(f"{where} " + "; ".join(said))
    for key, value in saved.items():
        if key == "finished":
            ok = isinstance(value, bool)
        elif key in ("epoch_loss_sum", "epoch_seconds"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif key == "history":
            ok = isinstance(value, list) and all(isinstance(entry, dict) for entry in value)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not ok:
            raise StillError(f"{where} has {key} = {value!r}, not a value of its kind")
    if saved["step"] != step:
        raise StillError(f"{where} says step {saved['step']}, its checkpoint step {step}")
    return TrainState(**saved)


# per-parameter state of PyTorch's optimizers: a tensor of the parameter's shape each
_PARAMETER_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                     "sum", "exp_inf", "grad_avg", "ax", "prev", "step_size")


def _misshapen_state(optimizer: torch.optim.Optimizer) -> str | None:
    """The first per-parameter state tensor (moments, momentum) loaded with another shape than its
    parameter's, or a parameter's state lacking an entry that another of its group and number of
    dimensions has, said; None where all fit. (`load_state_dict` takes any: a moment larger than
    its parameter trained on unsaid, a smaller one was read past its end by the fused step, a
    missing one failed at the first step. What state a parameter has may follow its group's
    options, Adam's amsgrad say, and its dimensions, Adafactor's factors: those are compared alike.)"""
    keys: dict[tuple[int, int], set[str]] = {}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if key in _PARAMETER_SHAPED and torch.is_tensor(value) and value.shape != p.shape:
                    return f"its {key} of shape {tuple(value.shape)} is for a parameter of shape {tuple(p.shape)}"
            if not state:  # (no state yet: a parameter that has had no gradient)
                continue
            alike = keys.setdefault((i, p.ndim), set(state))
            if set(state) != alike:
                return f"a parameter's state has {', '.join(sorted(alike))}, another's {', '.join(sorted(state))}"
    return None


_END = object()  # (`next`'s default: the end of an epoch's batches)

_FROZEN: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[nn.Module]] = weakref.WeakKeyDictionary()
"""The submodules of each model that were in eval mode when `fit` last began in training mode."""


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' global 2-norm, for the finite check of a step that clips nothing. On the CPU,
    fp32 gradients in one block each go through BLAS dot products, which read them at the memory's
    speed where PyTorch's norm kernel does not: the MNIST student's 1.3M gradients in 88 against
    211 µs, its teacher's 2.4M in 122 against 283. The same norm to rounding, and infinite where
    the norm kernel's is: both sum the squares in fp32 (a norm above about 1.8e19 overflows in
    either)."""
    if all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in grads):
        return torch.stack([torch.dot(flat, flat) for flat in (g.view(-1) for g in grads)]).sum().sqrt()
    return torch.nn.utils.get_total_norm(grads)


def _checked_loss(loss: Any) -> torch.Tensor:
    """`loss_fn`'s result as a float32 scalar, or a StillError saying what came back instead."""
    if not isinstance(loss, torch.Tensor):
        got = type(loss).__name__
    elif loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)} (a loss per example? take its mean)"
    elif not loss.requires_grad:
        got = "a tensor that does not require grad (computed under torch.no_grad, or detached?)"
    else:
        return loss.float().reshape(())
    raise StillError(f"loss_fn must return a scalar tensor (one element, with its graph), got {got}")


def _same(a: Any, b: Any) -> bool:
    """Whether two settings' JSON data are equal, a NaN equal to a NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _check_json_config(config: Any) -> dict[str, Any]:
    """`config`, if JSON can write it (else the first checkpoint would fail, an epoch into the run)."""
    if not isinstance(config, dict):
        raise StillError(f"config must be a dict of JSON data (still.config.to_dict of a config), "
                         f"got {type(config).__name__}")
    for key, value in config.items():
        try:
            text = json.dumps({key: value})
            # (JSON's keys are strings: a key 1, here or within, came back as "1", another setting)
            if not isinstance(key, str) or not _same(json.loads(text)[key], value):
                raise TypeError("its keys are not all strings")
        except (TypeError, ValueError) as e:
            raise StillError(f"config[{key!r}] cannot be written as JSON ({e}): pass JSON data, "
                             "such as still.config.to_dict of a config") from None
    return config


RESERVED_METRICS = ("epoch", "train_loss", "seconds")  # (a history entry's own keys)


def _json_metrics(metrics: Any) -> dict[str, Any]:
    """`evaluate`'s metrics as JSON data: one-element tensors and NumPy scalars become Python numbers."""
    if not isinstance(metrics, dict):
        raise StillError(f"evaluate must return a dict of metrics, got {type(metrics).__name__}")
    plain = {}
    for key, value in metrics.items():
        if key in RESERVED_METRICS:
            raise StillError(f"evaluate returned a metric named {key!r}, which the history keeps for its own "
                             f"({', '.join(RESERVED_METRICS)}): name it otherwise")
        if (isinstance(value, torch.Tensor) and value.numel() == 1) or isinstance(value, np.generic):
            value = value.item()
        try:
            json.dumps({key: value})
        except (TypeError, ValueError):
            what = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                    else type(value).__name__)
            raise StillError(f"evaluate's metric {key!r} is {what}, which a checkpoint cannot hold: "
                             "return numbers (or strings, lists of them)") from None
        plain[key] = value
    return plain
