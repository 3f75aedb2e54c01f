#!/usr/bin/env bash
# GPU: train the fidelity LM (examples/train_entmax_lm.py) then evaluate every policy on it.
# Writes $OUT/fidelity/{entmax_lm.pt,train_log.txt,train_stdout.txt,fidelity.json,fidelity.png,eval_stdout.txt}.
#   TRAIN_BUDGET  training seconds (default 360)       EVAL_TIMEOUT  seconds for the evaluation (default 170)
#   STAGE=train|eval|all                                 (default all)
#   TRAIN_ARGS    extra flags of the training script (default none: the committed recipe)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=.
dir="$OUT/fidelity"
mkdir -p "$dir"
stage=${STAGE:-all}
if [ "$stage" != eval ]; then
  python3 examples/train_entmax_lm.py --time-budget "${TRAIN_BUDGET:-360}" --out-dir "$dir" ${TRAIN_ARGS:-} \
    > "$dir/train_stdout.txt" 2>&1
  echo "[fidelity] train rc=$?"; tail -n 3 "$dir/train_stdout.txt"
fi
if [ "$stage" != train ]; then
  timeout "${EVAL_TIMEOUT:-170}" python3 -m entmaxkv_compile.eval --weights "$dir/entmax_lm.pt" \
    --out-dir "$dir" > "$dir/eval_stdout.txt" 2>&1
  echo "[fidelity] eval rc=$? (124 = cut by the timeout; finished sections are in the JSON)"
  tail -n 32 "$dir/eval_stdout.txt"
fi
