#!/usr/bin/env bash
# The tests of the hand-written C++ (the decoding step, the attention and dropout kernels) under
# GCC's sanitizers: every library built with them, and the sanitizer's runtime loaded first into
# Python.
#   SANITIZE=address (the default): AddressSanitizer and UndefinedBehaviorSanitizer. The runtime
#     also guards PyTorch's CPU tensors (their memory comes from malloc): a read or write past a
#     tensor's end, a use after free, an overflowing or misaligned integer operation stops the test
#     with the sanitizer's report.
#   SANITIZE=thread: ThreadSanitizer, for data races between the libraries' own threads (the
#     decoding step's helper threads and barriers; the kernels' helpers). Only the libraries are
#     instrumented: it sees their accesses, not PyTorch's.
# Needs GCC's runtimes (Debian: the g++ package has them). Several times slower than the plain
# tests (the compiler too runs under the runtime). Arguments go to pytest (without a test path:
# the tests that run the hand-written code, after the options given):
#   scripts/sanitized_tests.sh tests/compressive/test_native.py -x
#   SANITIZE=thread scripts/sanitized_tests.sh -q
# (The whole suite, `tests`, passes under both, but for test_allocator.py's count of glibc's page
# faults under AddressSanitizer, whose malloc replaces glibc's; under ThreadSanitizer PyTorch's own
# gloo process groups add reports of mutexes of theirs, which it cannot follow: docs/reliability.md.)
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # the header above, without its marks
    sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."
CXX=${CXX:-g++}
export CXX
case ${SANITIZE:=address} in
    address)
        runtime=$("$CXX" -print-file-name=libasan.so)
        export STILL_TEST_CFLAGS="-g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
        # PyTorch and Python keep at exit what the checker would call leaks; their allocations are not ours
        export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:alloc_dealloc_mismatch=0:halt_on_error=1}
        export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} ;;
    thread)
        runtime=$("$CXX" -print-file-name=libtsan.so)
        export STILL_TEST_CFLAGS="-g -fno-omit-frame-pointer -fsanitize=thread"
        # PyTorch's own threads (OpenMP's, not instrumented) synchronise where the checker cannot see
        # it: what they write through an intercepted call (memset, malloc) would read as races, and
        # Python's exit unlocks one of PyTorch's mutexes after destroying it; neither is ours
        suppressions=$(mktemp)
        trap 'rm -f "$suppressions"' EXIT
        printf '%s\n' called_from_lib:libtorch_cpu.so called_from_lib:libc10.so called_from_lib:libgomp.so.1 \
            called_from_lib:libtorch_python.so mutex:capsule_dealloc > "$suppressions"
        export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:report_signal_unsafe=0:suppressions=$suppressions} ;;
    *)
        echo "SANITIZE must be address or thread, got $SANITIZE" >&2
        exit 2 ;;
esac
if [ ! -e "$runtime" ]; then
    echo "$CXX has no $SANITIZE sanitizer runtime ($runtime): install GCC's (Debian: apt install g++)" >&2
    exit 2
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
paths=0  # arguments that are not options: test files or directories
for argument in "$@"; do
    case $argument in -*) ;; *) paths=1 ;; esac
done
if [ $paths = 0 ]; then
    set -- "$@" tests/compressive/test_native.py tests/compressive/test_attention.py tests/compressive/test_decode.py \
        tests/compressive/test_generate.py tests/compressive/test_prefill.py tests/test_layers.py
fi
# (with the C++ library loaded from the start too: the runtime finds the exception-throwing function it
# wraps only where that is loaded when it starts, and matplotlib's import throws one)
LD_PRELOAD="$runtime $("$CXX" -print-file-name=libstdc++.so)" .venv/bin/python -m pytest -p no:cacheprovider "$@"
