import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from still.distill.models import MLP, MLPConfig
from still.errors import StillError, TrainingInterrupted
from still.train import loop
from still.train.loop import IndexBatches, Trainer, TrainingDiverged
from still.train.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor
from still.train.seed import seed_everything

X = torch.randn(96, 10, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(1))
OPTIM = OptimConfig(name="adam", lr=1e-2, schedule="cosine", warmup_fraction=0.1)


def make_trainer(directory=None, every_steps=None, dropout=True):
    seed_everything(0)
    model = MLP(MLPConfig(in_features=10, hidden=(16,), classes=3, dropout_input=0.1 if dropout else 0.0,
                          dropout_hidden=0.5 if dropout else 0.0))
    optimizer = build_optimizer(model.parameters(), OPTIM)
    scheduler = build_scheduler(optimizer, OPTIM, total_steps=4 * 6)

    def loss_fn(m, idx):
        x = X[idx] + 0.1 * torch.randn_like(X[idx])  # uses the global RNG, like augmentation
        return F.cross_entropy(m(x), Y[idx])

    def evaluate(m):
        return {"errors": int((m(X).argmax(-1) != Y).sum())}

    return Trainer(model, loss_fn, optimizer, scheduler, evaluate=evaluate, checkpoint_dir=directory,
                   checkpoint_every_steps=every_steps, desc="t")


BATCHES = IndexBatches(96, 16, seed=3)


def test_index_batches_are_a_pure_function_of_the_epoch():
    assert len(BATCHES) == 6
    a, b = BATCHES(2), BATCHES(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(BATCHES(0)), torch.cat(BATCHES(1)))
    assert sorted(torch.cat(a).tolist()) == list(range(96))
    assert len(IndexBatches(100, 16, drop_last=True)(0)) == 6


def _interrupted_run(tmp_path, stop_after_steps, batches=BATCHES):
    """Train until `stop_after_steps`, then stop as a crash would (after the checkpoint)."""

    class Stop(Exception):
        pass

    first = make_trainer(tmp_path, every_steps=stop_after_steps)
    original = first.save

    def save_then_stop():
        path = original()
        if first.state.step == stop_after_steps:
            raise Stop
        return path

    first.save = save_then_stop
    with pytest.raises(Stop):
        first.fit(batches, 4)
    torch.manual_seed(12345)  # a fresh process would start from other RNG states
    second = make_trainer(tmp_path)
    second.fit(batches, 4)
    return second


@pytest.mark.parametrize("stop_after_steps", [9, 12], ids=["mid-epoch", "epoch-boundary"])
def test_resume_is_exact(tmp_path, stop_after_steps):
    straight = make_trainer()
    straight.fit(BATCHES, 4)
    resumed = _interrupted_run(tmp_path, stop_after_steps)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in straight.state.history] == [h["train_loss"] for h in resumed.state.history]
    assert resumed.state.step == 24 and resumed.state.finished


def _shuffled(epoch):
    """A DataLoader that shuffles as most do: its order drawn from the global generator as it starts."""
    from torch.utils.data import DataLoader

    return DataLoader(range(96), batch_size=16, shuffle=True)


@pytest.mark.parametrize("stop_after_steps", [9, 12, 15], ids=["mid-epoch", "epoch-boundary", "second-epoch"])
def test_resume_with_a_shuffling_data_loader_is_exact(tmp_path, stop_after_steps):
    """A probe: resumed within an epoch, a `DataLoader(shuffle=True)` drew its order from the
    checkpoint's RNG states, not the epoch's: the rest of the epoch trained on some examples twice
    and others never (the weights 0.08 apart at the end). It now draws from the states the
    checkpoint keeps of the epoch's start."""
    straight = make_trainer()
    straight.fit(_shuffled, 4)
    resumed = _interrupted_run(tmp_path, stop_after_steps, _shuffled)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in straight.state.history] == [h["train_loss"] for h in resumed.state.history]


def test_a_resumed_data_loader_with_persistent_workers_is_said_not_to_resume_exactly(tmp_path):
    """A probe: resumed in a later epoch, a DataLoader with persistent workers drew another order (its
    first iterator draws the workers' base seed, which the uninterrupted run drew once): said."""
    from torch.utils.data import DataLoader

    def run(epochs, **workers):
        trainer, said = make_trainer(tmp_path / str(workers)), []
        trainer.log = said.append
        loader = DataLoader(range(96), batch_size=16, shuffle=True, **workers)
        trainer.fit(lambda epoch: loader, epochs)
        return said

    for workers in ({"num_workers": 1, "persistent_workers": True}, {}):
        run(1, **workers)
        said = [m for m in run(2, **workers) if "persistent workers" in m]
        assert len(said) == bool(workers) and (not said or "resumed in epoch 2, its order" in said[0]), said


def test_a_checkpoint_without_the_epochs_rng_states_resumes_saying_so(tmp_path):
    """A probe: a checkpoint written within an epoch by an older still (no `epoch_start` states)
    resumed inexactly where the batches draw from the global generator, unsaid."""
    make_trainer(tmp_path, every_steps=9).fit(BATCHES, 2)
    path = tmp_path / "ckpt-00000009"
    _forge(path, "state.json", lambda data: data["rng"].pop("epoch_start"))
    _forge(path, "state.safetensors", lambda tensors: [tensors.pop(k) for k in list(tensors) if "epoch_start" in k])
    for newer in sorted(tmp_path.glob("ckpt-*"))[1:]:
        shutil.rmtree(newer)
    trainer, said = make_trainer(tmp_path), []
    trainer.log = said.append
    trainer.fit(BATCHES, 2)
    assert any("keeps no RNG states of its epoch's start" in m and "epoch 2 is not" in m for m in said), said


def test_an_epoch_of_no_batches_is_named(tmp_path):
    """A probe: a DataLoader with drop_last and fewer examples than a batch (or a spent generator
    given again) "trained" every epoch to a NaN loss, the weights untouched, and finished."""
    from torch.utils.data import DataLoader

    loader = DataLoader(range(5), batch_size=10, drop_last=True)
    with pytest.raises(StillError, match=re.escape("batches(0) gave no batches: epoch 1 would train nothing")):
        make_trainer(tmp_path).fit(lambda epoch: loader, 3)
    once = iter(BATCHES(0))
    trainer = make_trainer()
    with pytest.raises(StillError, match=re.escape("batches(1) gave no batches: epoch 2 would train nothing")):
        trainer.fit(lambda epoch: once, 3)
    assert trainer.state.epoch == 1 and trainer.state.step == 6
    for bad in (None, 3):
        message = f"batches(0) must give an iterable of batches, got {type(bad).__name__}"
        with pytest.raises(StillError, match=re.escape(message)):
            make_trainer().fit(lambda epoch, bad=bad: bad, 1)


