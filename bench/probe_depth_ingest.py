"""How fast does one SM take in the forward's depth rows, by TMA boxes or by cp.async?

The forward loads a CTA's depth rows as TMA boxes of 128 rows (16 KB per 64 head-dim
columns) into its ring of shared-memory stages. probe_stream_beside.py found that one SM
streaming contiguous bulk copies reaches about 65 GB/s with 16 KB copies, 130 with 32 KB
and 181 with 64 KB, whatever the bytes in flight: the copy engine seems to spend a fixed
time on each copy. If the depth boxes are held to that rate too, a CTA's depth rows (393 KB
at T=4096, D=64, L=64) take about 8 us to arrive however early they are asked for.

This probe streams exactly the forward's depth rows (each CTA one kv head and a block of
positions, as the forward's CTAs read them) with nothing computed, by:
  tma16    one thread, TMA boxes of 128 rows (the forward's), `stages` stages;
  tma32    one thread, boxes of 256 rows (twice the positions), half the stages;
  tma48    boxes of 384 rows, a third of the stages (where the positions divide);
  cpN      N threads (32, 96, 128) issuing 16-byte cp.async into the same stages, completed
           on the same kind of mbarrier (cp.async.mbarrier.arrive.noinc).
And, for a depth kernel that would run beside the sequence kernel and take whole positions:
  headsH   one thread, one TMA box per tensor (and 64 head-dim columns) holding H kv heads of
           one position, rows in (head, slot) order: depth as [D, L, Hk, T, B], the slot and
           head strides swapped, so that each head's L rows land contiguous and swizzled as a
           wgmma or ldmatrix operand wants them (H = Hk: the position's L * Hk rows, which are
           contiguous in memory). Items are (position, group of H heads), CTAs take them
           round-robin; a stage holds one tensor's box, as many stages as fit in 200 KB.
  headsHxW the same from W producer threads (lane 0 of warps 0 .. W-1), each with its own
           share of the stages: whether the copy engine takes one box at a time per SM or
           per issuing thread.
  ...spin  (tma16spin, heads2spin, heads8spin, heads2x4spin) the same with waits that spin on
           mbarrier.test_wait instead of try_wait, which may suspend the waiting thread: whether
           the time per box is the copy engine's or the wake-up of a suspended issuer.
It prints GB/s per SM for 1 .. all SMs.

    python bench/probe_depth_ingest.py --out bench/results/probe_depth_ingest
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from torch.utils.cpp_extension import load_inline

CSRC = Path(__file__).resolve().parents[1] / "csrc"

_CUDA = r"""
#include <cstdint>
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include "moda_tma_maps.h"

