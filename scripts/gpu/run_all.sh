#!/usr/bin/env bash
# The GPU checks in one call (≈ 6 min on one H200), results under $OUT:
#   1. the whole gpu-marked test suite (correctness; 3 workers share the GPU)
#   2. reliability rows: the 2,048-step compile-count test, GPU bad-input/state tests, a 60-variant fuzz run
#   3. the kernel benchmark on a quiet GPU (kernels.sh; its tests are skipped: step 1 ran them)
# The end-to-end benchmark (scripts/gpu/e2e.sh, ≈ 5 min) and the fidelity LM (scripts/gpu/fidelity.sh:
# training + evaluation, ≈ 5 min) are calls of their own: together they would exceed one 10-minute call.
# Each step is bounded by `timeout`; a failing step does not stop the others.
#   OUT=/tmp/out bash scripts/gpu/run_all.sh        (from the repo root)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[run_all +$(($(date +%s) - t0))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"

stamp "GPU tests"
timeout 240 python3 -m pytest -m gpu -q -n 3 -p no:cacheprovider tests/ --ignore=tests/gpu/test_gpu_recompiles.py \
  --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
stamp "GPU tests rc=$?"; grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -n 1
grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -n 30

timeout 200 bash scripts/gpu/reliability.sh > "$OUT/reliability.log" 2>&1
stamp "reliability rc=$?"; tail -n 8 "$OUT/reliability.log"

SKIP_TESTS=1 timeout 90 bash scripts/gpu/kernels.sh > "$OUT/kernels.log" 2>&1
stamp "kernels rc=$?"; tail -n 30 "$OUT/kernels.log"
stamp "all done"
