// Schedule of the Hopper backward per head dim (BwdConfig), and whether a problem's dQ is
// fused into the key-stationary kernel. No kernel code: the host entry point reads it too.
#pragma once

#include "moda_params.h"

namespace moda {

// Schedule per head dim. Each knob was chosen by measurement; the numbers are in
// docs/experiments.md, "Backward".
// - kStages, kStagesDq: pipeline stages of the key-stationary kernel's Q / dO tiles (shared
//   memory: kKVBuffers buffers of K, V, plus 2 x kStages x [64 x D]) and of the dQ kernel's
//   K / V tiles (Q, dO once, plus 2 x kStages x [64 x D]).
// - kOverlapSteps: the key-stationary kernel leaves a step's dV / dK running while it issues
//   the next step's S^T / dP^T. Two more 64 x 64 fp32 accumulators live at once: they fit at
//   D = 64, not beside D = 128's dK and dV (ptxas serializes the wgmmas, C7512).
// - kOverlapTiles: the dQ kernel leaves a tile's dQ product running into the next tile
//   (no gain at D = 64, slower at D = 128).
// - kKVBuffers: K / V buffers of the key-stationary kernel; a CTA walking a run of depth
//   boxes keeps kKVBuffers - 1 boxes' loads in flight behind the one it works on (shared
//   memory: kKVBuffers x 2 x [128 x D]). More than two measured no faster.
// - kFusedDq: unless deterministic gradients are asked for, the key-stationary kernel also
//   computes dQ (fp32 atomics, then a conversion) instead of the dQ kernel: it saves the dQ
//   kernel's second pass over S and dP. Faster at D = 64 (which shapes: bwd_fuses_dq
//   below); slower at D = 128, where its accumulators spill.
// - kDqOwnKeys: the fused dQ's split over the consumer warpgroups (BwdTraits): by keys (no
//   barrier between them, twice the atomics, D / 2 accumulator registers per thread) or by
//   head dim. By keys is faster at D = 64; at D = 128 the D / 2 registers do not fit (C7512).
// - kDepthKernel: where each query reads only its own position's depth rows (depth_chunk =
//   1), their gradients come from the per-position depth kernel (moda_bwd_depth_kernel.h:
//   warp-level products that fit G x L exactly) and the sequence kernels run without depth
//   rows; otherwise the key-stationary kernel's depth boxes (64-row products over several
//   positions) and the dQ kernel's depth tiles. kDepthSlotRows, kDepthStages, kDepthWarps: its
//   depth rows per item, items per warp in shared memory, warps per CTA (BwdDepthTraits).
//   The kernel is latency-bound per warp, and many one-warp CTAs per SM (one stage each)
//   hide the loads better than stages or more warps per CTA, or L2 prefetches of the next item.
template <int D> struct BwdConfig;
template <> struct BwdConfig<64> {
    static constexpr int kStages = 3, kStagesDq = 3, kKVBuffers = 2;
    static constexpr bool kOverlapSteps = true, kOverlapTiles = true;
    static constexpr bool kFusedDq = true, kDqOwnKeys = true;
    static constexpr bool kDepthKernel = true;
    static constexpr int kDepthSlotRows = 64, kDepthStages = 1, kDepthWarps = 1;
};
template <> struct BwdConfig<128> {
    static constexpr int kStages = 2, kStagesDq = 2, kKVBuffers = 2;
    static constexpr bool kOverlapSteps = false, kOverlapTiles = false;
    static constexpr bool kFusedDq = false, kDqOwnKeys = false;
    static constexpr bool kDepthKernel = true;
    static constexpr int kDepthSlotRows = 32, kDepthStages = 1, kDepthWarps = 1;
};

// Whether the backward of a problem accumulates dQ in the key-stationary kernel (atomics
// into BwdParams::dq_accum) rather than in the dQ kernel.
//
// At D = 64 the fused dQ saves the dQ kernel's second pass over S and dP, but makes each
// key-stationary CTA heavier, with G query heads adding into the same rows. Measured over
// twelve shapes (docs/experiments.md, "Backward"): the dQ kernel is ahead for G >= 8 up to
// T = 4096 (except B = 1, T = 2048, even), the fused dQ from T = 8192 on and for G <= 4.
inline bool bwd_fuses_dq(const FwdParams& params, bool deterministic) {
    if (deterministic) return false;
    const int G = params.kv_heads > 0 ? params.q_heads / params.kv_heads : 0;
    if (G >= 8 && params.seqlen <= 4096) return false;
    // Depth-only with depth_chunk = 1: the per-position depth kernel writes all of dQ. (The
    // key-stationary kernel runs only where the depth kernel cannot, misaligned gradients,
    // and then with the dQ kernel: no fused dQ's scratch buffer is asked for.)
    if (!params.has_seq && params.depth_chunk == 1) return false;
    return params.head_dim == 64 ? BwdConfig<64>::kFusedDq : BwdConfig<128>::kFusedDq;
}

}  // namespace moda
