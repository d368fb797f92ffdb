"""SIGKILL at random moments while checkpoints are being written: the newest complete one loads."""

import random
import signal
import subprocess
import sys
import textwrap
import time

from still.train.checkpoint import latest_checkpoint, list_checkpoints

SCRIPT = textwrap.dedent("""
    import sys, torch
    from still.train.loop import IndexBatches, Trainer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    x, y = torch.randn(512, 64), torch.randint(0, 8, (512,))
    optimizer = torch.optim.Adam(model.parameters())
    loss = lambda m, idx: torch.nn.functional.cross_entropy(m(x[idx]), y[idx])
    trainer = Trainer(model, loss, optimizer, checkpoint_dir=sys.argv[1], checkpoint_every_steps=1, keep=3)
    print("ready", flush=True)
    trainer.fit(IndexBatches(512, 16), 1000)
""")


def test_sigkill_during_saving_never_loses_the_newest_complete_checkpoint(tmp_path):
    rng = random.Random(0)
    directory = tmp_path / "checkpoints"
    last_step = -1
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(directory)], stdout=subprocess.PIPE, text=True,
                                env={"STILL_PROGRESS": "0", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 1.2))  # it saves every step: the kill lands in or near a save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = latest_checkpoint(directory, log=lambda message: None)
        assert loaded is not None, f"attempt {attempt}: no checkpoint loads"
        assert loaded.step > last_step  # each run resumed and made progress
        last_step = loaded.step
        assert len(list_checkpoints(directory)) <= 4
        # half-written checkpoints of killed writers are cleaned up by the next writer: at most the last one's
        assert len([p for p in directory.iterdir() if p.name.startswith(".ckpt-")]) <= 1
