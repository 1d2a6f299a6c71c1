#!/usr/bin/env bash
# Build, check and time the CUDA forward (--direction fwd, the default) or backward
# (--direction bwd) under several schedules in one GPU run.
#
# Each configuration is a comma-separated list of assignments to FwdConfig
# (csrc/moda_fwd_config.h) or BwdConfig (csrc/moda_bwd_config.h): FIELD=VALUE for both head
# dims, 64.FIELD=VALUE or 128.FIELD=VALUE for one, prefixed fwd: or bwd: to set the other
# direction's struct (the backward's timing includes the forward kernel), or patch:FILE to
# apply a patch (git apply, paths relative to the checkout; bench/patches/ holds diagnostic
# ones); "base" is the committed configuration. Each is a scratch copy of this checkout with
# the assignments applied. All copies are built at once (`setup.py build_ext --inplace`, the
# compiles share the cores); then each is imported through PYTHONPATH, checked
# (validate_fwd.py, and validate_bwd.py for bwd; bf16) and timed: the forward alone with
# bench_moda.py, or forward+backward per kernel with time_backward.py. The Triton kernels are
# timed once beside them (not with --no-triton). --ncu CFG adds the Nsight table, with warp
# stall reasons, of configuration CFG on the paper geometry, and a per-instruction profile of
# its main kernel (or of the kernels --ncu-kernel REGEX names). Logs and JSON per
# configuration under --out; the checkout's own install is not touched.
#
# Usage: bench/sweep_config.sh --out DIR [--direction fwd|bwd] [--configs LIST] [--ncu CFG]
#                              [--ncu-kernel REGEX] [--no-triton]
#   e.g. --configs "base kWarpDepth=true 64.kConsumerWGs=2"
#        --direction bwd --configs "base 128.kOverlapTiles=true,128.kStagesDq=3"
#        --direction bwd --configs "base 64.kKVBuffers=2,fwd:kStripeDepth=false"
#        --configs "base patch:bench/patches/fwd_depth_loads_from_l2.patch"
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="" configs="base" ncu_cfg="" ncu_kernel="" direction=fwd triton=1
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --direction) direction=$2; shift 2 ;;
        --configs) configs=$2; shift 2 ;;
        --ncu) ncu_cfg=$2; shift 2 ;;
        --ncu-kernel) ncu_kernel=$2; shift 2 ;;
        --no-triton) triton=0; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ -n "$out" ] || { echo "usage: $0 --out DIR [--direction fwd|bwd] [--configs LIST] [--ncu CFG] [--ncu-kernel REGEX] [--no-triton]" >&2; exit 2; }
case "$direction" in
    fwd) config_struct=FwdConfig launch_header=moda_fwd_config.h main_kernel=moda_fwd_kernel
         validate=(python3 bench/validate_fwd.py --backend cuda --dtypes bf16)
         time_one=(python3 bench/bench_moda.py --fwd-only --no-baselines --no-check --shapes probe) ;;
    bwd) config_struct=BwdConfig launch_header=moda_bwd_config.h main_kernel=moda_bwd_dkdv_kernel
         validate=(python3 bench/validate_bwd.py --dtypes bf16)
         time_one=(python3 bench/time_backward.py) ;;
    *) echo "--direction must be fwd or bwd, got $direction" >&2; exit 2 ;;
esac
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
n_configs=$(wc -w <<<"$configs")
jobs_each=$(( ($(nproc) + n_configs - 1) / n_configs ))
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

name_of() { local n=${1//./}; n=${n//=/}; n=${n//:/-}; n=${n//\//-}; echo "${n//,/_}"; }
configure() {  # DIR CFG: apply CFG's assignments to the config structs in DIR/csrc/
    local item field value scope struct launch
    [ "$2" = base ] && return 0
    for item in ${2//,/ }; do
        if [ "${item#patch:}" != "$item" ]; then
            git -C "$1" apply "$root/${item#patch:}" || { echo "!! patch ${item#patch:} does not apply" >&2; return 1; }
            continue
        fi
        struct=$config_struct launch="$1/csrc/$launch_header"
        case "$item" in  # fwd:/bwd: name the other direction's struct
            fwd:*) struct=FwdConfig launch="$1/csrc/moda_fwd_config.h"; item=${item#fwd:} ;;
            bwd:*) struct=BwdConfig launch="$1/csrc/moda_bwd_config.h"; item=${item#bwd:} ;;
        esac
        field=${item%%=*} value=${item#*=} scope="/struct $struct</,/};/"
        case "$field" in 64.*|128.*) scope="/struct $struct<${field%%.*}>/,/};/"; field=${field#*.} ;; esac
        grep -q "static constexpr .*\b$field = " "$launch" || { echo "!! no $struct field $field" >&2; return 1; }
        sed -i -E "${scope}{/static constexpr/ s/\b($field = )[^,;]+/\1$value/}" "$launch"
    done
}

for cfg in $configs; do
    work="$scratch/$(name_of "$cfg")"
    mkdir -p "$work"
    cp -r setup.py pyproject.toml MANIFEST.in README.md moda_cuda triton_ref csrc "$work"/
    ln -s ../triton_ref "$work/moda_cuda/triton_ref"  # what the install's package mapping does
    configure "$work" "$cfg" || exit 2
    (cd "$work" && MAX_JOBS=$jobs_each python3 setup.py build_ext --inplace >"$out/$(name_of "$cfg").build.log" 2>&1) &
done
echo "== building $n_configs configurations"
wait

first=$(name_of "${configs%% *}")
if [ $triton = 1 ]; then
    PYTHONPATH="$scratch/$first${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "${time_one[@]}" --backends triton \
        --out "$out/triton" >"$out/triton.bench.log" 2>&1
    grep -E "^B=|moda_cuda\[" "$out/triton.bench.log"
fi

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
    check=("${validate[@]}")  # a configuration setting the forward's struct (fwd:) checks the forward too
    case "$cfg" in *fwd:*) check=(bash -c "python3 bench/validate_fwd.py --backend cuda --dtypes bf16 && ${validate[*]}") ;; esac
    PYTHONPATH=$export_path timeout 200 "${check[@]}" >"$out/$name.validate.log" 2>&1
    tail -n 1 "$out/$name.validate.log"
    PYTHONPATH=$export_path timeout 200 "${time_one[@]}" --backends cuda --out "$out/$name" \
        >"$out/$name.bench.log" 2>&1
    grep -E "^B=|moda_cuda\[" "$out/$name.bench.log"
    if [ "$cfg" = "$ncu_cfg" ]; then
        PYTHONPATH=$export_path timeout 240 python3 bench/profile_ncu.py --stalls --backend cuda \
            --direction "$direction" --out "$out/ncu_$name" >"$out/$name.ncu.log" 2>&1
        tail -n 30 "$out/$name.ncu.log"
        # Per-instruction stall samples of the main kernel (SASS with source lines).
        PYTHONPATH=$export_path timeout 240 ncu --clock-control none --profile-from-start off --set full --import-source yes \
            -k "regex:${ncu_kernel:-$main_kernel}" -c 1 -f -o "$out/ncu_$name/$direction" \
            python3 bench/profile_ncu.py --worker --backend cuda --direction "$direction" \
            >"$out/$name.ncu_source.log" 2>&1 &&
            ncu -i "$out/ncu_$name/$direction.ncu-rep" --page source --csv --print-source sass \
                >"$out/ncu_$name/${direction}_sass.csv" 2>>"$out/$name.ncu_source.log"
        tail -n 3 "$out/$name.ncu_source.log"
    fi
done