def test_a_resumed_run_sets_a_damaged_checkpoint_aside(tmp_path):
    """A run resuming past a damaged newest checkpoint renames it out of the rotation: else, as the
    newest, it would outlive the good checkpoints written after it (keep 2), leaving one good one."""
    first = make_trainer(tmp_path, every_steps=6)
    first.fit(BATCHES, 2)  # checkpoints at steps 6 and 12
    (tmp_path / "ckpt-00000012" / "model.safetensors").write_bytes(b"")
    second, said, kept = make_trainer(tmp_path, every_steps=8), [], []
    second.log = said.append
    save = second.save
    second.save = lambda: (save(), kept.append({p.name for p in tmp_path.iterdir()}))[0]
    second.fit(BATCHES, 4)  # from step 6: checkpoints every 8 steps and at each epoch's end
    aside = "ckpt-00000012.damaged"
    assert kept[0] == {aside, "ckpt-00000006", "ckpt-00000008"}  # (without: ckpt-6 deleted, 12 kept)
    assert all(aside in names and len(names) == 3 for names in kept)  # two good ones after every save
    assert any("ckpt-00000012 is damaged" in m and m.endswith(f"skipped, set aside as {aside}") for m in said)
    assert second.state.step == 24


def test_resume_without_the_rng_restore_differs(tmp_path, monkeypatch):
    """The control: the exact-resume test would catch a missing RNG restore."""
    straight = make_trainer()
    straight.fit(BATCHES, 4)
    monkeypatch.setattr(loop, "set_rng_state", lambda state: None)
    resumed = _interrupted_run(tmp_path, 9)
    assert not all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                      resumed.model.state_dict().values()))


def test_finished_run_loads_without_training(tmp_path):
    first = make_trainer(tmp_path)
    first.fit(BATCHES, 2)
    second = make_trainer(tmp_path)
    second.loss_fn = lambda m, idx: pytest.fail("a finished run must not train again")
    second.fit(BATCHES, 2)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert second.state.history == first.state.history


