#!/usr/bin/env bash
# Creates .venv-bench: torch (CPU), `still` in editable mode, the two public Compressive
# Transformers that bench/compressive_peers.py compares against and torchdistill, which
# bench/distill_peers.py compares against (with labml-nn's distillation). The peers are
# benchmark-only: they are never dependencies of the project. Safe to run again.
#
# torch (the CPU build; STILL_TORCH_VERSION, default 2.13.0) comes from a local wheel only (pip
# install --no-index): pip's find-links must name a folder holding it, PIP_FIND_LINKS=DIR or
# find-links in pip.conf; without one the script stops saying so. The rest come from pip's indexes.
#
#     bash bench/setup_peers.sh && .venv-bench/bin/python bench/compressive_peers.py
#     .venv-bench/bin/python bench/distill_peers.py
#
# The peers are installed with --no-deps, then only the small packages they import:
#   labml-nn 0.5.1                        -> labml (-> gitpython, pyyaml), einops, numpy
#                                            (its torchvision, torchtext and fairscale requirements are
#                                            not imported by the modules we use; the benchmark stubs
#                                            torchvision, see compressive_peers.py)
#   compressive-transformer-pytorch 0.4.0 -> mogrifier (-> einops)
#   torchdistill 1.1.5                    -> pyyaml (labml's already), numpy (its torchvision, scipy
#                                            and cython requirements are not imported by the modules
#                                            we use; the benchmark stubs torchvision, see distill_peers.py)
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # the header above, without its marks
    sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."
VENV=.venv-bench
TORCH_VERSION="${STILL_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "still needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# Every install below is constrained to this torch, so no dependency can make pip fetch another
# build (PyPI's Linux torch wheels are the CUDA build: gigabytes).
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    # The local CPU wheel (pip's find-links); never a bare `torch` or a range. Its own
    # dependencies (filelock, sympy, ...) come next, from the indexes, with torch already satisfied.
    if ! "${PIP[@]}" install --no-index --no-deps "torch==$TORCH_VERSION"; then  # (else only pip's "no matching
        # distribution", which does not say that a local wheel is wanted, nor where pip looked)
        echo "error: torch==$TORCH_VERSION not found in pip's find-links (PIP_FIND_LINKS=${PIP_FIND_LINKS:-unset}," \
             "or find-links in pip.conf): set PIP_FIND_LINKS to a folder holding its CPU wheel" \
             "(or STILL_TORCH_VERSION to the version of the wheel there)" >&2
        exit 2
    fi
fi
"${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
"${PIP[@]}" install -c "$CONSTRAINTS" -e .
"${PIP[@]}" install --no-deps "labml-nn==0.5.1" "compressive-transformer-pytorch==0.4.0" "torchdistill==1.1.5"
"${PIP[@]}" install -c "$CONSTRAINTS" "labml==0.5.3" "mogrifier==0.0.5" "einops>=0.8" "numpy>=1.24"
echo "(pip's complaint that labml-nn requires fairscale, torchtext and torchvision, and torchdistill torchvision, scipy and cython, is expected: they are not installed on purpose)"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
names = ["still", "labml-nn", "labml", "compressive-transformer-pytorch", "mogrifier", "einops", "torchdistill"]
print(f"torch {torch.__version__}; " + "; ".join(f"{n} {md.version(n)}" for n in names))
EOF
