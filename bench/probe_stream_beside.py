"""How fast can a few SMs stream from DRAM, and does that stream slow the forward beside it?

Whether the depth part of the forward can run beside the sequence part on its own SMs (a
depth kernel on N SMs, the sequence kernel on the rest) turns on two numbers this measures:

1. the DRAM rate one SM reaches when it does nothing but stream (bulk copies into a ring of
   shared-memory stages, completed on mbarriers), for N = 1 .. all SMs;
2. the forward without depth rows (L = 0) alone, the stream alone on N SMs, and both at once
   (the stream launched first, on a second stream of normal priority; each of its CTAs takes
   more shared memory than a forward CTA leaves, so none shares an SM). Measured: "both"
   took the sum of the two, so they did not overlap; the forward's depth kernel
   (FwdConfig::kDepthBeside) runs on a stream of the highest priority instead.

    python bench/probe_stream_beside.py --out bench/results/probe_stream_beside
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moda_cuda  # noqa: E402

_CUDA = r"""
#include <cstdint>
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One thread per CTA keeps `stages` bulk copies of `chunk` bytes in flight, chunks taken
// round-robin over the grid. Nothing reads the shared memory: this is the load path alone.
__global__ void __launch_bounds__(32) stream_chunks(const char* src, long long n_chunks, int chunk, int stages) {
    extern __shared__ __align__(128) char ring[];
    __shared__ __align__(8) uint64_t full[16];
    if (threadIdx.x != 0) return;
    for (int s = 0; s < stages; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&full[s])));
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    long long k = 0;
    for (long long i = blockIdx.x; i < n_chunks; i += gridDim.x, ++k) {
        const int s = int(k % stages);
        const uint32_t bar = smem_addr(&full[s]);
        if (k >= stages) {  // the stage's previous copy, completion number k / stages - 1
            const uint32_t parity = uint32_t((k / stages - 1) & 1);
            asm volatile("{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT;\n}"
                         ::"r"(bar), "r"(parity) : "memory");
        }
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(chunk) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(smem_addr(ring + size_t(s) * chunk)), "l"(src + i * chunk), "r"(chunk), "r"(bar)
                     : "memory");
    }
    for (long long j = (k > stages ? k - stages : 0); j < k; ++j) {  // drain
        const uint32_t parity = uint32_t((j / stages) & 1);
        asm volatile("{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT;\n}"
                     ::"r"(smem_addr(&full[j % stages])), "r"(parity) : "memory");
    }
}

void stream(torch::Tensor src, int64_t ctas, int64_t chunk, int64_t stages) {
    TORCH_CHECK(stages >= 1 && stages <= 16 && chunk % 16 == 0 && src.nbytes() % chunk == 0);
    const int smem = int(chunk * stages);
    cudaFuncSetAttribute(stream_chunks, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    stream_chunks<<<int(ctas), 32, smem, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const char*>(src.data_ptr()), (long long)(src.nbytes() / chunk), int(chunk), int(stages));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the JSON")
    ap.add_argument("--gbytes", type=float, default=0.5368709, help="bytes streamed (default: the depth rows at T=4096)")
    args = ap.parse_args()
    ext = load_inline("probe_stream", cpp_sources="void stream(torch::Tensor, int64_t, int64_t, int64_t);",
                      cuda_sources=_CUDA, functions=["stream"], extra_cuda_cflags=["-arch=sm_90a", "-O3"])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    nbytes = int(args.gbytes * 2**30) // (1 << 16) * (1 << 16)
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    result = {"bytes": nbytes, "sms": sms, "alone": [], "beside": []}

    print(f"stream of {nbytes / 1e9:.3f} GB alone, GB/s per SM (ms):")
    for chunk, stages in ((32768, 6), (65536, 3), (16384, 12)):
        for n in (1, 4, 8, 12, 16, 24, 32, 66, sms):
            ms = triton.testing.do_bench(lambda: ext.stream(src, n, chunk, stages), warmup=5, rep=40)
            rate = nbytes / ms / 1e6 / n
            result["alone"].append({"chunk": chunk, "stages": stages, "ctas": n, "ms": ms, "gbs_per_sm": rate})
            print(f"  chunk {chunk // 1024:3d} KB x {stages:2d}  N={n:3d}: {rate:7.1f} ({ms:.3f} ms)")

    shapes = [(4096, 64, 64, 8, 64), (8192, 128, 32, 8, 32)]  # T, D, Hq, Hk, L of the forward targets
    side = torch.cuda.Stream()
    for T, D, Hq, Hk, L in shapes:
        q = torch.randn(1, T, Hq, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, T, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        depth = [torch.randn(1, T, L, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        depth_bytes = 2 * depth[0].nbytes
        part = src.view(torch.uint8)[: depth_bytes // (1 << 16) * (1 << 16)]
        fwd = lambda: moda_cuda.moda_attention(q, k, v, backend="cuda")  # noqa: E731
        fwd_depth = lambda: moda_cuda.moda_attention(q, k, v, *depth, backend="cuda")  # noqa: E731
        t_fwd, t_depth = (triton.testing.do_bench(f, warmup=10, rep=60) for f in (fwd, fwd_depth))
        print(f"T={T} D={D} L={L}: forward without depth {t_fwd:.3f} ms, with depth {t_depth:.3f} ms;"
              f" stream of {part.numel() / 1e9:.3f} GB on N SMs, alone / beside the forward without depth:")
        for n in (4, 8, 12, 16, 24):
            def both():
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    ext.stream(part, n, 32768, 6)
                fwd()
                torch.cuda.current_stream().wait_stream(side)
            t_alone = triton.testing.do_bench(lambda: ext.stream(part, n, 32768, 6), warmup=5, rep=40)
            t_both = triton.testing.do_bench(both, warmup=10, rep=60)
            result["beside"].append({"T": T, "D": D, "L": L, "ctas": n, "fwd_no_depth_ms": t_fwd,
                                     "fwd_depth_ms": t_depth, "stream_ms": t_alone, "both_ms": t_both})
            print(f"  N={n:3d}: stream {t_alone:.3f} ms, both {t_both:.3f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_stream_beside.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
