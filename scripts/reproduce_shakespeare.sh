#!/usr/bin/env bash
# The Shakespeare experiments of docs/results/shakespeare.md, one command each. Run them all
# (hours on two cores), or one at a time by name: scripts/reproduce_shakespeare.sh xl256
# Each run directory resumes if interrupted; rerunning a finished one only prints its table.
set -euo pipefail
cd "$(dirname "$0")/.."
STILL=${STILL:-.venv/bin/still}
OUT=${OUT:-runs/shakespeare}

declare -A RUNS=(
  # the main comparison: reference preset, the same budget (4000 steps x 16 x 128 characters)
  [transformer]="--preset reference --mem-len 0 --c-mem-len 0"
  [xl256]="--preset reference --mem-len 256 --c-mem-len 0"
  [compressive]="--preset reference"
  # compression functions (ablation preset, attention-reconstruction loss where f_c has weights)
  [f-conv]="--preset ablation --compression conv"
  [f-dilated]="--preset ablation --compression dilated"
  [f-max]="--preset ablation --compression max"
  [f-mean]="--preset ablation --compression mean"
  [f-most_used]="--preset ablation --compression most_used"
  # compression losses (ablation preset, 1-D convolution)
  [loss-autoencoding]="--preset ablation --compression-loss autoencoding"
  [loss-none]="--preset ablation --compression-loss none"
  # the ablation preset's references: f-conv is also loss-attention
  [ablation-xl128]="--preset ablation --mem-len 128 --c-mem-len 0"
)
ORDER=(f-conv f-dilated f-max f-mean f-most_used loss-autoencoding loss-none ablation-xl128 transformer xl256 compressive)

for name in "${@:-${ORDER[@]}}"; do
  [ -n "${RUNS[$name]+x}" ] || { echo "unknown run $name; one of: ${ORDER[*]}" >&2; exit 2; }
  echo "== $name: still lm train ${RUNS[$name]} --out $OUT/$name"
  # shellcheck disable=SC2086
  "$STILL" lm train ${RUNS[$name]} --out "$OUT/$name"
  "$STILL" lm eval "$OUT/$name" --split test >/dev/null
done
"$STILL" lm compare "$OUT"/{transformer,xl256,compressive} --out "$OUT/main" 2>/dev/null || true
"$STILL" lm compare "$OUT"/{f-conv,f-dilated,f-max,f-mean,f-most_used,ablation-xl128} --out "$OUT/functions" 2>/dev/null || true
"$STILL" lm compare "$OUT"/{f-conv,loss-autoencoding,loss-none} --out "$OUT/losses" 2>/dev/null || true
