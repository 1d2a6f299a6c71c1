// MoDA forward for Hopper (sm_90a): TMA loads on an mbarrier pipeline, wgmma, one producer
// warpgroup and two or three consumer warpgroups (FwdConfig::kConsumerWGs).
//
// One CTA owns kBlockM = 64 x (consumer warpgroups) G-folded query rows of one (batch, kv
// head): folded row R = t * G + g is query head hk * G + g at position t, so the CTA covers
// the kBlockM / G positions [t_lo, t_hi] with all their G heads, and every key/value tile it
// loads serves all G heads at once. Consumer warpgroup w owns rows [64 w, 64 w + 64).
//
// The CTA walks one list of key tiles into ONE online softmax (moda_fwd_tile_scheduler.h):
// sequence tiles, then the depth boxes of its own positions. The producer
// (moda_fwd_producer.h) issues every tile through the same two pipelines (K, then V), so the
// consumers see a single stream of [kBlockN x D] tiles whatever their source. A warpgroup
// skips the matmuls of a depth tile that none of its rows can see (with G = 8, half of them),
// and of causal sequence tiles that lie wholly after its rows. A depth tile is dense: the
// warpgroup's 64 rows times every column of the box, of which a row sees at most one
// position's slots (moda_fwd_mask.h masks the others).
//
// Within a warpgroup, tile i's S = Q K^T is issued together with tile i-1's O += P V, and
// the P V product is waited for only after tile i's softmax, so that the tensor cores work on
// P V while the warpgroup exponentiates (see the main loop for how that wait is kept there).
#pragma once

#include <cuda.h>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/array.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "moda_fwd_kernel_params.h"
#include "moda_fwd_mask.h"
#include "moda_fwd_producer.h"
#include "moda_fwd_softmax.h"
#include "moda_fwd_tile_scheduler.h"
#include "moda_fwd_traits.h"
#include "moda_sm90_common.h"

