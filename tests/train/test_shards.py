import shutil
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from still.errors import StillError
from still.layers import Dropout
from still.train.distributed import Dist
from still.train.loop import IndexBatches, Trainer
from still.train.optim import OptimConfig, build_optimizer
from still.train.seed import seed_everything
from still.train.shards import Shard, ShardPool, default_shards

X = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
BATCHES = IndexBatches(64, 16, seed=3)


def test_shard_rows_cover_the_batch_in_order():
    parts = [Shard(i, 4).rows(12) for i in range(4)]
    assert parts == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12)]
    assert Shard(1, 4).fraction == 0.25
    with pytest.raises(StillError, match=r"the rows \(10 rows\) must be a multiple of the number of shards \(4\)"):
        Shard(0, 4).rows(10, "the rows")
    with pytest.raises(StillError, match="shard index 2"):
        Shard(2, 2)


def test_default_shards():
    assert default_shards("cpu", 16, threads=2) == 2
    assert default_shards("cpu", 16, threads=1) == 1
    assert default_shards("cpu", 15, threads=2) == 1  # the batch does not split in two
    assert default_shards("cuda", 16, threads=2) == 1


def test_pool_workers_get_their_share_of_threads_and_leave_this_one_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = ShardPool(2)
        try:
            assert pool.threads == 1
            seen = pool.map(lambda _: (threading.get_ident(), torch.get_num_threads()), range(2))
            assert {n for _, n in seen} == {1}
            assert all(ident != threading.get_ident() for ident, _ in seen)
            assert torch.get_num_threads() == 2
            # a thread started now gets the main setting again, not the workers'
            fresh = []
            t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
            t.start()
            t.join()
            assert fresh == [2]
            with pytest.raises(ValueError, match="boom"):
                pool.map(lambda i: (_ for _ in ()).throw(ValueError("boom")), range(2))
        finally:
            pool.close()
    finally:
        torch.set_num_threads(before)


def make_trainer(shards, dropout=0.0, directory=None, every_steps=None):
    seed_everything(0)
    model = nn.Sequential(nn.Linear(10, 32), Dropout(dropout), nn.ReLU(), nn.Linear(32, 3))
    optim = OptimConfig(name="adam", lr=1e-2, schedule="constant")
    optimizer = build_optimizer(model.parameters(), optim)

    def loss_fn(m, idx, shard=None):
        if shard is not None:
            idx = idx[shard.rows(len(idx))]
        loss = F.cross_entropy(m(X[idx]), Y[idx])
        return loss if shard is None else loss * shard.fraction

    return Trainer(model, loss_fn, optimizer, shards=shards, checkpoint_dir=directory,
                   checkpoint_every_steps=every_steps, desc="t", log=lambda _: None)


@pytest.mark.parametrize("shards", [2, 4])
def test_sharded_steps_match_whole_batches(shards):
    whole, sharded = make_trainer(1), make_trainer(shards)
    a, b = whole.fit(BATCHES, 2), sharded.fit(BATCHES, 2)
    for p, q in zip(whole.model.parameters(), sharded.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=1e-5)
    assert sharded._pool is None  # the workers end with the run


def test_sharded_dropout_is_reproducible():
    runs = []
    for _ in range(2):
        runs.append(make_trainer(2, dropout=0.5))  # seeds the global generator
        runs[-1].fit(BATCHES, 1)
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q)  # two shards: the same numbers on every run


def test_each_shard_draws_its_own_dropout_masks():
    net, drop, masks = nn.Linear(1, 1), Dropout(0.5), {}

    def loss_fn(m, batch, shard):
        masks[shard.index] = drop(torch.ones(1000))
        return m(torch.ones(1, 1)).sum() * 0

    Trainer(net, loss_fn, torch.optim.SGD(net.parameters(), lr=0.0), shards=2, log=lambda _: None).fit(
        lambda epoch: [None], 1)
    assert not torch.equal(masks[0], masks[1])


def test_sharded_resume_is_exact(tmp_path):
    class Stop(Exception):
        pass

    first = make_trainer(2, dropout=0.3, directory=tmp_path, every_steps=5)
    original = first.save

    def save_then_stop():
        path = original()
        if first.state.step == 5:
            raise Stop
        return path

    first.save = save_then_stop
    with pytest.raises(Stop):
        first.fit(BATCHES, 2)
    resumed = make_trainer(2, dropout=0.3, directory=tmp_path)
    resumed.fit(BATCHES, 2)
    straight = make_trainer(2, dropout=0.3)
    straight.fit(BATCHES, 2)
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(p, q)


