#!/usr/bin/env bash
# The Shakespeare experiments of docs/results/shakespeare.md, one command each. Run them all, or
# some by name: scripts/reproduce_shakespeare.sh xl256 compressive
# All runs use bf16 autocast (PRECISION=fp32 to change). Each run directory resumes if interrupted;
# rerunning a finished one loads it, evaluates its test split again and prints its table. A run
# that fails is said (its log: $OUT/NAME.log), the others go on, and the script then exits 1; a
# run interrupted (Ctrl-C, SIGTERM: saved, exit 130 or 143) stops them all, with its exit code.
# With JOBS=2 (the default on 2+ cores) two workers of one thread each take the runs in turn (the
# main comparison first), which keeps two cores busier than one worker of two threads.
set -euo pipefail
self=$(realpath "$0")  # (for --help, after the cd)
cd "$(dirname "$0")/.."
STILL=${STILL:-.venv/bin/still}
OUT=${OUT:-runs/shakespeare}
PRECISION=${PRECISION:-bf16}
JOBS=${JOBS:-$(( $(nproc) >= 2 ? 2 : 1 ))}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

declare -A RUNS=(
  # the main comparison: reference preset, the same budget (2000 steps x 16 x 128 characters)
  [transformer]="--preset reference --mem-len 0 --c-mem-len 0"
  [xl256]="--preset reference --mem-len 256 --c-mem-len 0"
  [compressive]="--preset reference"
  # compression functions (ablation preset, attention-reconstruction loss where f_c has weights)
  [f-conv]="--preset ablation --compression conv"
  [f-dilated]="--preset ablation --compression dilated"
  [f-max]="--preset ablation --compression max"
  [f-mean]="--preset ablation --compression mean"
  [f-most_used]="--preset ablation --compression most_used"
  # compression losses (ablation preset, 1-D convolution); f-conv is also loss-attention
  [loss-autoencoding]="--preset ablation --compression-loss autoencoding"
  [loss-none]="--preset ablation --compression-loss none"
  # the ablation preset's reference: XL with the same attention span as 64 + 64
  [ablation-xl128]="--preset ablation --mem-len 128 --c-mem-len 0"
  # precision check: f-conv again in fp32 (the runs above use $PRECISION, bf16 by default)
  [f-conv-fp32]="--preset ablation --compression conv --precision fp32"
  # the same check at the reference preset: the main comparison's compressive run, in fp32
  [compressive-fp32]="--preset reference --precision fp32"
)
MAIN=(compressive xl256 transformer)
ABLATION=(f-conv f-dilated f-max f-mean f-most_used loss-autoencoding loss-none ablation-xl128 f-conv-fp32 compressive-fp32)

run() {  # run NAME [extra options]: train, then evaluate the test split by position
  local name=$1; shift
  echo "== $name: still lm train --precision $PRECISION ${RUNS[$name]} $* --out $OUT/$name"
  # shellcheck disable=SC2086
  # (each failure returned explicitly: a worker calls run where `set -e` does not apply)
  "$STILL" lm train --precision "$PRECISION" ${RUNS[$name]} "$@" --out "$OUT/$name" >> "$OUT/$name.log" 2>&1 || return
  "$STILL" lm eval "$OUT/$name" --split test "$@" >> "$OUT/$name.log" 2>&1 || return
  # the summary, in one write (two workers share the terminal): the run's table (validation and test
  # bits per character after training), then `lm eval`'s line (its loss by position: eval-test.md)
  printf '%s\n' "== $name: done" "$(tail -n +3 "$OUT/$name/results.md")" "$(head -n 1 "$OUT/$name/eval-test.md")"
}

if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # the header above, without its marks
  sed -n '2,/^set /p' "$self" | sed '$d; s/^# \{0,1\}//'
  echo "runs: ${MAIN[*]} ${ABLATION[*]}"
  exit 0
fi
for name in "$@"; do  # (before anything is made under $OUT)
  [ -n "${RUNS[$name]+x}" ] || { echo "unknown run $name; one of: ${MAIN[*]} ${ABLATION[*]}" >&2; exit 2; }
done
mkdir -p "$OUT"
: > "$OUT/.failed"
rm -f "$OUT/.stopped"
# a run's exit code: 0 done; 128 or more, interrupted (still saved it and exited 130 or 143): every
# run stops, as asked; else failed: said and listed, and the others go on (one failure ended its
# worker, unsaid)
outcome() {
  [ "$2" -eq 0 ] && return 0
  if [ "$2" -ge 128 ]; then echo "== $1: interrupted" >&2; echo "$2" > "$OUT/.stopped"; return "$2"; fi
  echo "== $1: failed (see $OUT/$1.log)" >&2; echo "$1" >> "$OUT/.failed"
}
claim() { mkdir "$OUT/.claims/$1" 2>/dev/null; }  # atomic: one worker takes each run
worker() {
  for name in "${MAIN[@]}" "${ABLATION[@]}"; do
    [ -e "$OUT/.stopped" ] && return 0
    if claim "$name"; then rc=0; run "$name" "$@" || rc=$?; outcome "$name" "$rc" || return 0; fi
  done
}
if [ $# -gt 0 ]; then
  for name in "$@"; do rc=0; run "$name" || rc=$?; outcome "$name" "$rc" || exit "$rc"; done
else
  rm -rf "$OUT/.claims" && mkdir -p "$OUT/.claims"
  for _ in $(seq "$JOBS"); do worker $([ "$JOBS" -ge 2 ] && echo --threads 1) & done
  wait
  if [ -e "$OUT/.stopped" ]; then exit "$(cat "$OUT/.stopped")"; fi
fi
compare() { local out=$1; shift; local runs=(); for r in "$@"; do [ -f "$OUT/$r/results.json" ] && runs+=("$OUT/$r"); done
            if [ ${#runs[@]} -gt 0 ]; then "$STILL" lm compare "${runs[@]}" --out "$OUT/$out"; fi; }
compare main transformer xl256 compressive
compare functions f-conv f-dilated f-max f-mean f-most_used ablation-xl128
compare losses f-conv loss-autoencoding loss-none
compare precision f-conv f-conv-fp32
compare precision-reference compressive compressive-fp32
if [ -s "$OUT/.failed" ]; then echo "failed: $(sort "$OUT/.failed" | tr '\n' ' ')(their logs: $OUT/NAME.log)" >&2; exit 1; fi
