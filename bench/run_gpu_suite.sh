#!/usr/bin/env bash
# One GPU run's worth of checks and measurements, logs and JSON under --out:
#   validate  bench/validate_fwd.py and bench/validate_bwd.py (the compiled kernels against the reference)
#   tests   the cuda-marked tests and the kernel tests (autotuning off: quick compiles)
#   bench   bench_moda.py on the issue shapes, with the per-kernel breakdown
#   stream  bench_depth_stream.py (32-layer stack, depth stream vs stack-per-layer)
#   lm      the byte-level LM example, MoDA vs baseline (--lm-minutes each)
#   ncu     profile_ncu.py on the paper geometry
# Usage: bench/run_gpu_suite.sh --out DIR [--only tests,bench,...] [--lm-minutes M]
set -uo pipefail
cd "$(dirname "$0")/.."
out="" only="validate,tests,bench,stream,lm,ncu" lm_minutes=1.5
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --lm-minutes) lm_minutes=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ -n "$out" ] || { echo "usage: $0 --out DIR [--only LIST] [--lm-minutes M]" >&2; exit 2; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1 || { tail "$out/install.log"; exit 1; }
want() { case ",$only," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
status=0
step() {  # name, command...: run, log, remember failures, print the tail
    local name=$1; shift
    echo "== $name: $*"
    "$@" >"$out/$name.log" 2>&1 || { echo "!! $name failed (rc=$?)"; status=1; }
    tail -n 15 "$out/$name.log"
}
want validate && step validate_fwd python3 bench/validate_fwd.py --backend cuda
want validate && step validate_bwd python3 bench/validate_bwd.py
# 4 workers: the paper-layout test alone holds ~53 GB of the GPU; 12 ran out of memory.
want tests && step tests env MODA_TRITON_TUNING=off python3 -m pytest -q -n 4 -p no:benchmark \
    tests/test_cuda.py tests/test_triton_kernels.py tests/test_op.py tests/test_cli.py
want bench && step bench python3 bench/bench_moda.py --breakdown --out "$out"
want stream && step stream env MODA_TRITON_TUNING=off python3 bench/bench_depth_stream.py --profile --out "$out"
want lm && step lm torchrun --standalone --nproc_per_node=1 examples/train_lm.py --minutes "$lm_minutes" \
    --out "$out/lm"
want ncu && step ncu python3 bench/profile_ncu.py --stalls --backend triton --shape 1,16384,64,8,64,64 --out "$out"
exit $status