struct Probe {
    CUtensorMap map_k, map_v;      // depth as [D, Hk, L, T, B], box [64, 1, Lb, rows / Lb, 1]
    const uint16_t* k;             // [T, L, Hk, D] contiguous (B = 1)
    const uint16_t* v;
    int T, L, Hk, D, Lb, rows, positions_per_item, n_items, stages;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// kSpin = false: try_wait, which may suspend the thread until the phase completes (how the
// pipelines wait); true: test_wait in a loop, which never suspends it.
template <bool kSpin = false>
__device__ __forceinline__ void wait_parity(uint32_t bar, uint32_t parity) {
    if constexpr (kSpin) {
        asm volatile("{\n.reg .pred p;\nSPIN:\nmbarrier.test_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra SPIN;\n}"
                     ::"r"(bar), "r"(parity) : "memory");
    } else {
        asm volatile("{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT;\n}"
                     ::"r"(bar), "r"(parity) : "memory");
    }
}

// Tile k of this CTA: item (hk slowest, as the forward's grid), first position s0 of the tile.
__device__ __forceinline__ bool tile_of(Probe const& p, long long k, int& hk, int& s0) {
    const int tiles_per_item = p.positions_per_item / (p.rows / p.Lb);
    const long long item = blockIdx.x + (k / tiles_per_item) * gridDim.x;
    if (item >= p.n_items) return false;
    const int blocks_per_head = (p.T + p.positions_per_item - 1) / p.positions_per_item;
    hk = int(item / blocks_per_head);
    s0 = int(item % blocks_per_head) * p.positions_per_item + int(k % tiles_per_item) * (p.rows / p.Lb);
    return true;
}

// kThreads == 0: TMA from thread 0. Otherwise kThreads threads issue cp.async.
template <int kThreads, int kD, bool kSpin = false>
__global__ void __launch_bounds__(128) ingest(__grid_constant__ const Probe p) {
    extern __shared__ __align__(1024) char ring[];
    __shared__ __align__(8) uint64_t full[16];
    constexpr bool kTma = kThreads == 0;
    const int tid = threadIdx.x;
    if (kTma ? tid != 0 : tid >= kThreads) return;
    const int stage_bytes = 2 * p.rows * p.D * 2;
    if (tid == 0) {
        for (int s = 0; s < p.stages; ++s)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(&full[s])), "r"(kTma ? 1 : kThreads));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if constexpr (!kTma) asm volatile("bar.sync 1, %0;" ::"r"(kThreads) : "memory");
    long long k = 0;
    int hk, s0;
    for (; tile_of(p, k, hk, s0); ++k) {
        const int s = int(k % p.stages);
        const uint32_t bar = smem_addr(&full[s]);
        if (k >= p.stages) wait_parity<kSpin>(bar, uint32_t((k / p.stages - 1) & 1));
        char* stage = ring + size_t(s) * stage_bytes;
        if constexpr (kTma) {
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(stage_bytes) : "memory");
            for (int t = 0; t < 2; ++t) {
                const CUtensorMap* map = t == 0 ? &p.map_k : &p.map_v;
                for (int j = 0; j < p.D / 64; ++j) {
                    char* dst = stage + (t * p.D / 64 + j) * p.rows * 128;
                    asm volatile(
                        "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes"
                        " [%0], [%1, {%3, %4, %5, %6, %7}], [%2];"
                        ::"r"(smem_addr(dst)), "l"(map), "r"(bar), "r"(j * 64), "r"(hk), "r"(0), "r"(s0), "r"(0)
                        : "memory");
                }
            }
        } else {
            // Thread i copies 16-byte chunk i % (D / 8) of rows i / (D / 8), + kThreads / (D / 8), ...
            // (shifts and adds only: the issue rate must not be the limit).
            constexpr int kChunksPerRow = kD / 8, kRowStep = kThreads / kChunksPerRow;
            const int ch = tid % kChunksPerRow;
            const int lb_shift = 31 - __clz(p.Lb);
            for (int t = 0; t < 2; ++t) {
                const uint16_t* base = (t == 0 ? p.k : p.v) + hk * kD + ch * 8;
                const uint32_t dst0 = smem_addr(stage) + t * p.rows * kD * 2 + ch * 16;
#pragma unroll 4
                for (int row = tid / kChunksPerRow; row < p.rows; row += kRowStep) {
                    const int pos = s0 + (row >> lb_shift), slot = row & (p.Lb - 1);
                    const bool ok = pos < p.T && slot < p.L;
                    const uint16_t* src = base + (int64_t(ok ? pos : 0) * p.L + (ok ? slot : 0)) * (p.Hk * kD);
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst0 + row * kD * 2), "l"(src),
                                 "r"(ok ? 16 : 0) : "memory");
                }
            }
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
        }
    }
    for (long long j = (k > p.stages ? k - p.stages : 0); j < k; ++j)  // drain
        wait_parity<kSpin>(smem_addr(&full[j % p.stages]), uint32_t((j / p.stages) & 1));
}

// The headsH method: item i is position i / (Hk / Hb), kv heads [h0, h0 + Hb).
struct HeadsProbe {
    CUtensorMap map_k, map_v;  // depth as [D, L, Hk, T, B], box [64, L, Hb, 1, 1]
    int L, Hk, Hb, n_items, stages, box_bytes;
    int issuers;  // producer threads, one per warp, each with its own stages
};

template <int kD, bool kSpin>
__global__ void __launch_bounds__(128) ingest_heads(__grid_constant__ const HeadsProbe p) {
    extern __shared__ __align__(1024) char ring[];
    __shared__ __align__(8) uint64_t full[16];
    constexpr int kHalves = kD / 64;
    const int stage_bytes = kHalves * p.box_bytes, groups = p.Hk / p.Hb;  // a stage: one tensor of an item
    if (threadIdx.x == 0) {
        for (int s = 0; s < p.stages; ++s)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&full[s])));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    // Issuer w (lane 0 of warp w < p.issuers) owns stages [w * per, (w + 1) * per) and the
    // stage uses u = k * issuers + w: item u / 2, its K (u even) or V rows.
    const int w = threadIdx.x / 32, per = p.stages / p.issuers;
    if (threadIdx.x % 32 != 0 || w >= p.issuers) return;
    long long k = 0;
    for (;; ++k) {
        const long long u = k * p.issuers + w;
        const long long item = blockIdx.x + (u / 2) * gridDim.x;
        if (item >= p.n_items) break;
        const int t = int(item / groups), h0 = int(item % groups) * p.Hb;
        const int s = w * per + int(k % per);
        const uint32_t bar = smem_addr(&full[s]);
        if (k >= per) wait_parity<kSpin>(bar, uint32_t((k / per - 1) & 1));
        char* stage = ring + size_t(s) * stage_bytes;
        const CUtensorMap* map = (u & 1) == 0 ? &p.map_k : &p.map_v;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(stage_bytes) : "memory");
        for (int j = 0; j < kHalves; ++j) {
            asm volatile(
                "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes"
                " [%0], [%1, {%3, %4, %5, %6, %7}], [%2];"
                ::"r"(smem_addr(stage + j * p.box_bytes)), "l"(map), "r"(bar), "r"(j * 64), "r"(0), "r"(h0), "r"(t),
                  "r"(0)
                : "memory");
        }
    }
    for (long long j = (k > per ? k - per : 0); j < k; ++j)  // drain
        wait_parity<kSpin>(smem_addr(&full[w * per + j % per]), uint32_t((j / per) & 1));
}

