"""The shell scripts under scripts/, run with a stand-in for `still`."""

import os
import subprocess
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

FAKE_STILL = """#!/bin/bash
echo "$*" >> "$CALLS"
case "$*" in *"--out $OUT/$FAIL"*) echo "error: simulated" >&2; exit 2;; esac
case "$*" in *"--out $OUT/$STOP"*) echo "interrupted by SIGINT at step 3" >&2; exit 130;; esac
if [ "$1 $2" = "lm train" ]; then  # (long enough for an interrupted run beside it to be said first)
  sleep 0.2; out="${@: -1}"; mkdir -p "$out"; printf 'title\\n\\n| row |\\n' > "$out/results.md"
fi
if [ "$1 $2" = "lm eval" ]; then echo "by position" > "$3/eval-test.md"; fi
exit 0
"""


def test_a_failed_shakespeare_run_is_said_the_others_go_on_and_the_script_fails(tmp_path):
    """A probe: one failed run ended its worker under `set -e`, so the runs that worker would have
    taken were never started, unsaid, and the script exited 0."""
    fake = tmp_path / "still"
    fake.write_text(FAKE_STILL)
    fake.chmod(0o755)
    for jobs in ("1", "2"):
        out, calls = tmp_path / f"out{jobs}", tmp_path / f"calls{jobs}"
        env = {**os.environ, "STILL": str(fake), "OUT": str(out), "CALLS": str(calls), "JOBS": jobs, "FAIL": "xl256",
               "STOP": "none"}
        done = subprocess.run(["bash", str(SCRIPTS / "reproduce_shakespeare.sh")], env=env, capture_output=True,
                              text=True, timeout=120)
        trained = [line for line in calls.read_text().splitlines() if line.startswith("lm train")]
        assert done.returncode == 1 and len(trained) == 13, (jobs, done.stderr)
        assert "== xl256: failed" in done.stderr and "failed: xl256 " in done.stderr
        assert (out / "compressive" / "results.md").exists() and (out / "compressive-fp32" / "results.md").exists()


def test_an_interrupted_shakespeare_run_stops_them_all(tmp_path):
    """A probe: with failures said and gone past, a run interrupted by Ctrl-C (still saves and exits
    130) was called failed, and the next runs started."""
    fake = tmp_path / "still"
    fake.write_text(FAKE_STILL)
    fake.chmod(0o755)
    for jobs, names, most in (("1", [], 1), ("2", [], 2), ("1", ["transformer", "compressive", "xl256"], 2)):
        out, calls = tmp_path / f"out{jobs}{len(names)}", tmp_path / f"calls{jobs}{len(names)}"
        env = {**os.environ, "STILL": str(fake), "OUT": str(out), "CALLS": str(calls), "JOBS": jobs, "FAIL": "none",
               "STOP": "compressive"}
        done = subprocess.run(["bash", str(SCRIPTS / "reproduce_shakespeare.sh"), *names], env=env,
                              capture_output=True, text=True, timeout=120)
        trained = [line for line in calls.read_text().splitlines() if line.startswith("lm train")]
        assert done.returncode == 130 and "== compressive: interrupted" in done.stderr, (jobs, names, done.stderr)
        assert len(trained) <= most and "failed" not in done.stderr and "lm compare" not in calls.read_text()


def test_the_scripts_answer_help_and_a_bad_run_name_makes_nothing(tmp_path):
    """`--help` started gpu_check.sh's checks (and without a GPU left its temporary folder behind),
    and an unknown run name, or --help, made reproduce_shakespeare.sh's $OUT before it was refused."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "STILL": "false"}
    done = subprocess.run(["bash", str(SCRIPTS / "reproduce_shakespeare.sh"), "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "runs: compressive xl256 transformer" in done.stdout and not out.exists()
    done = subprocess.run(["bash", str(SCRIPTS / "reproduce_shakespeare.sh"), "xl256", "bogus"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown run bogus" in done.stderr and not out.exists()
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--help"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "The checks for a session lent a GPU" in done.stdout and not out.exists()
