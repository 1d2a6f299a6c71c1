// The depth part of the backward where each query reads only its own position's depth rows
// (depth_chunk = 1). Per (batch, position t, kv head h) the G query rows q_g = q[t, h G + g]
// and the L depth rows K_l = depth_k[t, l, h], V_l = depth_v[t, l, h] form a closed problem:
//     S^T = K Q^T,  dP^T = V dO^T                          (L x G)
//     P^T = exp2(S^T * scale * log2 e - lse * log2 e),  dS^T = P^T (dP^T - delta)
//     dV = P^T dO,  dK = scale dS^T Q                       (L x D)
//     dQ = scale dS K                                       (G x D, added to the sequence part's dQ)
// with lse and delta of the whole softmax (the preprocess's row statistics), so that it adds
// up with the sequence kernels' gradients run without depth rows.
//
// Why a kernel of its own: the products are G x L x D (8 x 64 x 64 in the paper geometry).
// A 64-row wgmma tile over the depth rows of several positions, as the key-stationary kernel's
// depth boxes use, computes every position's rows against every position's queries, 1/8 of
// which are visible. Warp-level mma.sync tiles fit the problem exactly: depth rows as M in
// 16-row tiles, the G heads as N (8 per tile), and the head dim or the heads as K. What is
// left is bytes (every depth row is read once and its gradient written once), so each warp
// works alone on a stream of (position, head) items with cp.async loads and no barrier
// beyond its own warp. What hides the loads is many warps per SM (one-warp CTAs, one item in
// shared memory each) rather than stages per warp: BwdConfig's measurements say why.
//
// Deterministic: every gradient element has one writer, which sums in a fixed order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/swizzle.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "moda_bwd_traits.h"
#include "moda_warp_mma.h"

namespace moda {

struct BwdDepthParams {
    const void* q;        // [B, T, Hq, D]
    const void* dout;     // [B, T, Hq, D]
    const void* depth_k;  // [B, T, L, Hk, D]
    const void* depth_v;
    const float* row_stats;  // [B, Hk, row steps, 2, kBwdStepRows]: lse * log2 e, delta (preprocess)
    void* grad_q;
    void* grad_depth_k;
    void* grad_depth_v;
    int64_t q_batch_stride, q_seq_stride, q_head_stride;
    int64_t do_batch_stride, do_seq_stride, do_head_stride;
    int64_t dk_batch_stride, dk_seq_stride, dk_slot_stride, dk_head_stride;
    int64_t dv_batch_stride, dv_seq_stride, dv_slot_stride, dv_head_stride;
    int64_t gq_batch_stride, gq_seq_stride, gq_head_stride;
    int64_t gdk_batch_stride, gdk_seq_stride, gdk_slot_stride, gdk_head_stride;
    int64_t gdv_batch_stride, gdv_seq_stride, gdv_slot_stride, gdv_head_stride;
    int batch, seqlen, kv_heads, group, depth, row_steps;
    float scale, scale_log2;
    bool add_to_dq;               // grad_q holds the sequence part's dQ: add to it (else overwrite)
};

// kGroupTiles: the G <= 8 kGroupTiles query heads of a kv head as tiles of 8 (the N of mma.sync);
// missing heads are zero rows whose probabilities are forced to 0. kSlotRows: depth rows per
// item (a position's L rows come in items of at most this many, zero-padded); kStages: items
// per warp in shared memory (2: the next one loads while the warp computes the current one);
// kWarps: warps per CTA.
template <class Element_, int kHeadDim_, int kGroupTiles_, int kSlotRows_, int kStages_, int kWarps_>
struct BwdDepthTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kGroupTiles = kGroupTiles_;
    static constexpr int kQueryRows = 8 * kGroupTiles;
    static constexpr int kSlotRows = kSlotRows_;
    static constexpr int kStages = kStages_;
    static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
    static constexpr int kWarps = kWarps_;  // per CTA: they share nothing but the SM
    static constexpr int kThreads = 32 * kWarps;
    static_assert(kSlotRows % 16 == 0 && kSlotRows * kChunks % 32 == 0 && kStages >= 1);
    // Rows of 16-byte chunks, chunk c of row r stored at chunk c ^ (r % 8): the 8 rows that one
    // ldmatrix reads (same columns, consecutive rows) land in 8 different bank groups.
    using Swizzle = cute::Swizzle<3, 3, kHeadDim == 64 ? 3 : 4>;
    __device__ static int offset(int row, int col) { return Swizzle{}(row * kHeadDim + col); }

