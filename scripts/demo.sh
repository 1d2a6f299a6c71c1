#!/usr/bin/env bash
# Sets up the environment and runs the demo: a MoDA problem on the best backend present,
# checked against the float64 reference, with timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m moda_cuda demo "$@"
