"""Every bad input the user can give ends with a clear message and exit code 2, no traceback."""

import os

import pytest

from helpers import assert_user_error, run_cli


def test_help_and_version(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "distill" in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and "still" in out
    code, out, _ = run_cli(capsys, "distill", "mnist", "--help")
    assert code == 0 and "SOFT-target" in out
    code, out, _ = run_cli(capsys, "lm", "train", "--help")  # (it said bits per character for bytes too: a probe)
    assert code == 0 and "bits per character (per byte with --byte-level, and on enwik8)" in " ".join(out.split())


def _commands(command, path=("still",)):
    import click

    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield " ".join(path), command


def test_every_option_of_every_command_has_help():
    import click

    from still.cli import cli

    missing = [f"{name} {p.opts[0]}" for name, command in _commands(cli) for p in command.params
               if isinstance(p, click.Option) and not p.help]
    assert missing == []
    summaries = {name: cli.commands[name].get_short_help_str(limit=80) for name in cli.commands}
    assert not [s for s in summaries.values() if s.endswith("...")], summaries  # (not cut short)


def test_python_dash_m(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "still", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Knowledge distillation" in result.stdout


def test_ctrl_c_while_the_command_starts_says_interrupted():
    """Ctrl-C while still's modules load (seconds on a busy machine, under torchrun) ended in the
    import's traceback (a probe): it says "interrupted" and exits 130, as later."""
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "class Interrupting:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'still.cli':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupting())\n"
            "runpy.run_module('still', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (130, "interrupted\n")
    # said once under torchrun, by rank 0 (as the command's own messages)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "RANK": "1"})
    assert (result.returncode, result.stderr) == (130, "")


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, "PASSIVE 10000"),  # threads sleep when idle, after a short spin
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),  # the user's policy as it is
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),
    ({"GOMP_SPINCOUNT": "500"}, "PASSIVE 500"),
])
def test_the_command_sets_openmp_waiting_before_torch_loads(environ, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | environ
    code = ("import os, sys; import still.cli; assert 'torch' not in sys.modules; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0"], "temperature must be a finite number > 0, got 0.0"),
    (["--temperature", "inf"], "temperature must be a finite number > 0, got inf"),
    (["--temperature", "2,nan"], "temperature must be a finite number > 0, got nan"),
    (["--temperature", "20,1e6"], "temperature 1000000.0 is above 100000"),
    (["--temperature", "100000.0001"], "temperature 100000.0001 is above 100000"),  # (:g said "100000 is above")
    (["--temperature", "2,abc"], "expected numbers separated by commas"),
    (["--temperature", "1,,2"], "expected numbers separated by commas, got '1,,2'"),
    (["--alpha", "1.5"], "must be in [0, 1], got 1.5"),
    (["--alpha", "-0.2"], "must be in [0, 1], got -0.2"),
    (["--omit-digit", "12"], "12 is not in the range 0<=x<=9"),
    (["--teacher-epochs", "0"], "0 is not in the range x>=1"),
    (["--preset", "huge"], "'huge' is not one of 'quick', 'paper'"),
    (["--seed", "99999999999999999999"], "seed must be a whole number from 0 to 4294967295, got 99999999999999999999"),
    (["--seed", "-1"], "seed must be a whole number from 0 to 4294967295, got -1"),
])
def test_bad_mnist_options(capsys, tmp_path, args, message):
    assert_user_error(capsys, "distill", "mnist", "--out", str(tmp_path / "run"), *args, contains=message)
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize("seed", ["100000000000000", "4294967296", "-9223372036854775809"])
def test_a_seed_out_of_range_is_refused_by_every_command(capsys, tmp_path, cifar_dir, seed):
    """Found by a probe: a seed past int64 (or, for `lm train`, past 1.8e13: the seeds made from it
    overflowed) ended in PyTorch's OverflowError, exit 1."""
    message = f"seed must be a whole number from 0 to 4294967295, got {seed}"
    for command in (["lm", "train", "--corpus", "shakespeare"], ["distill", "cifar10", "--data-dir", str(cifar_dir)]):
        assert_user_error(capsys, *command, "--out", str(tmp_path / "run"), "--seed", seed, contains=message)
        assert not (tmp_path / "run").exists()
    assert_user_error(capsys, "lm", "generate", str(tmp_path / "none"), "--seed", seed, contains=message)
    from still.errors import StillError
    from still.recipes.lm import LMConfig

    with pytest.raises(StillError, match="seed must be a whole number"):
        LMConfig(seed=2**32)


