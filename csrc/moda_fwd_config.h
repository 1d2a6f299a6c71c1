// The Hopper forward's compile-time choices per head dim (FwdConfig), and the host-side
// plan of a call: whether its depth part runs in a kernel of its own beside the sequence
// kernel (plan_depth_beside), and the scratch memory that needs.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "moda_params.h"

namespace moda {

// Tile sizes and schedule per head dim: kBlockN keys per stage, kStages stages (shared
// memory: q + 2 x kStages x [kBlockN x D], at most 227 KB); kOverlap: issue tile i-1's P V
// with tile i's S and wait for it after tile i's softmax (as written: ptxas moves that wait
// ahead of the softmax unless kLatePvWait, below); kPingPong: the consumer warpgroups take
// turns issuing their matmuls; kConsumerWGs: 64-row consumer warpgroups per CTA (3: 192-row
// CTAs, a third warp per scheduler to hide the softmax's latency, 160 registers each);
// kStripeDepth: depth tiles in round-robin stripes, one per warpgroup (TileAt);
// kDepthPrefetch: depth tiles asked of L2 this many tiles before their load
// (produce_key_tiles; 0: none); kSwapDepth:
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
    static constexpr bool kLatePvWait = true;
    static constexpr int kConsumerWGs = 3;
    static constexpr bool kStripeDepth = false;
    static constexpr int kDepthPrefetch = 0;
    static constexpr bool kSwapDepth = false;
    static constexpr bool kDepthLoop = false;
    static constexpr bool kWarpDepth = false;
    static constexpr bool kDepthBeside = false;
    static constexpr int kDepthL2Lead = 0;
    static constexpr double kBesideSmBytesPerUs = 140e3, kBesideSmFlopsPerUs = 3.2e6;
};
template <> struct FwdConfig<128> {
    static constexpr int kBlockN = 128, kStages = 3;
    static constexpr bool kOverlap = true, kPingPong = false;
    static constexpr bool kLatePvWait = true;
    static constexpr int kConsumerWGs = 2;
    static constexpr bool kStripeDepth = false;
    static constexpr int kDepthPrefetch = 0;
    static constexpr bool kSwapDepth = false;
    static constexpr bool kDepthLoop = false;
    static constexpr bool kWarpDepth = false;
    static constexpr bool kDepthBeside = false;
    static constexpr int kDepthL2Lead = 0;
    static constexpr double kBesideSmBytesPerUs = 140e3, kBesideSmFlopsPerUs = 4.2e6;
};

