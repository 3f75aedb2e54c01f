#!/usr/bin/env bash
# Everything the GPU machine is for, in one call (≈ 9.5 min on one H200), results under $OUT:
#   1. train the fidelity LM (background) while the GPU test suite runs (correctness only, so sharing is fine)
#   2. evaluate every policy on the trained model          (fidelity.sh, STAGE=eval)
#   3. kernel benchmark on a quiet GPU                      (kernels.sh, tests skipped: step 1 ran them)
#   4. end-to-end decode benchmark                         (e2e.sh)
# Each step is bounded by `timeout`; a failing step does not stop the others.
#   bash scripts/gpu/run_all.sh        (from the repo root, with OUT set)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=.
if ls .whl/*.whl > /dev/null 2>&1; then  # wheels missing from the GPU image (the entmax package), carried along
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=.:/tmp/site
fi
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[run_all +$(($(date +%s) - t0))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"

STAGE=train TRAIN_BUDGET=${TRAIN_BUDGET:-230} bash scripts/gpu/fidelity.sh > "$OUT/fidelity_train.log" 2>&1 &
train_pid=$!
stamp "GPU tests"
timeout "${TEST_TIMEOUT:-230}" python3 -m pytest -m gpu -v -n 4 -p no:cacheprovider tests/ \
  --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
stamp "GPU tests rc=$?"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 3
grep -E "FAILED|ERROR" "$OUT/gpu_tests.log" | head -n 30
wait "$train_pid"; stamp "training done"; cat "$OUT/fidelity_train.log"

STAGE=eval EVAL_TIMEOUT=${EVAL_TIMEOUT:-95} bash scripts/gpu/fidelity.sh > "$OUT/fidelity_eval.log" 2>&1
stamp "eval done"; tail -n 34 "$OUT/fidelity_eval.log"

SKIP_TESTS=1 timeout 85 bash scripts/gpu/kernels.sh > "$OUT/kernels.log" 2>&1
stamp "kernels rc=$?"; tail -n 30 "$OUT/kernels.log"
timeout 145 bash scripts/gpu/e2e.sh > "$OUT/e2e.log" 2>&1
stamp "e2e rc=$?"; tail -n 30 "$OUT/e2e.log"
stamp "all done"
