// MoDA backward for Hopper (sm_90a), key-stationary part: dK, dV and the depth gradients.
//
// One CTA owns kBlockN = 128 keys of one (batch, kv head): 128 sequence keys, or one depth box
// of [Tb positions x Lb slots] as in the forward. It keeps K and V in shared memory and
// streams, through a TMA pipeline, the kBlockM = 64 G-folded query rows (Q and dO tiles) that
// can see those keys: for sequence keys the rows from the causal diagonal down (all rows when
// not causal); for a depth box only the rows of the positions whose depth window holds the
// box's positions. Each of the two consumer warpgroups owns 64 of the keys and per step runs
//     S^T = K Q^T,  dP^T = V dO^T                         (keys x rows, operands in smem)
//     P^T = exp2(S^T * scale * log2 e - lse * log2 e)      (masked entries 0)
//     dV += P^T dO,  dS^T = P^T (dP^T - delta),  dK += dS^T Q
// with delta = rowsum(dO * O) - grad_lse (moda_bwd_preprocess_kernel). Every gradient row of
// K, V, depth K and depth V is reduced inside one CTA, over all its readers, in a fixed order:
// no atomics, so these gradients are deterministic. dQ is not computed here.
#pragma once

#include <cuda.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "moda_bwd_traits.h"
#include "moda_sm90_common.h"

namespace moda {

using namespace cute;

struct BwdKernelParams {
    CUtensorMap tma_q;    // q and dO as [D, G, Hk, T, B]; box [64, G, 1, 64 / G, 1] -> rows t * G + g
    CUtensorMap tma_do;
    CUtensorMap tma_k;    // k, v as [D, Hk, T, B, 1]; box [64, 1, 128, 1, 1]
    CUtensorMap tma_v;
    CUtensorMap tma_dk;   // depth_k, depth_v as [D, Hk, L, T, B]; box [64, 1, Lb, Tb, 1]
    CUtensorMap tma_dv;
    const float* lse;     // [B, Hq, T], natural log
    const float* delta;   // [B, Hq, T]
    void* grad_k;         // [B, T, Hk, D]        (unused without sequence keys)
    void* grad_v;
    void* grad_depth_k;   // [B, T, L, Hk, D]     (unused when L = 0)
    void* grad_depth_v;
    int64_t gk_batch_stride, gk_seq_stride, gk_head_stride;
    int64_t gv_batch_stride, gv_seq_stride, gv_head_stride;
    int64_t gdk_batch_stride, gdk_seq_stride, gdk_slot_stride, gdk_head_stride;
    int64_t gdv_batch_stride, gdv_seq_stride, gdv_slot_stride, gdv_head_stride;
    int seqlen, kv_heads, group, depth, depth_chunk;
    int group_log2;           // G is a power of two: row / G is a shift
    int depth_box_slots;      // Lb
    int depth_box_positions;  // Tb
    int depth_slot_blocks;    // ceil(L / Lb)
    int n_seq_blocks;         // ceil(T / 128) with sequence keys, else 0
    float scale;              // softmax scale
    float scale_log2;         // scale * log2(e)
};

// The 128 keys of one CTA: key r is sequence key n * 128 + r, or depth row (s0 + r / Lb,
// l0 + r % Lb); and the query positions [t_first, t_last] that may read any of them.
struct KeyBlock {
    bool is_seq;
    int n, s0, l0;
    int t_first, t_last;

