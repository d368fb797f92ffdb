"""still.allocator: the `still` command's process keeps the memory it frees (glibc)."""

import os
import subprocess
import sys
import textwrap

import pytest

from still.allocator import ENVIRONMENT, glibc, huge_pages_environment, keep_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

# Pages faulted in by a round of eight 1 MiB blocks allocated, written and freed, after 3 warm-up rounds
PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    {setup}
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def round_():
        blocks = [libc.malloc(1 << 20) for _ in range(8)]
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        for b in blocks:
            libc.free(b)
    for _ in range(3):
        round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        round_()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _faults(setup: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(glibc() is None, reason="glibc's malloc")
def test_freed_memory_is_kept_for_the_next_use():
    """By default glibc gives the 8 MiB back and the next round faults its ~2,048 pages in again;
    kept, a round faults in almost none. The `still` command's entry point sets it."""
    default = _faults("")
    kept = _faults("from still.allocator import keep_freed_memory; assert keep_freed_memory()")
    command = _faults("from still.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass")
    assert default > 1000, default
    assert kept < 50 and command < 50, (kept, command)


def test_the_users_own_malloc_settings_are_kept():
    for name in ENVIRONMENT:
        assert keep_freed_memory({name: "0"}) is False


GIVE_BACK = textwrap.dedent("""
    from pathlib import Path
    from still.allocator import give_back, keep_freed_memory

    def anonymous():  # MiB
        rollup = Path("/proc/self/smaps_rollup").read_text().split()
        return int(rollup[rollup.index("Anonymous:") + 1]) / 1024

    assert keep_freed_memory()
    before = anonymous()
    texts = ["x" * 400_000 + str(i) for i in range(500)]  # about 200 MiB in blocks under the mapping threshold
    held = anonymous()
    del texts
    freed = anonymous()
    given = give_back()
    print(held - before, freed - before, anonymous() - before, given)
""")


@pytest.mark.skipif(glibc() is None or not os.path.exists("/proc/self/smaps_rollup"),
                    reason="glibc's malloc, Linux's smaps_rollup")
def test_give_back_hands_the_freed_heap_to_the_system():
    """Freed memory the process keeps (`keep_freed_memory`) is the system's again after `give_back`:
    what a corpus's text would hold after it is encoded once (`still.data.encoded`)."""
    out = subprocess.run([sys.executable, "-c", GIVE_BACK], capture_output=True, text=True, check=True)
    held, freed, after, given = out.stdout.split()
    assert float(held) > 180 and float(freed) > 180, out.stdout  # (kept after the strings are freed)
    assert float(after) < 20 and given == "True", out.stdout


HUGE = huge_pages_environment({}) is not None
"""Whether this system takes glibc's huge-page tunable (glibc 2.35 or later, transparent huge pages
in `madvise` mode)."""

STARTED = textwrap.dedent("""
    import os, sys
    heap = False  # whether the heap's mapping was advised for huge pages (`hg` among its VmFlags)
    name = None
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:
            name = fields[-1] if len(fields) >= 6 else None
        elif fields[0] == "VmFlags:" and name == "[heap]":
            heap = "hg" in fields[1:]
    os.write(2, f"started {{os.environ.get('GLIBC_TUNABLES')}} {{heap}}\\n".encode())
    sys.argv = ["still", *{argv}]
    from still import cli
    cli.{entry}()
""")


def _started(argv: tuple[str, ...] = ("no-such-command",), entry: str = "run", shell: str = "",
             **environ: str) -> tuple[list[str], int]:
    """The lines a command started through `still.cli.<entry>` says first (each start: the
    environment's tunables and whether its heap was advised), and its exit code."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "STILL_HUGE_PAGES", "STILL_STARTED_AGAIN")} | environ
    script = STARTED.format(argv=list(argv), entry=entry)
    command = ["sh", "-c", f'exec "{sys.executable}" -c "$0" {shell}', script]
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    return [line for line in out.stderr.splitlines() if line.startswith("started")], out.returncode


@pytest.mark.skipif(not HUGE, reason="no glibc 2.35 with transparent huge pages in madvise mode here")
def test_the_still_command_starts_again_once_with_mallocs_memory_on_huge_pages():
    lines, code = _started()
    assert lines == ["started None False", "started glibc.malloc.hugetlb=1 True"], lines  # as started, then again
    assert code == 2  # (the unknown command's usage error, said by the command started again)
    assert _started(shell=">&-") == (lines, 2)  # and with its standard output closed (nothing to flush)


def test_the_command_is_not_started_again_where_asked_or_not_its_own_start():
    once = ["started None False"]
    for value in ("0", "off", "No"):
        assert _started(STILL_HUGE_PAGES=value) == (once, 2)
    assert _started(STILL_STARTED_AGAIN="1") == (once, 2)  # (never twice: a start whose tunables were dropped)
    assert _started(("--version",)) == (once, 0)  # (what answers at once is not worth a start)
    assert _started(entry="main") == (once, 2)  # (`main`, as tests and programs call it: never)
    assert _started(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == (["started glibc.malloc.hugetlb=0 False"], 2)


@pytest.mark.skipif(not HUGE, reason="no glibc 2.35 with transparent huge pages in madvise mode here")
def test_the_tunable_joins_the_users_own():
    env = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "OTHER": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "OTHER": "1"}
    assert huge_pages_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_huge_pages_are_left_out_where_asked_or_named_already():
    assert huge_pages_environment({"STILL_HUGE_PAGES": "0"}) is None
    assert huge_pages_environment({"STILL_HUGE_PAGES": "Off"}) is None
    assert huge_pages_environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None
    assert huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=2"}) is None
