"""Forward+backward time of MoDA backends with per-kernel GPU times, on the three benchmark shapes and the
paper geometry without depth (whose difference is what the depth part costs each kernel).

A quick look at where the backward's time goes, without bench_moda.py's baselines and
checks: ``triton.testing.do_bench`` (100 ms warm-up, 300 ms of repetitions, mean) for the
step, per-kernel times from torch.profiler over a few steps (bench_moda.kernel_breakdown).
README tables come from bench_moda.py (medians); this is for the kernel breakdown.

    python bench/time_backward.py --out DIR                  # cuda and triton backends
    python bench/time_backward.py --backends cuda --out DIR
    python bench/time_backward.py --backends auto,cuda,triton --seqlens 4096 --out DIR
    python bench/time_backward.py --backends cuda,cuda+deterministic --out DIR
    python bench/time_backward.py --shape 1,2048,64,8,64,64 --shape 1,8192,64,8,64,64 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import fwd_bwd_step  # noqa: E402
from bench_moda import Shape, kernel_breakdown, make_inputs  # noqa: E402
from profile_ncu import parse_shape  # noqa: E402

import moda_cuda  # noqa: E402

SHAPES = [Shape(1, 16384, 64, 8, 64, 64), Shape(1, 16384, 64, 8, 64, 0), Shape(1, 8192, 32, 8, 128, 32),
          Shape(1, 4096, 64, 8, 64, 64)]


def _parse_shape(text: str) -> Shape:
    return Shape(**parse_shape(text))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for time_backward.json")
    p.add_argument("--backends", default="cuda,triton",
                   help="comma-separated moda_cuda backends (auto too); '+deterministic' asks for "
                        "bitwise-repeatable gradients, e.g. cuda+deterministic")
    p.add_argument("--seqlens", default="", help="only the shapes of these T (comma-separated; default all)")
    p.add_argument("--shape", action="append", type=_parse_shape, default=[],
                   help="B,T,Hq,Hk,D,L instead of the built-in shapes (repeatable)")
    a = p.parse_args()
    seqlens = {int(t) for t in a.seqlens.split(",") if t}
    shapes = a.shape or SHAPES
    rows = []
    for s in shapes:
        if seqlens and s.T not in seqlens:
            continue
        inputs = make_inputs(s)
        grad_out = torch.randn(s.B, s.T, s.Hq, s.D, device="cuda", dtype=torch.bfloat16)
        for backend in a.backends.split(","):
            def fn(*x, _b=backend.split("+")[0], _det=backend.endswith("+deterministic")):
                return moda_cuda.moda_attention(*x, backend=_b, deterministic=_det)

            ms = triton.testing.do_bench(fwd_bwd_step(fn, inputs, grad_out), warmup=100, rep=300)
            kernels = kernel_breakdown(fn, inputs, grad_out)
            rows.append(dict(shape=[s.B, s.T, s.Hq, s.Hk, s.D, s.L], backend=backend, fwd_bwd_ms=ms, kernels=kernels))
            top = "  ".join(f"{t:.3f} {name[:28]}" for name, t in list(kernels.items())[:4])
            print(f"{s.label()} {backend:20s} fwd+bwd {ms:8.3f} ms  {top}", flush=True)
        del inputs, grad_out
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "time_backward.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