def test_enwik8_is_read_as_bytes_without_being_told(capsys, tmp_path):
    """`--corpus enwik8:PATH` alone: byte level (a character vocabulary failed on enwik8's first byte);
    here the short file is refused for its length, which is read only after the configuration."""
    (tmp_path / "enwik8").write_bytes(b"<mediawiki>" * 10)
    assert_user_error(capsys, "lm", "train", "--corpus", f"enwik8:{tmp_path / 'enwik8'}", "--out",
                      str(tmp_path / "run"), contains="holds 110 bytes; the split needs 100000000")
    from still.errors import StillError
    from still.recipes.lm import LMConfig

    with pytest.raises(StillError, match="enwik8 is read as bytes: it needs byte_level=True"):
        LMConfig(corpus="enwik8:x")


def test_corrupt_mnist_cache_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("STILL_OFFLINE", "1")
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist.pkl.gz").write_bytes(b"garbage")
    assert_user_error(capsys, "distill", "mnist", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "run"),
                      contains="SHA-256 mismatch")


def test_missing_mnist_cache_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("STILL_OFFLINE", "1")
    assert_user_error(capsys, "data", "fetch", "mnist", "--cache-dir", str(tmp_path), contains="is missing")


def test_an_empty_cache_dir_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (a probe: "" was the current folder, fetched into)
    monkeypatch.setenv("STILL_OFFLINE", "1")
    err = assert_user_error(capsys, "data", "fetch", "mnist", "--cache-dir", "", contains="--cache-dir is empty")
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_cifar10_missing_directory(capsys, tmp_path):
    assert_user_error(capsys, "distill", "cifar10", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
                      contains="does not exist")


def test_cifar10_missing_batch(capsys, cifar_dir, tmp_path):
    (cifar_dir / "cifar-10-batches-py" / "test_batch").unlink()
    assert_user_error(capsys, "distill", "cifar10", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "r"),
                      contains="missing CIFAR-10 batch file(s) test_batch")


def test_cifar10_bad_temperature(capsys, cifar_dir, tmp_path):
    assert_user_error(capsys, "distill", "cifar10", "--data-dir", str(cifar_dir), "--temperature", "-3",
                      "--out", str(tmp_path / "r"), contains="temperature must be a finite number > 0, got -3.0")


def test_cifar10_refuses_a_pickle_that_runs_code(capsys, cifar_dir, tmp_path):
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (cifar_dir / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps({b"data": Payload()}, protocol=2))
    assert_user_error(capsys, "distill", "cifar10", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "r"),
                      contains="refusing to unpickle posix.system")
    assert not marker.exists()


def test_bench_peak_runs(capsys):
    code, out, _ = run_cli(capsys, "bench", "peak", "--size", "128", "--repeats", "1")
    assert code == 0 and "fp32:" in out and "bf16:" in out
    assert float(out.split("fp32:")[1].split("GFLOP")[0]) > 0


def test_bench_peak_refuses_a_size_beyond_the_machines_memory(capsys, monkeypatch):
    """Found by a probe: `--size 1000000` (12 TB of matrices) ended in the allocator's traceback;
    one that passes the check but cannot be had is said the same way."""
    import torch

    import still.bench.peak as peak

    assert_user_error(capsys, "bench", "peak", "--size", "1000000", "--repeats", "1",
                      contains="size 1000000: its three 1000000 x 1000000 fp32 matrices (11,175.9 GiB) do not fit "
                               "in the machine's memory, more than its")

    def refused(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 196608 bytes")

    monkeypatch.setattr(torch, "randn", refused)
    assert_user_error(capsys, "bench", "peak", "--size", "128", "--repeats", "1",
                      contains="(192.0 KiB) do not fit in the machine's memory, more than it has free")
    monkeypatch.setattr(peak, "_memory", lambda device: 1000)
    assert_user_error(capsys, "bench", "peak", "--size", "128", "--repeats", "1", contains="more than its 1000 B")


def test_more_threads_than_cores_are_named(capsys, monkeypatch):
    import os

    import torch

    from still.cli import _threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    try:
        _threads(3)
        assert "--threads 3: more than the 2 cores" in capsys.readouterr().err
        _threads(2)
        assert capsys.readouterr().err == ""
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command, message", [
    (["lm", "train", "--out"], "--out is empty: give a folder (`.` for the current folder)"),
    (["distill", "mnist", "--out"], "--out is empty: give a folder"),
    (["lm", "eval"], "RUN_DIR is empty: give a path (`.` for the current folder)"),
    (["lm", "generate", "x", "--checkpoint"], "--checkpoint is empty"),
    (["lm", "generate", "x", "--save-state"], "--save-state is empty: give a file"),
    (["lm", "compare", "x", "--out"], "--out is empty"),
    (["lm", "compare", "x"], "one of RUN_DIRS is empty: give a path"),
    (["distill", "cifar10", "--data-dir"], "--data-dir is empty"),
    (["data", "list", "--cache-dir"], "--cache-dir is empty: give a folder")])
