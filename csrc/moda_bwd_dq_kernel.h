// MoDA backward for Hopper (sm_90a), query-stationary part: dQ.
//
// The forward's structure (moda_fwd_kernel.h): one CTA per 128 G-folded query rows of one
// (batch, kv head), Q and dO loaded once, the same list of key tiles (sequence tiles, then the
// depth boxes of its own positions: moda_fwd_tile_scheduler.h) streamed by the same producer
// (moda_fwd_producer.h) through the same K and V pipelines, the same per-row visibility
// (moda_fwd_mask.h) and warpgroup skipping. With the forward's lse the probabilities need no
// online softmax; per tile each consumer warpgroup runs
//     S = Q K^T,  dP = dO V^T                      (operands in shared memory)
//     P = exp2(S * scale * log2 e - lse * log2 e),  dS = P (dP - delta)
//     dQ += dS K                                   (dS from registers, K read MN-major)
// dQ stays in registers over all tiles and is written once: no atomics, deterministic.
#pragma once

#include <cuda.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "moda_fwd_kernel_params.h"
#include "moda_fwd_mask.h"
#include "moda_fwd_producer.h"
#include "moda_fwd_tile_scheduler.h"
#include "moda_sm90_common.h"

namespace moda {

using namespace cute;

template <class Element_, int kHeadDim_, int kStages_, bool kOverlapTiles_>
struct BwdDqTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = 128;  // G-folded query rows: two consumer warpgroups x 64
    static constexpr int kBlockN = 64;   // keys per tile: S and dP both live in registers
    static constexpr int kStages = kStages_;
    static constexpr int kConsumerWGs = 2;
    static constexpr int kThreads = 128 * (1 + kConsumerWGs);
    static constexpr int kProducerRegs = 24;
    static constexpr int kConsumerRegs = 240;
    // Leave a tile's dQ product running into the next tile (BwdConfig).
    static constexpr bool kOverlapTiles = kOverlapTiles_;