def test_nan_loss_stops_before_the_step(tmp_path):
    trainer = make_trainer(tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.loss_fn = lambda m, idx: m(X[idx]).sum() * float("nan")
    with pytest.raises(TrainingDiverged, match="loss is nan at step 0"):
        trainer.fit(BATCHES, 1)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("mode", ["stop", "skip"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_metric_stops_before_its_epochs_checkpoint(tmp_path, mode, value):
    """Found by a fuzzer: a learning rate of 1e6 gave finite losses and gradients for a step, but
    weights whose outputs were NaN; the run ended with exit code 0 and NaN in its table."""
    trainer = make_trainer(tmp_path)
    trainer.on_nonfinite = mode
    epochs = []

    def evaluate(m):
        epochs.append(len(epochs))
        return {"errors": 3, "valid_bits": 1.5 if len(epochs) == 1 else value}

    trainer.evaluate = evaluate
    with pytest.raises(TrainingDiverged, match=f"t: valid_bits is {value} after step 12, though every step's loss "
                                               "and gradient norm were finite"):
        trainer.fit(BATCHES, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000006"]  # (the first epoch's: the last sound one)


def test_a_nonfinite_metric_after_skipped_steps_says_they_were_skipped():
    """In skip mode the message said every step had been finite, after lines saying steps were skipped."""
    trainer = make_trainer()
    trainer.on_nonfinite = "skip"
    loss_fn, calls = trainer.loss_fn, []

    def nan_at_the_second(m, idx):
        calls.append(1)
        loss = loss_fn(m, idx)
        return loss * float("nan") if len(calls) == 2 else loss

    trainer.loss_fn, trainer.evaluate = nan_at_the_second, lambda m: {"valid_bits": float("nan")}
    with pytest.raises(TrainingDiverged, match=r"though the steps taken had finite losses and gradient norms \(1 "
                                               r"skipped for ones that were not\)"):
        trainer.fit(BATCHES, 1)


@pytest.mark.parametrize("clip", [True, False], ids=["clip-groups", "no-clipping"])
def test_a_step_reads_the_device_once(monkeypatch, clip):
    """The loss's and the clip groups' gradient norms' finiteness are read together, once a step: on
    a GPU each read from the device waits for all the work queued before it. Without clipping, the
    global gradient norm is checked in the same read. (Steps split across CPU threads, `shards`, also
    draw their seed as a Python int: CPU only, nothing queued; so does the model's dropout on a CPU,
    `still.layers`, which is PyTorch's on a GPU: the model here has none.)"""
    trainer = make_trainer(dropout=False)
    if clip:
        trainer.grad_clip = 1.0
        trainer.clip_groups = [list(trainer.model.parameters())[:2], list(trainer.model.parameters())[2:]]
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    assert trainer._step(BATCHES(0)[0]) is not None
    assert reads == ["tolist"]


def test_history_and_evaluation_per_epoch():
    trainer = make_trainer()
    state = trainer.fit(BATCHES, 3)
    assert [h["epoch"] for h in state.history] == [1, 2, 3]
    assert all({"train_loss", "seconds", "errors"} <= set(h) for h in state.history)
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]


def test_lr_schedule_warmup_then_cosine():
    config = OptimConfig(lr=1.0, warmup_fraction=0.1, schedule="cosine")
    factors = [lr_factor(s, 100, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.01
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_nan_skip_mode_drops_the_step_and_counts_it(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.on_nonfinite = "skip"
    calls = []
    original = trainer.loss_fn

    def sometimes_nan(m, idx):
        calls.append(1)
        loss = original(m, idx)
        return loss * float("nan") if len(calls) == 3 else loss

    trainer.loss_fn = sometimes_nan
    state = trainer.fit(BATCHES, 1)
    assert state.skipped_steps == 1 and state.step == 6
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {5}  # six batches, one of them skipped: five updates
    from still.train.checkpoint import latest_checkpoint

    saved = latest_checkpoint(tmp_path)
    assert saved.state["state"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in saved.model.values())


def test_the_epochs_mean_loss_is_over_the_steps_taken():
    """With steps skipped (on_nonfinite="skip"), train_loss is the mean of the other steps' losses,
    not their sum over every batch."""
    model = torch.nn.Linear(10, 1)
    calls = []

    def loss_fn(m, idx):  # 1.0 for every step taken, nan for every other one
        calls.append(1)
        return m(X[idx]).sum() * 0 + (1.0 if len(calls) % 2 else float("nan"))

    trainer = Trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), on_nonfinite="skip",
                      log=lambda _: None)
    state = trainer.fit(BATCHES, 1)
    assert state.skipped_steps == 3 and state.history[0]["train_loss"] == 1.0


def test_bad_trainer_settings_are_named():
    model = torch.nn.Linear(10, 1)

    def make(**kwargs):
        return Trainer(model, lambda m, idx: m(X[idx]).sum(), torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)

    for kwargs, message in (({"grad_clip": -1.0}, "grad_clip must be a finite number > 0 or None, got -1.0"),
                            ({"grad_clip": 0.0}, "grad_clip must be"), ({"grad_clip": float("nan")}, "grad_clip must"),
                            ({"checkpoint_every": 0}, "checkpoint_every must be an int >= 1, got 0"),
                            ({"checkpoint_every_steps": -1}, "checkpoint_every_steps must be an int >= 1 or None"),
                            ({"keep": -1}, "keep must be an int >= 0")):
        with pytest.raises(StillError, match=re.escape(message)):
            make(**kwargs)
    with pytest.raises(StillError, match="batches must be a function of the epoch"):
        make().fit([torch.arange(4)], 1)
    with pytest.raises(StillError, match="epochs must be an int >= 0, got -1"):
        make().fit(BATCHES, -1)
    trainer = Trainer(model, lambda m, idx: 1.0, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(StillError, match="loss_fn must return a scalar tensor .*, got float"):
        trainer.fit(BATCHES, 1)


def test_nan_stop_leaves_only_finite_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.fit(BATCHES, 1)  # one finite checkpoint
    trainer = make_trainer(tmp_path)
    trainer.loss_fn = lambda m, idx: m(X[idx]).sum() * float("inf")
    with pytest.raises(TrainingDiverged):
        trainer.fit(BATCHES, 2)
    from still.train.checkpoint import list_checkpoints, load_checkpoint

    for path in list_checkpoints(tmp_path):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path).model.values())


def test_cli_exit_code_for_divergence(capsys, monkeypatch):
    from helpers import run_cli
    from still.recipes import mnist

    def diverge(*args, **kwargs):
        raise TrainingDiverged("teacher: the loss is nan at step 7")

    monkeypatch.setattr(mnist, "run_mnist", diverge)
    code, _, err = run_cli(capsys, "distill", "mnist", "--teacher-epochs", "1")
    assert code == 3 and "the loss is nan at step 7" in err and "Traceback" not in err


def test_resume_is_exact_with_the_one_cycle_schedule(tmp_path):
    """OneCycleLR cycles the momentum too: its state must survive the JSON round trip."""
    config = OptimConfig(name="sgd", lr=0.05, momentum=0.9, schedule="onecycle", warmup_fraction=0.2)

    def trainer(directory=None):
        t = make_trainer(directory, every_steps=5)
        t.optimizer = build_optimizer(t.model.parameters(), config)
        t.scheduler = build_scheduler(t.optimizer, config, total_steps=4 * 6)
        return t

    straight = trainer()
    straight.fit(BATCHES, 4)
    first = trainer(tmp_path)
    first.fit(BATCHES, 2)  # stops after epoch 2: as if the run had been cut there
    second = trainer(tmp_path)
    second.fit(BATCHES, 4)
    for a, b in zip(straight.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert second.optimizer.param_groups[0]["momentum"] == straight.optimizer.param_groups[0]["momentum"]


# ------------------------------------------------------------------ checks and edge cases


def _nan_gradient_loss(m, idx):
    """A finite loss (0) whose gradient is NaN: sqrt at 0, times the model's output."""
    return torch.sqrt(m(X[idx]).sum() * 0)


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_nan_gradients_of_a_finite_loss_stop_before_the_step(tmp_path, grad_clip):
    """With grad_clip None too: the gradient norm is computed for the finiteness check."""
    model = torch.nn.Linear(10, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, _nan_gradient_loss, torch.optim.SGD(model.parameters(), lr=0.1), grad_clip=grad_clip,
                      checkpoint_dir=tmp_path, checkpoint_every_steps=1, log=lambda _: None)
    with pytest.raises(TrainingDiverged, match="the gradient norm is nan at step 0"):
        trainer.fit(BATCHES, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob("ckpt-*"))


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_a_nonfinite_gradient_outside_the_clip_groups_stops_before_the_step(tmp_path, grad_clip):
    """A parameter in no clip group is not clipped, but its gradient is checked: an infinite one
    (sqrt at 0) stopped nothing before, and the step made the weight -inf in the next checkpoint."""

    class Offset(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.offset = torch.nn.Linear(10, 1), torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.body(x) + torch.sqrt(self.offset)  # d sqrt / d offset at 0 = inf

    torch.manual_seed(0)
    model = Offset()
    x, y = torch.randn(96, 10), torch.randn(96, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, lambda m, idx: (m(x[idx]) - y[idx]).pow(2).mean(),
                      torch.optim.SGD(model.parameters(), lr=0.1), grad_clip=grad_clip,
                      clip_groups=[model.body.parameters()], checkpoint_dir=tmp_path, checkpoint_every_steps=1,
                      log=lambda _: None)
    with pytest.raises(TrainingDiverged, match="the gradient norm is inf at step 0"):
        trainer.fit(BATCHES, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob("ckpt-*"))


def test_the_total_norm_for_the_finite_check_is_pytorchs_to_rounding_and_finite_where_it_is():
    """`_total_norm` (CPU fp32 gradients as BLAS dot products) against `get_total_norm`: the same
    norm to rounding, the same finiteness (also past the fp32 sum of squares' range, 1e20, where
    both overflow), and PyTorch's own for gradients it does not take (bf16, not contiguous)."""
    torch.manual_seed(0)
    grads = [torch.randn(80, 78), torch.randn(80), torch.randn(10, 80)]
    want = torch.nn.utils.get_total_norm(grads)
    assert loop._total_norm(grads).item() == pytest.approx(want.item(), rel=1e-6)
    for value in (1e20, math.inf, -math.inf, math.nan):
        bad = [g.clone() for g in grads]
        bad[1][3] = value
        got, want = loop._total_norm(bad).item(), torch.nn.utils.get_total_norm(bad).item()
        assert math.isfinite(got) == math.isfinite(want) and (not math.isfinite(got) or got == pytest.approx(want))
    for others in ([g.to(torch.bfloat16) for g in grads], [g.t() for g in grads]):
        assert loop._total_norm(others).item() == pytest.approx(torch.nn.utils.get_total_norm(others).item(), rel=1e-6)


def test_nan_gradients_are_skipped_in_skip_mode():
    model = torch.nn.Linear(10, 1)
    calls = []

    def loss_fn(m, idx):  # NaN gradients at every third step, from a finite loss
        calls.append(1)
        return _nan_gradient_loss(m, idx) if len(calls) % 3 == 0 else m(X[idx]).pow(2).mean()

    trainer = Trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.01), on_nonfinite="skip",
                      log=lambda _: None)
    state = trainer.fit(BATCHES, 2)
    assert state.skipped_steps == 4 and state.step == 12
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_epoch_whose_every_step_was_skipped_reports_nan(tmp_path):
    """Not 0.0, which reads as a perfect epoch; NaN goes through the checkpoint's JSON and back."""
    model = torch.nn.Linear(10, 1)
    calls = []

    def loss_fn(m, idx):  # the first epoch's six steps NaN, the second's finite
        calls.append(1)
        return m(X[idx]).pow(2).mean() * (float("nan") if len(calls) <= 6 else 1.0)

    def make():
        return Trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.01), on_nonfinite="skip",
                       checkpoint_dir=tmp_path, log=lambda _: None)

    state = make().fit(BATCHES, 2)
    assert math.isnan(state.history[0]["train_loss"]) and math.isfinite(state.history[1]["train_loss"])
    assert state.skipped_steps == 6 and state.step == 12  # `step` counts the skipped steps too
    loaded = make()
    loaded.fit(BATCHES, 2)
    assert loaded.loaded_finished and math.isnan(loaded.state.history[0]["train_loss"])


def test_a_checkpoint_folder_that_takes_no_files_is_named_before_the_first_step(tmp_path, monkeypatch):
    """Read-only media: a probe's run trained an epoch, then ended in an OSError at its first
    checkpoint. A finished run there still loads."""
    import tempfile

    make_trainer(tmp_path).fit(BATCHES, 1)
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path:
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    trainer = make_trainer(tmp_path)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    steps = []
    trainer.post_step = lambda: steps.append(1)
    with pytest.raises(StillError, match=f"cannot write checkpoints into {tmp_path}: Read-only file system"):
        trainer.fit(BATCHES, 2)
    assert steps == [] and [p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-")] == ["ckpt-00000006"]
    loaded = make_trainer(tmp_path)
    loaded.fit(BATCHES, 1)
    assert loaded.loaded_finished and not all(torch.equal(weights[k], v) for k, v in loaded.model.state_dict().items())


def test_clip_groups_given_as_generators_clip_every_step():
    """`[m.a.parameters(), m.b.parameters()]`: generators, which the first step would use up."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Linear(8, 1))
    norms = []

    def record():  # post_step: the gradients as the optimizer used them
        norms.append([torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item() for layer in model])

    trainer = Trainer(model, lambda m, idx: 1000 * m(X[idx]).pow(2).mean(),
                      torch.optim.SGD(model.parameters(), lr=1e-4), grad_clip=1.0,
                      clip_groups=[model[0].parameters(), model[1].parameters()], post_step=record, log=lambda _: None)
    trainer.fit(BATCHES, 1)
    assert len(norms) == 6 and all(n <= 1.0 + 1e-5 for step in norms for n in step), norms


@pytest.mark.parametrize("groups", [lambda m: m.parameters(), lambda m: list(m.parameters()),
                                    lambda m: [torch.nn.Linear(2, 2).parameters()], lambda m: [[]]])
def test_clip_groups_that_are_not_groups_of_the_models_parameters_are_refused(groups):
    """A flat `model.parameters()` made groups of each weight's rows (no gradients): nothing clipped."""
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Linear(8, 1))
    with pytest.raises(StillError, match="clip_groups must be groups"):
        Trainer(model, lambda m, idx: m(X[idx]).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=1e-4),
                grad_clip=1.0, clip_groups=groups(model), log=lambda _: None)