    struct Stage {
        Element k[kSlotRows * kHeadDim];
        Element v[kSlotRows * kHeadDim];
        Element q[kQueryRows * kHeadDim];
        Element dout[kQueryRows * kHeadDim];
        Element dq_old[kQueryRows * kHeadDim];  // grad_q's rows before the add (row-major)
        float lse2[kQueryRows];                 // lse * log2 e
        float delta[kQueryRows];
    };
    // dQ is transposed through shared memory on its way out, over the stage's K, V, Q and dO
    // rows (dead by then); the pitch of 4 extra floats spreads a warp's writes over all banks.
    static constexpr int kDqPitch = kHeadDim + 4;
    static_assert(kQueryRows * kDqPitch * 4 <= (2 * kSlotRows + 2 * kQueryRows) * kHeadDim * int(sizeof(Element)),
                  "the dQ transpose fits over the K, V, Q and dO rows");
    struct SharedStorage {
        Stage stage[kWarps][kStages];
    };
};

// One item: depth rows [l0, l0 + kSlotRows) of (batch b, position t, kv head h).
struct DepthItem {
    int b, t, h, l0;
    // Items run position-major over (batch, position, head): the warps at work at one time
    // read neighbouring rows of the depth tensors.
    __device__ static DepthItem of(BwdDepthParams const& p, int64_t unit, int l0) {
        const int h = int(unit % p.kv_heads);
        const int64_t bt = unit / p.kv_heads;
        return {int(bt / p.seqlen), int(bt % p.seqlen), h, l0};
    }
    // The unit's last item (rows up to L): after it, the position's dQ is complete.
    template <class Traits>
    __device__ bool ends_unit(BwdDepthParams const& p) const { return l0 + Traits::kSlotRows >= p.depth; }
    // Past the last unit (b == batch).
    __device__ bool done(BwdDepthParams const& p) const { return b >= p.batch; }
    // The next item of a warp whose units are `stride` apart (`stride` as the digits of
    // DepthItem::of, l0 unused): the next rows of the unit, else the first ones of the unit
    // `stride` further, by digit-wise addition with carries (no 64-bit division per item).
    template <class Traits>
    __device__ void advance(BwdDepthParams const& p, DepthItem const& stride) {
        l0 += Traits::kSlotRows;
        if (l0 < p.depth) return;
        l0 = 0;
        h += stride.h;
        const int carry_t = h >= p.kv_heads;
        h -= carry_t ? p.kv_heads : 0;
        t += stride.t + carry_t;
        const int carry_b = t >= p.seqlen;
        t -= carry_b ? p.seqlen : 0;
        b += stride.b + carry_b;
    }
};

