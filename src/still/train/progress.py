"""Progress bars (tqdm), on by default on a terminal; STILL_PROGRESS=0/1 forces them off/on."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

from still.train.io import printable


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm bar; `enabled=False` hides it whatever STILL_PROGRESS says (ranks other than 0)."""
    flag = os.environ.get("STILL_PROGRESS")
    disable = True if not enabled else None if flag is None else flag in ("0", "false", "no", "")
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=disable, **kwargs)


def log(message: str) -> None:
    """A line for the user that does not break an active progress bar (`printable`: a file name's
    undecodable bytes as \\xNN, which a strict stream takes)."""
    tqdm.write(printable(message), file=sys.stderr)


def format_size(size: int | None) -> str:
    """Bytes as people read them: "3.3 MiB", "812 B" ("-" for None)."""
    return _scaled(size, (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)), " B")


def format_count(n: int | None) -> str:
    """A count as people read it: "11.7 G", "12.4 k", "812" ("-" for None)."""
    return _scaled(n, (("G", 10**9), ("M", 10**6), ("k", 10**3)))


def _scaled(n: int | None, units: tuple[tuple[str, int], ...], unit: str = "") -> str:
    """`n` in the largest of `units` (name, scale) it reaches, to a tenth; else whole, with `unit`."""
    if n is None:
        return "-"
    name, scale = next(((name, scale) for name, scale in units if n >= scale), (unit, 1))
    return f"{n / scale:,.1f} {name}" if scale > 1 else f"{n}{unit}"