def test_metrics_that_are_tensors_or_numpy_scalars_are_saved_as_numbers(tmp_path):
    import numpy as np

    model = torch.nn.Linear(10, 1)

    def evaluate(m):
        return {"tensor": (m(X) > 0).float().mean(), "one": torch.ones(1, dtype=torch.int64),
                "np32": np.float32(0.5), "np64": np.int64(3), "plain": [1, 2]}

    trainer = Trainer(model, lambda m, idx: m(X[idx]).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.01),
                      evaluate=evaluate, checkpoint_dir=tmp_path, log=lambda _: None)
    state = trainer.fit(BATCHES, 1)
    record = state.history[0]
    assert isinstance(record["tensor"], float) and record["one"] == 1 and type(record["one"]) is int
    assert record["np32"] == 0.5 and type(record["np32"]) is float and type(record["np64"]) is int
    from still.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path).state["state"]["history"][0]["np64"] == 3


def test_a_metric_json_cannot_hold_is_named():
    model = torch.nn.Linear(10, 1)
    trainer = Trainer(model, lambda m, idx: m(X[idx]).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.01),
                      evaluate=lambda m: {"logits": m(X)}, log=lambda _: None)
    with pytest.raises(StillError, match=r"evaluate's metric 'logits' is a tensor of shape \(96, 1\)"):
        trainer.fit(BATCHES, 1)


@pytest.mark.parametrize("key", ["epoch", "train_loss", "seconds"])
def test_a_metric_named_as_the_historys_own_is_refused(key):
    """It overwrote the history's entry without a word (the epoch number, the training loss)."""
    model = torch.nn.Linear(10, 1)
    trainer = Trainer(model, lambda m, idx: m(X[idx]).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.01),
                      evaluate=lambda m: {key: 0.5}, log=lambda _: None)
    with pytest.raises(StillError, match=f"evaluate returned a metric named '{key}', which the history keeps"):
        trainer.fit(BATCHES, 1)


