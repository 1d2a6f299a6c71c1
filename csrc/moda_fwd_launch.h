// Host side of the Hopper forward: tensor maps, grid, shared memory, launch. Included by the
// instantiation files (one element type and head dim each, compiled in parallel).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "moda_fwd_kernel.h"
#include "moda_params.h"
#include "moda_tma_maps.h"

namespace moda {

// Tile sizes and schedule per head dim: kBlockN keys per stage, kStages stages (shared
// memory: q + 2 x kStages x [kBlockN x D], at most 227 KB); kOverlap: run tile i's softmax
// while tile i-1's P V product runs; kPingPong: the consumer warpgroups take turns issuing
// their matmuls; kConsumerWGs: 64-row consumer warpgroups per CTA (3: 192-row CTAs, a third
// warp per scheduler to hide the softmax's latency, 160 registers each); kStripeDepth: depth
// tiles in round-robin stripes, one per warpgroup (TileAt); kDepthPrefetch: depth tiles
// asked of L2 this many tiles before their load (produce_key_tiles; 0: none); kSwapDepth:
// with depth_chunk = 1, depth boxes with the operands swapped (slots as M, 16 query rows as
// N: FwdTraits::kSwapRows; its scratch needs fewer stages: 2 at D = 128, under 6 at D = 64);
// kWarpDepth: depth tiles on each warp's own rows with mma.sync instead of the warpgroup's
// dense wgmma; kDepthLoop: depth tiles in a loop of their own after the sequence loop, each
// tile's products drained in order, a warp skipping the softmax of what its rows do not see
// (both moda_fwd_kernel.h).
// Chosen by measurement (bench/sweep_config.sh, bench/NOTES.md), H200, forward of the issue
// shapes. D = 64: three warpgroups, overlapped: 5.34 ms at T = 16384 against 5.83 with two
// warpgroups in serial order (with two, serial was fastest: overlapped 5-6% slower,
// turn-taking 6-7%); six stages (the most that fit): 0.499 against 0.528 ms at T = 4096,
// 5.32 against 5.38 at T = 16384, the same without depth: a CTA's depth boxes come from
// DRAM, and more of them in flight hide more of that latency (four stages: 1-2%). D = 128:
// two warpgroups, overlapped (2-4% faster than serial), a third stage (the most that fit;
// 1% faster). kStripeDepth measured no faster (D = 64: within 1%, and slower beside six
// stages; D = 128: 1.30 against 1.19 ms at T = 8192, where run-to-run noise reached 5%);
// off. kWarpDepth measured 1.4x slower (even at L = 0: the code beside the main loop costs
// it registers); off. kDepthPrefetch measured slower at every distance (8, 16, 32 tiles:
// 0.567, 0.571, 0.592 against 0.537 ms at T = 4096; the same at the other shapes); off.
// kSwapDepth is exact and sanitizer-clean but measured 2-4% slower (0.534 against 0.513 ms
// at T = 4096, 1.288 against 1.255 at D = 128 with two stages each); off. kDepthLoop is
// exact (17 cases) and measured within noise of the default: 0.495 against 0.511 ms at
// T = 4096, 1.299 against 1.298 at D = 128, 5.33 against 5.49 at T = 16384, where the same
// code without depth measured 4.84 against 4.95; off.
template <int D> struct FwdConfig;
template <> struct FwdConfig<64> {
    static constexpr int kBlockN = 128, kStages = 6;
    static constexpr bool kOverlap = true, kPingPong = false;
    static constexpr int kConsumerWGs = 3;
    static constexpr bool kStripeDepth = false;
    static constexpr int kDepthPrefetch = 0;
    static constexpr bool kSwapDepth = false;
    static constexpr bool kDepthLoop = false;
    static constexpr bool kWarpDepth = false;
};
template <> struct FwdConfig<128> {
    static constexpr int kBlockN = 128, kStages = 3;
    static constexpr bool kOverlap = true, kPingPong = false;
    static constexpr int kConsumerWGs = 2;
    static constexpr bool kStripeDepth = false;
    static constexpr int kDepthPrefetch = 0;
    static constexpr bool kSwapDepth = false;
    static constexpr bool kDepthLoop = false;
    static constexpr bool kWarpDepth = false;
};

// The query-stationary kernels' parameters (the forward's, and the backward's dQ kernel's):
// tensor maps with query boxes of kBlockM G-folded rows and key boxes of kBlockN rows, the
// depth-box geometry, the tile order, and the outputs. Returns an error message, or an empty string.
inline std::string make_fwd_kernel_params(const FwdParams& a, int kBlockM, int kBlockN, bool stripe_depth,
                                          FwdKernelParams& p) {
    const bool bf16 = a.dtype == DType::kBFloat16;
    const int B = a.batch, T = a.seqlen, Hk = a.kv_heads, G = a.q_heads / a.kv_heads, L = a.depth;
    std::string err = make_folded_rows_map(&p.tma_q, bf16, a.q, a.head_dim, G, Hk, T, B, a.q_batch_stride,
                                           a.q_seq_stride, a.q_head_stride, kBlockM);
    if (!err.empty()) return "q: " + err;
    err = make_key_maps(a, kBlockN, &p.tma_k, &p.tma_v, &p.tma_dk, &p.tma_dv);
    if (!err.empty()) return err;
    const int Lb = depth_box_slots(L, kBlockN);
    p.out = a.out;
    p.lse = a.lse;
    p.out_batch_stride = a.out_batch_stride;
    p.out_seq_stride = a.out_seq_stride;
    p.out_head_stride = a.out_head_stride;
    p.seqlen = T;
    p.kv_heads = Hk;
    p.group = G;
    p.depth = L;
    p.depth_chunk = a.depth_chunk;
    p.depth_box_slots = Lb;
    p.depth_box_positions = kBlockN / Lb;
    p.depth_slot_blocks = L > 0 ? (L + Lb - 1) / Lb : 0;
    p.num_m_blocks = (T * G + kBlockM - 1) / kBlockM;
    p.has_seq = a.has_seq;
    p.depth_stripes = stripe_depth ? kBlockM / 64 : 1;  // one stripe per 64-row consumer warpgroup
    p.scale_log2 = a.scale * 1.4426950408889634f;
    return {};
}

template <class Element, int D>
std::string launch_fwd(const FwdParams& a, cudaStream_t stream) {
    using Config = FwdConfig<D>;
    using Traits = FwdTraits<Element, D, Config::kBlockN, Config::kStages, Config::kConsumerWGs,
                             Config::kDepthPrefetch, Config::kSwapDepth, Config::kDepthLoop>;
    static_assert(sizeof(typename Traits::SharedStorage) <= 227 * 1024,
                  "shared memory over the 227 KB an SM90 CTA may have: fewer stages");
    FwdKernelParams p{};
    const std::string err = make_fwd_kernel_params(a, Traits::kBlockM, Traits::kBlockN, Config::kStripeDepth, p);
    if (!err.empty()) return err;

    const size_t smem = sizeof(typename Traits::SharedStorage);
    auto kernel = a.causal ? &moda_fwd_kernel<Traits, true, Config::kOverlap, Config::kPingPong, Config::kWarpDepth>
                           : &moda_fwd_kernel<Traits, false, Config::kOverlap, Config::kPingPong, Config::kWarpDepth>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
    const dim3 grid(p.num_m_blocks, a.kv_heads, a.batch);
    kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return std::string("kernel launch: ") + cudaGetErrorString(e);
    return {};
}

}  // namespace moda
