// The forward's depth part as a kernel of its own (FwdConfig::kDepthBeside; depth_chunk = 1),
// run on a few SMs beside the sequence kernel. Per (batch, position t, kv head h) the G query
// rows q[t, h G + g] and the L depth rows K_l = depth_k[t, l, h], V_l = depth_v[t, l, h] form
// a closed softmax: S = Q K^T (G x L), O = softmax(S) V (G x D); its normalized O and lse are
// one half of the rows' softmax, merged with the sequence half (moda_fwd_merge.h).
//
// Built to stream: a producer warp keeps kStages stages of TMA boxes in flight (a stage is
// kPositions positions of one kv head: their depth K and V rows and their G query rows, about
// 64 KB), and four consumer warps compute one position each with mma.sync (the G heads as M,
// padded to 16; slots as N, then as K). Work goes in query blocks of the sequence kernel, in
// the order its CTAs start, so that the depth half of a block is usually there first.
#pragma once

#include <cuda.h>

#include <cstdint>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "moda_fwd_merge.h"
#include "moda_warp_mma.h"

namespace moda {

struct FwdDepthParams {
    CUtensorMap tma_q;   // q as [D, G, Hk, T, B]; box [64, G, 1, kPositions, 1]: rows (position, head)
    CUtensorMap tma_dk;  // depth_k as [D, Hk, L, T, B]; box [64, 1, kSlots, kPositions, 1]: rows (position, slot)
    CUtensorMap tma_dv;
    FwdMergeParams merge;
    void* out;           // [B, T, Hq, D]
    float* lse;          // [B, Hq, T]
    int64_t out_batch_stride, out_seq_stride, out_head_stride;
    int batch, seqlen, kv_heads, group, depth;
    int block_rows;      // the sequence kernel's query block, in G-folded rows
    int num_m_blocks;
    float scale_log2;
};

template <class Element_, int kHeadDim_, int kSlots_>
struct FwdDepthTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kSlots = kSlots_;  // L rounded up to a power of two, >= 16
    static constexpr int kHalves = kHeadDim / 64;  // TMA boxes are 64 columns wide (128-byte swizzle)
    static constexpr int kPositions = cute::max(1, cute::min(8, 16384 / (kSlots * kHeadDim)));
    static constexpr int kQueryRows = 16;  // per position: the G <= 16 heads, as the M of mma.sync
    static constexpr int kWarps = 4;       // consumer warps; warp 0 of the CTA produces
    static constexpr int kThreads = 32 * (kWarps + 1);
    static constexpr int kKVElems = kPositions * kSlots * kHeadDim;
    static constexpr int kQElems = kPositions * kQueryRows * kHeadDim;
    static constexpr int kStageBytes = (2 * kKVElems + kQElems) * int(sizeof(Element));
    static constexpr int kStages = cute::min(4, (220 * 1024) / kStageBytes);
    static_assert(kStages >= 2, "two stages of depth rows must fit");
    static_assert(kSlots % 16 == 0 && kSlots <= 256, "slot tiles of 16 (the K of the P V product)");
    struct Stage {
        alignas(1024) Element k[kKVElems];  // kHalves boxes of [kPositions * kSlots rows x 64]
        alignas(1024) Element v[kKVElems];
        alignas(1024) Element q[kQElems];   // kHalves boxes of [kPositions * G rows x 64], kPositions * 16 apart
    };
    struct SharedStorage {
        Stage stage[kStages];
        alignas(8) uint64_t full[kStages];
        alignas(8) uint64_t empty[kStages];
    };
    // Element (row, col) of a box of 64-column rows written with the 128-byte swizzle: the
    // 16-byte chunk c of row r sits at chunk c ^ (r % 8).
    __device__ static int swizzled(int row, int col) { return row * 64 + ((((col >> 3) ^ row) & 7) << 3) + (col & 7); }
};

