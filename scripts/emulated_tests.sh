#!/usr/bin/env bash
# The test suite on an emulated x86-64 processor without AVX-512: qemu-user's model of Intel's
# Haswell (AVX2 with FMA). PyTorch chooses its AVX2 kernels there; the hand-written libraries are
# built for Haswell (what -march=native gives on one) and so are the compiled packages, whose
# compiling process runs under the same emulator. Children the tests start themselves (the command
# line, torchrun) run on the host's processor. Needs `qemu-user` (Debian: apt install qemu-user);
# slow (the whole suite about 30 minutes on 2 cores). Arguments go to pytest:
#   scripts/emulated_tests.sh tests/compressive -x
# Another processor: STILL_EMULATED_CPU (qemu's model, `qemu-x86_64 -cpu help`) and
# STILL_EMULATED_MARCH (GCC's name for it), e.g. SandyBridge and sandybridge: AVX without FMA, where
# PyTorch takes its default kernels. (PyTorch 2.13 itself stops on a Nehalem, which lacks AVX.)
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # the header above, without its marks
    sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."
cpu=${STILL_EMULATED_CPU:-Haswell}
march=${STILL_EMULATED_MARCH:-haswell}
if ! command -v qemu-x86_64 >/dev/null; then
    echo "qemu-x86_64 not found: install qemu-user (Debian: apt install qemu-user)" >&2
    exit 2
fi
if [ "$(uname -m)" != x86_64 ]; then
    echo "this emulates an x86-64 processor on an x86-64 host; this one is $(uname -m)" >&2
    exit 2
fi
export STILL_TEST_TUNE="-march=$march" STILL_TEST_EMULATOR="qemu-x86_64 -cpu $cpu" TORCHINDUCTOR_CPP_MARCH="$march"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# (qemu warns, once a process, of the model's features its translator lacks: TSX, the TSC deadline)
qemu-x86_64 -cpu "$cpu" .venv/bin/python -m pytest -p no:cacheprovider "${@:-tests}" 2> >(grep -v "TCG doesn't support" >&2)
