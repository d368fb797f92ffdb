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
    print(os.environ.get("GLIBC_TUNABLES"), heap, flush=True)
    sys.argv = ["still", "--version"]
    from still.cli import main
    main({argv})
""")


def _started(argv: str = "", **environ: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "STILL_HUGE_PAGES")} | environ
    out = subprocess.run([sys.executable, "-c", STARTED.format(argv=argv)], capture_output=True, text=True,
                         check=False, env=env)
    return out.stdout.splitlines()


@pytest.mark.skipif(not HUGE, reason="no glibc 2.35 with transparent huge pages in madvise mode here")
def test_the_still_command_starts_again_with_mallocs_memory_on_huge_pages():
    lines = _started()
    assert lines[:2] == ["None False", "glibc.malloc.hugetlb=1 True"], lines  # once as started, once again
    assert lines[2].startswith("still") and len(lines) == 3, lines


def test_the_command_starts_once_where_asked_or_called_with_arguments():
    assert _started(STILL_HUGE_PAGES="0")[:1] == ["None False"] and len(_started(STILL_HUGE_PAGES="0")) == 2
    assert len(_started(argv="['--version']")) == 2  # (tests call main with arguments: never started again)
    assert _started(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")[0] == "glibc.malloc.hugetlb=0 False"


@pytest.mark.skipif(not HUGE, reason="no glibc 2.35 with transparent huge pages in madvise mode here")
def test_the_tunable_joins_the_users_own():
    env = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "OTHER": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "OTHER": "1"}
    assert huge_pages_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_huge_pages_are_left_out_where_asked_or_named_already():
    assert huge_pages_environment({"STILL_HUGE_PAGES": "0"}) is None
    assert huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=2"}) is None
