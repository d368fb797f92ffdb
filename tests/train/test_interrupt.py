"""SIGTERM finishes the step, saves, exits 143; the resumed run ends where an uninterrupted one does."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 40


def command(corpus, out, steps):
    return [sys.executable, "-m", "still", "lm", "train", "--corpus", str(corpus), "--steps", str(steps),
            "--eval-every", str(steps // 4), "--batch-size", "2", "--segment-len", "16", "--mem-len", "16",
            "--c-mem-len", "8", "--threads", "1", "--out", str(out)]


def final_weights(out):
    newest = sorted((out / "checkpoints").glob("ckpt-*"))[-1]
    return hashlib.sha256((newest / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_matches(tmp_path, signum):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(TEXT[i * 11 :])
    env = {**os.environ, "STILL_PROGRESS": "0"}
    straight = tmp_path / "straight"
    subprocess.run(command(corpus, straight, 200), check=True, env=env, capture_output=True)

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(command(corpus, out, 200), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out.glob("checkpoints/ckpt-*")) and time.time() < deadline:
        time.sleep(0.02)  # the first interval's checkpoint: training is under way
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}" in err and "run the same command again" in err
    assert not (out / "results.json").exists()
    resumed = subprocess.run(command(corpus, out, 200), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    step = re.search(r"at step (\d+);", err)[1]
    assert f"resuming from step {step}, in epoch " in resumed.stderr  # (where the interrupt said it stopped)
    assert final_weights(out) == final_weights(straight)
