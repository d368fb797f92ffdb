import json
import os

import pytest
import torch
from torch import nn

from still.errors import StillError
from still.train import checkpoint as ckpt
from still.train.io import atomic_write_bytes
from still.train.seed import rng_state, set_rng_state


def make(tmp_path, step=10, keep=3, **kwargs):
    torch.manual_seed(step)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = ckpt.save_checkpoint(tmp_path, step, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                rng=rng_state(), state={"epoch": 1, "history": [{"loss": 0.5}]},
                                config={"lr": 1e-3}, keep=keep, **kwargs)
    return path, model, optimizer


def test_round_trip(tmp_path):
    path, model, optimizer = make(tmp_path, extra_tensors={"memory": torch.arange(6.0).view(2, 3)})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                      "state.json", "state.safetensors"]
    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 10 and loaded.config == {"lr": 1e-3}
    assert loaded.state["state"]["history"] == [{"loss": 0.5}]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model[k], v)
    fresh = torch.optim.Adam(nn.Linear(4, 3).parameters(), lr=1e-3)
    fresh.load_state_dict(ckpt.optimizer_state(loaded))
    for a, b in zip(fresh.state.values(), optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert torch.equal(loaded.extra_tensors()["memory"], torch.arange(6.0).view(2, 3))


def test_rng_states_round_trip(tmp_path):
    import random

    import numpy as np

    make(tmp_path)
    loaded = ckpt.latest_checkpoint(tmp_path)
    set_rng_state(ckpt.rng_state_of(loaded))
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(ckpt.rng_state_of(loaded))
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_every_ranks_generator_state_comes_back_in_rank_order(tmp_path):
    ranks = []
    for r in range(12):  # past 10: "10" sorts before "2" as text
        torch.manual_seed(r)
        ranks.append(torch.get_rng_state())
    rng = {**rng_state(), "torch_ranks": ranks}
    ckpt.save_checkpoint(tmp_path, 1, model={"w": torch.zeros(1)}, rng=rng)
    loaded = ckpt.rng_state_of(ckpt.latest_checkpoint(tmp_path))
    assert len(loaded["torch_ranks"]) == 12
    for want, got in zip(ranks, loaded["torch_ranks"]):
        assert torch.equal(want, got)


def test_keeps_the_newest_k(tmp_path):
    for step in (1, 2, 3, 4, 5):
        make(tmp_path, step=step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000004", "ckpt-00000005"]


@pytest.mark.parametrize("damage", ["truncate_zero", "truncate_half", "flip_byte", "no_manifest"])
def test_damaged_newest_is_skipped_with_a_reason(tmp_path, damage):
    make(tmp_path, step=1)
    newest, _, _ = make(tmp_path, step=2)
    target = newest / "model.safetensors"
    data = target.read_bytes()
    if damage == "truncate_zero":
        target.write_bytes(b"")
    elif damage == "truncate_half":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        target.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        (newest / "manifest.json").unlink()
    messages = []
    loaded = ckpt.latest_checkpoint(tmp_path, log=messages.append)
    assert loaded.step == 1
    assert len(messages) == 1 and "ckpt-00000002" in messages[0]
    with pytest.raises(StillError, match="damaged|incomplete"):
        ckpt.load_checkpoint(newest)


def test_a_damaged_newest_that_cannot_be_set_aside_is_said_and_the_older_loads(tmp_path, monkeypatch):
    """Read-only media: the rename raised an OSError's traceback, where the older checkpoint loads."""
    make(tmp_path, step=1)
    newest, _, _ = make(tmp_path, step=2)
    (newest / "manifest.json").unlink()

    def read_only(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(ckpt.os, "replace", read_only)
    messages = []
    assert ckpt.latest_checkpoint(tmp_path, log=messages.append, set_aside=True).step == 1
    assert messages[0].endswith("skipped, not set aside (Read-only file system)") and newest.is_dir()


def test_failure_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    make(tmp_path, step=1)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "sha256_file", full_disk)  # fails after the tensors are written
    with pytest.raises(OSError):
        make(tmp_path, step=2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000001"]  # no temporary left behind
    assert ckpt.latest_checkpoint(tmp_path).step == 1


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_bytes(target, b"old")

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    from still.train.io import atomic_write

    with pytest.raises(OSError) as raised:
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["results.json"]
    assert raised.value.filename == str(target)  # (named by no writer, as savefig's: a probe's error named no file)

    def failing_on_the_file(tmp):
        raise OSError(13, "Permission denied", str(tmp))

    with pytest.raises(OSError) as raised:  # named as the file written, not its temporary (a probe)
        atomic_write(target, failing_on_the_file)
    assert raised.value.filename == str(target)


def test_optimizer_state_a_checkpoint_cannot_hold_is_named(tmp_path):
    """State an optimizer adds at its step (a NumPy number, say), which the check before the first
    step cannot see, raised json's TypeError at the first save (a probe)."""
    import numpy as np

    optimizer = {"state": {0: {"scale": np.float32(2.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    with pytest.raises(StillError, match=r"holds \['optimizer'\]\['state'\]\['0'\]\['scale'\] = a float32"):
        ckpt.save_checkpoint(tmp_path, 1, model={"w": torch.zeros(2)}, optimizer=optimizer)
    assert not list(tmp_path.iterdir())


def _dead_pid() -> int:
    """The process id of a process that has ended."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """SIGKILL in the middle of atomic_write leaves its temporary file (nothing can remove it then);
    the next write of that file removes it, and leaves alone those of live writers and other files."""
    import signal
    import subprocess
    import sys

    target = tmp_path / "results.json"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from still.train.io import atomic_write\n"
        "def write(tmp):\n"
        "    tmp.write_bytes(b'half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        f"atomic_write({str(target)!r}, write)\n")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".results.json.{writer.pid}-") and left[0].endswith(".tmp")

    live = tmp_path / f".results.json.{os.getppid()}-abcd1234.tmp"  # a writer still running
    other = tmp_path / f".results.md.{_dead_pid()}-abcd1234.tmp"  # another file's: its own next write's
    live.write_bytes(b"")
    other.write_bytes(b"")
    atomic_write_bytes(target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "results.json"])
    assert target.read_bytes() == b"new"

    from still.train.io import atomic_write_text  # (a write of the bytes the file holds is skipped, swept all the same)

    dead = tmp_path / f".results.json.{_dead_pid()}-abcd1234.tmp"
    dead.write_bytes(b"")
    atomic_write_text(target, "new")
    assert not dead.exists() and target.read_bytes() == b"new"


def test_a_dead_writers_half_checkpoint_is_removed_by_the_next_save(tmp_path):
    make(tmp_path, step=1)
    dead, live = tmp_path / f".ckpt-00000002.tmp-{_dead_pid()}", tmp_path / f".ckpt-00000002.tmp-{os.getppid()}"
    for half in (dead, live):
        half.mkdir()
        (half / "model.safetensors").write_bytes(b"half")
    make(tmp_path, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "ckpt-00000001", "ckpt-00000003"]


def test_strict_weight_loading_names_the_problem():
    model = nn.Linear(4, 3)
    weights = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3), "extra": torch.zeros(1)}
    with pytest.raises(StillError, match=r"unexpected extra.*wrong shape weight: \(3, 5\) in x, \(3, 4\) in the model"):
        ckpt.load_model_weights(model, weights, source="x")


def test_weights_of_another_kind_of_number_are_named_and_other_float_widths_cast():
    """Integer, bool or complex weights for a float parameter were cast unsaid (a model read 117.8
    bits a character); a half-precision copy is cast, as `load_state_dict` casts it."""
    model = nn.Linear(4, 3)
    for dtype in (torch.int64, torch.bool, torch.complex64):
        weights = {"weight": torch.ones(3, 4).to(dtype), "bias": torch.zeros(3)}
        with pytest.raises(StillError, match=f"wrong kind of number weight: {dtype} in x, torch.float32 in the model"):
            ckpt.load_model_weights(model, weights, source="x")
    ckpt.load_model_weights(model, {"weight": torch.ones(3, 4, dtype=torch.float16), "bias": torch.zeros(3)})
    assert model.weight.dtype == torch.float32 and bool((model.weight == 1).all())


def test_loading_never_unpickles(tmp_path):
    """state.json is JSON and the tensors are safetensors: a pickle dropped in their place is refused."""
    import pickle

    path, _, _ = make(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = pickle.dumps(Payload())
    (path / "model.safetensors").write_bytes(bad)
    manifest = json.loads((path / "manifest.json").read_text())
    from still.train.io import sha256_file

    manifest["files"]["model.safetensors"] = sha256_file(path / "model.safetensors")  # a forged manifest
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StillError, match="cannot be read"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_a_file_that_cannot_be_written_is_named_not_its_temporary(tmp_path, monkeypatch):
    """A probe on read-only media: "Read-only file system: .../.eval-test.json.7560-b6ndw70c.tmp", a
    temporary that never existed, where the folder refused its creation."""
    import errno
    import tempfile

    from still.train.io import atomic_write_text

    def refused(prefix, suffix, dir):
        raise OSError(errno.EROFS, "Read-only file system", f"{dir}/{prefix}abc{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(OSError) as error:
        atomic_write_text(tmp_path / "eval-test.json", "{}")
    assert error.value.filename == str(tmp_path / "eval-test.json") and list(tmp_path.iterdir()) == []


def test_atomic_writes_get_a_normal_file_mode(tmp_path):
    import os
    import stat

    from still.train.io import atomic_write_text

    atomic_write_text(tmp_path / "results.md", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "results.md").stat().st_mode) == 0o666 & ~mask
    # a checkpoint's files too (safetensors made the weights private: a probe's shared run lent none)
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", 1, model=torch.nn.Linear(2, 2).state_dict(), state={})
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {
        name: 0o666 & ~mask for name in ("config.json", "manifest.json", "model.safetensors", "state.json",
                                         "state.safetensors")}


@pytest.mark.parametrize("prefix, wrapper", [("module.", "DistributedDataParallel"), ("_orig_mod.", "torch.compile")])
def test_weights_that_differ_by_a_wrappers_prefix_alone_say_so(prefix, wrapper):
    """A model trained wrapped (DDP, torch.compile) and resumed unwrapped, or the other way round,
    was told every weight is missing and unexpected."""
    model = torch.nn.Linear(2, 2)
    wrapped = {prefix + k: v for k, v in model.state_dict().items()}
    with pytest.raises(StillError, match=f"by {prefix!r} alone: the model was saved wrapped in {wrapper}"):
        ckpt.load_model_weights(model, wrapped)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, prefix.rstrip("."), model)

    with pytest.raises(StillError, match=f"by {prefix!r} alone: the model was given wrapped in {wrapper}"):
        ckpt.load_model_weights(Wrapper(), model.state_dict())
    with pytest.raises(StillError, match=r"missing bias, weight; unexpected other.weight$"):
        ckpt.load_model_weights(model, {"other.weight": torch.zeros(2, 2)})


def test_a_damaged_checkpoint_is_set_aside_beside_one_set_aside_before(tmp_path):
    # (a probe: the copy of an earlier damaged checkpoint of the same step, "kept for a look", was deleted)
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model={"w": torch.full((2,), float(step))},
                             optimizer={"state": {}, "param_groups": []})
    (tmp_path / "ckpt-00000002" / "model.safetensors").write_bytes(b"")
    (tmp_path / "ckpt-00000002.damaged").mkdir()
    (tmp_path / "ckpt-00000002.damaged" / "earlier").write_text("a look")
    said = []
    assert ckpt.latest_checkpoint(tmp_path, log=said.append, set_aside=True).step == 1
    assert (tmp_path / "ckpt-00000002.damaged" / "earlier").read_text() == "a look"
    assert (tmp_path / "ckpt-00000002.damaged-2" / "model.safetensors").read_bytes() == b""
    assert said[0].endswith("set aside as ckpt-00000002.damaged-2")
