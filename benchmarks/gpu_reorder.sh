#!/usr/bin/env bash
# Real-size Mixtral layer through `moescope weights` on a GPU machine; prints the time and the 32-layer estimate.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e . >/dev/null
python benchmarks/gpu_reorder.py "$@"