    using AtomLayoutMNK = Layout<Shape<Int<kConsumerWGs>, _1, _1>>;
    using TiledMmaSdP = decltype(make_tiled_mma(
        GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), AtomLayoutMNK{}));
    using TiledMmaDq = decltype(make_tiled_mma(
        GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                             GMMA::Major::MN>(),
        AtomLayoutMNK{}));

    using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
    using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
    // K^T: the same bytes as K, indexed (d, n, stage).
    using SmemLayoutKt = decltype(composition(
        SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

    using Pipeline = cutlass::PipelineTmaAsync<kStages>;

    struct SharedStorage {
        cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
        cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> dout;
        cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
        cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
        typename Pipeline::SharedStorage pipe_k;
        typename Pipeline::SharedStorage pipe_v;
        alignas(8) uint64_t q_full;  // Q and dO
    };

    static constexpr int kTileBytes = kBlockN * kHeadDim * int(sizeof(Element));
    static constexpr int kQBytes = kBlockM * kHeadDim * int(sizeof(Element));
};

struct BwdDqKernelParams {
    FwdKernelParams fwd;  // q, k, v, depth maps, lse and the tile geometry, as the forward builds them
    CUtensorMap tma_do;   // dO like q
    const float* delta;   // [B, Hq, T]: rowsum(dO * O) - grad_lse
    void* dq;             // [B, T, Hq, D]
    int64_t dq_batch_stride, dq_seq_stride, dq_head_stride;
    float scale;
};

template <class Traits, bool kCausal>
__global__ void __launch_bounds__(Traits::kThreads, 1) moda_bwd_dq_kernel(__grid_constant__ const BwdDqKernelParams params) {
    using Element = typename Traits::Element;
    using Pipeline = typename Traits::Pipeline;
    using PipelineState = typename Pipeline::PipelineState;
    using Barrier = cutlass::arch::ClusterTransactionBarrier;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kBlockN = Traits::kBlockN;
    constexpr int kHeadDim = Traits::kHeadDim;
    FwdKernelParams const& p = params.fwd;

    extern __shared__ __align__(1024) char smem_raw[];
    auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

    const int warp_group = threadIdx.x / 128;
    const int hk = blockIdx.y;
    const int batch = blockIdx.z;
    const int G = p.group;
    const QueryBlock<kBlockM> qb(p);
    const int row0 = qb.row0, t_lo = qb.t_lo, t_hi = qb.t_hi;
    const TileSchedule sched = TileSchedule::make<kCausal, kBlockN>(p, t_lo, t_hi);

    const auto pipe_params = tma_pipeline_params<Pipeline>(Traits::kTileBytes, Traits::kConsumerWGs);
    Pipeline pipe_k(smem.pipe_k, pipe_params, Shape<_1, _1, _1>{});
    Pipeline pipe_v(smem.pipe_v, pipe_params, Shape<_1, _1, _1>{});
    if (threadIdx.x == 0) {
        Barrier::init(&smem.q_full, 1);
        cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    if (warp_group == 0) {
        // ------------------------------------------------------------------ producer
        cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
        if (threadIdx.x != 0) return;
        prefetch_tma_descriptor(&p.tma_q);
        prefetch_tma_descriptor(&params.tma_do);
        Barrier::arrive_and_expect_tx(&smem.q_full, 2 * Traits::kQBytes);
        tma_load_rows<kBlockM, kHeadDim>(&p.tma_q, &smem.q_full, smem.q.data(), 0, hk, t_lo, batch);
        tma_load_rows<kBlockM, kHeadDim>(&params.tma_do, &smem.q_full, smem.dout.data(), 0, hk, t_lo, batch);
        produce_key_tiles<kBlockN, kHeadDim>(p, sched, pipe_k, pipe_v, smem.k.data(), smem.v.data(), hk, batch);
        return;
    }

    // ---------------------------------------------------------------------- consumers
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    const int tid = threadIdx.x - 128;
    const int wg = __shfl_sync(0xffffffff, tid / 128, 0);  // warp-uniform, so wgmma is never in a divergent branch
    const int lane = tid % 32;

    typename Traits::TiledMmaSdP mma_sdp;
    typename Traits::TiledMmaDq mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(tid);
    auto thr_dq = mma_dq.get_thread_slice(tid);
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});
    Tensor sKt = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKt{});
    Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);
    Tensor tSrK = thr_sdp.partition_fragment_B(sK);     // (MMA, N, K, stage)
    Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO);
    Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
    Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);   // (MMA, D, K, stage)
    using ScoreShape = Shape<Int<kBlockM>, Int<kBlockN>>;  // S (then P) and dP: fp32, fresh per tile
    Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tdSrdS = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>{});  // A operand of dQ
    static_assert(decltype(size(partition_fragment_C(mma_sdp, ScoreShape{})))::value == decltype(size(tdSrdS))::value,
                  "dS is the score registers, converted");
    static_assert(decltype(size(tdQrdQ))::value == kHeadDim / 2, "two rows x D / 4 column pairs per thread");
    clear(tdQrdQ);

    // This thread's two rows, their positions, lse (log2-scaled) and delta.
    int row[2], t_row[2];
    float lse2[2], delta[2];
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        row[h] = row0 + frag_row(tid, h);
        t_row[h] = row[h] / G;
        lse2[h] = INFINITY;  // a row past T, or one that saw nothing: every P is 0
        delta[h] = 0.f;
        if (t_row[h] < p.seqlen) {
            const int64_t i = (int64_t(batch) * p.kv_heads * G + hk * G + row[h] % G) * p.seqlen + t_row[h];
            if (p.lse[i] != -INFINITY) lse2[h] = p.lse[i] * 1.4426950408889634f;
            delta[h] = params.delta[i];
        }
    }
    const int wg_t_lo = (row0 + wg * 64) / G;
    const int wg_t_hi = min((row0 + wg * 64 + 63) / G, p.seqlen - 1);
    const bool wg_has_rows = wg_t_lo < p.seqlen;
    const RowVisibility<kCausal, kBlockN> rows_see(p, t_row);
    const int wg_first = DepthWindow::of<kCausal>(wg_t_lo, p.depth_chunk, document_of(p, wg_t_lo)).first;
    const int wg_last = DepthWindow::of<kCausal>(wg_t_hi, p.depth_chunk, document_of(p, wg_t_hi)).last;

    // With Traits::kOverlapTiles a tile's dQ product is left running into the next tile: the
    // wait for the next S also sees it complete, and only then is its K / V stage released.
    // S and dP are fresh per tile, so no accumulator of a wgmma in flight is written by
    // ordinary instructions.
    Barrier::wait(&smem.q_full, 0);
    PipelineState read, pending_stage;
    bool pending = false;  // pending_stage's dQ product may still run
    auto release = [&](PipelineState const& state) {
        pipe_v.consumer_release(state);
        pipe_k.consumer_release(state);
    };
    for (int i = 0; i < sched.size(); ++i) {
        const TileAt tile(p, sched, i);
        bool active = wg_has_rows;
        if (tile.is_seq) {
            if (kCausal) active &= tile.n * kBlockN <= wg_t_hi;
        } else {
            active &= tile.s0 <= wg_last && tile.s0 + p.depth_box_positions - 1 >= wg_first;
        }
        pipe_k.consumer_wait(read);
        pipe_v.consumer_wait(read);
        if (active) {
            const int stage = read.index();
            Tensor tSrS = partition_fragment_C(mma_sdp, ScoreShape{});
            Tensor tdPrdP = partition_fragment_C(mma_sdp, ScoreShape{});
            wgmma_issue<true, false>(mma_sdp, tSrQ, tSrK(_, _, _, stage), tSrS);
            wgmma_issue<true, false>(mma_sdp, tdPrdO, tdPrV(_, _, _, stage), tdPrdP);
            wgmma_wait<1>(tSrS);  // S ready, and the previous tile's dQ product
            warpgroup_fence_operand(tdQrdQ);
            if (pending) release(pending_stage);
            if (!tile.is_seq || sched.seq_tile_masked(tile.n)) rows_see.mask(p, tile, tSrS, lane);
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < size(tSrS); ++e) tSrS(e) = exp2f(tSrS(e) * p.scale_log2 - lse2[frag_row_half(e)]);
            wgmma_wait<0>(tdPrdP);
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < size(tSrS); ++e) {
                tdSrdS(e) = static_cast<Element>(tSrS(e) * (tdPrdP(e) - delta[frag_row_half(e)]));
            }
            wgmma_issue<false, true>(mma_dq, tdSrdS, tdQrKt(_, _, _, stage), tdQrdQ);  // dQ += dS K
            if constexpr (Traits::kOverlapTiles) {
                pending = true;
                pending_stage = read;
            } else {
                wgmma_wait<0>(tdQrdQ);
                release(read);
            }
        } else {
            wgmma_wait<0>(tdQrdQ);
            if (pending) release(pending_stage);
            pending = false;
            release(read);
        }
        ++read;
    }
    wgmma_wait<0>(tdQrdQ);
    if (pending) release(pending_stage);

    // ---------------------------------------------------------------------- epilogue
    Element* dq = static_cast<Element*>(params.dq);
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        if (t_row[h] >= p.seqlen) continue;
        const int head = hk * G + row[h] % G;
        Element* dst = dq + batch * params.dq_batch_stride + t_row[h] * params.dq_seq_stride + head * params.dq_head_stride;
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(tdQrdQ); e += 4) {
            cutlass::Array<Element, 2> pair;
            pair[0] = static_cast<Element>(tdQrdQ(e + 2 * h) * params.scale);
            pair[1] = static_cast<Element>(tdQrdQ(e + 2 * h + 1) * params.scale);
            *reinterpret_cast<cutlass::Array<Element, 2>*>(dst + frag_col(e, lane)) = pair;
        }
    }
}

}  // namespace moda
