#!/usr/bin/env bash
# Build, check and time the CUDA forward under several schedules in one GPU run.
#
# Each configuration "OVERLAP,PINGPONG,STAGES64" (0/1, 0/1, pipeline stages at D=64) is
# built from a scratch copy of this checkout with FwdConfig (csrc/moda_fwd_launch.h) edited,
# installed editable from there, checked with validate_fwd.py (bf16) and timed forward-only
# against the Triton forward with bench_moda.py. The checkout itself is reinstalled at the end.
# Logs and JSON per configuration under --out.
#
# Usage: bench/sweep_fwd_config.sh --out DIR [--configs "0,0,3 0,1,3 1,1,3 1,1,4"]
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="" configs="0,0,3 0,1,3 1,0,3 1,1,3"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --configs) configs=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ -n "$out" ] || { echo "usage: $0 --out DIR [--configs LIST]" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}

install() {  # DIR LOG: editable install of the package in DIR
    (cd "$1" && python3 -m pip install --no-build-isolation --no-deps -e . >"$2" 2>&1)
}
cxx_bool() { [ "$1" = 1 ] && echo true || echo false; }

for cfg in $configs; do
    IFS=, read -r overlap pingpong stages <<<"$cfg"
    name="overlap${overlap}_pingpong${pingpong}_stages${stages}"
    work=$(mktemp -d)
    cp -r setup.py pyproject.toml MANIFEST.in README.md moda_cuda triton_ref csrc "$work"/
    sed -i -E "s/kOverlap = (true|false), kPingPong = (true|false)/kOverlap = $(cxx_bool "$overlap"), kPingPong = $(cxx_bool "$pingpong")/" \
        "$work/csrc/moda_fwd_launch.h"
    sed -i -E "/struct FwdConfig<64>/,/};/ s/kStages = [0-9]+/kStages = $stages/" "$work/csrc/moda_fwd_launch.h"
    echo "== $name"
    if ! install "$work" "$out/$name.build.log"; then
        echo "!! build failed"; tail -5 "$out/$name.build.log"; continue
    fi
    (cd "$root" && timeout 120 python3 bench/validate_fwd.py --backend cuda --dtypes bf16 >"$out/$name.validate.log" 2>&1)
    tail -n 1 "$out/$name.validate.log"
    (cd "$root" && timeout 240 python3 bench/bench_moda.py --backends cuda,triton --fwd-only --no-baselines --no-check \
        --out "$out/$name" >"$out/$name.bench.log" 2>&1)
    grep -E "^B=|moda_cuda\[" "$out/$name.bench.log"
    rm -rf "$work"
done
install "$root" "$out/reinstall.log" || { echo "!! reinstalling the checkout failed"; exit 1; }