constexpr uint32_t kDepthMergeBarrier = 1;  // the consumer warps' named barrier

// Query block `item` in the sequence kernel's start order: its batch, kv head and positions.
struct FwdDepthBlock {
    int batch, hk, x, t_lo, t_hi;
    __device__ FwdDepthBlock(FwdDepthParams const& p, int item) {
        x = item % p.num_m_blocks;
        const int bh = item / p.num_m_blocks;
        hk = bh % p.kv_heads;
        batch = bh / p.kv_heads;
        const int row0 = (p.num_m_blocks - 1 - x) * p.block_rows;  // heaviest first, as the sequence kernel
        t_lo = row0 / p.group;
        t_hi = min((row0 + p.block_rows - 1) / p.group, p.seqlen - 1);
    }
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) moda_fwd_depth_kernel(__grid_constant__ const FwdDepthParams p) {
    using Element = typename Traits::Element;
    using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
    using EmptyBarrier = cutlass::arch::ClusterBarrier;
    constexpr int D = Traits::kHeadDim, kSlots = Traits::kSlots, kPositions = Traits::kPositions;
    constexpr int kStages = Traits::kStages;
    extern __shared__ __align__(1024) char smem_raw[];
    auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int G = p.group;
    const int n_items = p.batch * p.kv_heads * p.num_m_blocks;

    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; ++s) {
            FullBarrier::init(&smem.full[s], 1);
            EmptyBarrier::init(&smem.empty[s], Traits::kWarps);
        }
        cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    if (warp == 0) {
        // ------------------------------------------------------------------ producer
        if (lane != 0) return;
        cute::prefetch_tma_descriptor(&p.tma_q);
        cute::prefetch_tma_descriptor(&p.tma_dk);
        cute::prefetch_tma_descriptor(&p.tma_dv);
        constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_FIRST);
        int it = 0;
        for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
            const FwdDepthBlock w(p, item);
            for (int t0 = w.t_lo; t0 <= w.t_hi; t0 += kPositions, ++it) {
                const int s = it % kStages;
                EmptyBarrier::wait(&smem.empty[s], ((it / kStages) & 1) ^ 1);
                FullBarrier::arrive_and_expect_tx(&smem.full[s], Traits::kStageBytes - (16 - G) * kPositions * D * 2);
                auto& st = smem.stage[s];
                for (int j = 0; j < Traits::kHalves; ++j) {
                    cute::SM90_TMA_LOAD_5D::copy(&p.tma_dk, &smem.full[s], kHint, st.k + j * kPositions * kSlots * 64,
                                                 j * 64, w.hk, 0, t0, w.batch);
                    cute::SM90_TMA_LOAD_5D::copy(&p.tma_dv, &smem.full[s], kHint, st.v + j * kPositions * kSlots * 64,
                                                 j * 64, w.hk, 0, t0, w.batch);
                    cute::SM90_TMA_LOAD_5D::copy(&p.tma_q, &smem.full[s], kHint, st.q + j * kPositions * 16 * 64,
                                                 j * 64, 0, w.hk, t0, w.batch);
                }
            }
        }
        return;
    }

    // ---------------------------------------------------------------------- consumers
    const int cw = warp - 1;             // this warp's position in each stage
    const int qr = lane / 4, qc = lane % 4;  // fragment row (head) and column pair
    const int Hq = p.kv_heads * G;
    const float scale_log2 = p.scale_log2;
    int it = 0;
    for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
        const FwdDepthBlock w(p, item);
        for (int t0 = w.t_lo; t0 <= w.t_hi; t0 += kPositions, ++it) {
            const int s = it % kStages;
            FullBarrier::wait(&smem.full[s], (it / kStages) & 1);
            auto& st = smem.stage[s];
            for (int j = cw; j < kPositions; j += Traits::kWarps) {
                const int t = t0 + j;
                if (t > w.t_hi) break;
                // S = Q K^T: rows g (heads, rows past G repeat the last head), columns slots.
                float acc_s[kSlots / 8][4];
                CUTLASS_PRAGMA_UNROLL
                for (int n = 0; n < kSlots / 8; ++n) acc_s[n][0] = acc_s[n][1] = acc_s[n][2] = acc_s[n][3] = 0.f;
                CUTLASS_PRAGMA_UNROLL
                for (int ks = 0; ks < D / 16; ++ks) {
                    const int half = ks / 4, c0 = ks % 4 * 16;
                    uint32_t a[4];
                    const int q_row = j * G + min(lane % 16, G - 1);
                    ldsm_x4(st.q + half * kPositions * 16 * 64 + Traits::swizzled(q_row, c0 + lane / 16 * 8), a);
                    CUTLASS_PRAGMA_UNROLL
                    for (int np = 0; np < kSlots / 16; ++np) {
                        uint32_t b[4];
                        const int k_row = j * kSlots + np * 16 + lane / 16 * 8 + lane % 8;
                        ldsm_x4(st.k + half * kPositions * kSlots * 64 + Traits::swizzled(k_row, c0 + lane / 8 % 2 * 8), b);
                        mma_k16<Element>(acc_s[2 * np], a, b[0], b[1]);
                        mma_k16<Element>(acc_s[2 * np + 1], a, b[2], b[3]);
                    }
                }
                // Softmax over the slots (slots past L are the TMA's zero fill: masked).
                float row_max[2] = {-INFINITY, -INFINITY};
                CUTLASS_PRAGMA_UNROLL
                for (int n = 0; n < kSlots / 8; ++n) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int e = 0; e < 4; ++e) {
                        if (n * 8 + qc * 2 + e % 2 >= p.depth) acc_s[n][e] = -INFINITY;
                        row_max[e / 2] = fmaxf(row_max[e / 2], acc_s[n][e]);
                    }
                }
                float row_sum[2] = {0.f, 0.f};
                CUTLASS_PRAGMA_UNROLL
                for (int h = 0; h < 2; ++h) {
                    row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffff, row_max[h], 1));
                    row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffff, row_max[h], 2));
                }
                CUTLASS_PRAGMA_UNROLL
                for (int n = 0; n < kSlots / 8; ++n) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int e = 0; e < 4; ++e) {
                        acc_s[n][e] = exp2f((acc_s[n][e] - row_max[e / 2]) * scale_log2);
                        row_sum[e / 2] += acc_s[n][e];
                    }
                }
                // O = P V: P from the score registers (a C tile in pairs is an A tile), V read
                // transposed.
                float acc_o[D / 8][4];
                CUTLASS_PRAGMA_UNROLL
                for (int n = 0; n < D / 8; ++n) acc_o[n][0] = acc_o[n][1] = acc_o[n][2] = acc_o[n][3] = 0.f;
                CUTLASS_PRAGMA_UNROLL
                for (int kk = 0; kk < kSlots / 16; ++kk) {
                    const uint32_t a[4] = {WarpMma<Element>::pack(acc_s[2 * kk][0], acc_s[2 * kk][1]),
                                           WarpMma<Element>::pack(acc_s[2 * kk][2], acc_s[2 * kk][3]),
                                           WarpMma<Element>::pack(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]),
                                           WarpMma<Element>::pack(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3])};
                    const int v_row = j * kSlots + kk * 16 + lane / 8 % 2 * 8 + lane % 8;
                    CUTLASS_PRAGMA_UNROLL
                    for (int dp = 0; dp < D / 16; ++dp) {
                        const int half = dp / 4, c0 = dp % 4 * 16;
                        uint32_t b[4];
                        ldsm_x4_trans(st.v + half * kPositions * kSlots * 64 + Traits::swizzled(v_row, c0 + lane / 16 * 8), b);
                        mma_k16<Element>(acc_o[2 * dp], a, b[0], b[1]);
                        mma_k16<Element>(acc_o[2 * dp + 1], a, b[2], b[3]);
                    }
                }
                // This half of the rows' softmax, normalized, to the workspace.
                CUTLASS_PRAGMA_UNROLL
                for (int h = 0; h < 2; ++h) {
                    row_sum[h] += __shfl_xor_sync(0xffffffff, row_sum[h], 1);
                    row_sum[h] += __shfl_xor_sync(0xffffffff, row_sum[h], 2);
                }
                CUTLASS_PRAGMA_UNROLL
                for (int h = 0; h < 2; ++h) {
                    const int g = qr + 8 * h;
                    if (g >= G) continue;
                    const float l4 = row_sum[h];
                    const float inv = 1.f / l4;
                    const int head = w.hk * G + g;
                    float* dst = p.merge.depth_out + ((int64_t(w.batch) * p.seqlen + t) * Hq + head) * D;
                    CUTLASS_PRAGMA_UNROLL
                    for (int n = 0; n < D / 8; ++n) {
                        *reinterpret_cast<float2*>(dst + n * 8 + qc * 2) =
                            make_float2(__fmul_rn(acc_o[n][2 * h], inv), __fmul_rn(acc_o[n][2 * h + 1], inv));
                    }
                    if (qc == 0) {
                        p.merge.depth_lse[(int64_t(w.batch) * Hq + head) * p.seqlen + t] =
                            (row_max[h] * scale_log2 + log2f(l4)) * 0.6931471805599453f;
                    }
                }
            }
            __syncwarp();
            if (lane == 0) EmptyBarrier::arrive(&smem.empty[s]);
        }

        // The block's depth half is written: claim it; if the sequence kernel was first, merge.
        __threadfence();
        const int blk = merge_block_index(w.x, w.hk, w.batch, p.kv_heads, p.num_m_blocks);
        const bool leader = threadIdx.x == 32;
        if (!merge_claim(p.merge, blk, leader, kDepthMergeBarrier, 32 * Traits::kWarps)) continue;
        merge_wait_ready(p.merge, blk, leader, kDepthMergeBarrier, 32 * Traits::kWarps);
        const int rows = (w.t_hi - w.t_lo + 1) * G;
        constexpr int kChunksPerRow = D / 4;
        for (int i = threadIdx.x - 32; i < rows * kChunksPerRow; i += 32 * Traits::kWarps) {
            const int r = i / kChunksPerRow, c = i % kChunksPerRow * 4;
            const int t = w.t_lo + r / G, head = w.hk * G + r % G;
            const int64_t lse_at = (int64_t(w.batch) * Hq + head) * p.seqlen + t;
            const int64_t row_at = ((int64_t(w.batch) * p.seqlen + t) * Hq + head) * D + c;
            const MergeWeights mw = merge_weights(__ldcg(p.merge.seq_lse + lse_at), __ldcg(p.merge.depth_lse + lse_at));
            const float4 so = __ldcg(reinterpret_cast<const float4*>(p.merge.seq_out + row_at));
            const float4 dd = __ldcg(reinterpret_cast<const float4*>(p.merge.depth_out + row_at));
            cutlass::Array<Element, 4> o;
            o[0] = static_cast<Element>(merge_value(so.x, dd.x, mw));
            o[1] = static_cast<Element>(merge_value(so.y, dd.y, mw));
            o[2] = static_cast<Element>(merge_value(so.z, dd.z, mw));
            o[3] = static_cast<Element>(merge_value(so.w, dd.w, mw));
            Element* dst = static_cast<Element*>(p.out) + w.batch * p.out_batch_stride + t * p.out_seq_stride +
                           head * p.out_head_stride + c;
            *reinterpret_cast<cutlass::Array<Element, 4>*>(dst) = o;
            if (c == 0) p.lse[lse_at] = mw.lse;
        }
    }
}

}  // namespace moda
