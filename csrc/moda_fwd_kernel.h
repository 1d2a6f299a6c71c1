// MoDA forward for Hopper (sm_90a): TMA loads on an mbarrier pipeline, wgmma, one producer
// warpgroup and two or three consumer warpgroups (FwdConfig::kConsumerWGs).
//
// One CTA owns kBlockM = 64 x (consumer warpgroups) G-folded query rows of one (batch, kv
// head): folded row R = t * G + g is query head hk * G + g at position t, so the CTA covers
// the kBlockM / G positions [t_lo, t_hi] with all their G heads, and every key/value tile it
// loads serves all G heads at once. Consumer warpgroup w owns rows [64 w, 64 w + 64).
//
// The CTA walks one list of key tiles into ONE online softmax:
//   1. sequence tiles, last (causal diagonal, masked) first, then the fully visible ones;
//   2. depth tiles: the contiguous block of depth rows its own positions (and their depth
//      chunks) wrote. A depth tile is a [Tb positions x Lb slots] box of the depth tensor
//      (Lb = L rounded up to a power of two, capped at kBlockN; Tb = kBlockN / Lb), so it
//      reads only rows this CTA can see. A warpgroup skips the matmuls of a depth tile that
//      none of its rows can see (with G = 8, half of them), and of causal sequence tiles
//      that lie wholly after its rows.
// The producer issues every tile through the same two pipelines (K, then V), so the
// consumers see a single stream of [kBlockN x D] tiles whatever their source.
//
// Within a warpgroup, tile i's S = Q K^T is issued together with tile i-1's O += P V, and
// the P V product is waited for only after tile i's softmax, so that the tensor cores work on
// P V while the warpgroup exponentiates (see the main loop for how that wait is kept there).
// A depth tile is dense: the warpgroup's 64 rows times every column of the box, of which a
// row sees at most one position's slots (RowVisibility masks the others).
#pragma once

#include <cuda.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "moda_fwd_traits.h"
#include "moda_sm90_common.h"

namespace moda {

using namespace cute;

// Everything the kernel reads, passed by value as a __grid_constant__ parameter (the TMA
// unit reads the tensor maps straight from parameter space).
struct FwdKernelParams {
    // Five-dimensional maps, innermost first (moda_fwd_launch.h builds them):
    CUtensorMap tma_q;   // q as [D, G, Hk, T, B]; box [64, G, 1, 128 / G, 1] -> rows t * G + g
    CUtensorMap tma_k;   // k as [D, Hk, T, B, 1]; box [64, 1, kBlockN, 1, 1]
    CUtensorMap tma_v;
    CUtensorMap tma_dk;  // depth_k as [D, Hk, L, T, B]; box [64, 1, Lb, Tb, 1] -> rows t * Lb + l
    CUtensorMap tma_dv;
    void* out;
    float* lse;
    int64_t out_batch_stride, out_seq_stride, out_head_stride;
    int seqlen, kv_heads, group, depth, depth_chunk;
    int depth_box_slots;      // Lb
    int depth_box_positions;  // Tb
    int depth_slot_blocks;    // ceil(L / Lb)
    int num_m_blocks;
    int has_seq;
    float scale_log2;         // softmax scale * log2(e): scores are exponentiated with exp2
};

// The list of key tiles one CTA walks; producer and consumers derive it identically.
struct TileSchedule {
    int n_seq;         // sequence tiles, walked from n_seq - 1 down to 0
    int first_masked;  // sequence tiles >= this one need the causal / ragged-end mask
    int n_depth;       // depth tiles after them
    int s_lo, s_hi;    // depth rows of positions [s_lo, s_hi) may be visible