    template <bool kCausal>
    __device__ static KeyBlock make(BwdKernelParams const& p, int j) {
        KeyBlock kb{};
        const int T = p.seqlen;
        kb.is_seq = j < p.n_seq_blocks;
        if (kb.is_seq) {
            kb.n = j;
            kb.t_first = kCausal ? j * 128 : 0;
            kb.t_last = T - 1;
        } else {
            const int d = j - p.n_seq_blocks;
            kb.s0 = d / p.depth_slot_blocks * p.depth_box_positions;
            kb.l0 = d % p.depth_slot_blocks * p.depth_box_slots;
            const int C = p.depth_chunk;
            const int s_last = min(kb.s0 + p.depth_box_positions, T) - 1;
            // t reads s iff first(t) <= s <= last(t): t in [s (causal) or s's chunk start, s's chunk end].
            kb.t_first = kCausal ? kb.s0 : kb.s0 / C * C;
            kb.t_last = min((s_last / C + 1) * C, T) - 1;
        }
        return kb;
    }
};

// delta = rowsum(dO * O) - grad_lse, one thread per (batch, query head, position), float32
// [B, Hq, T]. out and dout are [B, T, Hq, D] with the given strides (elements).
template <class Element, int D>
__global__ void moda_bwd_preprocess_kernel(const Element* out, const Element* dout, const float* grad_lse,
                                           float* delta, int B, int T, int Hq, int64_t o_batch, int64_t o_seq,
                                           int64_t o_head, int64_t do_batch, int64_t do_seq, int64_t do_head) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (b * Hq + h) * T + t
    if (i >= int64_t(B) * Hq * T) return;
    const int t = int(i % T), h = int(i / T % Hq), b = int(i / T / Hq);
    const Element* o = out + b * o_batch + t * o_seq + h * o_head;
    const Element* g = dout + b * do_batch + t * do_seq + h * do_head;
    float acc = 0.f;
    CUTLASS_PRAGMA_UNROLL
    for (int d = 0; d < D; d += 8) {  // 16-byte loads
        const auto ov = *reinterpret_cast<const cutlass::Array<Element, 8>*>(o + d);
        const auto gv = *reinterpret_cast<const cutlass::Array<Element, 8>*>(g + d);
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < 8; ++e) acc += float(ov[e]) * float(gv[e]);
    }
    delta[i] = acc - (grad_lse != nullptr ? grad_lse[i] : 0.f);
}

