#!/usr/bin/env bash
# Tests a built wheel as users get it: installs WHEEL into a fresh virtual environment (which
# sees this Python's site-packages for torch, triton and pytest; the wheel itself goes in
# with --no-deps), then, from a directory outside the checkout so that the installed copy is
# what gets imported, runs `python -m moda_cuda info` and the GPU tests (`pytest -m cuda`).
#
#   bash scripts/check_wheel.sh WHEEL [extra pytest args]
#
# When the wheel holds the CUDA extension and a compute capability 9.0 GPU is present, the
# cuda-backend tests must run (MODA_REQUIRE_CUDA_EXT=1): a wheel whose extension does not
# load fails instead of skipping them.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
WHEEL=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
[ -f "$WHEEL" ] || { echo "no such wheel: $1" >&2; exit 2; }
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/moda_wheel_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
# When this Python is itself a virtual environment, --system-site-packages reaches only the
# base interpreter's packages: list this environment's site-packages too (after the new
# venv's own, so the wheel installed there comes first).
"$PY" -c "import site, sys; print('\n'.join(p for p in site.getsitepackages() if p.startswith(sys.prefix)))" \
    > "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_moda_parent_env.pth"
# --force-reinstall: a moda_cuda of the same version visible from the system site-packages
# (e.g. this checkout, installed editable) must not stand in for the wheel.
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$WHEEL"

cd "$WORK"
HAS_EXT=$("$VPY" - "$ROOT" "$WHEEL" <<'PYEOF'
import pathlib, sys, zipfile

import moda_cuda

root, wheel = pathlib.Path(sys.argv[1]).resolve(), sys.argv[2]
where = pathlib.Path(moda_cuda.__file__).resolve()
if root in where.parents or not str(where).startswith(sys.prefix):
    sys.exit(f"moda_cuda is imported from {where}, not from the wheel installed in {sys.prefix}")
print(f"moda_cuda {moda_cuda.__version__} imported from {where.parent}", file=sys.stderr)
has_ext = any(n.startswith("moda_cuda/_C.") for n in zipfile.ZipFile(wheel).namelist())
print(int(has_ext))
PYEOF
)
"$VPY" -m moda_cuda info

REQUIRE=0
if [ "$HAS_EXT" = 1 ] && "$VPY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) else 1)"; then
    REQUIRE=1
fi
echo "wheel has the CUDA extension: $([ "$HAS_EXT" = 1 ] && echo yes || echo no); cuda backend required: $([ $REQUIRE = 1 ] && echo yes || echo no)" >&2
MODA_TEST_INSTALLED=1 MODA_REQUIRE_CUDA_EXT=$REQUIRE \
    "$VPY" -m pytest -q -m cuda -p no:cacheprovider "$ROOT/tests" "$@"
