#!/usr/bin/env bash
# Reliability GPU rows (docs/RELIABILITY.md): the gpu-marked bad-input and state tests, then a short fuzz
# run. Run from the repo root on the GPU machine; writes $OUT/reliability/; <= 90 s wall.
set -u
export PYTHONPATH=.
OUT_DIR="${OUT:-/tmp}/reliability"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"

timeout 60 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_bad_inputs.py tests/test_state.py \
  --junitxml="$OUT_DIR/gpu_tests.xml" >"$OUT_DIR/gpu_tests.log" 2>&1
echo "gpu tests: rc=$? ($(tail -n 1 "$OUT_DIR/gpu_tests.log"))"

# the fuzz zoo on the GPU machine's torch (CPU tensors; checks the pass on that torch version)
ENTMAXKV_FUZZ_EXAMPLES=60 timeout 25 "$PY" -m pytest -q -p no:cacheprovider tests/test_fuzz_zoo.py \
  --junitxml="$OUT_DIR/fuzz.xml" >"$OUT_DIR/fuzz.log" 2>&1
echo "fuzz (60 variants): rc=$? ($(grep -E 'variants generated' "$OUT_DIR/fuzz.log" || tail -n 1 "$OUT_DIR/fuzz.log"))"
