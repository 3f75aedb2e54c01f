#!/usr/bin/env bash
# Set up, then lint and run the CPU test suite (GPU-marked tests are deselected; run them with
# `pytest -m gpu` on a CUDA machine, see README).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -m "not gpu" -q "$@"
