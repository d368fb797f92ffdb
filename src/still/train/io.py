"""Atomic file writes and hashing.

Every file still writes goes to a temporary file in the same directory, is flushed and fsynced,
then `os.replace`d over its final name: a crash or a full disk leaves either the old file or the
new one, never half of one, and no temporary file behind. A writer killed outright (SIGKILL, power
loss) cannot remove its temporary file; the file's name holds the writer's process id, and the next
write of the same file removes it once that process is gone.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def process_umask() -> int:
    """The process's file-creation mask (read by setting it, then put back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


_TEMPORARY = re.compile(r"\.(.+)\.(\d+)-[a-z0-9_]+\.tmp")  # (mkstemp's random part: [a-z0-9_])


def temporary_of(name: str) -> tuple[str, int] | None:
    """The file an `atomic_write` temporary named `name` (`.<file>.<pid>-<random>.tmp`) is written
    for, and its writer's pid; None for any other name."""
    found = _TEMPORARY.fullmatch(name)
    return (found[1], int(found[2])) if found else None


def _remove_dead_writers(path: Path) -> None:
    """Delete the temporary files of `path` (`temporary_of`) whose writer's process is gone: it was
    killed while it wrote."""
    for leftover in path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"):
        found = temporary_of(leftover.name)
        if found and found[0] == path.name and found[1] != os.getpid() and not process_alive(found[1]):
            leftover.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then move it over `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(path)
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        normal_mode(tmp)  # (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and (tmp is None or e.filename in (str(tmp), None)):
            # (the file being written, not its temporary name, which is gone or never was: a probe on
            # read-only media; or where the writer named none, as matplotlib's savefig on a full disk: a
            # probe's "error: File too large" named no file)
            e.filename = str(path)
        raise
    _fsync_dir(path.parent)


def normal_mode(path: Path) -> None:
    """Give `path` a normal file's mode (as `open` makes one under the process's umask)."""
    os.chmod(path, 0o666 & ~process_umask())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def printable(text: str) -> str:
    """`text` with the lone surrogates by which Python holds a file name's undecodable bytes (a
    folder named in Latin-1, say: `surrogateescape`) written as `\\xNN`, so that it encodes as
    UTF-8, prints and reads as the name it was."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # (a lone surrogate of no byte)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` as UTF-8 (`printable`: a file name's undecodable bytes as `\\xNN`), atomically, as
    `atomic_write_new_bytes`."""
    atomic_write_new_bytes(path, printable(text).encode("utf-8"))


def atomic_write_new_bytes(path: str | Path, data: bytes) -> None:
    """`data`, atomically, where `path` does not hold these bytes already: a file that does is left as
    it is (a finished run run again on read-only media)."""
    try:
        if os.path.getsize(path) == len(data) and Path(path).read_bytes() == data:
            _remove_dead_writers(Path(path))  # (what a writer killed before left, swept all the same)
            return
    except OSError:  # (none there yet, or unreadable: written)
        pass
    atomic_write_bytes(path, data)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
