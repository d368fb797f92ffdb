"""The exceptions a user is meant to read.

`StillError` is raised for anything the user can fix: a bad option, a missing or corrupt file,
data of the wrong shape. It subclasses `ValueError` so library callers can catch it the usual
way; the CLI turns it into a one-line message and exit code 2, never a traceback.
`TrainingInterrupted` ends a run stopped by SIGINT or SIGTERM after a checkpoint was saved; the
CLI exits with 130 or 143. `TrainingDiverged` (a NaN or infinite loss) exits with 3.
"""

from __future__ import annotations

import numbers
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn


class StillError(ValueError):
    """A mistake in the input that the user can act on. The message names the bad value."""


class Terminated(BaseException):
    """SIGTERM arrived outside a training loop's steps (which finish the step and save first): the
    command unwinds, so that what it was writing (a corpus's cache entry, say) is removed, and
    exits with 143. A `BaseException`, as `KeyboardInterrupt` is: no `except Exception` stops it."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived: the current step was finished and a checkpoint saved."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"; checkpoint saved to {checkpoint}: run the same command again to resume" if checkpoint else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; training stopped before the optimizer
    step, so every checkpoint on disk is finite. The CLI exits with code 3."""

    exit_code = 3


def whole(value: Any) -> bool:
    """A whole number: an int or NumPy's (taken as ints), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check(condition: bool, message: str) -> None:
    """Raise `StillError(message)` unless `condition` holds (for user input; not an assert)."""
    if not condition:
        raise StillError(message)


def fail(message: str) -> NoReturn:
    """For scripts outside the CLI (`bench/`): the message on stderr as the CLI prints a
    `StillError`, and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
