#!/usr/bin/env bash
# Real-size Mixtral layer through `moescope weights` on a GPU machine; prints the time and the 32-layer estimate.
set -euo pipefail
cd "$(dirname "$0")/.."
# no install needed (GPU machines are often offline): run from the source tree
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python3 benchmarks/gpu_reorder.py "$@"