namespace moda {

using namespace cute;

template <class Traits, bool kCausal>
__global__ void __launch_bounds__(Traits::kThreads, 1) moda_fwd_kernel(__grid_constant__ const FwdKernelParams p) {
    using Element = typename Traits::Element;
    using Pipeline = typename Traits::Pipeline;
    using PipelineState = typename Pipeline::PipelineState;
    using Barrier = cutlass::arch::ClusterTransactionBarrier;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kBlockN = Traits::kBlockN;
    constexpr int kHeadDim = Traits::kHeadDim;

    extern __shared__ __align__(1024) char smem_raw[];
    auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

    const int warp_group = threadIdx.x / 128;
    const int hk = blockIdx.y;
    const int batch = blockIdx.z;
    const int G = p.group;
    const QueryBlock<kBlockM> qb(p);
    const int row0 = qb.row0, t_lo = qb.t_lo, t_hi = qb.t_hi;
    const TileSchedule sched = TileSchedule::make<kCausal, kBlockN>(p, t_lo, t_hi);

    // One pipeline for K tiles, one for V tiles (V is needed later than K).
    const auto pipe_params = tma_pipeline_params<Pipeline>(Traits::kTileBytes, Traits::kConsumerWGs);
    Pipeline pipe_k(smem.pipe_k, pipe_params, Shape<_1, _1, _1>{});
    Pipeline pipe_v(smem.pipe_v, pipe_params, Shape<_1, _1, _1>{});
    if (threadIdx.x == 0) {
        Barrier::init(&smem.q_full, 1);
        cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    Element* sQ_ptr = smem.q.data();
    Element* sK_ptr = smem.k.data();
    Element* sV_ptr = smem.v.data();

    if (warp_group == 0) {
        // ------------------------------------------------------------------ producer
        cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
        if (threadIdx.x != 0) return;  // thread 0 issues every load
        prefetch_tma_descriptor(&p.tma_q);
        Barrier::arrive_and_expect_tx(&smem.q_full, Traits::kQBytes);
        tma_load_rows<kBlockM, kHeadDim>(&p.tma_q, &smem.q_full, sQ_ptr, 0, hk, t_lo, batch);
        produce_key_tiles<kBlockN, kHeadDim>(p, sched, pipe_k, pipe_v, sK_ptr, sV_ptr, hk, batch);
        return;
    }

    // ---------------------------------------------------------------------- consumers
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    const int tid = threadIdx.x - 128;  // over all consumer warpgroups
    // Broadcast from lane 0: the compiler then knows `wg`, and every branch derived from it,
    // is uniform across the warp; otherwise it serializes the wgmmas inside those branches.
    const int wg = __shfl_sync(0xffffffff, tid / 128, 0);
    const int lane = tid % 32;

    typename Traits::TiledMmaQK mma_qk;
    typename Traits::TiledMmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(tid);
    auto thr_pv = mma_pv.get_thread_slice(tid);
    Tensor sQ = make_tensor(make_smem_ptr(sQ_ptr), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(sK_ptr), typename Traits::SmemLayoutKV{});
    Tensor sVt = make_tensor(make_smem_ptr(sV_ptr), typename Traits::SmemLayoutVt{});
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // smem descriptors
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, N, K, stage)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, D, K, stage)
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    // P as the register A operand of the PV wgmma: same flat order as the S accumulator,
    // grouped by k = 16 columns (see frag_row_half / frag_col).
    Tensor tOrP = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>{});
    clear(tOrO);

    // This thread's two rows and their positions; this warpgroup's positions.
    int row[2], t_row[2];  // folded rows (accumulator layout: see frag_row_half), positions
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        row[h] = row0 + frag_row(tid, h);
        t_row[h] = row[h] / G;
    }
    const int wg_t_lo = (row0 + wg * 64) / G;
    const int wg_t_hi = min((row0 + wg * 64 + 63) / G, p.seqlen - 1);
    const bool wg_has_rows = wg_t_lo < p.seqlen;

    // The online softmax's running max and sum of this thread's two rows (moda_fwd_softmax.h).
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};
    const float scale_log2 = p.scale_log2;

    // This warpgroup's depth window (rows are in position order).
    const RowVisibility<kCausal, kBlockN> rows_see(p, t_row);
    const int wg_first = DepthWindow::of<kCausal>(wg_t_lo, p.depth_chunk, document_of(p, wg_t_lo)).first;
    const int wg_last = DepthWindow::of<kCausal>(wg_t_hi, p.depth_chunk, document_of(p, wg_t_hi)).last;
    // Scores -> -inf where a key is not visible (only the causal diagonal and ragged-end
    // sequence tiles, and the depth tiles, need it).
    auto apply_mask = [&](TileAt const& tile) {
        if (tile.is_seq && !sched.seq_tile_masked(tile.n)) return;
        rows_see.mask(p, tile, tSrS, lane);
    };

    Barrier::wait(&smem.q_full, 0);
    PipelineState read;     // the tile whose scores are computed next
    PipelineState pending;  // the tile whose P V product is still to be issued
    bool has_pending = false;
    // O += P V for the pending tile, waited for, its V stage released.
    auto flush_pending = [&]() {
        pipe_v.consumer_wait(pending);
        wgmma_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, pending.index()), tOrO);
        wgmma_wait<0>(tOrO);
        pipe_v.consumer_release(pending);
        has_pending = false;
    };

    // Whether any of this warpgroup's rows sees a tile.
    auto wg_sees = [&](TileAt const& tile) {
        bool active = wg_has_rows;
        if (tile.is_seq) {
            if (kCausal) active &= tile.n * kBlockN <= wg_t_hi;
        } else {
            const int s_last = tile.s0 + p.depth_box_positions - 1;
            active &= tile.s0 <= wg_last && s_last >= wg_first;
        }
        return active;
    };
    // Nothing this warpgroup can see: hand both stages back untouched. A pending product goes
    // first, so that its V stage is never held across skipped tiles (the producer may need
    // that stage to fill the ones we wait on).
    auto skip_tile = [&]() {
        if (has_pending) flush_pending();
        pipe_k.consumer_wait(read);
        pipe_k.consumer_release(read);
        pipe_v.consumer_wait(read);
        pipe_v.consumer_release(read);
        ++read;
    };

    for (int i = 0; i < sched.size(); ++i) {
        const TileAt tile(p, sched, i);
        if (!wg_sees(tile)) {
            skip_tile();
            continue;
        }

        pipe_k.consumer_wait(read);
        float alpha[2];
        if (has_pending) {
            // The previous tile's P V is issued with this tile's S and waited for after this
            // tile's softmax, so that it may run during the softmax. The issues and the plain
            // wait of this path are unconditional, so ptxas can see that the accumulators are
            // never touched while their wgmma is in flight.
            pipe_v.consumer_wait(pending);
            wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, read.index()), tSrS);
            wgmma_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, pending.index()), tOrO);
            wgmma_wait<1>(tSrS);  // S is ready; P V may still run
            pipe_k.consumer_release(read);
            apply_mask(tile);
            softmax_step(tSrS, row_max, row_sum, scale_log2, alpha);
            // A plain wgmma.wait_group here is moved ahead of the softmax by ptxas, in every
            // forward kernel (the SASS shows the wait before the first exp2), so
            // the overlap would not happen. Behind a branch on the row sums, which the exp2s
            // produce, the wait cannot move above them. The branch is always taken, by every
            // thread alike, as wgmma.wait_group requires: a sum of exp2s is never the all-ones
            // bit pattern (the GPU's NaNs are 0x7fffffff). The plain wait after it then finds
            // nothing left in flight. Measured (docs/experiments.md), forward ms
            // with depth / without depth, T = 16384 D = 64 | T = 8192 D = 128 | T = 4096 D = 64:
            // 5.158 / 4.675 | 1.230 / 0.984 | 0.474 / 0.328 against 5.298 / 4.865 | 1.261 /
            // 1.008 | 0.487 / 0.347 with the wait where ptxas put it.
            const float sums = row_sum[0] + row_sum[1];
            if (__all_sync(0xffffffff, __float_as_uint(sums) != 0xffffffffu)) wgmma_wait<0>(tOrO);
            wgmma_wait<0>(tOrO);
            pipe_v.consumer_release(pending);
        } else {
            wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, read.index()), tSrS);
            wgmma_wait<0>(tSrS);
            pipe_k.consumer_release(read);
            apply_mask(tile);
            softmax_step(tSrS, row_max, row_sum, scale_log2, alpha);
        }
        rescale_and_convert(tOrO, tOrP, tSrS, alpha);
        pending = read;
        has_pending = true;
        ++read;
    }
    if (has_pending) flush_pending();

    // ---------------------------------------------------------------------- epilogue
    // Each row's output, normalized, and its lse. (Kept here: as a function of its own it came
    // out of ptxas with two register initializations in another order.)
    float inv_sum[2], lse[2];
    softmax_finalize(row_max, row_sum, scale_log2, inv_sum, lse);
    Element* out = static_cast<Element*>(p.out);
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        const int t = t_row[h];
        const int head = hk * G + row[h] % G;
        if (t >= p.seqlen) continue;  // a padding row past T
        Element* dst = out + batch * p.out_batch_stride + t * p.out_seq_stride + head * p.out_head_stride;
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(tOrO); e += 4) {
            // Elements e + 2h and e + 2h + 1 are this row's adjacent column pair: one 4-byte store.
            cutlass::Array<Element, 2> pair;
            pair[0] = static_cast<Element>(tOrO(e + 2 * h) * inv_sum[h]);
            pair[1] = static_cast<Element>(tOrO(e + 2 * h + 1) * inv_sum[h]);
            *reinterpret_cast<cutlass::Array<Element, 2>*>(dst + frag_col(e, lane)) = pair;
        }
        if ((lane & 3) == 0) {
            p.lse[(int64_t(batch) * p.kv_heads * G + head) * p.seqlen + t] = lse[h];
        }
    }
}

}  // namespace moda
