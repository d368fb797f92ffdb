"""Helpers shared by the tests."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `still ARGS` in-process; return (exit code, stdout, stderr)."""
    from still.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(capsys, *args: str, contains: str) -> str:
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    assert contains in err, err
    return err


# The hand-written kernels as this machine builds them (-march=native), and built for processors
# without AVX-512: AVX2 with FMA (x86-64-v3, as many laptops' processors) and no tuning at all (SSE2
# on x86-64), whose code paths an AVX-512 machine would otherwise never run (`use_build`).
BUILDS = {"native": None, "x86-64-v3": ("-march=x86-64-v3",), "untuned": ()}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _runs_x86_64_v3() -> bool:
    """/proc/cpuinfo's flags, and PyTorch's own reading of the processor (its instructions: an emulated
    processor's, where /proc/cpuinfo shows the host's, as under `scripts/emulated_tests.sh`)."""
    import torch

    return (platform.machine() == "x86_64" and {"avx2", "fma", "bmi2", "f16c", "movbe"} <= _cpu_flags()
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def use_build(name: str, monkeypatch, *loaded: str) -> None:
    """Build `still.compressive.native`'s libraries with `BUILDS[name]`'s flags from here on (the
    test's), forgetting the libraries `loaded` names (its lists of loaded ones) so that they build
    anew; skips where this processor cannot run them."""
    from still.compressive import native

    tune = BUILDS[name]
    if tune is None:
        return
    if tune and not _runs_x86_64_v3():
        pytest.skip("this processor cannot run x86-64-v3 code")
    monkeypatch.setattr(native, "TUNE", tune)
    for attribute in loaded:
        monkeypatch.setattr(native, attribute, [])


def stage_history(stage_dir: Path) -> list[dict]:
    """A recipe stage's per-epoch records, from its last checkpoint."""
    last = sorted((Path(stage_dir) / "checkpoints").glob("ckpt-*"))[-1]
    return json.loads((last / "state.json").read_text())["state"]["history"]


__all__ = ["BUILDS", "assert_user_error", "pytest", "run_cli", "stage_history", "use_build"]


def run_config(kind: str) -> str:
    """A config.json of a run of `kind` (`still.recipes.common.RUN_KINDS`), every setting in it as
    still writes it."""
    import importlib

    from still.config import to_dict
    from still.recipes.common import RUN_KINDS

    module, cls = RUN_KINDS[kind]
    return json.dumps(to_dict(getattr(importlib.import_module(module), cls)()))


def process_gone(pid: int) -> bool:
    """Whether process `pid` has ended (also where it is a zombie its new parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"
