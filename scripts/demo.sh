#!/usr/bin/env bash
# Set up, then run the demo: a small entmax decoder compiled with backend="entmaxkv", checked against eager.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
python examples/demo.py "$@"