@pytest.mark.parametrize("kwargs, message", [({"n": 10, "batch_size": 0}, "batch_size must be an int >= 1, got 0"),
                                             ({"n": -1, "batch_size": 2}, "n must be an int >= 0, got -1"),
                                             ({"n": 10, "batch_size": 2.0}, "batch_size must be an int >= 1, got 2.0"),
                                             # (a review probe: tracebacks at the first epoch)
                                             *[({"n": 10, "batch_size": 2, "seed": seed},
                                                f"seed must be an int >= 0 and <= 2**40, got {seed!r}")
                                               for seed in (1.5, None, 2**60, -1)]])
def test_index_batches_name_bad_counts(kwargs, message):
    with pytest.raises(StillError, match=re.escape(f"IndexBatches.{message}")):
        IndexBatches(**kwargs)
    assert len(IndexBatches(0, 4)) == 0


@pytest.mark.parametrize("batch_size", [11, 2**62, 2**63, 2**70, 10**400])
def test_a_batch_larger_than_the_data_takes_it_all(batch_size):
    # (a probe: `distill mnist --batch-size 2**63` overflowed `split` at the first epoch)
    batches = IndexBatches(10, batch_size, seed=1)
    assert len(batches) == 1 and sorted(batches(0)[0].tolist()) == list(range(10))
    assert IndexBatches(0, batch_size)(0) == []


def test_a_config_json_cannot_hold_is_refused_before_training():
    model = torch.nn.Linear(10, 1)
    with pytest.raises(StillError, match=r"config\['optim'\] cannot be written as JSON .*OptimConfig.*to_dict"):
        Trainer(model, lambda m, idx: m(X[idx]).sum(), torch.optim.SGD(model.parameters(), lr=0.1),
                config={"seed": 0, "optim": OptimConfig()})


def test_a_loaded_finished_run_leaves_the_model_in_eval_mode(tmp_path):
    make_trainer(tmp_path).fit(BATCHES, 1)
    second = make_trainer(tmp_path)
    second.model.train()
    second.fit(BATCHES, 1)
    assert second.loaded_finished and not second.model.training


def test_a_submodule_frozen_in_eval_mode_stays_there():
    """A backbone the caller put in eval mode keeps its batch-norm statistics through fit (and its
    evaluations); the rest trains in training mode."""
    seed_everything(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.BatchNorm1d(8))
    head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    model = torch.nn.Sequential(backbone, head)
    backbone.eval()
    statistics = backbone[1].running_mean.clone()
    modes = []

    def loss_fn(m, idx):
        modes.append((backbone.training, backbone[1].training, head.training, head[0].training))
        return F.cross_entropy(m(X[idx]), Y[idx])

    trainer = Trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1),
                      evaluate=lambda m: {"errors": int((m(X).argmax(-1) != Y).sum())}, log=lambda _: None)
    trainer.fit(BATCHES, 2)
    assert set(modes) == {(False, False, True, True)}
    assert torch.equal(backbone[1].running_mean, statistics) and not model.training


def test_a_signal_that_arrives_during_the_ranks_agreement_is_acted_on_at_the_next():
    """A probe (torchrun, SIGINT to one rank): a signal that arrived while its rank waited in the
    agreement was acted on at once by that rank alone (the others had agreed on none): it went into
    the checkpoint's collectives by itself, and the run ended in gloo's "Connection closed by peer"
    with no checkpoint. Every rank acts on the agreed signal: this one at the next agreement."""
    from still.train.distributed import Dist

    agreements = []

    class Rank0(Dist):  # two ranks; the other never received a signal
        def all_min(self, value):
            if value.dtype != torch.int64 or not trainer.state.step:  # (the steps' finite checks, the start's)
                return value
            agreements.append(int(value))
            if len(agreements) == 3:  # the signal comes in while this rank waits in the third agreement
                os.kill(os.getpid(), signal.SIGINT)
            return value  # (the other rank's 0: the minimum of the negated signal numbers is this one's)

        def all_sum(self, value):
            return value * 2

        def gather_list(self, tensor):
            return [tensor.cpu().clone(), tensor.cpu().clone()]

        def barrier(self):
            pass

    trainer = make_trainer()
    trainer.dist = Rank0(rank=0, world=2)
    with pytest.raises(TrainingInterrupted) as raised:
        trainer.fit(BATCHES, 2)
    assert agreements == [0, 0, 0, -signal.SIGINT] and raised.value.signum == signal.SIGINT
    assert trainer.state.step == 4  # (the step after the agreement it arrived in)


def test_ranks_that_start_at_other_steps_are_named(tmp_path):
    """A probe: torchrun ranks given other --out folders (no file system shared by the nodes), one
    resuming at step 4 and the other starting afresh, trained on together unsaid."""
    from still.train.distributed import Dist

    class Rank0(Dist):  # two ranks; the other has no checkpoint, and starts at step 0
        def all_min(self, value):
            return torch.minimum(value, torch.zeros_like(value)) if value.dtype == torch.int64 else value

        def all_sum(self, value):
            return value * 0  # (rank 0's checks of the checkpoint folder passed)

    make_trainer(tmp_path, every_steps=6).fit(BATCHES, 1)
    trainer = make_trainer(tmp_path)
    trainer.dist = Rank0(rank=0, world=2)
    with pytest.raises(StillError, match=re.escape("the processes disagree on the step they start at (0 on one, 6 on "
                                                   "another): every process must read the same checkpoint folder")):
        trainer.fit(BATCHES, 2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("epochs, at", [(2, 2), (3, 1)], ids=["the last evaluation", "a middle one"])
def test_a_signal_in_an_evaluation_stops_the_run_once_it_is_saved(tmp_path, signum, epochs, at):
    """A signal in the last evaluation was recorded and dropped: fit returned, and a recipe went on
    through every later stage and exited 0; one in a middle evaluation stopped the run a step into
    the next epoch (probes). Both stop at the epoch's end, saved, and the run resumes exactly."""
    trainer = make_trainer(tmp_path / "run")
    evaluate, calls, epochs_started = trainer.evaluate, [], []

    def signalled(m):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signum)
        return evaluate(m)

    def batches(epoch):
        epochs_started.append(epoch)
        return BATCHES(epoch)

    trainer.evaluate = signalled
    with pytest.raises(TrainingInterrupted) as raised:
        trainer.fit(batches, epochs)
    steps = 6 * at  # (6 batches an epoch)
    assert raised.value.signum == signum and raised.value.checkpoint == tmp_path / "run" / f"ckpt-{steps:08d}"
    assert epochs_started == list(range(at)) and trainer.state.step == steps
    again = make_trainer(tmp_path / "run")
    again.fit(BATCHES, epochs)
    straight = make_trainer(tmp_path / "straight")
    straight.fit(BATCHES, epochs)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in again.state.history] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in straight.state.history]


