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
// Both consumer warpgroups wait on the same "full" barrier for each tile, so left alone they
// run in lockstep: both issue their matmuls at once, then both exponentiate at once, and the
// tensor cores idle during the softmax. With kPingPong they take turns (two named barriers,
// one per warpgroup): a warpgroup issues its matmuls only on its turn and hands the turn over
// right after issuing, so one warpgroup's softmax runs while the other's matmuls do.
//
// A depth tile is dense: the warpgroup's 64 rows times every column of the box, of which a
// row sees at most one position's slots (1/8 of the products kept at G = 8). With kWarpDepth
// each warp computes its own 16 rows instead (mma.sync; a warp that sees nothing of the box
// skips it), so the waste drops to what one warp's rows span, and the softmax of the tile runs
// in one warp instead of four. With kSwapDepth (depth_chunk = 1) the box is the M side instead
// and 16 query rows the N side (see depth_tile_swapped): 1/2 of the products kept at L = 64,
// G = 8. With kDepthLoop the dense tiles run after the sequence loop, where a warp may skip
// the softmax of the columns its rows do not see (see depth_tile_sparse).
#pragma once

#include <cuda.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "moda_fwd_merge.h"
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
    // The depth tensors as bytes, for the producer warp's L2 prefetches (kDepthL2Lead):
    // strides per batch, position, slot and kv head; a row is D contiguous elements.
    const char* depth_k_bytes;
    const char* depth_v_bytes;
    int64_t dk_byte_strides[4], dv_byte_strides[4];
    void* out;
    float* lse;
    int64_t out_batch_stride, out_seq_stride, out_head_stride;
    int seqlen, kv_heads, group, depth, depth_chunk;
    int depth_box_slots;      // Lb
    int depth_box_positions;  // Tb
    int depth_slot_blocks;    // ceil(L / Lb)
    int num_m_blocks;
    int has_seq;
    int depth_stripes;        // depth tiles visited in this many round-robin stripes (see TileAt)
    float scale_log2;         // softmax scale * log2(e): scores are exponentiated with exp2
    // With the depth rows in a kernel of their own (FwdConfig::kDepthBeside): where the two
    // halves of each block's softmax meet (moda_fwd_merge.h). merge.claims null: not used.
    FwdMergeParams merge;
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
// first position s0 and first slot l0 of its box.
//
// Depth boxes are position-major, so the boxes that one consumer warpgroup's rows see are
// consecutive: in that order a warpgroup's boxes fill the pipeline's stages while the other
// warpgroups skip them. With p.depth_stripes = W (the consumer warpgroups), the n depth
// tiles are cut into W contiguous stripes (sizes differ by at most one), visited
// round-robin: the first box of every stripe, then the second of every stripe, ... so that
// consecutive stages hold boxes of different warpgroups, which can work on them at once.
// (Measured no faster than the plain order: FwdConfig::kStripeDepth.)
struct TileAt {
    bool is_seq;
    int n;
    int s0 = 0, l0 = 0;
    __device__ TileAt(FwdKernelParams const& p, TileSchedule const& sched, int i)
        : is_seq(i < sched.n_seq), n(sched.n_seq - 1 - i) {
        if (!is_seq) {
            const int d = striped(i - sched.n_seq, sched.n_depth, p.depth_stripes);
            // One slot block (L <= kBlockN) is the common case: no 32-bit division then,
            // which every consumer warp would otherwise run once per depth tile.
            const int blocks = p.depth_slot_blocks;
            const int position_block = blocks == 1 ? d : d / blocks;
            s0 = sched.s_lo + position_block * p.depth_box_positions;
            l0 = (d - position_block * blocks) * p.depth_box_slots;
        }
    }
    // The k-th of n items visited round-robin over w contiguous stripes: the first `big`
    // stripes hold `per` items, the others per - 1; rows 0 .. per - 2 visit every stripe, the
    // last row only the big ones. A permutation of [0, n).
    __device__ static int striped(int k, int n, int w) {
        if (w <= 1 || n <= w) return k;
        const int per = (n + w - 1) / w, big = n - w * (per - 1);
        const int full_rows = w * (per - 1);
        const int stripe = k < full_rows ? k % w : k - full_rows;
        const int row = k < full_rows ? k / w : per - 1;
        const int start = stripe < big ? stripe * per : big * per + (stripe - big) * (per - 1);
        return start + row;
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

// Turn-taking of the two consumer warpgroups around their matmul issue (see the top of the
// file). Named barrier kTurnBarrier + w means "warpgroup w may issue"; it completes when w's
// 128 threads wait on it and the other warpgroup's 128 threads have arrived.
constexpr uint32_t kTurnBarrier = 0;  // user ids 0, 1 (CUTLASS offsets them past its reserved ones)
constexpr uint32_t kTurnThreads = 256;
// Named barriers of one consumer warpgroup's operand-swapped depth tiles (kSwapDepth): ids 2 + w.
constexpr uint32_t kSwapBarrier = 2;

template <bool kEnabled>
__device__ __forceinline__ void wait_for_turn(int wg) {
    if constexpr (kEnabled) cutlass::arch::NamedBarrier::sync(kTurnThreads, kTurnBarrier + wg);
}
template <bool kEnabled>
__device__ __forceinline__ void pass_turn(int wg) {
    if constexpr (kEnabled) cutlass::arch::NamedBarrier::arrive(kTurnThreads, kTurnBarrier + (1 - wg));
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

// Ask L2 for the rows of depth box `tile` in both depth tensors: plain prefetches, one
// 128-byte line per lane and instruction, from the 32 lanes of the producer warp. They go
// through the load/store unit, not the TMA unit that the pipeline's loads queue on.
template <int kHeadDim>
__device__ __forceinline__ void prefetch_depth_box_to_l2(FwdKernelParams const& p, TileAt const& tile, int hk,
                                                         int batch, int lane) {
    constexpr int kLinesPerRow = kHeadDim * 2 / 128;  // 16-bit elements
    const int slot_shift = __ffs(p.depth_box_slots) - 1;  // Lb is a power of two
    const int lines = (p.depth_box_positions << slot_shift) * kLinesPerRow;
    for (int line = lane; line < lines; line += 32) {
        const int row = line / kLinesPerRow;
        const int t = tile.s0 + (row >> slot_shift), l = tile.l0 + (row & (p.depth_box_slots - 1));
        if (t >= p.seqlen || l >= p.depth) continue;
        const int64_t part = (line % kLinesPerRow) * 128;
        auto at = [&](int64_t const (&s)[4]) { return batch * s[0] + t * s[1] + l * s[2] + hk * s[3] + part; };
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p.depth_k_bytes + at(p.dk_byte_strides)));
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p.depth_v_bytes + at(p.dv_byte_strides)));
    }
}

