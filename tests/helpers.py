"""Helpers shared by the tests."""

from __future__ import annotations

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


__all__ = ["assert_user_error", "pytest", "run_cli"]