def test_a_submodule_frozen_in_eval_mode_stays_there_in_a_later_fit():
    """fit leaves the model in eval mode; the next fit (of this trainer or a new one) then found no
    frozen submodule and trained the caller's frozen batch norm (a probe)."""
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    model[1].eval()
    statistics = model[1].running_mean.clone()
    trainer = Trainer(model, lambda m, idx: F.cross_entropy(m(X[idx]), Y[idx]),
                      torch.optim.SGD(model.parameters(), lr=0.1), log=lambda _: None)
    trainer.fit(BATCHES, 1)
    trainer.fit(BATCHES, 2)
    Trainer(model, lambda m, idx: F.cross_entropy(m(X[idx]), Y[idx]),
            torch.optim.SGD(model.parameters(), lr=0.1), log=lambda _: None).fit(BATCHES, 1)
    assert torch.equal(model[1].running_mean, statistics)
    model.train()  # the caller's own train(): every submodule trains from here
    Trainer(model, lambda m, idx: F.cross_entropy(m(X[idx]), Y[idx]),
            torch.optim.SGD(model.parameters(), lr=0.1), log=lambda _: None).fit(BATCHES, 1)
    assert not torch.equal(model[1].running_mean, statistics)


class _WithExtraState(torch.nn.Linear):
    def get_extra_state(self):
        return {"vocab": ["a"]}

    def set_extra_state(self, state):
        pass


def test_what_a_checkpoint_cannot_hold_is_refused_before_the_first_step(tmp_path):
    """A non-tensor state dict entry, a tensor learning rate or a checkpoint_dir that cannot be a
    folder ended the run at its first save, an epoch's work later, in a traceback (a probe)."""
    (tmp_path / "file").write_text("")
    linear = torch.nn.Linear(10, 3)
    cases = [
        (_WithExtraState(10, 3), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), tmp_path / "a",
         "the model's state dict holds '_extra_state' as a dict"),
        (linear, lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(1e-3)), tmp_path / "b",
         r"the optimizer's state dict holds \['param_groups'\]\[0\]\['lr'\] = a Tensor"),
        (linear, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), tmp_path / "file",
         "checkpoint folder .* File exists"),
        (linear, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), tmp_path / "file" / "sub",
         "checkpoint folder .* Not a directory"),
    ]
    steps = []

    def loss_fn(m, idx):
        steps.append(idx)
        return F.cross_entropy(m(X[idx]), Y[idx])

    for model, optimizer, folder, message in cases:
        trainer = Trainer(model, loss_fn, optimizer(model), checkpoint_dir=folder, log=lambda _: None)
        with pytest.raises(StillError, match=message):
            trainer.fit(BATCHES, 1)
    assert not steps


def test_state_tensors_that_are_not_tensors_are_refused_before_the_first_step(tmp_path):
    model = torch.nn.Linear(10, 3)
    steps = []

    def loss_fn(m, idx):
        steps.append(idx)
        return F.cross_entropy(m(X[idx]), Y[idx])

    for returned, message in (({"x": 3}, "got 'x': a int"), ([torch.zeros(1)], "got a list")):
        trainer = Trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=tmp_path,
                          state_tensors=lambda r=returned: r, load_state_tensors=lambda _: None, log=lambda _: None)
        with pytest.raises(StillError, match=f"state_tensors must return a dict of names to tensors .*{message}"):
            trainer.fit(BATCHES, 1)
    assert not steps


def _forge(path, name, edit):
    """Edit file `name` of checkpoint `path` with `edit`, and a manifest that vouches for it: a
    checkpoint written otherwise than by still (or by an older still)."""
    from safetensors.torch import load_file, save_file

    from still.train.io import sha256_file

    file = path / name
    if name.endswith(".json"):
        data = json.loads(file.read_text())
        edit(data)
        file.write_text(json.dumps(data))
    else:
        tensors = load_file(str(file))
        edit(tensors)
        save_file(tensors, str(file))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(file)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name, edit, message", [
    ("state.json", lambda d: d["state"].pop("step"), "training state lacks step"),
    ("state.json", lambda d: d["state"].update(step=5), "says step 5, its checkpoint step 6"),
    ("state.json", lambda d: d["state"].update(foo=1), "has unknown foo"),
    ("state.json", lambda d: d["state"].update(batch="2"), "has batch = '2'"),
    ("state.safetensors", lambda t: t.update({"optimizer/0/exp_avg": torch.zeros(16, 20)}),
     r"exp_avg of shape \(16, 20\) is for a parameter of shape \(16, 10\)"),
    ("state.safetensors", lambda t: t.update({"optimizer/0/exp_avg": torch.zeros(16, 5)}),
     r"exp_avg of shape \(16, 5\) is for a parameter of shape \(16, 10\)"),
    ("state.safetensors", lambda t: t.pop("optimizer/0/exp_avg"),
     r"does not fit this optimizer.*has exp_avg_sq, step, another's exp_avg, exp_avg_sq, step\)"),
    ("state.safetensors", lambda t: t.pop("rng/torch"), "training state does not read .*rng/torch"),
    ("state.safetensors", lambda t: t.update({"rng/torch": t["rng/torch"][:100]}), "training state does not read"),
])
def test_a_checkpoint_whose_training_state_was_written_otherwise_is_named(tmp_path, name, edit, message):
    """A larger moment than its parameter trained on unsaid, a smaller one was read past its end, a
    state without its step restarted the run at step 0 over the checkpoint it came from; the rest
    were tracebacks (a probe, with forged manifests)."""
    make_trainer(tmp_path, every_steps=6).fit(BATCHES, 1)
    path = sorted(tmp_path.glob("ckpt-*"))[-1]
    _forge(path, name, edit)
    trainer = make_trainer(tmp_path)
    weights, rng = {k: v.clone() for k, v in trainer.model.state_dict().items()}, torch.get_rng_state()
    with pytest.raises(StillError, match=message):
        trainer.fit(BATCHES, 2)
    # refused, the trainer is as it was (a probe: the counters were checked after the weights, the
    # moments and the RNG states had loaded, for a caller who goes on)
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert not trainer.optimizer.state and torch.equal(rng, torch.get_rng_state()) and trainer.state.step == 0