template <class Traits, bool kCausal>
__global__ void __launch_bounds__(Traits::kThreads, 1) moda_bwd_dkdv_kernel(__grid_constant__ const BwdKernelParams p) {
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
    const KeyBlock kb = KeyBlock::make<kCausal>(p, blockIdx.x);
    // The query-row steps: rows [t_first * G, (t_last + 1) * G) in steps of kBlockM.
    const int m_begin = kb.t_first * G / kBlockM;
    const int m_end = ((kb.t_last + 1) * G + kBlockM - 1) / kBlockM;

    Pipeline pipe(smem.pipe, tma_pipeline_params<Pipeline>(Traits::kStepBytes, Traits::kConsumerWGs),
                  Shape<_1, _1, _1>{});
    if (threadIdx.x == 0) {
        Barrier::init(&smem.kv_full, 1);
        cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    if (warp_group == 0) {
        // ------------------------------------------------------------------ producer
        cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
        if (threadIdx.x != 0) return;
        prefetch_tma_descriptor(&p.tma_q);
        prefetch_tma_descriptor(&p.tma_do);
        Barrier::arrive_and_expect_tx(&smem.kv_full, Traits::kKVBytes);
        if (kb.is_seq) {
            prefetch_tma_descriptor(&p.tma_k);
            prefetch_tma_descriptor(&p.tma_v);
            tma_load_rows<kBlockN, kHeadDim>(&p.tma_k, &smem.kv_full, smem.k.data(), hk, kb.n * kBlockN, batch, 0);
            tma_load_rows<kBlockN, kHeadDim>(&p.tma_v, &smem.kv_full, smem.v.data(), hk, kb.n * kBlockN, batch, 0);
        } else {
            prefetch_tma_descriptor(&p.tma_dk);
            prefetch_tma_descriptor(&p.tma_dv);
            tma_load_rows<kBlockN, kHeadDim>(&p.tma_dk, &smem.kv_full, smem.k.data(), hk, kb.l0, kb.s0, batch);
            tma_load_rows<kBlockN, kHeadDim>(&p.tma_dv, &smem.kv_full, smem.v.data(), hk, kb.l0, kb.s0, batch);
        }
        PipelineState write = cutlass::make_producer_start_state<Pipeline>();
        for (int m = m_begin; m < m_end; ++m) {
            pipe.producer_acquire(write);
            uint64_t* full = pipe.producer_get_barrier(write);
            const int offset = write.index() * kBlockM * kHeadDim;
            const int t0 = m * kBlockM / G;
            tma_load_rows<kBlockM, kHeadDim>(&p.tma_q, full, smem.q.data() + offset, 0, hk, t0, batch);
            tma_load_rows<kBlockM, kHeadDim>(&p.tma_do, full, smem.dout.data() + offset, 0, hk, t0, batch);
            ++write;
        }
        return;
    }

    // ---------------------------------------------------------------------- consumers
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    const int tid = threadIdx.x - 128;
    const int wg = __shfl_sync(0xffffffff, tid / 128, 0);  // warp-uniform, so wgmma is never in a divergent branch
    const int lane = tid % 32;

    typename Traits::TiledMmaSdP mma_sdp;
    typename Traits::TiledMmaKV mma_kv;
    auto thr_sdp = mma_sdp.get_thread_slice(tid);
    auto thr_kv = mma_kv.get_thread_slice(tid);
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQt{});
    Tensor tSrK = thr_sdp.partition_fragment_A(sK);      // smem descriptors
    Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);      // (MMA, N, K, stage)
    Tensor tdPrV = thr_sdp.partition_fragment_A(sV);
    Tensor tdPrdO = thr_sdp.partition_fragment_B(sdO);
    Tensor tdVrdO = thr_kv.partition_fragment_B(sdOt);   // (MMA, D, K, stage)
    Tensor tdKrQ = thr_kv.partition_fragment_B(sQt);
    Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});  // S^T, then P^T (fp32)
    Tensor tdPrdP = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor tdVrdV = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
    Tensor tdKrdK = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
    // P^T and dS^T as the register A operands: the accumulator's flat order, grouped by k = 16.
    Tensor tPrP = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kBlockM / 16>>{});
    Tensor tdSrdS = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kBlockM / 16>>{});
    static_assert(decltype(size(tSrS))::value == decltype(size(tPrP))::value, "P^T is S^T's registers, converted");
    static_assert(decltype(size(tdPrdP))::value == decltype(size(tdSrdS))::value, "dS^T is dP^T's registers");
    static_assert(decltype(size(tdKrdK))::value == kHeadDim / 2, "two key rows x D / 4 column pairs per thread");
    clear(tdVrdV);
    clear(tdKrdK);

    // This thread's two keys (accumulator rows): row in the tile, position, slot, and whether
    // they exist.
    int key_row[2], key_pos[2];
    bool key_ok[2];
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        const int r = key_row[h] = frag_row(tid, h);
        if (kb.is_seq) {
            key_pos[h] = kb.n * kBlockN + r;
            key_ok[h] = key_pos[h] < p.seqlen;
        } else {
            key_pos[h] = kb.s0 + r / p.depth_box_slots;
            key_ok[h] = key_pos[h] < p.seqlen && kb.l0 + r % p.depth_box_slots < p.depth;
        }
    }
    // May the query at position t read this thread's key h? A depth row (s, l) is read by the
    // queries of s's chunk (from s on when causal); with chunks of one position, by s alone.
    int key_chunk[2];
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) key_chunk[h] = key_pos[h] / p.depth_chunk;
    auto visible = [&](int h, int t) {
        if (!key_ok[h] || t >= p.seqlen) return false;
        if (kb.is_seq) return !kCausal || key_pos[h] <= t;
        if (p.depth_chunk == 1) return key_pos[h] == t;
        return key_chunk[h] == t / p.depth_chunk && (!kCausal || key_pos[h] <= t);
    };

    // lse (log2-scaled) and delta of a step's rows, loaded by each warpgroup into its own
    // buffer (two, alternating between steps; one named barrier per step).
    const uint32_t stats_barrier = 2 + wg;  // user ids 2, 3
    auto load_row_stats = [&](int m, int parity) {
        const int c = tid % 128 % kBlockM;  // column (query row within the step)
        const bool is_delta = tid % 128 >= kBlockM;
        const int row = m * kBlockM + c, t = row >> p.group_log2, head = hk * G + (row & (G - 1));
        float value = 0.f;
        if (t < p.seqlen) {
            const int64_t i = (int64_t(batch) * p.kv_heads * G + head) * p.seqlen + t;
            value = is_delta ? p.delta[i] : p.lse[i] * 1.4426950408889634f;
        }
        smem.row_stats[wg][parity][(is_delta ? kBlockM : 0) + c] = value;
        cutlass::arch::NamedBarrier::sync(128, stats_barrier);
    };

    Barrier::wait(&smem.kv_full, 0);
    PipelineState read;
    for (int m = m_begin; m < m_end; ++m) {
        const int parity = m & 1;
        load_row_stats(m, parity);
        const float* lse2 = smem.row_stats[wg][parity];
        const float* delta = lse2 + kBlockM;
        pipe.consumer_wait(read);
        const int stage = read.index();
        wgmma_issue<true, false>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS);
        wgmma_issue<true, false>(mma_sdp, tdPrV, tdPrdO(_, _, _, stage), tdPrdP);
        wgmma_wait<1>(tSrS);  // S^T ready; dP^T may still run
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(tSrS); ++e) {
            const int c = frag_col(e, lane);
            const bool ok = visible(frag_row_half(e), (m * kBlockM + c) >> p.group_log2);
            tSrS(e) = ok ? exp2f(tSrS(e) * p.scale_log2 - lse2[c]) : 0.f;
            tPrP(e) = static_cast<Element>(tSrS(e));
        }
        wgmma_issue<false, true>(mma_kv, tPrP, tdVrdO(_, _, _, stage), tdVrdV);  // dV += P^T dO
        wgmma_wait<1>(tdPrdP);  // dP^T ready; dV may still run
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(tdPrdP); ++e) {
            tdSrdS(e) = static_cast<Element>(tSrS(e) * (tdPrdP(e) - delta[frag_col(e, lane)]));
        }
        wgmma_issue<false, true>(mma_kv, tdSrdS, tdKrQ(_, _, _, stage), tdKrdK);  // dK += dS^T Q
        wgmma_wait<0>(tdKrdK);
        warpgroup_fence_operand(tdVrdV);
        pipe.consumer_release(read);
        ++read;
    }

    // ---------------------------------------------------------------------- epilogue
    // dK = scale * sum dS^T Q (S was scaled); dV as accumulated. Rows past T or L are dropped.
    Element* gk = static_cast<Element*>(kb.is_seq ? p.grad_k : p.grad_depth_k);
    Element* gv = static_cast<Element*>(kb.is_seq ? p.grad_v : p.grad_depth_v);
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        if (!key_ok[h]) continue;
        int64_t k_off, v_off;
        if (kb.is_seq) {
            k_off = batch * p.gk_batch_stride + key_pos[h] * p.gk_seq_stride + hk * p.gk_head_stride;
            v_off = batch * p.gv_batch_stride + key_pos[h] * p.gv_seq_stride + hk * p.gv_head_stride;
        } else {
            const int l = kb.l0 + key_row[h] % p.depth_box_slots;
            k_off = batch * p.gdk_batch_stride + key_pos[h] * p.gdk_seq_stride + l * p.gdk_slot_stride +
                    hk * p.gdk_head_stride;
            v_off = batch * p.gdv_batch_stride + key_pos[h] * p.gdv_seq_stride + l * p.gdv_slot_stride +
                    hk * p.gdv_head_stride;
        }
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(tdKrdK); e += 4) {
            // Elements e + 2h and e + 2h + 1 are this row's adjacent column pair: one 4-byte store each.
            cutlass::Array<Element, 2> k_pair, v_pair;
            k_pair[0] = static_cast<Element>(tdKrdK(e + 2 * h) * p.scale);
            k_pair[1] = static_cast<Element>(tdKrdK(e + 2 * h + 1) * p.scale);
            v_pair[0] = static_cast<Element>(tdVrdV(e + 2 * h));
            v_pair[1] = static_cast<Element>(tdVrdV(e + 2 * h + 1));
            *reinterpret_cast<cutlass::Array<Element, 2>*>(gk + k_off + frag_col(e, lane)) = k_pair;
            *reinterpret_cast<cutlass::Array<Element, 2>*>(gv + v_off + frag_col(e, lane)) = v_pair;
        }
    }
}

}  // namespace moda
