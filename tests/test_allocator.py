"""still.allocator: the `still` command's process keeps the memory it frees (glibc)."""

import os
import subprocess
import sys
import textwrap

import pytest

from still.allocator import ENVIRONMENT, glibc, keep_freed_memory

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
