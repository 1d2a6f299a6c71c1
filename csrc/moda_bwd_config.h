// Schedule of the Hopper backward per head dim (BwdConfig), and whether a problem's dQ is
// fused into the key-stationary kernel. No kernel code: the host entry point reads it too.
#pragma once

#include "moda_params.h"

namespace moda {

// Schedule per head dim (measurements: docs/experiments.md, "Backward"; result files at 5fe62d2):
// - kStages, kStagesDq: pipeline stages of the key-stationary kernel's Q / dO tiles (shared
//   memory: kKVBuffers buffers of K, V, plus 2 x kStages x [64 x D]) and of the dQ kernel's
//   K / V tiles (Q, dO once, plus 2 x kStages x [64 x D]). Not tuned yet.
// - kOverlapSteps: the key-stationary kernel leaves a step's dV / dK running while it issues
//   the next step's S^T / dP^T. Two more 64 x 64 fp32 accumulators live at once: they fit at
//   D = 64, not beside D = 128's dK and dV (ptxas serializes the wgmmas, C7512).
// - kOverlapTiles: the dQ kernel leaves a tile's dQ product running into the next tile. No
//   change at D = 64; at D = 128, with a third stage, about 10% slower.
// - kKVBuffers: K / V buffers of the key-stationary kernel; a CTA walking a run of depth
//   boxes keeps kKVBuffers - 1 boxes' loads in flight behind the one it works on (shared
//   memory: kKVBuffers x 2 x [128 x D]). Four at D = 64 measured within 1.5% of two.
// - kFusedDq: unless deterministic gradients are asked for, the key-stationary kernel also
//   computes dQ (fp32 atomics, then a conversion) instead of the dQ kernel. Forward+backward
//   at T = 16384, D = 64: 23.18 against 24.51 ms; T = 4096: 2.47 against 2.53; at D = 128
//   (T = 8192) 6.11 against 5.93, so D = 128 keeps the dQ kernel (cuda_bwd/fused_dq/). Which
//   shapes at D = 64 take it: bwd_fuses_dq below.
// - kDqOwnKeys: the fused dQ's split over the consumer warpgroups (BwdTraits): by keys (no
//   barrier between them, twice the atomics, D / 2 accumulator registers per thread) or by
//   head dim. By keys at D = 64: 16.41 against 16.90 ms for the kernel at T = 16384, 1.78
//   against 1.80 at T = 4096. At D = 128 the D / 2 registers do not fit (C7512).
// - kDepthKernel: where each query reads only its own position's depth rows (depth_chunk =
//   1), their gradients come from the per-position depth kernel (moda_bwd_depth_kernel.h:
//   warp-level products that fit G x L exactly) and the sequence kernels run without depth
//   rows; otherwise the key-stationary kernel's depth boxes (64-row products over several
//   positions) and the dQ kernel's depth tiles. kDepthSlotRows, kDepthStages, kDepthWarps: its
//   depth rows per item, items per warp in shared memory, warps per CTA (BwdDepthTraits).
//   Depth kernel alone at T = 16384 / D = 128 / T = 4096 (cuda_bwd/depth_kernel/):
//   four warps per CTA with two stages 1.81 / 0.98 / 0.44 ms (one CTA per SM: bound by
//   latency); one warp per CTA with two stages of half the rows 1.52 / 0.73 / 0.37; one warp
//   per CTA with one stage (eleven per SM) 1.43 / 0.75 / 0.36, shipped; with 16-byte stores
//   and no 64-bit divisions per item 1.36 / 0.64 / 0.33. Asking L2 for the next item's rows
//   while working on the current one: 1.69 / 0.75 / 0.41 against 1.38 / 0.64 / 0.34; two
//   stages of half the rows on that code: 1.47 / 0.63 / 0.36 against 1.38 / 0.64 / 0.34.
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
// key-stationary CTA heavier, with G query heads adding into the same rows. Forward+backward,
// mean of two runs (cuda_bwd/fused_dq_policy/; L = 64 unless said), fused
// against dQ kernel: with G >= 8 up to T = 4096 the dQ kernel is ahead (G = 8, T = 4096: 1.96
// against 1.90 ms at B = 1, 3.86 against 3.81 at B = 2, 7.66 against 7.65 at B = 4; L = 0:
// 1.46 against 1.41; T = 2048, B = 2: 1.34 against 1.29; G = 16: 2.34 against 2.13), except
// at B = 1, T = 2048 (1.05 against 1.06). From T = 8192 on (G = 8: 6.14 against 6.19, 12.32
// against 12.44 at B = 2, 21.49 against 22.13 at T = 16384) and for G <= 4 (T = 4096: 1.17
// against 1.19 at G = 4, 1.37 against 1.41 at G = 1) the fused dQ is ahead. The sums of the
// kernels' times point the same way, except at B = 2, T = 4096 (one run each way) and L = 0
// (even); docs/experiments.md has both measures.
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