// Issue the cp.async loads of an item into a stage (one commit group, committed by the caller):
// its K and V rows (zeros past L), the G query rows of q and dO (zeros past G), their row
// statistics. The row statistics of a position's G rows are contiguous: G divides kBwdStepRows.
template <class Traits>
__device__ void load_depth_item(BwdDepthParams const& p, DepthItem const& it, typename Traits::Stage& st, int lane) {
    using Element = typename Traits::Element;
    using Copy16 = cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>;
    using Copy4 = cute::SM80_CP_ASYNC_CACHEALWAYS<uint32_t>;
    constexpr int kChunks = Traits::kChunks;
    auto async_copy = [](const Element* src, Element* dst, bool valid) {
        Copy16::copy(*reinterpret_cast<const cute::uint128_t*>(src), *reinterpret_cast<cute::uint128_t*>(dst), valid);
    };
    const Element* dk = static_cast<const Element*>(p.depth_k) + it.b * p.dk_batch_stride + it.t * p.dk_seq_stride +
                        it.h * p.dk_head_stride;
    const Element* dv = static_cast<const Element*>(p.depth_v) + it.b * p.dv_batch_stride + it.t * p.dv_seq_stride +
                        it.h * p.dv_head_stride;
    static_assert(Traits::kSlotRows * kChunks % 32 == 0 && Traits::kQueryRows * kChunks % 32 == 0);
    CUTLASS_PRAGMA_UNROLL
    for (int i = lane; i < Traits::kSlotRows * kChunks; i += 32) {
        const int r = i / kChunks, col = i % kChunks * 8;
        const bool valid = it.l0 + r < p.depth;
        const int64_t l = valid ? it.l0 + r : 0;  // an address inside the tensor; nothing is read
        async_copy(dk + l * p.dk_slot_stride + col, st.k + Traits::offset(r, col), valid);
        async_copy(dv + l * p.dv_slot_stride + col, st.v + Traits::offset(r, col), valid);
    }
    const int G = p.group;
    const Element* q = static_cast<const Element*>(p.q) + it.b * p.q_batch_stride + it.t * p.q_seq_stride +
                       int64_t(it.h) * G * p.q_head_stride;
    const Element* dout = static_cast<const Element*>(p.dout) + it.b * p.do_batch_stride + it.t * p.do_seq_stride +
                          int64_t(it.h) * G * p.do_head_stride;
    CUTLASS_PRAGMA_UNROLL
    for (int i = lane; i < Traits::kQueryRows * kChunks; i += 32) {
        const int g = i / kChunks, col = i % kChunks * 8;
        const bool valid = g < G;
        const int64_t row = valid ? g : 0;
        async_copy(q + row * p.q_head_stride + col, st.q + Traits::offset(g, col), valid);
        async_copy(dout + row * p.do_head_stride + col, st.dout + Traits::offset(g, col), valid);
    }
    if (p.add_to_dq && it.template ends_unit<Traits>(p)) {  // its dQ is added with this item
        const Element* gq = static_cast<const Element*>(p.grad_q) + it.b * p.gq_batch_stride +
                            it.t * p.gq_seq_stride + int64_t(it.h) * G * p.gq_head_stride;
        for (int i = lane; i < G * kChunks; i += 32) {
            const int g = i / kChunks, col = i % kChunks * 8;
            async_copy(gq + g * p.gq_head_stride + col, st.dq_old + g * Traits::kHeadDim + col, true);
        }
    }
    const int row = it.t * G;  // G-folded row of head 0
    const float* stats = p.row_stats +
                         ((int64_t(it.b) * p.kv_heads + it.h) * p.row_steps + row / kBwdStepRows) * 2 * kBwdStepRows +
                         row % kBwdStepRows;
    if (lane < G) Copy4::copy(*reinterpret_cast<const uint32_t*>(stats + lane), *reinterpret_cast<uint32_t*>(st.lse2 + lane));
    if (lane >= 16 && lane - 16 < G) {
        Copy4::copy(*reinterpret_cast<const uint32_t*>(stats + kBwdStepRows + lane - 16),
                    *reinterpret_cast<uint32_t*>(st.delta + lane - 16));
    }
}

// The 16 x D rows of one depth gradient tile move in 16-byte chunks, kTileChunks per lane:
// chunk i = lane + 32 j is row i / kChunks, columns i % kChunks * 8 + [0, 8).
template <class Traits>
constexpr int kTileChunks = 16 * Traits::kChunks / 32;

// A depth gradient tile's rows as they are in global memory (rows l0 + r < L only), for the
// in-place mode to add to. All of a tile's loads are issued before any of its stores: a load
// after a store that may alias it would wait for it, one round trip per chunk.
template <class Traits>
__device__ void load_depth_rows(const typename Traits::Element* grad, int64_t slot_stride, int l0, int L, int lane,
                                Vec16<typename Traits::Element> (&old)[kTileChunks<Traits>]) {
    using Element = typename Traits::Element;
    constexpr int kChunks = Traits::kChunks;
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kTileChunks<Traits>; ++j) {
        const int i = lane + 32 * j, r = i / kChunks, col = i % kChunks * 8;
        if (l0 + r < L) old[j] = *reinterpret_cast<const Vec16<Element>*>(grad + (l0 + r) * slot_stride + col);
    }
}

// Store a depth gradient tile from a stage's rows [r0, r0 + 16) (elements, swizzled) to global
// rows l0 + r0 + r of `grad`, rows < L only; with `old`, their sum (fp32, rounded once).
template <class Traits>
__device__ void store_depth_rows(const typename Traits::Element* tile, int r0, typename Traits::Element* grad,
                                 int64_t slot_stride, int l0, int L, int lane,
                                 const Vec16<typename Traits::Element> (*old)[kTileChunks<Traits>]) {
    using Element = typename Traits::Element;
    constexpr int kChunks = Traits::kChunks;
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kTileChunks<Traits>; ++j) {
        const int i = lane + 32 * j, r = i / kChunks, col = i % kChunks * 8;
        if (l0 + r0 + r >= L) continue;
        Vec16<Element> val = *reinterpret_cast<const Vec16<Element>*>(tile + Traits::offset(r0 + r, col));
        if (old != nullptr) {
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < 8; ++e) val[e] = Element(float(val[e]) + float((*old)[j][e]));
        }
        store_16b(grad + (l0 + r0 + r) * slot_stride + col, val);
    }
}