// kLatePvWait (with kOverlap): keep the wait for P V after the softmax, where the source puts
// it. A plain wgmma.wait_group there is moved ahead of the softmax by ptxas, in every forward
// kernel (bench/sass_wait_placement.py: the wait before the first exp2), so the overlap of a
// tile's softmax with the previous tile's P V that kOverlap is written for does not happen
// within a warpgroup. Behind a branch on the row sums, which the exp2s produce, the wait
// stays after them (SASS of all four forward kernels: after the last exp2, no spills).
// Measured (bench/NOTES.md, fourteenth round), forward ms with depth / without depth,
// T = 16384 D = 64 | T = 8192 D = 128 | T = 4096 D = 64: 5.158 / 4.675 | 1.230 / 0.984 |
// 0.474 / 0.328 against 5.298 / 4.865 | 1.261 / 1.008 | 0.487 / 0.347 with the wait where
// ptxas put it; on.
//
// kDepthL2Lead = W > 0: while the producer issues a CTA's last W sequence tiles, the 32 lanes
// of its warp ask L2 for all the CTA's depth rows (prefetch.global.L2, through the load/store
// unit rather than the TMA unit that kDepthPrefetch used), so that the depth tiles at the end
// of the schedule load from L2 while the sequence tiles before them compute. Why: a depth box
// loaded and not computed still costs about what reading it at the DRAM's rate does (NOTES,
// eleventh round), because every CTA reads its own rows only at the end of its schedule.
// Measured (NOTES, fifteenth round; D = 64, W = 12): exact (validate_fwd), and slower:
// 5.297 / 0.505 ms against 5.148 / 0.471 at T = 16384 / 4096 (W = 4: 5.241 against 5.064 at
// T = 16384, in another call), and even the load-only diagnostic got slower with it (0.436
// against 0.394 ms at T = 4096). Off. Three consumer warpgroups only (FwdTraits: registers).
//
// kDepthBeside (depth_chunk = 1 with sequence keys): the depth rows are not tiles of the
// sequence kernel. A depth kernel (moda_fwd_depth_kernel.h) runs on a few SMs of its own, on
// a high-priority stream, while the sequence kernel runs on the others without depth rows;
// each query block's two halves of the softmax meet in whichever kernel finishes it second
// (moda_fwd_merge.h). Why: a CTA's depth rows are its own, so inside the sequence kernel
// they come from DRAM while the tensor cores wait (NOTES: streamed and not computed, they
// cost as much as reading them at the DRAM's whole rate), and a dense depth tile keeps 1/8
// of its products; one SM that only streams reads 130-180 GB/s (bench/probe_stream_beside.py),
// so a few of them can read the depth rows in the time the others take for the sequence.
// The SMs are split in proportion: depth bytes at kBesideSmBytesPerUs per SM against the
// sequence's causal FLOPs at kBesideSmFlopsPerUs per SM (what one SM reaches in each).
// Measured (bench/NOTES.md, eleventh round): exact (validate_fwd, 17 cases), and much slower
// than the default: 3.73 against 0.504 ms at T = 4096, 10.7 against 1.26 at D = 128, 50.7
// against 5.42 at T = 16384 (11, 7 and 3 depth SMs; with 15, 10 and 4: 2.74 / 7.57 / 39.0).
// Alone, the depth kernel streams 52 GB/s per SM, not 130-180 (under ncu: 13% of its samples
// on the per-thread fences before each claim), and beside the sequence kernel it is second
// at most blocks, where its merge loop waits on one load after another. Off.
struct DepthBesidePlan {
    int ctas = 0;     // depth kernel CTAs (one per SM); 0: the depth rows are sequence-kernel tiles
    int slots = 0;    // the depth kernel's slot tile: L rounded up to a power of two, >= 16
    int blocks = 0;   // query blocks of the sequence kernel (the unit of the merge)
    int64_t partial_floats = 0;  // B * T * Hq * D: one half's normalized output
    int64_t lse_floats = 0;      // B * Hq * T
    // Scratch: per block a claim counter and a ready flag (zeroed per call), then the depth
    // half's output and lse, then the sequence half's.
    int64_t flag_bytes() const { return (int64_t(blocks) * 2 * 4 + 255) / 256 * 256; }
    int64_t workspace_bytes() const {
        return ctas == 0 ? 0 : flag_bytes() + 2 * (partial_floats + lse_floats) * 4;
    }
};

inline int sm_count() {
    int device = 0, sms = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    return sms;
}

// The plan of a call on the current device. Asks the device for its SM count only when the
// depth kernel would run (every forward call plans; the default does not run it).
template <int D>
DepthBesidePlan plan_depth_beside_for(const FwdParams& a) {
    using Config = FwdConfig<D>;
    DepthBesidePlan plan;
    if (!Config::kDepthBeside || !a.has_seq || a.depth == 0 || a.depth_chunk != 1) return plan;
    int slots = 16;
    while (slots < a.depth) slots *= 2;
    if (slots * D > 16384) return plan;  // one position's rows would not fit a stage
    const int G = a.q_heads / a.kv_heads, block_rows = 64 * Config::kConsumerWGs;
    const double T = a.seqlen, bytes = 4.0 * a.batch * T * a.depth * a.kv_heads * D;
    const double pairs = a.causal ? T * (T + 1) / 2 : T * T;
    const double flops = 4.0 * a.batch * a.q_heads * D * pairs;
    const double x = (bytes / Config::kBesideSmBytesPerUs) / (flops / Config::kBesideSmFlopsPerUs);
    const int sms = sm_count();
    plan.blocks = a.batch * a.kv_heads * ((a.seqlen * G + block_rows - 1) / block_rows);
    plan.ctas = std::clamp(int(std::lround(sms * x / (1 + x))), 1, std::max(1, sms / 4));
    plan.ctas = std::min(plan.ctas, plan.blocks);
    plan.slots = slots;
    plan.lse_floats = int64_t(a.batch) * a.q_heads * a.seqlen;
    plan.partial_floats = plan.lse_floats * D;
    return plan;
}

inline DepthBesidePlan plan_depth_beside(const FwdParams& a) {
    return a.head_dim == 64 ? plan_depth_beside_for<64>(a) : plan_depth_beside_for<128>(a);
}

}  // namespace moda