def test_weights_refused_for_their_kind_of_number_leave_the_trainer_as_it_was(tmp_path):
    """A probe: a checkpoint refused for a weight of another kind of number (a float buffer where the
    model has an integer one) left the checkpoint's Adam moments, schedule and RNG states loaded."""
    def trainer(kind):
        torch.manual_seed(0)
        model = torch.nn.Linear(10, 3)
        model.register_buffer("b", torch.zeros(3, dtype=kind))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
        return Trainer(model, lambda m, idx: F.cross_entropy(m(X[idx]), Y[idx]), optimizer, scheduler,
                       checkpoint_dir=tmp_path, log=lambda _: None)

    trainer(torch.float32).fit(BATCHES, 1)
    other = trainer(torch.int64)
    rng, lr = torch.get_rng_state(), other.optimizer.param_groups[0]["lr"]
    with pytest.raises(StillError, match="b: torch.float32"):
        other.fit(BATCHES, 2)
    assert not other.optimizer.state and torch.equal(rng, torch.get_rng_state())
    assert other.scheduler.last_epoch == 0 and other.optimizer.param_groups[0]["lr"] == lr


@pytest.mark.parametrize("optimizer", [
    lambda m: torch.optim.Adafactor(m.parameters()),  # factors for matrices, a variance for vectors
    lambda m: torch.optim.Adam([{"params": m[0].parameters(), "amsgrad": True}, {"params": m[1].parameters()}]),
    lambda m: torch.optim.RMSprop([{"params": m[0].parameters(), "momentum": 0.9}, {"params": m[1].parameters()}]),
])
def test_optimizers_whose_state_differs_by_group_or_dimensions_resume(tmp_path, optimizer):
    """The check of a resumed optimizer's state first held every parameter to the same entries, and
    refused the checkpoints of these (a probe): their state follows a group's options, or the
    parameter's dimensions."""
    def fit(epochs):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Linear(8, 3))
        trainer = Trainer(model, lambda m, idx: F.cross_entropy(m(X[idx]), Y[idx]), optimizer(model),
                          checkpoint_dir=tmp_path, log=lambda _: None)
        return trainer.fit(BATCHES, epochs)

    fit(1)
    assert len(fit(2).history) == 2


def test_an_epoch_resumed_mid_way_counts_the_seconds_of_every_piece(tmp_path):
    """An epoch's `seconds` (a recipe's training time and tokens a second) counted only the piece
    after the last resume: a run interrupted mid-interval read up to 3x faster than it ran."""

    class Stop(Exception):
        pass

    def trainer(stop):
        model = torch.nn.Linear(10, 3)

        def loss_fn(m, idx):
            if stop and made.state.step == 3:
                raise Stop
            time.sleep(0.05)
            return F.cross_entropy(m(X[idx]), Y[idx])

        made = Trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=tmp_path,
                       checkpoint_every_steps=3, log=lambda _: None)
        return made

    with pytest.raises(Stop):
        trainer(stop=True).fit(BATCHES, 1)
    resumed = trainer(stop=False)
    resumed.fit(BATCHES, 1)
    assert resumed.state.history[0]["seconds"] >= 6 * 0.05


def test_a_scheduler_that_steps_on_a_metric_is_refused():
    model = torch.nn.Linear(10, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(StillError, match="ReduceLROnPlateau steps on a metric"):
        Trainer(model, lambda m, idx: m(X[idx]).sum(), optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer))


@pytest.mark.parametrize("setting", [dict(grad_clip="1"), dict(shards=2.5), dict(shards="2"), dict(keep=True),
                                     dict(checkpoint_every=True), dict(checkpoint_every_steps=False)])
def test_trainer_settings_of_the_wrong_type_are_named(setting):
    name, value = next(iter(setting.items()))
    model = torch.nn.Linear(10, 3)
    with pytest.raises(StillError, match=f"{name} must be .* got {re.escape(repr(value))}"):
        Trainer(model, lambda m, idx: m(X[idx]).sum(), torch.optim.SGD(model.parameters(), lr=0.1), **setting)


def test_a_trainer_of_what_is_not_a_model_loss_or_optimizer_is_named():
    """Probes: a function for the model or None for the optimizer were AttributeErrors at the first
    step; an optimizer over another model's parameters trained nothing, unsaid."""
    model, other = torch.nn.Linear(10, 3), torch.nn.Linear(10, 3)
    loss_fn = lambda m, idx: m(X[idx]).sum()  # noqa: E731
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for args, message in (((lambda x: x, loss_fn, optimizer), "model must be a torch.nn.Module, got a function"),
                          ((model, None, optimizer), r"loss_fn must be a function of \(model, batch\), got a NoneType"),
                          ((model, loss_fn, None), "optimizer must be a torch.optim.Optimizer, got a NoneType"),
                          ((model, loss_fn, torch.optim.SGD(other.parameters(), lr=0.1)),
                           "the optimizer holds none of the model's parameters")):
        with pytest.raises(StillError, match=message):
            Trainer(*args)
    frozen = torch.nn.Sequential(torch.nn.Linear(10, 3), other)  # (some of the model's: a fine-tuning)
    Trainer(frozen, loss_fn, torch.optim.SGD(other.parameters(), lr=0.1))


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("returned, message", [
    (lambda m, idx: 0.5, "got float"),
    (lambda m, idx: {"loss": m(X[idx]).mean()}, "got dict"),
    (lambda m, idx: m(X[idx]).squeeze(-1), r"got a tensor of shape \(\d+,\)"),
    (lambda m, idx: m(X[idx]).mean().detach(), "got a tensor that does not require grad"),
])
def test_a_loss_fn_returning_no_scalar_with_a_graph_is_named(shards, returned, message):
    model = torch.nn.Linear(10, 1)

    def loss_fn(m, idx, shard=None):
        return returned(m, idx if shard is None else idx[shard.rows(len(idx))])

    trainer = Trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), shards=shards, log=lambda _: None)
    with pytest.raises(StillError, match="loss_fn must return a scalar tensor .*, " + message):
        trainer.fit(BATCHES, 1)


@pytest.mark.parametrize("first, second, named", [
    *[(a, b, True) for a, b in [("sgd", "adamw"), ("adam", "sgd"), ("adam", "adamw"), ("adamw", "adam"),
                                ("adam", "adamax"), ("adam", "radam")]],
    ("sgd", "adamw", False), ("adam", "sgd", False)])