// The gradients of one item: its depth rows' dK and dV to global memory, its share of the
// position's dQ^T (D x 8 kGroupTiles, fp32) added into `dq`.
// kInPlace: add to what grad_depth_k / grad_depth_v hold (BwdParams::accumulate_depth_grads).
template <class Traits, bool kInPlace>
__device__ void depth_item_grads(BwdDepthParams const& p, DepthItem const& it, typename Traits::Stage& st, int lane,
                                 float (&dq)[Traits::kHeadDim / 16][Traits::kGroupTiles][4]) {
    using Element = typename Traits::Element;
    using Mma = WarpMma<Element>;
    constexpr int D = Traits::kHeadDim, kGT = Traits::kGroupTiles;
    const int g = lane / 4, c = lane % 4;
    // This lane's query heads (C columns) 8 gt + 2c + e: statistics, or P = 0 and delta = 0 past G.
    float lse2[kGT][2], delta[kGT][2];
    CUTLASS_PRAGMA_UNROLL
    for (int gt = 0; gt < kGT; ++gt) {
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < 2; ++e) {
            const int head = 8 * gt + 2 * c + e;
            lse2[gt][e] = head < p.group ? st.lse2[head] : INFINITY;
            delta[gt][e] = head < p.group ? st.delta[head] : 0.f;
        }
    }
    Element* gdk = static_cast<Element*>(p.grad_depth_k) + it.b * p.gdk_batch_stride + it.t * p.gdk_seq_stride +
                   it.h * p.gdk_head_stride;
    Element* gdv = static_cast<Element*>(p.grad_depth_v) + it.b * p.gdv_batch_stride + it.t * p.gdv_seq_stride +
                   it.h * p.gdv_head_stride;

    CUTLASS_PRAGMA_UNROLL
    for (int lt = 0; lt < Traits::kSlotRows / 16; ++lt) {
        const int r0 = 16 * lt;  // the tile's first row in the stage
        if (it.l0 + r0 >= p.depth) break;  // warp-uniform: rows past L are all padding
        // S^T and dP^T (16 rows x 8 heads per head tile), K = head dim.
        float s[kGT][4] = {}, dp[kGT][4] = {};
        CUTLASS_PRAGMA_UNROLL
        for (int ks = 0; ks < D / 16; ++ks) {
            uint32_t ak[4], av[4];
            const int a_row = r0 + lane % 8 + 8 * (lane / 8 % 2), a_col = 16 * ks + 8 * (lane / 16);
            ldsm_x4(st.k + Traits::offset(a_row, a_col), ak);
            ldsm_x4(st.v + Traits::offset(a_row, a_col), av);
            CUTLASS_PRAGMA_UNROLL
            for (int gt = 0; gt < kGT; ++gt) {
                uint32_t bq[2], bdo[2];
                const int b_row = 8 * gt + lane % 8, b_col = 16 * ks + 8 * (lane / 8 % 2);
                ldsm_x2(st.q + Traits::offset(b_row, b_col), bq[0], bq[1]);
                ldsm_x2(st.dout + Traits::offset(b_row, b_col), bdo[0], bdo[1]);
                mma_k16<Element>(s[gt], ak, bq[0], bq[1]);
                mma_k16<Element>(dp[gt], av, bdo[0], bdo[1]);
            }
        }
        // P^T and dS^T, packed as A operands (rows g and g + 8 of the tile); 0 in padding rows
        // past L (never stored, but their exp2(-lse) may overflow, and 0 * inf is no zero).
        const bool row_in[2] = {it.l0 + r0 + g < p.depth, it.l0 + r0 + g + 8 < p.depth};
        uint32_t pa[kGT][2], dsa[kGT][2];
        CUTLASS_PRAGMA_UNROLL
        for (int gt = 0; gt < kGT; ++gt) {
            float pr[4], ds[4];
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < 4; ++j) {
                pr[j] = row_in[j >> 1] ? exp2f(s[gt][j] * p.scale_log2 - lse2[gt][j & 1]) : 0.f;
                ds[j] = pr[j] * (dp[gt][j] - delta[gt][j & 1]);
            }
            pa[gt][0] = Mma::pack(pr[0], pr[1]), pa[gt][1] = Mma::pack(pr[2], pr[3]);
            dsa[gt][0] = Mma::pack(ds[0], ds[1]), dsa[gt][1] = Mma::pack(ds[2], ds[3]);
        }
        // dQ^T (D x heads) += K^T dS^T: M = head dim (K read transposed), K = the tile's 16 rows,
        // B = dS^T by columns, which is the transpose of the pair layout we hold: movmatrix.
        uint32_t dsb[kGT][2];
        CUTLASS_PRAGMA_UNROLL
        for (int gt = 0; gt < kGT; ++gt) {
            dsb[gt][0] = transpose_8x8(dsa[gt][0]);
            dsb[gt][1] = transpose_8x8(dsa[gt][1]);
        }
        CUTLASS_PRAGMA_UNROLL
        for (int mt = 0; mt < D / 16; ++mt) {
            uint32_t akt[4];
            ldsm_x4_trans(st.k + Traits::offset(r0 + lane % 8 + 8 * (lane / 16), 16 * mt + 8 * (lane / 8 % 2)), akt);
            CUTLASS_PRAGMA_UNROLL
            for (int gt = 0; gt < kGT; ++gt) mma_k16<Element>(dq[mt][gt], akt, dsb[gt][0], dsb[gt][1]);
        }
        // dV = P^T dO and dK = dS^T Q (16 rows x D), K = the heads: 8 columns at a time, dO and Q
        // read transposed, four column tiles per ldmatrix.
        // In place: the rows to add to are loaded now, their latency behind the products below.
        Vec16<Element> old_v[kTileChunks<Traits>], old_k[kTileChunks<Traits>];
        if constexpr (kInPlace) {
            load_depth_rows<Traits>(gdv, p.gdv_slot_stride, it.l0 + r0, p.depth, lane, old_v);
            load_depth_rows<Traits>(gdk, p.gdk_slot_stride, it.l0 + r0, p.depth, lane, old_k);
        }
        __syncwarp();  // every lane is done reading this tile's K and V rows: they take dK and dV
        CUTLASS_PRAGMA_UNROLL
        for (int n4 = 0; n4 < D / 32; ++n4) {
            uint32_t bdo[kGT][4], bq[kGT][4];
            CUTLASS_PRAGMA_UNROLL
            for (int gt = 0; gt < kGT; ++gt) {
                const int b_row = 8 * gt + lane % 8, b_col = 32 * n4 + 8 * (lane / 8);
                ldsm_x4_trans(st.dout + Traits::offset(b_row, b_col), bdo[gt]);
                ldsm_x4_trans(st.q + Traits::offset(b_row, b_col), bq[gt]);
            }
            CUTLASS_PRAGMA_UNROLL
            for (int n = 0; n < 4; ++n) {
                float acc_v[4] = {}, acc_k[4] = {};
                CUTLASS_PRAGMA_UNROLL
                for (int gt = 0; gt < kGT; ++gt) {
                    mma_k8<Element>(acc_v, pa[gt], bdo[gt][n]);
                    mma_k8<Element>(acc_k, dsa[gt], bq[gt][n]);
                }
                const int col = 32 * n4 + 8 * n + 2 * c;
                CUTLASS_PRAGMA_UNROLL
                for (int h = 0; h < 2; ++h) {
                    const int off = Traits::offset(r0 + g + 8 * h, col);
                    *reinterpret_cast<uint32_t*>(st.v + off) = Mma::pack(acc_v[2 * h], acc_v[2 * h + 1]);
                    *reinterpret_cast<uint32_t*>(st.k + off) =
                        Mma::pack(acc_k[2 * h] * p.scale, acc_k[2 * h + 1] * p.scale);
                }
            }
        }
        __syncwarp();
        store_depth_rows<Traits>(st.v, r0, gdv, p.gdv_slot_stride, it.l0, p.depth, lane, kInPlace ? &old_v : nullptr);
        store_depth_rows<Traits>(st.k, r0, gdk, p.gdk_slot_stride, it.l0, p.depth, lane, kInPlace ? &old_k : nullptr);
    }
}

