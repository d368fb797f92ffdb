"""glibc's malloc told to keep the memory it frees: the `still` command's setting.

By default glibc gives freed memory back to the system. Blocks above a threshold (128 kB at first,
rising to the largest such block freed) are mapped and unmapped one by one, and the heap's free top
is returned once it is more than twice that threshold. A PyTorch call on the CPU frees its
temporaries when it returns, so the next call touches fresh pages, and the kernel zeroes each page
at its first touch. A generation at the peer benchmark's size (a 512-token prompt at d_model 128,
then 256 tokens) faulted in about 530 pages, some 2 MB, every time: about 1.3 ms of a prompt of
about 11 ms. With freed memory kept, it faulted in 7, and the whole generation ran 3-7% faster
(docs/performance.md, session 26).

`keep_freed_memory()` fixes the thresholds so that freed memory stays with the process for its next
use: blocks under 32 MiB come from the heap, and up to 1 GiB of free heap is kept. The cost is that a
process keeps the most heap it has used, as PyTorch's own CPU launcher
(`torch.backends.xeon.run_cpu`) does with jemalloc. The `still` command sets it when it starts. A
library should not change its host process's allocator, so nothing else sets it: call this from
your own program where the same holds. (glibc reads the MALLOC_*_ environment variables only
when a process starts; by the time Python runs, only `mallopt` can change them.)

`start_with_huge_pages()` starts the command again in the same process with glibc's malloc
advising huge pages for its memory (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which has no `mallopt`
twin): the `still` command does so when started from a shell, where the system's transparent huge
pages are in `madvise` mode (`STILL_HUGE_PAGES=0` leaves it out).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Mapping
from pathlib import Path

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
SETTINGS = {
    M_MMAP_THRESHOLD: 32 << 20,  # blocks under this come from the heap (glibc's largest allowed on 64 bits)
    M_TRIM_THRESHOLD: 1 << 30,  # free heap kept at its top before any is given back
    M_TOP_PAD: 16 << 20,  # extra heap asked for each time the heap grows
}
VARIABLES = {M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
             M_TOP_PAD: "MALLOC_TOP_PAD_"}
"""glibc's environment variables for the same settings (read once, when a process starts)."""
ENVIRONMENT = (*VARIABLES.values(), "MALLOC_MMAP_MAX_")
"""glibc's own variables for these settings: where the user set any of them, theirs are kept."""


def environment() -> dict[str, str]:
    """`SETTINGS` as glibc's environment variables: for a child process to start with them."""
    return {VARIABLES[parameter]: str(value) for parameter, value in SETTINGS.items()}


def glibc() -> ctypes.CDLL | None:
    """The C library this process runs on where it is glibc (Linux), else None (musl's malloc, for
    one, has no such settings)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Set glibc's malloc to keep freed memory (`SETTINGS`) for the whole process. Returns whether it
    did: not where any of `ENVIRONMENT` is set (the user's choice stands), and not outside glibc."""
    libc = None if any(name in environ for name in ENVIRONMENT) else glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())


def give_back() -> bool:
    """Hand the heap's free pages back to the system now (glibc's `malloc_trim`), after a peak that
    later work will not reuse: a corpus read and encoded once (`still.data.encoded`), whose text
    would otherwise stay with the process (all of it under `keep_freed_memory`, and much of it even
    without: a freed block below the mapping threshold stays in the heap). Returns whether any
    memory was given back (False outside glibc)."""
    libc = glibc()
    if libc is None:
        return False
    trim = libc.malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim(0) == 1


HUGE_PAGES = "glibc.malloc.hugetlb=1"
"""glibc's tunable (2.35 and later) that advises the memory malloc takes from the system for
transparent huge pages (`madvise(MADV_HUGEPAGE)`): read once, when a process starts."""

STARTED_AGAIN = "STILL_STARTED_AGAIN"
"""Set in the environment of a command started again (`start_with_huge_pages`): never twice."""

_OFF = ("0", "false", "no", "off")
_OTHER_MALLOCS = ("jemalloc", "tcmalloc", "mimalloc")  # preloaded in glibc's place: the tunable does nothing


def huge_pages_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str] | None:
    """`environ` with glibc's malloc advising huge pages (`HUGE_PAGES` added to `GLIBC_TUNABLES`);
    None where that would change nothing or is not wanted: outside glibc 2.35 or later (or with
    another malloc preloaded), where the system's transparent huge pages are not in `madvise` mode
    (`always` gives them already, `never` none), where `GLIBC_TUNABLES` names the tunable already
    (the user's choice), or where `STILL_HUGE_PAGES` is 0 (or false, no, off).

    Why: a training step streams its activations through many small PyTorch calls, and in 4 KiB
    pages its memory is more pages than a core's TLB holds. With the heap on huge pages a training
    shard step at the peer benchmark's size ran 0.96x the time in bf16 and 0.95x in fp32 (medians of
    three and four pairs, machine C, docs/performance.md, session 41). The cost: about 7% more
    memory at 8 threads (each thread's malloc arena on huge pages), none seen at one."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get("STILL_HUGE_PAGES", "").strip().lower() in _OFF or "glibc.malloc.hugetlb" in tunables
            or any(name in environ.get("LD_PRELOAD", "") for name in _OTHER_MALLOCS) or glibc() is None):
        return None
    try:
        version = tuple(int(x) for x in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(encoding="utf-8")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    if version < (2, 35) or "[madvise]" not in mode:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def _secure() -> bool:
    """Whether this process runs in the C library's secure mode (setuid, or file capabilities),
    where glibc drops `GLIBC_TUNABLES`."""
    libc = glibc()
    if libc is None:
        return False
    getauxval = libc.getauxval
    getauxval.argtypes, getauxval.restype = [ctypes.c_ulong], ctypes.c_ulong
    return getauxval(23) != 0  # AT_SECURE


def start_with_huge_pages() -> None:
    """Start this process's command again, in the same process (`os.execve` of the same interpreter
    with the same arguments), with glibc's malloc advising huge pages (`huge_pages_environment`),
    where that changes something; else return. Only for a command's entry point, before it does
    anything (the `still` command's: `still.cli.run`): the program is started again from its first
    line. Not where it was started again already (`STARTED_AGAIN`), in secure mode, under a
    debugger or profiler, or in an interactive interpreter."""
    if os.environ.get(STARTED_AGAIN) or getattr(sys, "frozen", False) or not getattr(sys, "orig_argv", None):
        return
    if sys.gettrace() is not None or sys.getprofile() is not None or sys.flags.interactive or hasattr(sys, "ps1"):
        return
    environment = huge_pages_environment()
    if environment is None or _secure():
        return
    environment[STARTED_AGAIN] = "1"
    with contextlib.suppress(OSError, ValueError):  # (where it cannot start again, it runs as it is)
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        os.execve(sys.executable, sys.orig_argv, environment)