def test_an_empty_path_is_refused(command, message, tmp_path, monkeypatch, capsys):
    # (a probe: `--out ""`, an unset shell variable's "$OUT", wrote a run into the current folder)
    monkeypatch.chdir(tmp_path)
    assert_user_error(capsys, *command, "", contains=message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("threads", [17, 10**6, 2**31, 2**63])
def test_absurd_thread_counts_are_refused(threads, capsys, monkeypatch):
    # (a probe: a million threads exhausted the machine's and crashed, 2**31 was PyTorch's traceback)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for command in (["bench", "peak", "--size", "64", "--repeats", "1"], ["lm", "eval", "no-such-run"]):
        assert_user_error(capsys, *command, "--threads", str(threads),
                          contains=f"--threads {threads}: more than 8 a core of the 2 this process may use: give at "
                                   "most 16")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_rank_0_alone_says_what_went_wrong(capsys, tmp_path, monkeypatch, rank):
    """Every rank meets the same bad input; one message, not one a process."""
    monkeypatch.setenv("RANK", rank)
    code, _, err = run_cli(capsys, "distill", "mnist", "--out", str(tmp_path / "run"), "--alpha", "1.5")
    assert code == 2
    assert ("must be in [0, 1], got 1.5" in err) == (rank == "0")


@pytest.mark.parametrize("command", [["lm", "eval"], ["lm", "generate"], ["lm", "compare"]])
def test_evaluation_and_generation_refuse_torchrun(capsys, tmp_path, monkeypatch, command):
    """torchrun would run them whole in every process (each printing its tables): refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, *command, str(tmp_path / "run"))
    assert code == 2 and f"`still {' '.join(command)}` runs in one process: start it without torchrun" in err


def _corpus(folder, words="to be, or not to be"):
    folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (folder / split).mkdir()
        (folder / split / "1.txt").write_text(f"{split}: {words}\n" * 20)
    return f"pg19:{folder}"


def test_data_list_shows_the_cache_and_clear_removes_what_it_is_told(capsys, tmp_path, monkeypatch):
    from still.data.encoded import load_encoded

    root = tmp_path / "corpora"
    monkeypatch.setenv("STILL_CORPUS_CACHE", str(root))
    kept, changed = _corpus(tmp_path / "kept"), _corpus(tmp_path / "changed")
    kept_entries = [load_encoded(kept, byte_level=b).entry for b in (False, True)]
    changed_entry = load_encoded(changed).entry
    (tmp_path / "changed" / "test" / "1.txt").write_text("another\n")
    replaced = root / f".{kept_entries[0].name}.x1.old"
    replaced.mkdir()
    (replaced / "train.npy").write_bytes(b"1" * 3000)
    (tmp_path / "cache" / "mnist").mkdir(parents=True)
    (tmp_path / "cache" / "mnist" / "mnist.pkl.gz").write_bytes(b"garbage")

    code, out, err = run_cli(capsys, "data", "list", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "corrupt" in lines["mnist"] and "not fetched" in lines["shakespeare"]
    assert f"{kept} (characters)" in lines[kept_entries[0].name] and "current" in lines[kept_entries[0].name]
    assert f"{kept} (bytes)" in lines[kept_entries[1].name]
    assert "corpus changed" in lines[changed_entry.name] and "1 entry is not current" in out
    assert "Left beside them: 1 folder, 2.9 KiB: replaced entries and temporary ones" in out

    assert_user_error(capsys, "data", "clear", contains="say what to remove")
    err = assert_user_error(capsys, "data", "clear", kept, "pg19:/nowhere",
                            contains="no encoded corpus 'pg19:/nowhere'")
    assert "data sets" not in err
    code, out, _ = run_cli(capsys, "data", "--help")  # (a probe: it said clear cleared the data sets too)
    assert code == 0 and "Fetch and list the cached data sets; list and clear the encoded corpora." in out
    assert_user_error(capsys, "data", "clear", "mnist", "--cache-dir", str(tmp_path / "cache"),
                      contains=f"data sets are not cleared: remove {tmp_path / 'cache' / 'mnist'} by hand")
    assert_user_error(capsys, "data", "clear", "--stale", "--all", contains="give it alone, or --stale without it")
    assert_user_error(capsys, "data", "clear", kept, "--all", contains="give it alone, or names without it")
    assert all(e.is_dir() for e in [*kept_entries, changed_entry])  # (nothing removed)

    code, out, err = run_cli(capsys, "data", "clear", "--stale")
    assert code == 0 and "removed 2 folders" in out, (out, err)
    assert all(e.is_dir() for e in kept_entries) and not changed_entry.exists() and not replaced.exists()
    code, out, err = run_cli(capsys, "data", "clear", kept)  # (a corpus by name: both of its kinds)
    assert code == 0 and "removed 2 folders" in out and not any(e.exists() for e in kept_entries), (out, err)
    load_encoded(kept)
    (root / "important_dataset").mkdir()  # (not an entry: --all leaves it)
    code, out, err = run_cli(capsys, "data", "clear", "--all")
    assert code == 0 and "removed 1 folder" in out, (out, err)
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["important_dataset"]

    import still.data.encoded as encoded

    entry = load_encoded(kept).entry

    def rmtree(path, onexc=None, onerror=None):  # (the aside's files cannot be removed)
        error = OSError(5, "I/O")
        onexc(os.unlink, str(path), error) if onexc else onerror(os.unlink, str(path), (OSError, error, None))

    monkeypatch.setattr(encoded.shutil, "rmtree", rmtree)
    code, out, err = run_cli(capsys, "data", "clear", kept)
    assert code == 1 and "removed 0 folders" in out and f"left {entry.name}: cannot remove it (I/O)" in err
    monkeypatch.undo()
    monkeypatch.setenv("STILL_CORPUS_CACHE", str(root))

    monkeypatch.setenv("STILL_CORPUS_CACHE", "off")
    code, out, _ = run_cli(capsys, "data", "list", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0 and "none are kept (STILL_CORPUS_CACHE is off)" in out
    assert_user_error(capsys, "data", "clear", "--all", contains="STILL_CORPUS_CACHE is off")


def test_data_clear_removes_the_lock_files_of_corpora_without_an_entry(capsys, tmp_path, monkeypatch):
    """A lock file was left for every corpus tried, one that failed to load too, and `clear --all`
    or `--stale` never removed them (24 beside 9 entries, a probe). A removed entry's lock goes with
    it; --stale and --all take the others; the lock of an entry that stays stays."""
    from still.data.encoded import load_encoded

    root = tmp_path / "corpora"
    monkeypatch.setenv("STILL_CORPUS_CACHE", str(root))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"to be, \xff or not to be\n" * 20)
    assert_user_error(capsys, "lm", "train", "--corpus", str(bad), "--out", str(tmp_path / "run"),
                      contains="is not UTF-8")
    kept, named = _corpus(tmp_path / "kept"), _corpus(tmp_path / "named")
    kept_entry, named_entry = load_encoded(kept).entry, load_encoded(named).entry
    assert len([p for p in root.iterdir() if p.name.endswith(".lock")]) == 3
    code, out, err = run_cli(capsys, "data", "clear", named)
    assert code == 0 and "removed 1 folder (" in out and "lock" not in out, (out, err)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(f".{named_entry.name}")) == []
    code, out, err = run_cli(capsys, "data", "clear", "--stale")
    assert code == 0 and "removed 0 folders (0 B) and 1 lock file of a corpus without an entry from" in out, (out, err)
    assert sorted(p.name for p in root.iterdir()) == [f".{kept_entry.name}.lock", kept_entry.name]
    code, out, err = run_cli(capsys, "data", "clear", "--all")
    assert code == 0 and "removed 1 folder (" in out and "lock" not in out, (out, err)
    assert list(root.iterdir()) == []  # (the entry's lock with it)


def test_any_command_piped_into_head_ends_quietly(tmp_path):
    """`still data list | head -1`: click's own handling of the reader leaving exited 1 (a probe);
    every command now ends as `lm generate` does, with exit code 0 and nothing said."""
    import subprocess
    import sys

    def piped(command):
        return subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m still {command}"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "STILL_CACHE": str(tmp_path)})

    for command in ("data list | head -c 1", "--help | head -c 1", "--version | head -c 1"):
        done = piped(command)  # (the group's own --help and --version exited 1: printed outside its commands)
        assert done.returncode == 0 and len(done.stdout) == 1 and done.stderr == "", (command, done.stderr)
    # its messages cut too: the work they report was (a probe: `lm train 2>&1 | head -1` stopped at its
    # first message and exited 0); 141, as SIGPIPE would end it. (A reader gone before the first write:
    # `head -c 1` raced the command's few writes, which all fitted in the pipe before it left, exit 0.)
    done = piped("data list 2>&1 | true")
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_demo_starts_again_only_what_it_made(tmp_path, capsys, monkeypatch):
    """`still demo --out X` started again, with --overwrite, a user's own run in X/mnist (its
    checkpoints and results deleted, unsaid: a probe). Only a folder the demo made is its scratch."""
    from still.errors import StillError
    from still.recipes import lm, mnist

    calls = []

    def recipe(name):
        def run(config, out, cache=None, overwrite=False):
            calls.append((name, overwrite))
            if not overwrite and (out / "user.txt").exists():
                raise StillError(f"{out}/teacher holds a run with different settings (epochs); choose another --out")
        return run

    monkeypatch.setattr(mnist, "run_mnist", recipe("mnist"))
    monkeypatch.setattr(lm, "train_lm", recipe("lm"))
    fresh = tmp_path / "fresh"
    assert run_cli(capsys, "demo", "--out", str(fresh))[0] == 0
    assert calls == [("mnist", True), ("lm", True)] and (fresh / ".still-demo").is_file()
    calls.clear()
    users = tmp_path / "users"
    (users / "mnist").mkdir(parents=True)
    (users / "mnist" / "user.txt").write_text("a run of the user's")
    assert_user_error(capsys, "demo", "--out", str(users), contains=f"{users} was not made by `still demo`")
    assert calls == [("mnist", False)] and not (users / ".still-demo").exists()
    calls.clear()
    (users / "mnist" / "user.txt").unlink()  # (runs of the demo's settings: reused, and the folder the demo's)
    assert run_cli(capsys, "demo", "--out", str(users))[0] == 0
    assert calls == [("mnist", False), ("lm", False)] and (users / ".still-demo").is_file()
    # a user's lm run of other settings: refused before the MNIST run is made beside it (a probe: it was
    # refused after the MNIST experiment had trained into the folder); of the demo's own, not refused
    from still.config import replace, save_config

    calls.clear()
    others = tmp_path / "others"
    save_config(replace(lm.PRESETS["quick"], seed=7), others / "lm" / "config.json")
    assert_user_error(capsys, "demo", "--out", str(others),
                      contains=f"({others / 'lm'} holds a run with other settings); the demo would start that run "
                               "again: choose another --out")
    assert calls == [] and sorted(p.name for p in others.iterdir()) == ["lm"]
    save_config(  # (the vocabulary's size is the corpus's, recorded by the run)
        replace(lm.PRESETS["quick"], model=replace(lm.PRESETS["quick"].model, vocab_size=67)),
        others / "lm" / "config.json")
    assert run_cli(capsys, "demo", "--out", str(others))[0] == 0 and calls == [("mnist", False), ("lm", False)]
    # a folder that is a run itself (a probe: the demo made its runs inside an lm run's folder, marked it its own)
    calls.clear()
    save_config(lm.PRESETS["quick"], tmp_path / "lmrun" / "config.json")
    assert_user_error(capsys, "demo", "--out", str(tmp_path / "lmrun"),
                      contains=f"{tmp_path / 'lmrun'} holds a language-model run, not the demo's runs")
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "stage.json").write_text("{}")
    assert_user_error(capsys, "demo", "--out", str(tmp_path / "stage"), contains="holds a run (or a run's stage)")
    assert calls == [] and sorted(p.name for p in (tmp_path / "lmrun").iterdir()) == ["config.json"]