// A position's dQ (G x D) from the dQ^T fragments: scaled, transposed through the stage's
// shared memory, added to grad_q's rows loaded with the item (or written) in 16-byte chunks;
// `dq` is zeroed for the next one.
template <class Traits>
__device__ void write_depth_dq(BwdDepthParams const& p, DepthItem const& it, typename Traits::Stage& st, int lane,
                               float (&dq)[Traits::kHeadDim / 16][Traits::kGroupTiles][4]) {
    using Element = typename Traits::Element;
    constexpr int D = Traits::kHeadDim, kPitch = Traits::kDqPitch;
    const int g = lane / 4, c = lane % 4;
    float* scratch = reinterpret_cast<float*>(st.k);  // [heads][kPitch]
    CUTLASS_PRAGMA_UNROLL
    for (int mt = 0; mt < D / 16; ++mt) {
        CUTLASS_PRAGMA_UNROLL
        for (int gt = 0; gt < Traits::kGroupTiles; ++gt) {
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < 4; ++j) {
                const int head = 8 * gt + 2 * c + (j & 1), d = 16 * mt + g + 8 * (j >> 1);
                scratch[head * kPitch + d] = dq[mt][gt][j] * p.scale;
                dq[mt][gt][j] = 0.f;
            }
        }
    }
    __syncwarp();
    Element* gq = static_cast<Element*>(p.grad_q) + it.b * p.gq_batch_stride + it.t * p.gq_seq_stride +
                  int64_t(it.h) * p.group * p.gq_head_stride;
    for (int i = lane; i < p.group * (D / 8); i += 32) {  // 16-byte chunks of the G rows
        const int head = i / (D / 8), d = i % (D / 8) * 8;
        const float4* src = reinterpret_cast<const float4*>(scratch + head * kPitch + d);
        const float4 lo = src[0], hi = src[1];
        float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        if (p.add_to_dq) {
            const auto old = *reinterpret_cast<const Vec16<Element>*>(st.dq_old + head * D + d);
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < 8; ++e) v[e] += float(old[e]);
        }
        Vec16<Element> val;
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < 8; ++e) val[e] = Element(v[e]);
        store_16b(gq + head * p.gq_head_stride + d, val);
    }
}

