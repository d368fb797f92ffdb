#!/usr/bin/env bash
# Creates .venv with PyTorch (CPU build, or the CUDA build where an NVIDIA GPU is present),
# the project in editable mode and its test tools. Safe to run again.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # the header above, without its marks
    sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."
TORCH_VERSION="${STILL_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "still needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    if [ -n "${STILL_TORCH_INDEX:-}" ]; then
        # e.g. STILL_TORCH_INDEX=https://download.pytorch.org/whl/cu128
        "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$STILL_TORCH_INDEX"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        # PyPI's Linux wheels of torch are the CUDA build.
        "${PIP[@]}" install "torch==$TORCH_VERSION"
    else
        # No GPU: never let pip resolve the CUDA build (gigabytes). A local CPU wheel first
        # (pip's find-links), alone, then its small dependencies from the usual index (torch is
        # then already satisfied and stays the CPU build); else PyTorch's CPU index.
        if "${PIP[@]}" install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
            "${PIP[@]}" install "torch==$TORCH_VERSION"
        else
            "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
fi
"${PIP[@]}" install -e ".[dev]"
.venv/bin/python -c "import torch, still; print(f'still {still.__version__} with torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
