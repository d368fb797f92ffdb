"""Progress bars (tqdm), on by default on a terminal; STILL_PROGRESS=0/1 forces them off/on."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm bar; `enabled=False` hides it whatever STILL_PROGRESS says (ranks other than 0)."""
    flag = os.environ.get("STILL_PROGRESS")
    disable = True if not enabled else None if flag is None else flag in ("0", "false", "no", "")
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=disable, **kwargs)


def log(message: str) -> None:
    """A line for the user that does not break an active progress bar."""
    tqdm.write(message, file=sys.stderr)
