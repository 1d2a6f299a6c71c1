#!/usr/bin/env bash
# Build, check and time the CUDA forward under several schedules in one GPU run.
#
# Each configuration "OVERLAP,PINGPONG,STAGES64[,STAGES128[,WARPDEPTH]]" (0/1, 0/1, pipeline
# stages at D=64 and at D=128, 0/1; the committed values where left out or "-"; OVERLAP and
# PINGPONG otherwise set both head dims) is a
# scratch copy of this checkout with FwdConfig (csrc/moda_fwd_launch.h) edited. All copies are
# built at once (`setup.py build_ext --inplace`, the compiles share the cores); then each is
# imported through PYTHONPATH, checked with validate_fwd.py (bf16) and timed forward-only with
# bench_moda.py. The Triton forward is timed once beside them. --ncu CFG adds the Nsight
# table, with warp stall reasons, of configuration CFG on the paper geometry.
# Logs and JSON per configuration under --out; the checkout's own install is not touched.
#
# Usage: bench/sweep_fwd_config.sh --out DIR [--configs "-,-,-,-,0 -,-,-,-,1"] [--ncu CFG]
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="" configs="0,0,3 0,1,3 1,0,3 1,1,3" ncu_cfg=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --configs) configs=$2; shift 2 ;;
        --ncu) ncu_cfg=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ -n "$out" ] || { echo "usage: $0 --out DIR [--configs LIST] [--ncu CFG]" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
n_configs=$(wc -w <<<"$configs")
jobs_each=$(( ($(nproc) + n_configs - 1) / n_configs ))
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

cxx_bool() { [ "$1" = 1 ] && echo true || echo false; }
name_of() {
    IFS=, read -r o p s s128 w <<<"$1"
    local name="overlap${o}_pingpong${p}_stages${s}${s128:+_stages128_$s128}${w:+_warpdepth$w}"
    echo "${name//-/x}"
}

for cfg in $configs; do
    IFS=, read -r overlap pingpong stages stages128 warpdepth <<<"$cfg"
    work="$scratch/$(name_of "$cfg")"
    mkdir -p "$work"
    cp -r setup.py pyproject.toml MANIFEST.in README.md moda_cuda triton_ref csrc "$work"/
    [ "$overlap" != - ] && [ "$pingpong" != - ] &&
        sed -i -E "s/kOverlap = (true|false), kPingPong = (true|false)/kOverlap = $(cxx_bool "$overlap"), kPingPong = $(cxx_bool "$pingpong")/" \
            "$work/csrc/moda_fwd_launch.h"
    [ "$stages" != - ] &&
        sed -i -E "/struct FwdConfig<64>/,/};/ s/kStages = [0-9]+/kStages = $stages/" "$work/csrc/moda_fwd_launch.h"
    [ -n "$stages128" ] && [ "$stages128" != - ] &&
        sed -i -E "/struct FwdConfig<128>/,/};/ s/kStages = [0-9]+/kStages = $stages128/" "$work/csrc/moda_fwd_launch.h"
    [ -n "$warpdepth" ] && [ "$warpdepth" != - ] &&
        sed -i -E "s/kWarpDepth = (true|false)/kWarpDepth = $(cxx_bool "$warpdepth")/" "$work/csrc/moda_fwd_launch.h"
    (cd "$work" && MAX_JOBS=$jobs_each python3 setup.py build_ext --inplace >"$out/$(name_of "$cfg").build.log" 2>&1) &
done
echo "== building $n_configs configurations"
wait

PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" python3 bench/bench_moda.py --backends triton --fwd-only --no-baselines --no-check --shapes probe --out "$out/triton" \
    >"$out/triton.bench.log" 2>&1
grep -E "^B=|moda_cuda\[" "$out/triton.bench.log"

for cfg in $configs; do
    name=$(name_of "$cfg")
    work="$scratch/$name"
    echo "== $name"
    if ! ls "$work"/moda_cuda/_C*.so >/dev/null 2>&1; then
        echo "!! build failed"; tail -5 "$out/$name.build.log"; continue
    fi
    export_path="$work${PYTHONPATH:+:$PYTHONPATH}"
    if command -v cuobjdump >/dev/null; then  # the kernels' SASS, for reading the schedule
        cuobjdump -sass "$work"/moda_cuda/_C*.so | gzip >"$out/$name.sass.gz"
    fi
    (cd / && PYTHONPATH=$export_path python3 -c "import torch, moda_cuda._C as c; print('extension:', c.__file__)")
    PYTHONPATH=$export_path timeout 150 python3 bench/validate_fwd.py --backend cuda --dtypes bf16 \
        >"$out/$name.validate.log" 2>&1
    tail -n 1 "$out/$name.validate.log"
    PYTHONPATH=$export_path timeout 200 python3 bench/bench_moda.py --backends cuda --fwd-only --no-baselines \
        --no-check --shapes probe --out "$out/$name" >"$out/$name.bench.log" 2>&1
    grep -E "^B=|moda_cuda\[" "$out/$name.bench.log"
    if [ "$cfg" = "$ncu_cfg" ]; then
        PYTHONPATH=$export_path timeout 240 python3 bench/profile_ncu.py --stalls --backend cuda --direction fwd \
            --out "$out/ncu_$name" >"$out/$name.ncu.log" 2>&1
        tail -n 30 "$out/$name.ncu.log"
        # Per-instruction stall samples of the forward kernel (SASS with source lines).
        PYTHONPATH=$export_path timeout 240 ncu --clock-control none --profile-from-start off --set full --import-source yes \
            -k regex:moda_fwd_kernel -c 1 -f -o "$out/ncu_$name/fwd" \
            python3 bench/profile_ncu.py --worker --backend cuda --direction fwd >"$out/$name.ncu_source.log" 2>&1 &&
            ncu -i "$out/ncu_$name/fwd.ncu-rep" --page source --csv --print-source sass \
                >"$out/ncu_$name/fwd_sass.csv" 2>>"$out/$name.ncu_source.log"
        tail -n 3 "$out/$name.ncu_source.log"
    fi
done