def test_resuming_with_another_optimizer_is_named_and_changes_nothing(tmp_path, first, second, named):
    """Adam's state loaded into Adamax failed at the first step (no exp_inf), into AdamW or RAdam,
    or AdamW's into Adam, trained on unsaid: checkpoints name the optimizer's class. Older ones,
    which do not (`named` False), are checked by their state alone, which tells SGD from Adam."""

    def make(name, directory):
        torch.manual_seed(0)
        model = torch.nn.Linear(10, 1)
        others = {"adamax": torch.optim.Adamax, "radam": torch.optim.RAdam}
        optimizer = (others[name](model.parameters(), lr=0.01) if name in others
                     else build_optimizer(model.parameters(), OptimConfig(name=name, lr=0.01)))
        return Trainer(model, lambda m, idx: m(X[idx]).pow(2).mean(), optimizer, checkpoint_dir=directory,
                       log=lambda _: None)

    make(first, tmp_path).fit(BATCHES, 1)
    if not named:
        _forge(tmp_path / "ckpt-00000006", "state.json", lambda d: d.pop("optimizer_class"))
    trainer = make(second, tmp_path)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optimizer_state = trainer.optimizer.state_dict()
    saved_by = type(make(first, None).optimizer).__name__
    message = (rf"ckpt-00000006 was saved by another optimizer, torch.optim.\w+.{saved_by}, "
               rf"than this one, torch.optim.\w+.{type(trainer.optimizer).__name__}" if named else
               rf"optimizer state in .*ckpt-00000006 does not fit this optimizer, "
               rf"{type(trainer.optimizer).__name__} .*only in the checkpoint: ")
    with pytest.raises(StillError, match=message):
        trainer.fit(BATCHES, 2)
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.optimizer.state_dict() == optimizer_state and trainer.state.step == 0


def test_resuming_a_changed_model_names_the_weights(tmp_path):
    """The model is checked before the optimizer, whose state would not fit either."""
    def make(width):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.Linear(width, 1))
        return Trainer(model, lambda m, idx: m(X[idx]).pow(2).mean(),
                       build_optimizer(model.parameters(), OptimConfig(name="adam", lr=0.01)),
                       checkpoint_dir=tmp_path, log=lambda _: None)

    make(4).fit(BATCHES, 1)
    with pytest.raises(StillError, match=r"do not fit the model: wrong shape 0.bias: \(4,\)"):
        make(5).fit(BATCHES, 2)


def test_a_resumed_optimizer_keeps_its_moments_in_the_parameters_layout(tmp_path):
    """Adam's moments of a channels-last convolution weight are channels-last again after a resume
    (checkpoints hold them contiguous), and the resumed run is exact: the fused Adam that
    `build_optimizer` picks on a CPU reads moments as if they had the parameter's strides."""
    images = torch.randn(96, 2, 6, 6, generator=torch.Generator().manual_seed(1))

    def make(directory=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 1))
        model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model.parameters(), OptimConfig(name="adam", lr=0.01))
        return Trainer(model, lambda m, idx: m(images[idx]).pow(2).mean(), optimizer, checkpoint_dir=directory,
                       log=lambda _: None)

    straight = make()
    straight.fit(BATCHES, 2)
    make(tmp_path).fit(BATCHES, 1)
    resumed = make(tmp_path)
    assert resumed.resume()
    weight = resumed.model[0].weight
    moments = resumed.optimizer.state[weight]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    for key in ("exp_avg", "exp_avg_sq"):
        assert moments[key].stride() == weight.stride(), key
    resumed.fit(BATCHES, 2)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_under_other_settings_says_which(tmp_path):
    """A Trainer knows nothing of which settings matter (the recipes refuse changes themselves): it
    resumes, and says which settings differ from the checkpoint's."""
    model = torch.nn.Linear(10, 1)

    def trainer(config, lines):
        return Trainer(model, lambda m, idx: m(X[idx]).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.01),
                       checkpoint_dir=tmp_path, config=config, log=lines.append)

    trainer({"lr": 0.01, "width": 10}, []).fit(BATCHES, 1)
    lines = []
    trainer({"lr": 0.02, "width": 10}, lines).fit(BATCHES, 2)
    assert any("ckpt-00000006 was saved with other settings (lr); resuming from it" in line for line in lines), lines
    lines = []
    trainer({"lr": 0.02, "width": 10}, lines).fit(BATCHES, 2)  # (its own now: nothing said)
    assert not any("other settings" in line for line in lines), lines
    trainer({"lr": 0.02, "width": math.nan}, []).fit(BATCHES, 3)
    lines = []  # (a NaN, unequal to itself, was "other settings (width)" on every resume)
    trainer({"width": math.nan, "lr": 0.02}, lines).fit(BATCHES, 4)
    assert not any("other settings" in line for line in lines), lines
    lines = []  # (equal values written otherwise: 1 and 1.0, a review probe's "other settings ()")
    trainer({"width": math.nan, "lr": 0.02 * 1.0, "n": 1}, []).fit(BATCHES, 5)
    trainer({"width": math.nan, "lr": 0.02, "n": 1.0}, lines).fit(BATCHES, 6)
    assert not any("other settings" in line for line in lines), lines
    for bad in ({1: "x", "a": 2}, {"a": {1: "x", "b": 2}}):  # (keys JSON writes as strings, or cannot sort)
        with pytest.raises(StillError, match="cannot be written as JSON"):
            trainer(bad, [])


def test_numpy_whole_numbers_are_taken_as_ints(tmp_path):
    """NumPy's ints (from a sweep's arange, say) were refused as "must be an int" (the configs took them)."""
    import numpy as np

    plain = make_trainer()
    plain.fit(IndexBatches(96, 16, seed=3), 2)
    numpy = make_trainer(tmp_path)  # (seeds the global RNG as plain's did)
    trainer = Trainer(numpy.model, numpy.loss_fn, numpy.optimizer, numpy.scheduler, grad_clip=np.float32(1e9),
                      checkpoint_dir=tmp_path, checkpoint_every=np.int64(1), checkpoint_every_steps=np.int32(4),
                      keep=np.int64(1), shards=np.int64(1), log=lambda _: None)
    trainer.fit(IndexBatches(np.int64(96), np.int64(16), seed=3), np.int64(2))
    weights = zip(plain.model.state_dict().values(), trainer.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in weights)
    assert type(trainer.keep) is int and type(trainer.grad_clip) is float
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-")] == ["ckpt-00000012"]