// The producer's stream of key tiles for a query-stationary CTA: each tile of the schedule
// into the K pipeline's and the V pipeline's next stage (a sequence box [64, 1, kBlockN, 1, 1]
// at position n * kBlockN, or a depth box [64, 1, Lb, Tb, 1] at slot l0, position s0), issued
// by thread 0. With kDepthPrefetch = A > 0 a depth box is also asked of L2 (a TMA prefetch)
// when the tile A places before it is issued: no other CTA reads a CTA's depth rows, so their
// loads come from DRAM, and the pipeline's few stages do not cover that latency.
// With kDepthL2Lead = W > 0 the whole producer warp runs this loop (its other lanes only wait
// with thread 0) and, while thread 0 issues the last W sequence tiles, asks L2 for all the depth
// boxes, spread evenly over those W tiles (prefetch_depth_box_to_l2), so that the depth tiles
// at the end of the schedule load from L2 while the sequence tiles before them compute.
template <int kBlockN, int kHeadDim, int kDepthPrefetch, class Pipeline, class Element, int kDepthL2Lead = 0>
__device__ __forceinline__ void produce_key_tiles(FwdKernelParams const& p, TileSchedule const& sched,
                                                  Pipeline& pipe_k, Pipeline& pipe_v, Element* sK, Element* sV,
                                                  int hk, int batch) {
    const bool leader = threadIdx.x == 0;
    if (leader) {
        if (p.has_seq) {
            prefetch_tma_descriptor(&p.tma_k);
            prefetch_tma_descriptor(&p.tma_v);
        }
        if (p.depth > 0) {
            prefetch_tma_descriptor(&p.tma_dk);
            prefetch_tma_descriptor(&p.tma_dv);
        }
    }
    auto prefetch_depth = [&](int i) {
        if (i >= sched.size()) return;
        const TileAt tile(p, sched, i);
        if (tile.is_seq) return;
        tma_prefetch_rows<kHeadDim>(&p.tma_dk, hk, tile.l0, tile.s0, batch);
        tma_prefetch_rows<kHeadDim>(&p.tma_dv, hk, tile.l0, tile.s0, batch);
    };
    if constexpr (kDepthPrefetch > 0) {
        if (p.depth > 0) {
            for (int i = 0; i < kDepthPrefetch; ++i) prefetch_depth(i);
        }
    }
    // kDepthL2Lead: the depth boxes go to L2 over the last `lead` sequence tiles.
    const int lead = kDepthL2Lead > 0 && p.depth > 0 ? min(kDepthL2Lead, sched.n_seq) : 0;
    auto write = cutlass::make_producer_start_state<Pipeline>();
    for (int i = 0; i < sched.size(); ++i) {
        if constexpr (kDepthPrefetch > 0) {
            if (p.depth > 0 && leader) prefetch_depth(i + kDepthPrefetch);
        }
        if constexpr (kDepthL2Lead > 0) {
            if (i >= sched.n_seq - lead && i < sched.n_seq) {  // so lead > 0
                // Boxes [box_at(i), box_at(i + 1)) at sequence tile i, spread evenly.
                auto box_at = [&](int k) { return ((k - (sched.n_seq - lead)) * sched.n_depth + lead - 1) / lead; };
                for (int j = box_at(i); j < box_at(i + 1); ++j) {
                    prefetch_depth_box_to_l2<kHeadDim>(p, TileAt(p, sched, sched.n_seq + j), hk, batch,
                                                       threadIdx.x % 32);
                }
            }
        }
        const int stage_offset = write.index() * kBlockN * kHeadDim;
        const TileAt tile(p, sched, i);
        auto load = [&](Pipeline& pipe, CUtensorMap const* seq_map, CUtensorMap const* depth_map, Element* buf) {
            pipe.producer_acquire(write);  // thread 0 arrives with the byte count; the others only wait
            if (!leader) return;
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

template <class Traits, bool kCausal, bool kOverlap, bool kPingPong, bool kWarpDepth>
__global__ void __launch_bounds__(Traits::kThreads, 1) moda_fwd_kernel(__grid_constant__ const FwdKernelParams p) {
    using Element = typename Traits::Element;
    using Pipeline = typename Traits::Pipeline;
    using PipelineState = typename Pipeline::PipelineState;
    using Barrier = cutlass::arch::ClusterTransactionBarrier;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kBlockN = Traits::kBlockN;
    constexpr int kHeadDim = Traits::kHeadDim;
    static_assert(!kPingPong || Traits::kConsumerWGs == 2, "turn-taking is written for two consumer warpgroups");

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
        // Thread 0 issues every load; with kDepthL2Lead its warp's other lanes prefetch.
        if (threadIdx.x >= (Traits::kDepthL2Lead > 0 ? 32 : 1)) return;
        if (threadIdx.x == 0) {
            prefetch_tma_descriptor(&p.tma_q);
            Barrier::arrive_and_expect_tx(&smem.q_full, Traits::kQBytes);
            tma_load_rows<kBlockM, kHeadDim>(&p.tma_q, &smem.q_full, sQ_ptr, 0, hk, t_lo, batch);
        }
        produce_key_tiles<kBlockN, kHeadDim, Traits::kDepthPrefetch, Pipeline, Element, Traits::kDepthL2Lead>(
            p, sched, pipe_k, pipe_v, sK_ptr, sV_ptr, hk, batch);
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
    if (wg == 1) pass_turn<kPingPong>(wg);  // warpgroup 0 issues first
    PipelineState read;     // the tile whose scores are computed next
    PipelineState pending;  // with kOverlap: the tile whose P V product is still to be issued
    bool has_pending = false;
    // O += P V for the pending tile, waited for, its V stage released.
    auto flush_pending = [&]() {
        pipe_v.consumer_wait(pending);
        wgmma_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, pending.index()), tOrO);
        wgmma_wait<0>(tOrO);
        pipe_v.consumer_release(pending);
        has_pending = false;
    };

    // kWarpDepth: one depth tile on this warp's own 16 rows (see the top of the file). The
    // accumulators are views of the wgmma fragments' registers (same per-thread order), so
    // apply_mask, softmax_step and rescale_and_convert work on them unchanged.
    typename Traits::WarpMma warp_mma;
    auto warp_thr = warp_mma.get_thread_slice(lane);
    auto load_q = make_tiled_copy_A(typename Traits::WarpLoadK{}, warp_mma);
    auto load_k = make_tiled_copy_B(typename Traits::WarpLoadK{}, warp_mma);
    auto load_vt = make_tiled_copy_B(typename Traits::WarpLoadT{}, warp_mma);
    auto load_q_thr = load_q.get_thread_slice(lane);
    auto load_k_thr = load_k.get_thread_slice(lane);
    auto load_vt_thr = load_vt.get_thread_slice(lane);
    Tensor sQw = local_tile(sQ, Shape<_16, Int<kHeadDim>>{}, make_coord(tid / 32, 0));
    Tensor wS = make_tensor(tSrS.data(), Layout<Shape<Shape<_2, _2>, _1, Int<kBlockN / 8>>>{});
    Tensor wO = make_tensor(tOrO.data(), Layout<Shape<Shape<_2, _2>, _1, Int<kHeadDim / 8>>>{});
    static_assert(decltype(size(wS))::value == decltype(size(tSrS))::value &&
                      decltype(size(wO))::value == decltype(size(tOrO))::value,
                  "the warp-level accumulators are exactly the wgmma fragments' registers");
    auto depth_tile_by_warp = [&](TileAt const& tile, PipelineState const& state) {
        int lo[2], hi[2];
        rows_see.columns(p, tile, lo, hi);
        // slot_end >= 1 (l0 < L): a row whose window meets the box's columns sees slot l0.
        const bool row_sees = max(lo[0], 0) < min(hi[0], kBlockN) || max(lo[1], 0) < min(hi[1], kBlockN);
        const bool sees = __any_sync(0xffffffff, row_sees);
        Tensor sKs = sK(_, _, state.index());
        Tensor sVts = sVt(_, _, state.index());
        pipe_k.consumer_wait(state);
        if (sees) {
            Tensor wQ = warp_thr.partition_fragment_A(sQw);  // (MMA, 1, D / 16)
            Tensor wK = warp_thr.partition_fragment_B(sKs);  // (MMA, kBlockN / 8, D / 16)
            Tensor wQ_src = load_q_thr.partition_S(sQw);
            Tensor wQ_dst = load_q_thr.retile_D(wQ);
            Tensor wK_src = load_k_thr.partition_S(sKs);
            Tensor wK_dst = load_k_thr.retile_D(wK);
            clear(wS);
            CUTLASS_PRAGMA_UNROLL
            for (int k = 0; k < size<2>(wQ); ++k) {  // one k-slice of Q and K in registers at a time
                copy(load_q, wQ_src(_, _, k), wQ_dst(_, _, k));
                copy(load_k, wK_src(_, _, k), wK_dst(_, _, k));
                cute::gemm(warp_mma, wQ(_, _, k), wK(_, _, k), wS);
            }
        }
        pipe_k.consumer_release(state);
        if (sees) {
            float alpha[2];
            apply_mask(tile);
            softmax_step(alpha);
            rescale_and_convert(alpha);
        }
        pipe_v.consumer_wait(state);
        if (sees) {
            Tensor wV = warp_thr.partition_fragment_B(sVts);  // (MMA, D / 8, kBlockN / 16)
            Tensor wV_src = load_vt_thr.partition_S(sVts);
            Tensor wV_dst = load_vt_thr.retile_D(wV);
            // Unrolled at D = 128, ptxas keeps every k-slice of V^T in flight and spills (~650
            // bytes); rolled, P goes to local memory instead (128 bytes per thread, no spills).
            constexpr int kUnrollPV = kHeadDim == 64 ? kBlockN / 16 : 1;
#pragma unroll kUnrollPV
            for (int k = 0; k < size<2>(wV); ++k) {
                copy(load_vt, wV_src(_, _, k), wV_dst(_, _, k));
                cute::gemm(warp_mma, tOrP(_, _, k), wV(_, _, k), wO);
            }
        }
        pipe_v.consumer_release(state);
    };

    // kSwapDepth: one depth box with the operands swapped (see FwdTraits::kSwapRows), for
    // depth_chunk = 1, where a query row sees exactly its own position's slots. For each
    // block of 16 of this warpgroup's rows that see the box:
    //   S^T = K_box Q_rows^T   [kBlockN slots x 16 rows], wgmma M = slots, N = query rows;
    //   a column (query row) softmax over the slots: each warp reduces its slot rows, the
    //   four warps meet in shared memory (named barrier 1 of 4);
    //   P^T -> shared memory as the B operand of the second product (barrier 2);
    //   O^T = V_box^T P^T      [D x 16 rows], V^T read MN-major as for the P V product;
    //   every warp's product done, P^T dead (barrier 3);
    //   O^T -> shared memory (barrier 4), whence the warp that owns the 16 rows in the
    //   accumulator layout merges (max, sum, O^T) into its online-softmax state, exactly as
    //   a key tile's scores would be (rescale by exp2 of the max difference).
    // One scratch buffer per warpgroup serves P^T and then O^T: the next block writes P^T only
    // after its barrier 1, which the owning warp reaches after its merge read O^T. The column
    // maxima are written before barrier 1, so they alternate between two buffers
    // (compute-sanitizer's racecheck caught the single-buffered version).
    // Only values the main loop holds anyway are used here (with depth_chunk = 1, t_lo is
    // sched.s_lo and this warpgroup's positions are [wg_first, wg_last]): the main loop runs
    // at the register limit, and one more value live across it spills.
    constexpr int kSwapRows = Traits::kSwapRows;
    int swap_blocks = 0;  // blocks done: the parity picks the column statistics' buffer
    auto depth_tile_swapped = [&](TileAt const& tile, PipelineState const& state) {
        if constexpr (Traits::kSwapDepth) {
            const int wg_warp = __shfl_sync(0xffffffff, (tid % 128) / 32, 0);
            auto& scratch = smem.swap[wg];
            typename Traits::TiledMmaSwapS mma_ss;
            typename Traits::TiledMmaSwapO mma_so;
            auto thr_ss = mma_ss.get_thread_slice(tid % 128);
            auto thr_so = mma_so.get_thread_slice(tid % 128);
            Tensor sPt = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(scratch.pt_or_o)),
                                     typename Traits::SmemLayoutPt{});
            float(*sOt)[Traits::kSwapOStride] = reinterpret_cast<float(*)[Traits::kSwapOStride]>(scratch.pt_or_o);
            Tensor tXrK = thr_ss.partition_fragment_A(sK);   // (MMA, kBlockN / 64, D / 16, stage)
            Tensor tXrQ = thr_ss.partition_fragment_B(sQ);   // (MMA, kBlockM / 16, D / 16)
            Tensor tXrV = thr_so.partition_fragment_A(sVt);  // (MMA, D / 64, kBlockN / 16, stage)
            Tensor tXrP = thr_so.partition_fragment_B(sPt);  // (MMA, 1, kBlockN / 16)
            Tensor tXsS = partition_fragment_C(mma_ss, Shape<Int<kBlockN>, Int<kSwapRows>>{});  // (MMA, kBlockN / 64, 1)
            Tensor tXoO = partition_fragment_C(mma_so, Shape<Int<kHeadDim>, Int<kSwapRows>>{});  // (MMA, D / 64, 1)
            const int lb_shift = __ffs(p.depth_box_slots) - 1;  // Lb and G are powers of two
            const int g_shift = __ffs(G) - 1;
            const int slot_end = min(p.depth - tile.l0, p.depth_box_slots);  // valid slots of a box position
            // This warpgroup's rows that read the box, local to the CTA.
            const int pos_begin = max(tile.s0, wg_first);
            const int pos_end = min(tile.s0 + p.depth_box_positions, wg_last + 1);
            const int rows_begin = (pos_begin - sched.s_lo) * G, rows_end = (pos_end - sched.s_lo) * G;
            const int box_pos0 = tile.s0 - sched.s_lo;  // the box's first position, local to the CTA
            pipe_k.consumer_wait(state);
            pipe_v.consumer_wait(state);
            for (int rows0 = rows_begin / kSwapRows * kSwapRows; rows0 < rows_end; rows0 += kSwapRows) {
                // The thread's coordinates, opaque to the compiler: else it hoists the ~60
                // addresses and masks derived from them out of the loop and spills them.
                int ln = lane, wq = wg_warp;
                asm volatile("" : "+r"(ln), "+r"(wq));
                auto& col_max_buf = scratch.col_max[swap_blocks & 1];
                auto& col_sum_buf = scratch.col_sum[swap_blocks & 1];
                ++swap_blocks;
                // S^T for the query rows [rows0, rows0 + 16): B is that 16-row block of Q.
                Tensor q_rows = tXrQ(_, rows0 / kSwapRows, _);
                Tensor tXrQb = make_tensor(q_rows.data(),
                                           make_layout(layout<0>(q_rows), Layout<_1, _0>{}, layout<1>(q_rows)));
                wgmma_issue<true, false>(mma_ss, tXrK(_, _, _, state.index()), tXrQb, tXsS);
                wgmma_wait<0>(tXsS);
                // Mask: slot row i (box position i >> lb_shift, slot l0 + (i & (Lb - 1))) is seen
                // by column c (CTA row rows0 + c, position (rows0 + c) >> g_shift) iff the
                // positions match and the slot exists. Then each column's max over the slots.
                // This thread's four columns: j -> 8 (j >> 1) + 2 (lane % 4) + (j & 1).
                float col_max[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
                CUTLASS_PRAGMA_UNROLL
                for (int a = 0; a < size<1>(tXsS); ++a) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int e = 0; e < size<0>(tXsS); ++e) {
                        const int i = 64 * a + 16 * wq + ln / 4 + 8 * frag_row_half(e);
                        const int c = frag_col(e, ln);
                        const bool seen = ((rows0 + c) >> g_shift) == box_pos0 + (i >> lb_shift) &&
                                          (i & (p.depth_box_slots - 1)) < slot_end;
                        float& s = tXsS(e, a, 0);
                        if (!seen) s = -INFINITY;
                        const int j = (e & 1) + 2 * (e >> 2);
                        col_max[j] = fmaxf(col_max[j], s);
                    }
                }
                CUTLASS_PRAGMA_UNROLL
                for (int j = 0; j < 4; ++j) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int m = 4; m < 32; m *= 2) col_max[j] = fmaxf(col_max[j], __shfl_xor_sync(0xffffffff, col_max[j], m));
                    if (ln < 4) col_max_buf[wq][8 * (j >> 1) + 2 * ln + (j & 1)] = col_max[j];
                }
                cutlass::arch::NamedBarrier::sync(128, kSwapBarrier + wg);
                float offset[4], col_sum[4] = {0.f, 0.f, 0.f, 0.f};
                CUTLASS_PRAGMA_UNROLL
                for (int j = 0; j < 4; ++j) {
                    const int c = 8 * (j >> 1) + 2 * (ln & 3) + (j & 1);
                    float m = col_max_buf[0][c];
                    CUTLASS_PRAGMA_UNROLL
                    for (int w = 1; w < 4; ++w) m = fmaxf(m, col_max_buf[w][c]);
                    offset[j] = m == -INFINITY ? 0.f : m * scale_log2;  // a row that sees nothing: P = 0
                }
                CUTLASS_PRAGMA_UNROLL
                for (int a = 0; a < size<1>(tXsS); ++a) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int e = 0; e < size<0>(tXsS); ++e) {
                        const int i = 64 * a + 16 * wq + ln / 4 + 8 * frag_row_half(e);
                        const int c = frag_col(e, ln);
                        const int j = (e & 1) + 2 * (e >> 2);
                        const float prob = exp2f(tXsS(e, a, 0) * scale_log2 - offset[j]);
                        col_sum[j] += prob;
                        sPt(c, i) = static_cast<Element>(prob);
                    }
                }
                CUTLASS_PRAGMA_UNROLL
                for (int j = 0; j < 4; ++j) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int m = 4; m < 32; m *= 2) col_sum[j] += __shfl_xor_sync(0xffffffff, col_sum[j], m);
                    if (ln < 4) col_sum_buf[wq][8 * (j >> 1) + 2 * ln + (j & 1)] = col_sum[j];
                }
                cutlass::arch::fence_view_async_shared();  // P^T, written by threads, is read by wgmma
                cutlass::arch::NamedBarrier::sync(128, kSwapBarrier + wg);
                wgmma_issue<true, false>(mma_so, tXrV(_, _, _, state.index()), tXrP, tXoO);
                wgmma_wait<0>(tXoO);
                cutlass::arch::NamedBarrier::sync(128, kSwapBarrier + wg);  // every warp's product done: P^T dead
                CUTLASS_PRAGMA_UNROLL
                for (int a = 0; a < size<1>(tXoO); ++a) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int e = 0; e < size<0>(tXoO); ++e) {
                        const int d = 64 * a + 16 * wq + ln / 4 + 8 * frag_row_half(e);
                        sOt[frag_col(e, ln)][d] = tXoO(e, a, 0);
                    }
                }
                cutlass::arch::NamedBarrier::sync(128, kSwapBarrier + wg);
                // The warp that owns rows [rows0, rows0 + 16) merges them: its ln holds row
                // rows0 + ln / 4 + 8 h in half h, the columns frag_col of O.
                if (wq == (rows0 % 64) / 16) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int h = 0; h < 2; ++h) {
                        const int c = ln / 4 + 8 * h;
                        float m = col_max_buf[0][c], l = col_sum_buf[0][c];
                        CUTLASS_PRAGMA_UNROLL
                        for (int w = 1; w < 4; ++w) {
                            m = fmaxf(m, col_max_buf[w][c]);
                            l += col_sum_buf[w][c];
                        }
                        if (m == -INFINITY) continue;  // this row sees none of the box
                        const float new_max = fmaxf(row_max[h], m);
                        const float alpha = exp2f((row_max[h] - new_max) * scale_log2);
                        const float beta = exp2f((m - new_max) * scale_log2);
                        row_max[h] = new_max;
                        row_sum[h] = row_sum[h] * alpha + ((ln & 3) == 0 ? beta * l : 0.f);
                        CUTLASS_PRAGMA_UNROLL
                        for (int e = 0; e < size(tOrO); ++e) {
                            if (frag_row_half(e) != h) continue;
                            tOrO(e) = tOrO(e) * alpha + beta * sOt[c][frag_col(e, ln)];
                        }
                    }
                }
            }
            pipe_k.consumer_release(state);
            pipe_v.consumer_release(state);
        }
    };

    // kDepthLoop: one depth tile, its two products issued and drained in order (no P V left
    // running, so the main loop's pending-product registers are free here and a warp may
    // branch around work it does not need). A row sees one position's slots: a warp none of
    // whose rows sees the box skips its softmax and output rescale (its probabilities are 0),
    // and a warp that sees part of it masks and exponentiates only the 16-column blocks its
    // rows see. At G = 8, L = 64 one warp of four sees a box, and exponentiates half of its
    // scores; the MUFU unit that computes exp2 runs at 1/8 of the FMA rate.
    auto depth_tile_sparse = [&](TileAt const& tile, PipelineState const& state) {
        pipe_k.consumer_wait(state);
        wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, state.index()), tSrS);
        // While S = Q K^T runs: bit 2 b + h is set if some row of this warp's row half h sees
        // a column of the 16-column block b (bounds reduced over the warp: uniform branches).
        int lo[2], hi[2];
        rows_see.columns(p, tile, lo, hi);
        uint32_t seen = 0;
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
            const int warp_lo = __reduce_min_sync(0xffffffff, lo[h]);
            const int warp_hi = __reduce_max_sync(0xffffffff, hi[h]);
            CUTLASS_PRAGMA_UNROLL
            for (int b = 0; b < kBlockN / 16; ++b) {
                if (b * 16 < warp_hi && b * 16 + 16 > warp_lo) seen |= 1u << (2 * b + h);
            }
        }
        wgmma_wait<0>(tSrS);
        pipe_k.consumer_release(state);
        // Each score of the blocks this warp sees -> seen_score(e, h), each of the others ->
        // unseen_score(e): element q of block b, row half h is flat index 8 b + 4 (q / 2) +
        // 2 h + q % 2 (frag_col).
        auto for_each_score = [&](auto&& seen_score, auto&& unseen_score) {
            CUTLASS_PRAGMA_UNROLL
            for (int b = 0; b < kBlockN / 16; ++b) {
                CUTLASS_PRAGMA_UNROLL
                for (int h = 0; h < 2; ++h) {
                    if ((seen >> (2 * b + h)) & 1u) {
                        CUTLASS_PRAGMA_UNROLL
                        for (int q = 0; q < 4; ++q) seen_score(8 * b + 4 * (q >> 1) + 2 * h + (q & 1), h);
                    } else {
                        CUTLASS_PRAGMA_UNROLL
                        for (int q = 0; q < 4; ++q) unseen_score(8 * b + 4 * (q >> 1) + 2 * h + (q & 1));
                    }
                }
            }
        };
        if (seen != 0) {
            const int slot_mask = p.depth_box_slots - 1;
            const int slot_end = min(p.depth - tile.l0, p.depth_box_slots);
            float tile_max[2] = {row_max[0], row_max[1]};
            for_each_score(
                [&](int e, int h) {
                    const int c = frag_col(e, lane);
                    if (c < lo[h] || c >= hi[h] || (c & slot_mask) >= slot_end) tSrS(e) = -INFINITY;
                    tile_max[h] = fmaxf(tile_max[h], tSrS(e));
                },
                [](int) {});
            float alpha[2], offset[2];
            update_row_max(tile_max, alpha, offset);
            for_each_score(
                [&](int e, int h) {
                    tSrS(e) = exp2f(tSrS(e) * scale_log2 - offset[h]);
                    row_sum[h] += tSrS(e);
                },
                [&](int e) { tSrS(e) = 0.f; });
            rescale_and_convert(alpha);
        } else {
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < size(tOrP); ++e) tOrP(e) = static_cast<Element>(0.f);
        }
        pipe_v.consumer_wait(state);
        wgmma_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, state.index()), tOrO);
        wgmma_wait<0>(tOrO);
        pipe_v.consumer_release(state);
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
    // Nothing this warpgroup can see: hand both stages back untouched (and the turn: both
    // warpgroups take exactly one turn per tile). A pending product goes first, so that its V
    // stage is never held across skipped tiles (the producer may need that stage to fill the
    // ones we wait on).
    auto skip_tile = [&]() {
        if (has_pending) flush_pending();
        wait_for_turn<kPingPong>(wg);
        pass_turn<kPingPong>(wg);
        pipe_k.consumer_wait(read);
        pipe_k.consumer_release(read);
        pipe_v.consumer_wait(read);
        pipe_v.consumer_release(read);
        ++read;
    };

    // The depth tiles come last in the schedule; swapped and sparse ones get a loop of their
    // own, after the last pending P V product, so that none of the main loop's pending
    // registers is live there.
    int n_main = sched.size();
    if constexpr (Traits::kSwapDepth) {
        if (p.depth_chunk == 1) n_main = sched.n_seq;
    }
    if constexpr (Traits::kDepthLoop) n_main = sched.n_seq;
    for (int i = 0; i < n_main; ++i) {
        const TileAt tile(p, sched, i);
        if (!wg_sees(tile)) {
            skip_tile();
            continue;
        }
        if constexpr (kWarpDepth) {
            if (!tile.is_seq) {
                if (has_pending) flush_pending();  // its wgmma accumulates into O: finish it first
                wait_for_turn<kPingPong>(wg);
                pass_turn<kPingPong>(wg);
                depth_tile_by_warp(tile, read);
                ++read;
                continue;
            }
        }

        pipe_k.consumer_wait(read);
        float alpha[2];
        if (kOverlap && has_pending) {
            // The previous tile's P V is issued with this tile's S and waited for after this
            // tile's softmax, so that it may run during the softmax. (A plain wait there is moved
            // ahead of the softmax by ptxas; Traits::kLatePvWait pins it, see below.) The issues
            // and the plain wait of this path are unconditional, so ptxas can see that the
            // accumulators are never touched while their wgmma is in flight.
            pipe_v.consumer_wait(pending);
            wait_for_turn<kPingPong>(wg);
            wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, read.index()), tSrS);
            wgmma_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, pending.index()), tOrO);
            pass_turn<kPingPong>(wg);
            wgmma_wait<1>(tSrS);  // S is ready; P V may still run
            pipe_k.consumer_release(read);
            apply_mask(tile);
            softmax_step(alpha);
            if constexpr (Traits::kLatePvWait) {
                // A wait behind a branch on the row sums cannot move above the exp2s that make
                // them. The branch is always taken, by every thread alike, as wgmma.wait_group
                // requires: a sum of exp2s is never the all-ones bit pattern (the GPU's NaNs are
                // 0x7fffffff). The plain wait after it then finds nothing left in flight.
                const float sums = row_sum[0] + row_sum[1];
                if (__all_sync(0xffffffff, __float_as_uint(sums) != 0xffffffffu)) wgmma_wait<0>(tOrO);
            }
            wgmma_wait<0>(tOrO);
            pipe_v.consumer_release(pending);
        } else {
            wait_for_turn<kPingPong>(wg);
            wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, read.index()), tSrS);
            pass_turn<kPingPong>(wg);
            wgmma_wait<0>(tSrS);
            pipe_k.consumer_release(read);
            apply_mask(tile);
            softmax_step(alpha);
        }
        rescale_and_convert(alpha);
        pending = read;
        has_pending = true;
        if (!kOverlap) flush_pending();  // serial order: this tile's P V right away
        ++read;
    }
    if (has_pending) flush_pending();
    if constexpr (Traits::kSwapDepth || Traits::kDepthLoop) {
        for (int i = n_main; i < sched.size(); ++i) {
            const TileAt tile(p, sched, i);
            if (!wg_sees(tile)) {
                skip_tile();
                continue;
            }
            wait_for_turn<kPingPong>(wg);
            pass_turn<kPingPong>(wg);
            if constexpr (Traits::kSwapDepth) {
                depth_tile_swapped(tile, read);
            } else {
                depth_tile_sparse(tile, read);
            }
            ++read;
        }
    }
    if (wg == 0) wait_for_turn<kPingPong>(wg);  // take warpgroup 1's last hand-over: no arrival left pending

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
    if (p.merge.claims != nullptr) {
        // The depth rows ran in the depth kernel (moda_fwd_merge.h): merge with its half if it
        // is there, else leave this half for it.
        constexpr uint32_t kMergeBarrier = 14, kMergeThreads = 128 * Traits::kConsumerWGs;
        const int blk = merge_block_index(blockIdx.x, hk, batch, p.kv_heads, p.num_m_blocks);
        const bool leader = threadIdx.x == 128;
        const bool depth_done = merge_claim(p.merge, blk, leader, kMergeBarrier, kMergeThreads);
        const int Hq = p.kv_heads * G;
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
            const int t = t_row[h];
            if (t >= p.seqlen) continue;
            const int head = hk * G + row[h] % G;
            const int64_t lse_at = (int64_t(batch) * Hq + head) * p.seqlen + t;
            const int64_t row_at = ((int64_t(batch) * p.seqlen + t) * Hq + head) * kHeadDim;
            if (!depth_done) {
                CUTLASS_PRAGMA_UNROLL
                for (int e = 0; e < size(tOrO); e += 4) {
                    *reinterpret_cast<float2*>(p.merge.seq_out + row_at + frag_col(e, lane)) =
                        make_float2(__fmul_rn(tOrO(e + 2 * h), inv_sum[h]), __fmul_rn(tOrO(e + 2 * h + 1), inv_sum[h]));
                }
                if ((lane & 3) == 0) p.merge.seq_lse[lse_at] = lse[h];
                continue;
            }
            const MergeWeights mw = merge_weights(lse[h], __ldcg(p.merge.depth_lse + lse_at));
            Element* dst = out + batch * p.out_batch_stride + t * p.out_seq_stride + head * p.out_head_stride;
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < size(tOrO); e += 4) {
                const float2 d = __ldcg(reinterpret_cast<const float2*>(p.merge.depth_out + row_at + frag_col(e, lane)));
                cutlass::Array<Element, 2> pair;
                pair[0] = static_cast<Element>(merge_value(__fmul_rn(tOrO(e + 2 * h), inv_sum[h]), d.x, mw));
                pair[1] = static_cast<Element>(merge_value(__fmul_rn(tOrO(e + 2 * h + 1), inv_sum[h]), d.y, mw));
                *reinterpret_cast<cutlass::Array<Element, 2>*>(dst + frag_col(e, lane)) = pair;
            }
            if ((lane & 3) == 0) p.lse[lse_at] = mw.lse;
        }
        if (!depth_done) merge_publish(p.merge, blk, leader, kMergeBarrier, kMergeThreads);
        return;
    }
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
