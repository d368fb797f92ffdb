"""Data parallelism with torchrun: two CPU processes (gloo, localhost) against one."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import stage_history
from still.train.distributed import Dist


def still(processes: int, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = launcher + ["-m", "still", *args] if processes > 1 else [sys.executable, "-m", "still", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def lm_args(corpus, out, steps=8):
    # global batch 4: two ranks of 2 rows against one process of 4; no dropout, so the runs are comparable
    return ["lm", "train", "--corpus", str(corpus), "--steps", str(steps), "--eval-every", "4", "--batch-size", "4",
            "--segment-len", "16", "--mem-len", "16", "--c-mem-len", "8", "--dropout", "0", "--threads", "1",
            "--out", str(out)]


def newest(run):
    return sorted((run / "checkpoints").glob("ckpt-*"))[-1]


def newest_weights(run):
    """The weights of `run`'s newest checkpoint, by name."""
    return load_file(str(newest(run) / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = newest_weights(a), newest_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    one, two = still(1, *lm_args(corpus, base / "one")), still(2, *lm_args(corpus, base / "two"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return base, two


def test_two_ranks_match_one_process_with_the_whole_batch(runs):
    base, two = runs
    assert_same_weights(base / "one", base / "two")
    h1 = json.loads((base / "one" / "results.json").read_text())["meta"]["history"]
    h2 = json.loads((base / "two" / "results.json").read_text())["meta"]["history"]
    for a, b in zip(h1, h2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["train_bits"] == pytest.approx(b["train_bits"], rel=1e-4)  # over every rank's rows
        assert a["valid_bits"] == pytest.approx(b["valid_bits"], rel=1e-4)
    assert json.loads((base / "two" / "results.json").read_text())["meta"]["processes"] == 2
    assert two.stdout.count("| model") == 1  # rank 0 alone prints the table


def test_a_checkpoint_written_on_two_ranks_resumes_on_one(runs, corpus):
    base, _ = runs
    resumed = base / "resumed"
    shutil.copytree(base / "two", resumed)
    shutil.rmtree(newest(resumed))  # back to step 4, written by the two ranks (memories of all 4 rows)
    memories = load_file(str(newest(resumed) / "state.safetensors"))
    assert memories["extra/memory/0"].shape[0] == 4
    (resumed / "results.json").unlink()
    done = still(1, *lm_args(corpus, resumed))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr
    assert "(written by 2 processes, resumed on 1: dropout and other random draws" in done.stderr  # (a probe)
    assert_same_weights(resumed, base / "one")


def test_a_one_document_corpus_trains_on_two_ranks_as_on_one(tmp_path):
    from conftest import HAMLET

    text = tmp_path / "one.txt"  # one document a split: cut into a piece a row, so each rank has rows
    text.write_text("".join(f"{i}: {HAMLET}" for i in range(40)))
    two = still(2, *lm_args(text, tmp_path / "two", steps=4))
    one = still(1, *lm_args(text, tmp_path / "one", steps=4))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    # the corpus encoded once, by one process (the other waited on its lock and mapped the entry), then mapped again
    assert two.stderr.count(f"encoded {text} once into") == 1 and "encoded" not in one.stderr
    assert load_file(str(newest(tmp_path / "two") / "state.safetensors"))["extra/memory/0"].shape[0] == 4
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_two_ranks_resume_with_each_ranks_own_dropout_stream(corpus, tmp_path):
    """With dropout, each rank draws its own masks; a run interrupted and resumed on two ranks ends
    with the weights of the uninterrupted run (rank 1 must not inherit rank 0's generator)."""
    def args(out):
        a = lm_args(corpus, out)
        a[a.index("--dropout") + 1] = "0.2"
        return a
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    done = still(2, *args(full))
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(full, resumed)
    shutil.rmtree(newest(resumed))  # back to step 4
    states = load_file(str(newest(resumed) / "state.safetensors"))
    assert not torch.equal(states["rng/torch_ranks/0"], states["rng/torch_ranks/1"])
    (resumed / "results.json").unlink()
    again = still(2, *args(resumed))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    assert_same_weights(resumed, full)


def test_a_corpus_that_fails_to_load_stops_the_run(tmp_path):
    """The process that takes the corpus's lock reads it while the other waits: where it fails, the
    run stops at once with its error (the other, past the wait, reads the corpus and fails as it
    did, or torchrun stops it first)."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Ophélie, nymphe\n".encode("latin-1") * 100)
    two = still(2, *lm_args(latin1, tmp_path / "two", steps=4))  # (stopped after 300 s)
    assert two.returncode != 0
    assert f"{latin1} is not UTF-8: byte 0xe9 at offset 3" in two.stderr  # (said by rank 0)
    assert re.search(r"exitcode\s*: 2\b", two.stderr), two.stderr[-3000:]  # (a bad input: exit code 2)


def test_a_folder_in_use_is_refused_on_every_rank(corpus, tmp_path):
    """Found by a probe: rank 0 refused a run folder another process held, while rank 1 went on
    alone: it failed at its first collective, or waited there until torchrun's timeout (30 s)."""
    from still.recipes.common import hold_run_folder

    out = tmp_path / "run"
    with hold_run_folder(out):
        two = still(2, *lm_args(corpus, out, steps=4))
    assert two.returncode != 0 and f"{out} is in use: another still process is training into it now" in two.stderr
    # each rank refused it (exit code 2), or was stopped by torchrun as rank 0 ended first (SIGTERM); none
    # failed otherwise (exit code 1: rank 1, not told, failed at its first collective where rank 0 was gone)
    assert set(re.findall(r"exitcode\s*: (-?\d+)", two.stderr)) <= {"2", "-15"}, two.stderr[-3000:]


def test_a_run_refused_for_its_settings_is_one_line_on_every_rank(runs, corpus, tmp_path):
    """Rank 0 refused a run folder holding other settings, and rank 1, waiting at a barrier, ended
    in gloo's 'connection closed by peer' traceback (a probe)."""
    base, _ = runs
    shutil.copytree(base / "one", tmp_path / "run")
    shutil.copytree(base / "one", tmp_path / "blocked")  # (a run's: a folder of no run holding one is refused)
    (tmp_path / "blocked" / "vocab.json").unlink()
    (tmp_path / "blocked" / "vocab.json").mkdir()  # rank 0 cannot write it: an OSError (a probe), one line too
    for out, steps, said in ((tmp_path / "run", 4, "holds a run with different settings (steps)"),
                             (tmp_path / "blocked", 8, "Is a directory")):
        two = still(2, *lm_args(corpus, out, steps=steps))
        assert two.returncode != 0 and said in two.stderr, two.stderr[-3000:]
        assert "[rank1]" not in two.stderr and "Connection closed" not in two.stderr, two.stderr[-3000:]
        assert set(re.findall(r"exitcode\s*: (-?\d+)", two.stderr)) <= {"2", "-15"}, two.stderr[-3000:]


def test_rows_must_split_evenly():
    from still.errors import StillError

    assert Dist(rank=1, world=2).rows(6) == slice(3, 6)
    with pytest.raises(StillError,
                       match=r"the batch size \(5 rows\) must be a multiple of the number of processes \(2\)"):
        Dist(rank=0, world=2).rows(5, "the batch size")


# 1,001 images in batches of 50: each epoch's last batch holds one row, so that one rank's share of it is empty
MNIST_TINY = ["distill", "mnist", "--train-subset", "1001", "--test-subset", "500", "--teacher-epochs", "2",
              "--student-epochs", "3", "--batch-size", "50", "--threads", "1"]


def assert_same_training(a, b):
    """Two runs of a distillation stage trained alike: the same per-epoch losses and test errors,
    and weights within 1e-3 of each other (relative norm, per tensor). Not to the last bits: a ReLU
    unit whose input sits within float rounding of zero can switch on in one run and not in the
    other (this stage in one process, fused SGD against its loop: one unit on one image, -5.6e-9
    in one run and +3.9e-8 in the other), and that step's gradient then parts the weights by 1e-5.
    Gradients summed instead of averaged, or a resume that loses the momentum, fail it."""
    ha, hb = stage_history(a), stage_history(b)
    assert [h["test_errors"] for h in ha] == [h["test_errors"] for h in hb]
    assert [h["train_loss"] for h in ha] == pytest.approx([h["train_loss"] for h in hb], rel=1e-4)
    wa, wb = newest_weights(a), newest_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert float((wa[k] - wb[k]).norm() / wa[k].norm()) < 1e-3, k


def test_distillation_on_two_ranks(tmp_path):
    """The baseline stage (no dropout, no jitter) matches one process; a stage checkpointed on two
    ranks resumes on one. (The teacher's dropout masks are drawn per rank, so its stage differs.)
    Each epoch ends in a batch of one row: the rank given none trains on a row weighted 0 (its mean
    over no rows was NaN, and stopped the run as diverged)."""
    from conftest import mnist_available

    if not mnist_available():
        pytest.skip("MNIST cache missing: run `make data` (make test does)")
    one, two = tmp_path / "one", tmp_path / "two"
    for processes, out in ((1, one), (2, two)):
        done = still(processes, *MNIST_TINY, "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "results.json").read_text())["meta"]["processes"] == 2
    assert_same_training(one / "baseline", two / "baseline")
    shutil.rmtree(newest(two / "baseline"))  # back to the baseline's second epoch, written by two ranks
    done = still(1, *MNIST_TINY, "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "baseline: resuming" in done.stderr
    assert_same_training(one / "baseline", two / "baseline")
    # rank 0 failing in the report, rank 1 waiting for it at the end: rank 0's one line, no traceback
    # of rank 1's lost collective (a probe)
    (two / "results.md").unlink()
    (two / "results.md").mkdir()
    done = still(2, *MNIST_TINY, "--out", str(two))
    assert done.returncode != 0 and "error: Is a directory" in done.stderr, done.stderr[-3000:]
    # (torchrun's own report of rank 0's failure stays: it is torchrun's)
    assert "[rank1]" not in done.stderr and "Connection closed" not in done.stderr, done.stderr[-3000:]


def torchrun_script(tmp_path, code: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(code)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_a_barrier_waits_for_rank_zero_beyond_the_process_groups_time_limit(tmp_path):
    # (a probe: rank 0 alone evaluated the whole splits for longer than gloo's 30 minutes while rank 1
    # waited in a barrier, which timed out: the run ended before its results, and so did every rerun)
    done = torchrun_script(tmp_path, (
        "import datetime, time\n"
        "import torch.distributed as torch_dist\n"
        "from still.train import distributed\n"
        "torch_dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=2))  # (for gloo's 30 minutes)\n"
        "dist = distributed.setup()\n"
        "if dist.main:\n"
        "    time.sleep(6)\n"
        "dist.barrier()\n"
        "distributed.finish()\n"
        f"open({str(tmp_path)!r} + f'/through-{{dist.rank}}', 'w').close()\n"))  # (the ranks' prints interleave)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(path.name for path in tmp_path.glob("through-*")) == ["through-0", "through-1"]


def test_a_process_lost_by_rank_zero_is_one_line(tmp_path):
    # (a probe: SIGKILL to rank 1 mid-run, and rank 0 printed gloo's 40-line "Connection closed by peer")
    text = tmp_path / "text.txt"
    text.write_text("abc " * 500)
    done = torchrun_script(tmp_path, (
        "import os, sys\n"
        "import still.recipes.lm as lm\n"
        "from still.cli import main\n"
        "from still.train import distributed\n"
        "def train_lm(*args, **kwargs):\n"
        "    dist = distributed.setup()\n"
        "    if not dist.main:\n"
        "        os._exit(9)  # (as if killed)\n"
        "    dist.barrier()\n"
        "lm.train_lm = train_lm\n"
        f"main(['lm', 'train', '--corpus', {str(text)!r}, '--out', {str(tmp_path / 'run')!r}])\n"))
    assert done.returncode != 0
    assert "error: another process of this run stopped while this one waited for it" in done.stderr, done.stderr
    # (torchrun's own report of the failures stays: it is torchrun's)
    assert "[rank0]" not in done.stderr and "Connection closed" not in done.stderr, done.stderr[-3000:]


def test_teardown_collects_a_wrapper_left_in_a_reference_cycle(tmp_path):
    """A DistributedDataParallel wrapper in a reference cycle would keep the gloo backend alive past
    destroy_process_group, to be torn down in the interpreter's exit (where it can abort)."""
    import gc
    import weakref

    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel

    from still.train import distributed

    store = torch_dist.FileStore(str(tmp_path / "store"), 1)
    torch_dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = DistributedDataParallel(torch.nn.Linear(2, 2))
        cycle = [model]
        cycle.append(cycle)
        wrapper = weakref.ref(model)
        del model, cycle
        gc.disable()  # as if the collector had not run yet
        distributed.teardown()
        assert wrapper() is None
        assert not torch_dist.is_initialized()
    finally:
        gc.enable()
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


RANK_LOSSES = """
import json, sys
import torch
from still.train import distributed
from still.train.loop import IndexBatches, Trainer

dist = distributed.setup()
model = torch.nn.Linear(1, 1, bias=False)
torch.nn.init.zeros_(model.weight)
# each rank's loss a step: 1 + its rank (+ 0 from the weight, which a zero learning rate keeps at 0)
trainer = Trainer(model, lambda m, idx: m(torch.ones(1, 1)).sum() + 1 + dist.rank,
                  torch.optim.SGD(model.parameters(), lr=0.0), checkpoint_dir=sys.argv[1],
                  checkpoint_every_steps=2, keep=0, dist=dist, log=lambda _: None)
trainer.fit(IndexBatches(4, 1), 1)
distributed.finish()
"""


def test_a_checkpoint_within_an_epoch_holds_every_ranks_losses(tmp_path):
    """A checkpoint inside an epoch (an interrupt, or checkpoint_every_steps) held rank 0's own loss
    sum: resumed, on any number of ranks, the epoch's train_loss lost the other ranks' steps before
    it (a probe: 0.39528 against 0.39441). It holds the ranks' mean loss a step, summed."""
    script = tmp_path / "losses.py"
    script.write_text(RANK_LOSSES)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(launcher + [str(script), str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    within = json.loads((tmp_path / "run" / "ckpt-00000002" / "state.json").read_text())["state"]
    assert within["epoch_loss_sum"] == pytest.approx(2 * 1.5)  # two steps of the ranks' mean, (1 + 2) / 2
    final = json.loads((tmp_path / "run" / "ckpt-00000004" / "state.json").read_text())["state"]
    assert final["history"][0]["train_loss"] == pytest.approx(1.5)


AUGMENT_DRAWS = """
import hashlib, json, os, sys
import torch
import still.recipes.cifar10 as cifar10
from still.cli import main

augment, draws = cifar10.augment, []


def recorded(images, *args):  # the generator's state at each augmentation: the crops and flips it is about to draw
    draws.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
    return augment(images, *args)


cifar10.augment = recorded
try:
    main(sys.argv[2:])
finally:
    with open(f"{sys.argv[1]}-{os.environ.get('RANK', 'one')}.json", "w") as f:
        json.dump(draws, f)
"""


def test_each_rank_draws_its_own_augmentation(cifar_dir, tmp_path):
    """A probe: under torchrun every rank of `distill cifar10` drew the same crops, flips and
    dropout masks (each stage seeded alike on every rank, and nothing per rank after). Each rank
    but 0 now reseeds after its model is built; rank 0 draws what one process draws."""
    script = tmp_path / "draws.py"
    script.write_text(AUGMENT_DRAWS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for processes, out in ((1, "one"), (2, "two")):
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                    if processes > 1 else [sys.executable])
        done = subprocess.run(launcher + [str(script), str(tmp_path / "draws"), "distill", "cifar10", "--data-dir",
                                          str(cifar_dir), "--preset", "tiny", "--epochs", "1", "--augment",
                                          "--threads", "1", "--out", str(tmp_path / out)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    one, rank0, rank1 = (json.loads((tmp_path / f"draws-{r}.json").read_text()) for r in ("one", "0", "1"))
    assert len(one) == len(rank0) == len(rank1) == 3 * 7  # three stages of 7 batches (200 images, 32 a batch)
    assert not set(rank0) & set(rank1)
    # each stage's first batch: rank 0's generator where one process's is (it draws for half the rows after)
    assert [rank0[i] for i in (0, 7, 14)] == [one[i] for i in (0, 7, 14)]