// One of the probe's kernels on `ctas` CTAs of 128 threads with `smem` bytes of stages (one
// CTA per SM, as the forward), on the current stream.
template <class Params>
void launch_probe(void (*kernel)(Params), Params const& p, int ctas, int smem) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<ctas, 128, smem, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_heads(torch::Tensor dk, torch::Tensor dv, int64_t heads_per_box, int64_t stages, int64_t n_items,
               int64_t ctas, int64_t issuers, bool spin) {
    TORCH_CHECK(dk.is_contiguous() && dv.is_contiguous() && dk.dim() == 5 && dk.size(0) == 1);
    HeadsProbe p{};
    const int T = int(dk.size(1)), D = int(dk.size(4));
    p.L = int(dk.size(2)); p.Hk = int(dk.size(3)); p.Hb = int(heads_per_box);
    TORCH_CHECK(p.Hk % p.Hb == 0 && p.L <= 256, "heads per box must divide Hk; L <= 256 (a box dimension)");
    p.n_items = int(n_items); p.stages = int(stages); p.issuers = int(issuers);
    TORCH_CHECK(issuers >= 1 && issuers <= 4 && stages % issuers == 0, "1 to 4 issuers, dividing the stages");
    p.box_bytes = p.L * p.Hb * 64 * 2;
    const bool bf16 = dk.scalar_type() == at::kBFloat16;
    for (int t = 0; t < 2; ++t) {
        const torch::Tensor& d = t == 0 ? dk : dv;
        std::string err = moda::make_tensor_map<5>(
            t == 0 ? &p.map_k : &p.map_v, bf16, d.data_ptr(),
            {uint64_t(D), uint64_t(p.L), uint64_t(p.Hk), uint64_t(T), 1},
            {uint64_t(d.stride(2)) * 2, uint64_t(d.stride(3)) * 2, uint64_t(d.stride(1)) * 2,
             uint64_t(d.stride(0)) * 2},
            {64, uint32_t(p.L), uint32_t(p.Hb), 1, 1}, CU_TENSOR_MAP_L2_PROMOTION_L2_128B);
        TORCH_CHECK(err.empty(), err);
    }
    const int smem = 200 * 1024;
    TORCH_CHECK(int64_t(stages) * (D / 64) * p.box_bytes <= smem && stages <= 16, "stages do not fit");
    auto kernel = D == 64 ? (spin ? ingest_heads<64, true> : ingest_heads<64, false>)
                          : (spin ? ingest_heads<128, true> : ingest_heads<128, false>);
    launch_probe(kernel, p, int(ctas), smem);
}