def test_a_run_resumed_with_other_shards_says_so(tmp_path):
    # (a probe: `lm train` resumed with another --shards said nothing, and dropout's draws went on otherwise)
    make_trainer(2, directory=tmp_path).fit(BATCHES, 1)
    said = []
    for shards in (2, 4):
        resumed = make_trainer(shards, directory=tmp_path)
        resumed.log = said.append
        resumed.fit(BATCHES, 2)
        shutil.rmtree(sorted(tmp_path.glob("ckpt-*"))[-1])  # back to the first epoch's checkpoint
    said = [line for line in said if "resuming" in line]
    assert len(said) == 2 and "shard" not in said[0]
    assert "(written with 2 shards a step, resumed with 4: dropout and other random draws" in said[1]


def test_bad_shard_settings_are_named():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(StillError, match="shards must be a whole number >= 1, got 0"):
        Trainer(model, lambda m, b: m(b).sum(), optimizer, shards=0)
    with pytest.raises(StillError, match=r"shards \(2\) split a step across CPU threads: not with several processes"):
        Trainer(model, lambda m, b: m(b).sum(), optimizer, shards=2, dist=Dist(rank=0, world=2))
    # (a probe: a TypeError's traceback at the first step)
    with pytest.raises(StillError, match=r"shards \(2\): loss_fn must take a `shard` keyword"):
        Trainer(model, lambda m, b: m(b).sum(), optimizer, shards=2)
    for fn in (lambda m, b, shard: 0, lambda m, b, **kw: 0, lambda m, b, *, shard=None: 0):
        Trainer(model, fn, optimizer, shards=2)


@pytest.mark.parametrize("shards", [3, 4])
def test_more_than_two_shards_add_their_gradients_in_shard_order(shards):
    """Floating-point addition does not associate, so gradients accumulated in the order the
    threads finish would change from run to run. Here shard 0's backward is held back so that it
    finishes last; the gradients are still shard 0's + shard 1's + ... in that order, bit for bit."""
    torch.manual_seed(0)
    net = nn.Linear(10, 3)
    x = torch.randn(6, 10).repeat(shards, 1)
    scale = [1.0, 1e8, -1e8, 3.0]  # shards 1 and 2 cancel: the order of the additions shows

    def shard_loss(m, shard):
        return m(x[shard.rows(len(x))]).sum() * scale[shard.index] * shard.fraction

    def loss_fn(m, batch, shard):
        loss = shard_loss(m, shard)
        if shard.index == 0:
            loss.register_hook(lambda grad: time.sleep(0.05))  # shard 0's backward starts late
        return loss

    trainer = Trainer(net, loss_fn, torch.optim.SGD(net.parameters(), lr=0.0), shards=shards, log=lambda _: None)
    trainer.fit(lambda epoch: [None], 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each shard's worker computes its own
    try:
        parts = [torch.autograd.grad(shard_loss(net, Shard(i, shards)), [net.weight, net.bias]) for i in range(shards)]
    finally:
        torch.set_num_threads(before)
    def added(order, j):
        total = parts[order[0]][j]
        for i in order[1:]:
            total = total + parts[i][j]
        return total

    in_order, zero_last = list(range(shards)), [*range(1, shards), 0]
    assert torch.equal(net.weight.grad, added(in_order, 0)) and torch.equal(net.bias.grad, added(in_order, 1))
    # the other order gives other numbers here, so an accumulation as the threads finish would fail
    assert not torch.equal(added(zero_last, 0), added(in_order, 0))


def test_sharded_step_stops_on_a_nonfinite_gradient_norm():
    from still.train.loop import TrainingDiverged

    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)

    def loss_fn(m, batch, shard):  # 0, with a NaN gradient at 0 (the update runs on a worker)
        return m.weight.abs().sqrt().sum() * shard.fraction

    trainer = Trainer(net, loss_fn, torch.optim.SGD(net.parameters(), lr=0.1), grad_clip=1.0, shards=2,
                      log=lambda _: None)
    with pytest.raises(TrainingDiverged, match="the gradient norm is nan at step 0"):
        trainer.fit(lambda epoch: [None], 1)
    assert torch.equal(net.weight, torch.zeros(1, 1))  # no step taken
