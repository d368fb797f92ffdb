"""The one exception type a user is meant to read.

`StillError` is raised for anything the user can fix: a bad option, a missing or corrupt file,
data of the wrong shape. It subclasses `ValueError` so library callers can catch it the usual
way; the CLI turns it into a one-line message and exit code 2, never a traceback.
"""


class StillError(ValueError):
    """A mistake in the input that the user can act on. The message names the bad value."""


def check(condition: bool, message: str) -> None:
    """Raise `StillError(message)` unless `condition` holds (for user input; not an assert)."""
    if not condition:
        raise StillError(message)