// Each warp takes the items of units (batch, position, head) warp, warp + warps, ... of the
// grid, all depth rows of a unit in a row (its dQ sums over them), with the next item's
// loads in flight while it computes the current one.
template <class Traits, bool kInPlace>
__global__ void __launch_bounds__(Traits::kThreads) moda_bwd_depth_kernel(__grid_constant__ const BwdDepthParams p) {
    using Stage = typename Traits::Stage;
    extern __shared__ __align__(1024) char smem_raw[];  // declared so by the other kernels too
    auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    Stage* stages = smem.stage[warp];

    const int64_t units = int64_t(p.batch) * p.seqlen * p.kv_heads;
    const int64_t first = int64_t(blockIdx.x) * Traits::kWarps + warp;
    if (first >= units) return;  // no barrier beyond the warp: idle warps may leave
    // The warp's first item and the grid stride in units, as digits to add
    // (DepthItem::advance): the only 64-bit divisions, both before the loop.
    const DepthItem stride = DepthItem::of(p, int64_t(gridDim.x) * Traits::kWarps, 0);
    DepthItem it = DepthItem::of(p, first, 0);  // the item to compute
    DepthItem next = it;                        // the next item to load

    float dq[Traits::kHeadDim / 16][Traits::kGroupTiles][4] = {};
    // Items in flight: with two or more stages the next kStages - 1 items load while the warp
    // computes the current one; with one, the next item loads once the current one is done.
    constexpr int kAhead = Traits::kStages - 1;
    auto load_next = [&](int stage) {  // one commit group, empty past the last item
        if (!next.done(p)) {
            load_depth_item<Traits>(p, next, stages[stage], lane);
            next.template advance<Traits>(p, stride);
        }
        cute::cp_async_fence();
    };
    for (int i = 0; i < (kAhead > 0 ? kAhead : 1); ++i) load_next(i);
    for (int i = 0; !it.done(p); ++i, it.template advance<Traits>(p, stride)) {
        if constexpr (kAhead > 0) load_next((i + kAhead) % Traits::kStages);
        cute::cp_async_wait<kAhead>();
        __syncwarp();
        Stage& st = stages[i % Traits::kStages];
        depth_item_grads<Traits, kInPlace>(p, it, st, lane, dq);
        if (it.template ends_unit<Traits>(p)) {
            __syncwarp();
            write_depth_dq<Traits>(p, it, st, lane, dq);
        }
        __syncwarp();  // the stage is refilled next
        if constexpr (kAhead == 0) load_next(0);
    }
}

}  // namespace moda
