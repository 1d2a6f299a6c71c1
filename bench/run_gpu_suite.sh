#!/usr/bin/env bash
# One GPU run's worth of checks and measurements, logs and JSON under --out:
#   validate  bench/validate_fwd.py and bench/validate_bwd.py (the compiled kernels against the reference)
#   tests   every cuda-marked test (autotuning off: quick compiles); the two paper-layout
#           cases alone afterwards (each holds ~53 GB of the GPU in its float64 reference)
#   bench   bench_moda.py on the three benchmark shapes (auto and each backend), with the per-kernel breakdown
#   varlen  bench_varlen.py: packed documents against one call per document and FlexAttention
#   host    host_overhead.py: host time per call against SDPA
#   decode  bench_decode.py: decode attention against SDPA without depth and the memory roofline
#   stream  bench_depth_stream.py (32-layer stack, depth stream vs stack-per-layer)
#   lm      the byte-level LM example, MoDA vs baseline (--lm-minutes each), padded windows
#           and packed documents (--pack); profile_lm.py: where a training and a decode step's
#           GPU time goes, MoDA vs baseline; bench_generate.py: generate() tokens/s of both
#   ncu     profile_ncu.py on the paper geometry
#   sweep   bench_sweep.py, one slice (--sweep-slice i/n, default 1/4): not in the default list,
#           a whole sweep takes several calls (merge the slices with bench_sweep.py --merge)
# Usage: bench/run_gpu_suite.sh --out DIR [--only tests,bench,...] [--lm-minutes M] [--sweep-slice i/n]
set -uo pipefail
cd "$(dirname "$0")/.."
out="" only="validate,tests,bench,varlen,host,decode,stream,lm,ncu" lm_minutes=1.5 sweep_slice=1/4
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --lm-minutes) lm_minutes=$2; shift 2 ;;
        --sweep-slice) sweep_slice=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ -n "$out" ] || { echo "usage: $0 --out DIR [--only LIST] [--lm-minutes M] [--sweep-slice i/n]" >&2; exit 2; }
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
# 4 workers, without the paper-layout cases: two of those at once need more than an H100 holds.
want tests && step tests env MODA_TRITON_TUNING=off MODA_REQUIRE_CUDA_EXT=1 python3 -m pytest -q -n 4 \
    -p no:benchmark -m cuda -k "not paper_layout" tests
want tests && step tests_paper_layout env MODA_TRITON_TUNING=off python3 -m pytest -q -p no:benchmark -m cuda \
    -k paper_layout tests
want bench && step bench python3 bench/bench_moda.py --backends auto,cuda,cuda+deterministic,triton --breakdown \
    --out "$out"
want varlen && step varlen python3 bench/bench_varlen.py --out "$out"
want host && step host python3 bench/host_overhead.py --out "$out"
want decode && step decode python3 bench/bench_decode.py --out "$out"
want stream && step stream env MODA_TRITON_TUNING=off python3 bench/bench_depth_stream.py --profile --out "$out"
want lm && step lm torchrun --standalone --nproc_per_node=1 examples/train_lm.py --minutes "$lm_minutes" \
    --out "$out/lm"
want lm && step profile_lm_train python3 bench/profile_lm.py --mode train --out "$out"
want lm && step profile_lm_decode python3 bench/profile_lm.py --mode decode --batch 1 --out "$out"
want lm && step generate python3 bench/bench_generate.py --batches 1,8 --tokens 512 --out "$out"
want lm && step lm_pack torchrun --standalone --nproc_per_node=1 examples/train_lm.py --pack \
    --minutes "$lm_minutes" --out "$out/lm_pack"
want sweep && step sweep python3 bench/bench_sweep.py --slice "$sweep_slice" --out "$out"
want ncu && step ncu python3 bench/profile_ncu.py --stalls --backend triton --shape 1,16384,64,8,64,64 --out "$out"
exit $status
