#!/usr/bin/env bash
# Create .venv (once) and install the package with its test/demo extras on a CPU machine.
# torch comes from the local CPU wheel first, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q "triton>=3.6" "numpy<2.4"
python -m pip install -q -e ".[dev]"
