#!/usr/bin/env bash
# Builds a moda_cuda wheel from this checkout and prints its path (the only line on stdout;
# the build's own output goes to stderr).
#
#   bash scripts/build_wheel.sh [--out DIR]      (default DIR: dist/)
#
# The wheel holds the CUDA extension moda_cuda._C when it can be built here (torch with CUDA,
# nvcc, the CUTLASS headers; see setup.py) and is then tagged e.g. 0.1.0+cu130torch2.11;
# otherwise it is the pure-Python 0.1.0. MODA_SKIP_CUDA_BUILD=1, MODA_FORCE_CUDA_BUILD=1,
# TORCH_CUDA_ARCH_LIST and MAX_JOBS apply. Builds against the current environment's torch
# (no build isolation; setup.py checks what it needs itself, so the build-system requirements
# are not checked): a wheel with the extension needs that same torch at run time.
set -euo pipefail
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
OUT=dist
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || { usage >&2; exit 2; }; OUT=$2; shift 2 ;;
        --out=*) OUT=${1#--out=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # the build runs elsewhere

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/moda_wheel.XXXXXX")
STAGE=$(cd "$STAGE" && pwd)
trap 'rm -rf "$STAGE"' EXIT
# Staged files of an earlier build (e.g. a _C from a CUDA build) must not leak into this
# wheel; build/temp* (compiled objects, reused by ninja) is kept.
rm -rf "$ROOT"/build/lib* "$ROOT"/build/bdist*
# The frontend runs from the (empty) staging folder, not from the checkout: `python -m` puts
# the working directory first on sys.path, where the checkout's build/ folder (setuptools'
# output) would be imported as the package `build`.
cd "$STAGE"
if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('build.__main__') else 1)" \
        >/dev/null 2>&1; then
    echo "building the wheel with python -m build" >&2
    "$PY" -m build --wheel --no-isolation --skip-dependency-check --outdir "$STAGE" "$ROOT" >&2
else
    echo "building the wheel with pip wheel (the build package is not installed)" >&2
    "$PY" -m pip wheel -v --no-build-isolation --no-deps --disable-pip-version-check -w "$STAGE" "$ROOT" >&2
fi
shopt -s nullglob
wheels=("$STAGE"/moda_cuda-*.whl)
[ ${#wheels[@]} -eq 1 ] || { echo "expected one moda_cuda wheel, got: ${wheels[*]:-none}" >&2; exit 1; }
mv -f "${wheels[0]}" "$OUT/"
echo "$OUT/$(basename "${wheels[0]}")"
