#!/usr/bin/env bash
# Sets up the environment and runs the test suite. On a machine without a GPU the Triton
# kernels run in Triton's interpreter and the tests marked `cuda` are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