    template <bool kCausal, int kBlockN>
    __device__ static TileSchedule make(FwdKernelParams const& p, int t_lo, int t_hi) {
        TileSchedule s{};
        if (p.has_seq) {
            int seq_end = kCausal ? t_hi + 1 : p.seqlen;
            s.n_seq = (seq_end + kBlockN - 1) / kBlockN;
            s.first_masked = kCausal ? (t_lo + 1) / kBlockN : p.seqlen / kBlockN;
        }
        if (p.depth > 0) {
            int C = p.depth_chunk;
            s.s_lo = t_lo / C * C;
            s.s_hi = kCausal ? t_hi + 1 : min((t_hi / C + 1) * C, p.seqlen);
            int position_blocks = (s.s_hi - s.s_lo + p.depth_box_positions - 1) / p.depth_box_positions;
            s.n_depth = position_blocks * p.depth_slot_blocks;
        }
        return s;
    }
    __device__ int size() const { return n_seq + n_depth; }
};

// Tile i of a schedule: sequence tile n (walked last to first), or depth tile d with the
// first position s0 and first slot l0 of its box. Depth boxes are position-major, so the
// boxes that one consumer warpgroup's rows see are consecutive.
struct TileAt {
    bool is_seq;
    int n;
    int s0 = 0, l0 = 0;
    __device__ TileAt(FwdKernelParams const& p, TileSchedule const& sched, int i)
        : is_seq(i < sched.n_seq), n(sched.n_seq - 1 - i) {
        if (!is_seq) {
            const int d = i - sched.n_seq;
            // One slot block (L <= kBlockN) is the common case: no 32-bit division then,
            // which every consumer warp would otherwise run once per depth tile.
            const int blocks = p.depth_slot_blocks;
            const int position_block = blocks == 1 ? d : d / blocks;
            s0 = sched.s_lo + position_block * p.depth_box_positions;
            l0 = (d - position_block * blocks) * p.depth_box_slots;
        }
    }
};

template <class T>
__device__ __forceinline__ T quad_allreduce_max(T x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

template <class T>
__device__ __forceinline__ T quad_allreduce_sum(T x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// The kBlockM G-folded query rows of a query-stationary CTA (the forward, the backward's dQ):
// blocks are taken heaviest first (the last rows see the most causal keys); rows
// [row0, row0 + kBlockM) are the positions [t_lo, t_hi] with all their G heads.
template <int kBlockM>
struct QueryBlock {
    int row0, t_lo, t_hi;
    __device__ explicit QueryBlock(FwdKernelParams const& p)
        : row0((p.num_m_blocks - 1 - int(blockIdx.x)) * kBlockM),
          t_lo(row0 / p.group),
          t_hi(min((row0 + kBlockM - 1) / p.group, p.seqlen - 1)) {}
};

// The producer's stream of key tiles for a query-stationary CTA: each tile of the schedule
// into the K pipeline's and the V pipeline's next stage (a sequence box [64, 1, kBlockN, 1, 1]
// at position n * kBlockN, or a depth box [64, 1, Lb, Tb, 1] at slot l0, position s0). Run by
// thread 0 alone.
template <int kBlockN, int kHeadDim, class Pipeline, class Element>
__device__ __forceinline__ void produce_key_tiles(FwdKernelParams const& p, TileSchedule const& sched,
                                                  Pipeline& pipe_k, Pipeline& pipe_v, Element* sK, Element* sV,
                                                  int hk, int batch) {
    if (p.has_seq) {
        prefetch_tma_descriptor(&p.tma_k);
        prefetch_tma_descriptor(&p.tma_v);
    }
    if (p.depth > 0) {
        prefetch_tma_descriptor(&p.tma_dk);
        prefetch_tma_descriptor(&p.tma_dv);
    }
    auto write = cutlass::make_producer_start_state<Pipeline>();
    for (int i = 0; i < sched.size(); ++i) {
        const int stage_offset = write.index() * kBlockN * kHeadDim;
        const TileAt tile(p, sched, i);
        auto load = [&](Pipeline& pipe, CUtensorMap const* seq_map, CUtensorMap const* depth_map, Element* buf) {
            pipe.producer_acquire(write);  // arrives on the stage's "full" barrier with its byte count
            uint64_t* full = pipe.producer_get_barrier(write);
            if (tile.is_seq) {
                tma_load_rows<kBlockN, kHeadDim>(seq_map, full, buf + stage_offset, hk, tile.n * kBlockN, batch, 0);
            } else {
                tma_load_rows<kBlockN, kHeadDim>(depth_map, full, buf + stage_offset, hk, tile.l0, tile.s0, batch);
            }
        };
        load(pipe_k, &p.tma_k, &p.tma_dk, sK);
        load(pipe_v, &p.tma_v, &p.tma_dv, sV);
        ++write;
    }
}

// Which columns of a key tile one thread's two query rows (positions t[0], t[1]) see. In both
// kinds of tile a row sees one contiguous range of columns [lo, hi): sequence tiles up to the
// causal diagonal or the end of T; depth boxes (position-major: column c is position
// s0 + c / Lb, slot l0 + c % Lb) the positions of the row's depth window. Masking is then two
// compares per score against per-row bounds, plus the slot test in a box whose last slots lie
// past L: no divisions and no branches per element.
template <bool kCausal, int kBlockN>
struct RowVisibility {
    int t[2];
    DepthWindow window[2];

    __device__ RowVisibility(FwdKernelParams const& p, int const (&t_row)[2]) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
            t[h] = t_row[h];
            window[h] = DepthWindow::of<kCausal>(t_row[h], p.depth_chunk, p.seqlen);
        }
    }

    __device__ void columns(FwdKernelParams const& p, TileAt const& tile, int (&lo)[2], int (&hi)[2]) const {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
            if (tile.is_seq) {
                const int end = kCausal ? min(t[h] + 1, p.seqlen) : p.seqlen;
                lo[h] = 0;
                hi[h] = end - tile.n * kBlockN;
            } else {
                lo[h] = (window[h].first - tile.s0) * p.depth_box_slots;
                hi[h] = (window[h].last + 1 - tile.s0) * p.depth_box_slots;
            }
        }
    }

