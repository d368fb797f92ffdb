"""Exact resume across processes: N steps straight equal k steps, a new process, N - k steps."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from still.distill.models import MLP, MLPConfig
    from still.train import loop
    from still.train.loop import IndexBatches, Trainer
    from still.train.optim import OptimConfig, build_optimizer, build_scheduler
    from still.train.seed import seed_everything

    mode, directory, stop_at, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    if mode == "resume-without-rng":
        loop.set_rng_state = lambda state: None  # the control: the resume must then differ
    torch.manual_seed(os.getpid())  # a new process starts from other RNG states
    x = torch.randn(96, 10, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(1))
    seed_everything(0)
    model = MLP(MLPConfig(in_features=10, hidden=(16,), classes=3, dropout_input=0.1, dropout_hidden=0.5))
    config = OptimConfig(name="adam", lr=1e-2, schedule="cosine", warmup_fraction=0.1)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_scheduler(optimizer, config, total_steps=24)
    loss = lambda m, idx: F.cross_entropy(m(x[idx] + 0.1 * torch.randn_like(x[idx])), y[idx])
    trainer = Trainer(model, loss, optimizer, scheduler, checkpoint_dir=None if mode == "straight" else directory,
                      checkpoint_every_steps=stop_at if mode == "first" else None)
    if mode == "first":
        save = trainer.save
        def save_then_stop():
            save()
            if trainer.state.step == stop_at:
                sys.exit(0)  # as if the process died right after this checkpoint
        trainer.save = save_then_stop
    trainer.fit(IndexBatches(96, 16, seed=3), 4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
""")


def run(*args):
    subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], check=True, capture_output=True, text=True)


@pytest.mark.parametrize("stop_at", [9, 12], ids=["mid-epoch", "epoch-boundary"])
def test_resume_in_a_new_process_is_exact(tmp_path, stop_at):
    run("straight", tmp_path / "none", 0, tmp_path / "straight.safetensors")
    run("first", tmp_path / "ckpt", stop_at, tmp_path / "unused.safetensors")
    assert not (tmp_path / "unused.safetensors").exists()  # the first process stopped at step k
    run("resume", tmp_path / "ckpt", 0, tmp_path / "resumed.safetensors")
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    # the control: the same resume without restoring the RNG states is not exact
    run("first", tmp_path / "ckpt2", stop_at, tmp_path / "unused.safetensors")
    run("resume-without-rng", tmp_path / "ckpt2", 0, tmp_path / "control.safetensors")
    control = load_file(tmp_path / "control.safetensors")
    assert not all(torch.equal(straight[k], control[k]) for k in straight)