void run(torch::Tensor dk, torch::Tensor dv, int64_t method, int64_t rows, int64_t stages,
         int64_t positions_per_item, int64_t n_items, int64_t ctas) {
    TORCH_CHECK(dk.is_contiguous() && dv.is_contiguous() && dk.dim() == 5 && dk.size(0) == 1);
    Probe p{};
    p.T = int(dk.size(1)); p.L = int(dk.size(2)); p.Hk = int(dk.size(3)); p.D = int(dk.size(4));
    p.Lb = moda::depth_box_slots(p.L, 128);  // the forward's slots per box (kBlockN = 128 rows)
    p.rows = int(rows); p.stages = int(stages);
    p.positions_per_item = int(positions_per_item); p.n_items = int(n_items);
    p.k = static_cast<const uint16_t*>(dk.data_ptr());
    p.v = static_cast<const uint16_t*>(dv.data_ptr());
    const bool bf16 = dk.scalar_type() == at::kBFloat16;
    for (int t = 0; t < 2; ++t) {  // the forward's depth maps (boxes of `rows` rows)
        const torch::Tensor& d = t == 0 ? dk : dv;
        std::string err = moda::make_depth_box_map(t == 0 ? &p.map_k : &p.map_v, bf16, d.data_ptr(), p.D, p.Hk, p.L,
                                                   p.T, 1, d.stride(0), d.stride(1), d.stride(2), d.stride(3),
                                                   p.rows, p.Lb);
        TORCH_CHECK(err.empty(), err);
    }
    const int smem = 200 * 1024;  // one CTA per SM, as the forward
    TORCH_CHECK(int64_t(stages) * 2 * rows * p.D * 2 <= smem && stages <= 16);
#define LAUNCH(N, SPIN) launch_probe(p.D == 64 ? ingest<N, 64, SPIN> : ingest<N, 128, SPIN>, p, int(ctas), smem)
    switch (method) {  // 0: TMA; 1: TMA, waits that spin; N > 1: N threads of cp.async
        case 0: LAUNCH(0, false); break;
        case 1: LAUNCH(0, true); break;
        case 32: LAUNCH(32, false); break;
        case 96: LAUNCH(96, false); break;
        case 128: LAUNCH(128, false); break;
        default: TORCH_CHECK(false, "method");
    }
#undef LAUNCH
}
"""


def time_over_sms(name: str, launch, max_items: int, per_cta: int, item_bytes: int, sms: int, row: dict) -> list:
    """Time launch(n_items, n) on n = 1 .. all SMs (per_cta items each, at most max_items);
    print one line of GB/s per SM and return one result per n, `row` added to each."""
    results, line = [], []
    for n in (1, 8, 32, 66, sms):
        n_items = min(max_items, n * per_cta)
        ms = triton.testing.do_bench(lambda: launch(n_items, n), warmup=5, rep=30)
        rate = n_items * item_bytes / ms / 1e6 / n
        results.append({**row, "method": name, "ctas": n, "items": n_items, "ms": ms, "gbs_per_sm": rate})
        line.append(f"N={n}: {rate:6.1f} ({ms:.3f})")
    print(f"  {name:6s} " + "  ".join(line))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the JSON")
    ap.add_argument("--methods", default="", help="comma-separated subset (e.g. tma16,heads8); default: all")
    args = ap.parse_args()
    wanted = set(filter(None, args.methods.split(",")))
    ext = load_inline("probe_depth_ingest", cpp_sources="void run(torch::Tensor, torch::Tensor, int64_t, int64_t, "
                      "int64_t, int64_t, int64_t, int64_t);\nvoid run_heads(torch::Tensor, torch::Tensor, int64_t, "
                      "int64_t, int64_t, int64_t, int64_t, bool);", cuda_sources=_CUDA, functions=["run", "run_heads"],
                      extra_cuda_cflags=["-arch=sm_90a", "-O3"], extra_include_paths=[str(CSRC)])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # (T, D, L, Hk, positions per CTA, stages of 128 rows): the forward's issue shapes.
    shapes = [(4096, 64, 64, 8, 24, 6), (8192, 128, 32, 8, 32, 3)]
    methods = [("tma16", 0, 128, 1), ("tma32", 0, 256, 2), ("tma48", 0, 384, 3), ("cp32", 32, 128, 1),
               ("cp96", 96, 128, 1), ("cp128", 128, 128, 1), ("tma16spin", 1, 128, 1)]
    results = []
    for T, D, L, Hk, positions, stages in shapes:
        dk, dv = (torch.randn(1, T, L, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        items = Hk * ((T + positions - 1) // positions)
        item_bytes = 2 * positions * L * D * 2
        shape = {"T": T, "D": D, "L": L}
        print(f"T={T} D={D} L={L}: {items} items of {item_bytes // 1024} KB; GB/s per SM (ms)")
        for name, method, rows, div in methods:
            if positions % (rows // min(128, 2 ** (L - 1).bit_length())) or (wanted and name not in wanted):
                continue
            ring = max(1, stages // div)
            launch = lambda n_items, n: ext.run(dk, dv, method, rows, ring, positions, n_items, n)  # noqa: E731
            results += time_over_sms(name, launch, items, 16, item_bytes, sms, shape)
        for heads, issuers, spin in ((2, 1, False), (4, 1, False), (8, 1, False), (2, 2, False), (2, 4, False),
                                     (4, 2, False), (2, 1, True), (8, 1, True), (2, 4, True)):
            box_bytes = 2 * L * heads * D * 2  # K and V of one item
            ring = min(16, (200 * 1024) // (box_bytes // 2)) // issuers * issuers  # a stage: one tensor
            name = f"heads{heads}" + (f"x{issuers}" if issuers > 1 else "") + ("spin" if spin else "")
            if ring < 2 * issuers or (wanted and name not in wanted):
                continue
            launch = lambda n_items, n: ext.run_heads(dk, dv, heads, ring, n_items, n, issuers, spin)  # noqa: E731
            results += time_over_sms(name, launch, T * Hk // heads, 64, box_bytes, sms,
                                     {**shape, "stages": ring, "issuers": issuers, "spin": spin})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_depth_ingest.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