    // Scores of the columns these rows do not see -> -inf (an accumulator fragment, see frag_col).
    template <class Frag>
    __device__ void mask(FwdKernelParams const& p, TileAt const& tile, Frag& scores, int lane) const {
        int lo[2], hi[2];
        columns(p, tile, lo, hi);
        // Slot test, a no-op for sequence tiles: column c holds slot c & slot_mask.
        const int slot_mask = tile.is_seq ? kBlockN - 1 : p.depth_box_slots - 1;
        const int slot_end = tile.is_seq ? kBlockN : min(p.depth - tile.l0, p.depth_box_slots);
        if (slot_end > slot_mask) {
            // Every slot of the box exists (and sequence tiles have none): only the window.
            // Column c = frag_col(e, 0) + frag_col(0, lane); the first term is a constant, so
            // shifting the bounds by the second leaves two compares with immediates per score.
            const int lane_col = frag_col(0, lane);
            const int first[2] = {lo[0] - lane_col, lo[1] - lane_col};
            const int end[2] = {hi[0] - lane_col, hi[1] - lane_col};
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < size(scores); ++e) {
                const int c = frag_col(e, 0);
                const int h = frag_row_half(e);
                if (c < first[h] || c >= end[h]) scores(e) = -INFINITY;
            }
            return;
        }
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(scores); ++e) {
            const int c = frag_col(e, lane);
            const int h = frag_row_half(e);
            if (c < lo[h] || c >= hi[h] || (c & slot_mask) >= slot_end) scores(e) = -INFINITY;
        }
    }
};

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

    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};  // this thread's partial sums; reduced over the quad at the end
    const float scale_log2 = p.scale_log2;

    // This warpgroup's depth window (rows are in position order).
    const RowVisibility<kCausal, kBlockN> rows_see(p, t_row);
    const int wg_first = DepthWindow::of<kCausal>(wg_t_lo, p.depth_chunk, p.seqlen).first;
    const int wg_last = DepthWindow::of<kCausal>(wg_t_hi, p.depth_chunk, p.seqlen).last;
    // Scores -> -inf where a key is not visible (only the causal diagonal and ragged-end
    // sequence tiles, and the depth tiles, need it).
    auto apply_mask = [&](TileAt const& tile) {
        if (tile.is_seq && tile.n < sched.first_masked) return;
        rows_see.mask(p, tile, tSrS, lane);
    };
    // The new running max from this thread's partial tile maxima (reduced over the quad here);
    // the factor alpha that rescales what was accumulated, and the exponent offset of the
    // tile's scores.
    auto update_row_max = [&](float (&tile_max)[2], float (&alpha)[2], float (&offset)[2]) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
            tile_max[h] = quad_allreduce_max(tile_max[h]);
            // A row that has seen only masked scores keeps max -inf: exponentiate against 0
            // instead, so that exp2(-inf - -inf) never makes a NaN.
            offset[h] = tile_max[h] == -INFINITY ? 0.f : tile_max[h] * scale_log2;
            alpha[h] = exp2f(row_max[h] * scale_log2 - offset[h]);
            row_max[h] = tile_max[h];
            row_sum[h] *= alpha[h];
        }
    };
    // Online softmax in base 2 over the scores in tSrS: updates the running max and sum,
    // turns tSrS into probabilities (fp32, in place) and returns the factor by which the
    // output accumulated so far must be rescaled.
    auto softmax_step = [&](float (&alpha)[2]) {
        float tile_max[2] = {row_max[0], row_max[1]};
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(tSrS); ++e) {
            tile_max[frag_row_half(e)] = fmaxf(tile_max[frag_row_half(e)], tSrS(e));
        }
        float offset[2];
        update_row_max(tile_max, alpha, offset);
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(tSrS); ++e) {
            const int h = frag_row_half(e);
            tSrS(e) = exp2f(tSrS(e) * scale_log2 - offset[h]);
            row_sum[h] += tSrS(e);
        }
    };
    auto rescale_and_convert = [&](float const (&alpha)[2]) {
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(tOrO); ++e) tOrO(e) *= alpha[frag_row_half(e)];
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(tSrS); ++e) tOrP(e) = static_cast<Element>(tSrS(e));
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
            softmax_step(alpha);
            // A plain wgmma.wait_group here is moved ahead of the softmax by ptxas, in every
            // forward kernel (bench/sass_wait_placement.py: the wait before the first exp2), so
            // the overlap would not happen. Behind a branch on the row sums, which the exp2s
            // produce, the wait cannot move above them. The branch is always taken, by every
            // thread alike, as wgmma.wait_group requires: a sum of exp2s is never the all-ones
            // bit pattern (the GPU's NaNs are 0x7fffffff). The plain wait after it then finds
            // nothing left in flight. Measured (bench/NOTES.md, fourteenth round), forward ms
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
            softmax_step(alpha);
        }
        rescale_and_convert(alpha);
        pending = read;
        has_pending = true;
        ++read;
    }
    if (has_pending) flush_pending();

    // ---------------------------------------------------------------------- epilogue
    float inv_sum[2], lse[2];
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        const float l = quad_allreduce_sum(row_sum[h]);
        inv_sum[h] = l > 0.f ? 1.f / l : 0.f;
        // Natural-log logsumexp of the scaled scores (-inf for a row that saw nothing).
        lse[h] = l > 0.f ? (row_max[h] * scale_log2 + log2f(l)) * 0.6931471805599453f : -INFINITY;
    }
    Element* out = static_cast<Element*>(p.out);
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        const int t = t_row[h];
        const int head = hk * G + row[h] % G;
        if (t >= p.seqlen) continue;
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
