#!/usr/bin/env bash
# Reliability GPU rows (docs/RELIABILITY.md), three jobs side by side, each under its own `timeout`:
#   1. compiles vs decode length: 2,048 steps per policy, Dynamo + Triton counts (tests/gpu/test_gpu_recompiles.py)
#   2. the gpu-marked bad-input and state tests
#   3. a 60-variant fuzz run (CPU tensors: the pass on the GPU image's torch)
# Run from the repo root on the GPU machine (`bash scripts/gpu/reliability.sh`, OUT set); writes
# $OUT/reliability/; <= 190 s wall. A failing job does not stop the others.
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
OUT_DIR="${OUT:-/tmp}/reliability"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
t0=$(date +%s)

timeout 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider --durations=0 tests/gpu/test_gpu_recompiles.py \
  --junitxml="$OUT_DIR/recompiles.xml" > "$OUT_DIR/recompiles.log" 2>&1 &
recompiles=$!
timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_bad_inputs.py tests/test_state.py \
  --junitxml="$OUT_DIR/gpu_tests.xml" > "$OUT_DIR/gpu_tests.log" 2>&1 &
gpu_tests=$!
ENTMAXKV_FUZZ_EXAMPLES=60 timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_fuzz_zoo.py \
  --junitxml="$OUT_DIR/fuzz.xml" > "$OUT_DIR/fuzz.log" 2>&1 &
fuzz=$!

wait "$recompiles"; rc=$?
echo "recompiles (2,048 steps x certified/topk/adaptive/dense): rc=$rc ($(tail -n 1 "$OUT_DIR/recompiles.log"))"
grep -E "call .*test_gpu_compiles" "$OUT_DIR/recompiles.log"
grep -E "^E .*(grew|RecompileError|not close)" "$OUT_DIR/recompiles.log" | head -n 5
wait "$gpu_tests"; rc=$?
echo "gpu tests: rc=$rc ($(tail -n 1 "$OUT_DIR/gpu_tests.log"))"
wait "$fuzz"; rc=$?
echo "fuzz (60 variants): rc=$rc ($(grep -E 'variants generated' "$OUT_DIR/fuzz.log" || tail -n 1 "$OUT_DIR/fuzz.log"))"
echo "reliability wall: $(($(date +%s) - t0)) s"
