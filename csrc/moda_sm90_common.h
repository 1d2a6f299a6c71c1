// Device helpers shared by the Hopper forward and backward kernels: TMA row loads, the TMA
// pipeline's parameters, wgmma issue / wait, and the register layout of wgmma accumulators.
#pragma once

#include <cuda.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace moda {

using namespace cute;

template <int N, int D, class Element>
__device__ __forceinline__ void tma_load_rows(CUtensorMap const* map, uint64_t* bar, Element* smem, int c1, int c2,
                                              int c3, int c4) {
    // One box per 64 head-dim columns; box j lands kRows x 64 elements after box j-1.
    constexpr uint64_t kHint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < D / 64; ++j) {
        SM90_TMA_LOAD_5D::copy(map, bar, kHint, smem + j * N * 64, j * 64, c1, c2, c3, c4);
    }
}

// Parameters of a TMA pipeline whose producer is thread 0 (warpgroup 0) and whose consumers
// are all threads of the other warpgroups: the producer arrives on "full" with the stage's byte
// count and TMA completes it; every consumer thread arrives on "empty" when done with a stage.
template <class Pipeline>
__device__ __forceinline__ typename Pipeline::Params tma_pipeline_params(int stage_bytes, int consumer_wgs) {
    typename Pipeline::Params params;
    params.transaction_bytes = stage_bytes;
    params.role = threadIdx.x < 128 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    params.is_leader = threadIdx.x == 0;
    params.num_consumers = 128 * consumer_wgs;
    return params;
}

// Issue C (+)= A * B on one warpgroup's wgmma as one commit group, without waiting. B comes
// from shared memory; A from shared memory (descriptors) or, with kRegisterA, from registers,
// which must then stay untouched until the group completes.
template <bool kZeroInit, bool kRegisterA, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_issue(TiledMma& mma, TA const& a, TB const& b, TC& c) {
    if constexpr (kRegisterA) warpgroup_fence_operand(const_cast<TA&>(a));
    warpgroup_fence_operand(c);
    warpgroup_arrive();
    if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < size<2>(a); ++k) {
        cute::gemm(mma, a(_, _, k), b(_, _, k), c);
        mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_fence_operand(c);
}

// Wait until at most kInFlight commit groups of this warpgroup are still running (groups
// complete in issue order); `c` is the accumulator the caller reads next.
template <int kInFlight, class TC>
__device__ __forceinline__ void wgmma_wait(TC& c) {
    warpgroup_wait<kInFlight>();
    warpgroup_fence_operand(c);
}

// Register fragments of wgmma accumulators hold, per thread, two rows (lane / 4 and
// lane / 4 + 8 of its warp's 16) and pairs of adjacent columns: flat element i is row half
// (i >> 1) & 1, column 8 (i >> 2) + 2 (lane % 4) + (i & 1).
__device__ __forceinline__ int frag_row_half(int i) { return (i >> 1) & 1; }
__device__ __forceinline__ int frag_col(int i, int lane) { return 8 * (i >> 2) + 2 * (lane & 3) + (i & 1); }
// The tile row of a consumer thread's row half h: consumer warpgroup w owns rows [64 w, 64 w + 64),
// its warp j rows [16 j, 16 j + 16) of those; `tid` counts the consumer threads from 0.
__device__ __forceinline__ int frag_row(int tid, int h) {
    const unsigned t = unsigned(tid);  // >= 0: shifts and masks, no signed-division fix-ups
    return int(t / 32 * 16 + t % 32 / 4) + 8 * h;
}

}  // namespace moda
