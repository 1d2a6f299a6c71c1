// MoDA backward for Hopper (sm_90a), key-stationary part: dK, dV and the depth gradients.
// (With depth_chunk = 1 the host runs it without depth rows and the per-position depth
// kernel, moda_bwd_depth_kernel.h, takes them: see moda_bwd_launch.h.)
//
// A key block is kBlockN = 128 keys of one (batch, kv head): 128 sequence keys, or one depth
// box of [Tb positions x Lb slots] as in the forward. A CTA works on one sequence block, or on
// a run of consecutive depth boxes (CtaWork), keeping a block's K and V in shared memory
// (kKVBuffers buffers: the next boxes' keys load during the current one) and streaming,
// through a TMA pipeline, the kBlockM = 64 G-folded query rows that can see those keys: Q and
// dO tiles, and the rows' lse and delta as one bulk copy. For sequence keys those are the rows from the
// causal diagonal down (all rows when not causal); for a depth box only the rows of the
// positions whose depth window holds the box's positions. Each of the two consumer warpgroups
// owns 64 of the keys and per step runs
//     S^T = K Q^T,  dP^T = V dO^T                         (keys x rows, operands in smem)
//     P^T = exp2(S^T * scale * log2 e - lse * log2 e)      (masked entries 0)
//     dV += P^T dO,  dS^T = P^T (dP^T - delta),  dK += dS^T Q
// with delta = rowsum(dO * O) - grad_lse (moda_bwd_preprocess.h). Steps whose rows see all
// of a sequence block's keys skip the mask; at D = 64 a step's dV and dK run while the next
// step's S^T and dP^T are issued. Every gradient row of K, V, depth K and depth V is reduced
// inside one CTA, over all its readers, in a fixed order: no atomics, so these gradients are
// deterministic. With Traits::kFusedDq the CTA also computes each step's
//     dQ_step = dS K                                       (rows x D, dS through shared memory)
// and adds it into an fp32 buffer with vector atomics (moda_bwd_dq_accum.h): the sequence
// and depth blocks that a row reads all add into its dQ, in an order that varies from run to
// run, so dQ is then not deterministic. Without it dQ comes from moda_bwd_dq_kernel.
#pragma once

#include <cuda.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "moda_bwd_dq_accum.h"
#include "moda_bwd_kernel_params.h"
#include "moda_bwd_named_barriers.h"
#include "moda_bwd_tile_scheduler.h"
#include "moda_bwd_traits.h"
#include "moda_sm90_common.h"

namespace moda {

using namespace cute;

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
    const CtaWork work = CtaWork::of(p, blockIdx.x);
    const int hk = work.hk, batch = work.batch;
    const int G = p.group;
    // The query-row steps of a key block: rows [t_first * G, (t_last + 1) * G) in steps of kBlockM.
    auto first_step = [&](KeyBlock const& kb) { return kb.t_first * G / kBlockM; };
    auto end_step = [&](KeyBlock const& kb) { return ((kb.t_last + 1) * G + kBlockM - 1) / kBlockM; };

    Pipeline pipe(smem.pipe, tma_pipeline_params<Pipeline>(Traits::kStepBytes, Traits::kConsumerWGs),
                  Shape<_1, _1, _1>{});
    if (threadIdx.x == 0) {
        for (int b = 0; b < Traits::kKVBuffers; ++b) {
            Barrier::init(&smem.kv_full[b], 1);
            cutlass::arch::ClusterBarrier::init(&smem.kv_empty[b], 128 * Traits::kConsumerWGs);
        }
        cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    if (warp_group == 0) {
        // ------------------------------------------------------------------ producer
        cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
        if (threadIdx.x != 0) return;
        prefetch_tma_descriptor(&p.tma_q);
        prefetch_tma_descriptor(&p.tma_do);
        const float* stats = p.row_stats + int64_t(batch * p.kv_heads + hk) * p.n_row_steps * 2 * kBlockM;
        PipelineState write = cutlass::make_producer_start_state<Pipeline>();
        for (int j = work.j_begin; j < work.j_end; ++j) {
            const int w = j - work.j_begin, buf = w % Traits::kKVBuffers;
            if (w >= Traits::kKVBuffers) {  // wait until the consumers are done with this buffer's last block
                cutlass::arch::ClusterBarrier::wait(&smem.kv_empty[buf], (w / Traits::kKVBuffers - 1) & 1);
            }
            const KeyBlock kb = KeyBlock::make<kCausal>(p, j);
            Element* k_dst = smem.k.data() + buf * kBlockN * kHeadDim;
            Element* v_dst = smem.v.data() + buf * kBlockN * kHeadDim;
            Barrier::arrive_and_expect_tx(&smem.kv_full[buf], Traits::kKVBytes);
            if (kb.is_seq) {
                tma_load_rows<kBlockN, kHeadDim>(&p.tma_k, &smem.kv_full[buf], k_dst, hk, kb.n * kBlockN, batch, 0);
                tma_load_rows<kBlockN, kHeadDim>(&p.tma_v, &smem.kv_full[buf], v_dst, hk, kb.n * kBlockN, batch, 0);
            } else {
                tma_load_rows<kBlockN, kHeadDim>(&p.tma_dk, &smem.kv_full[buf], k_dst, hk, kb.l0, kb.s0, batch);
                tma_load_rows<kBlockN, kHeadDim>(&p.tma_dv, &smem.kv_full[buf], v_dst, hk, kb.l0, kb.s0, batch);
            }
            for (int m = first_step(kb); m < end_step(kb); ++m) {
                pipe.producer_acquire(write);
                uint64_t* full = pipe.producer_get_barrier(write);
                const int offset = write.index() * kBlockM * kHeadDim;
                const int t0 = m * kBlockM / G;
                tma_load_rows<kBlockM, kHeadDim>(&p.tma_q, full, smem.q.data() + offset, 0, hk, t0, batch);
                tma_load_rows<kBlockM, kHeadDim>(&p.tma_do, full, smem.dout.data() + offset, 0, hk, t0, batch);
                SM90_BULK_COPY_G2S::copy(stats + m * 2 * kBlockM, full,
                                         smem.row_stats.data() + write.index() * 2 * kBlockM, Traits::kRowStatsBytes);
                ++write;
            }
        }
        return;
    }

    // ---------------------------------------------------------------------- consumers
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    const int tid = threadIdx.x - 128;
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
    Tensor tSrK = thr_sdp.partition_fragment_A(sK);      // smem descriptors (MMA, M, K, buffer)
    Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);      // (MMA, N, K, stage)
    Tensor tdPrV = thr_sdp.partition_fragment_A(sV);
    Tensor tdPrdO = thr_sdp.partition_fragment_B(sdO);
    Tensor tdVrdO = thr_kv.partition_fragment_B(sdOt);   // (MMA, D, K, stage)
    Tensor tdKrQ = thr_kv.partition_fragment_B(sQt);
    using ScoreShape = Shape<Int<kBlockN>, Int<kBlockM>>;  // S^T and dP^T: keys x rows, fp32, fresh per step
    Tensor tdVrdV = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
    Tensor tdKrdK = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
    // P^T and dS^T as the register A operands: the accumulator's flat order, grouped by k = 16.
    Tensor tPrP = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kBlockM / 16>>{});
    Tensor tdSrdS = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kBlockM / 16>>{});
    static_assert(decltype(size(partition_fragment_C(mma_sdp, ScoreShape{})))::value == decltype(size(tPrP))::value,
                  "P^T and dS^T are the score registers, converted");
    static_assert(decltype(size(tdKrdK))::value == kHeadDim / 2, "two key rows x D / 4 column pairs per thread");
    // Fused dQ: dS^T goes from the score registers to shared memory (tdSsdS), dQ = dS K reads it
    // back with the keys as K: each warpgroup computes half of the head dim for all 64 rows,
    // or (kDqOwnKeys) all of it over its own 64 keys.
    const int wg = __shfl_sync(0xffffffff, tid / 128, 0);  // warp-uniform, so wgmma is never in a divergent branch
    const int wg_tid = tid % 128;
    typename Traits::TiledMmaDq mma_dq;
    auto thr_dq = mma_dq.get_thread_slice(Traits::kDqOwnKeys ? wg_tid : tid);
    Tensor sDs = make_tensor(make_smem_ptr(smem.ds.data()), typename Traits::SmemLayoutDs{});
    Tensor sDst = make_tensor(make_smem_ptr(smem.ds.data()), typename Traits::SmemLayoutDst{});
    Tensor sKt = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKt{});
    Tensor tdQrdS = thr_dq.partition_fragment_A(sDs);  // (MMA, M, K, dS buffer)
    Tensor tdQrK = thr_dq.partition_fragment_B(sKt);   // (MMA, N, K, K buffer)
    constexpr int kDqKBlocks = Traits::kDqKeys / 16;  // wgmma k-blocks of one warpgroup's dQ product
    const int dq_k0 = Traits::kDqOwnKeys ? wg * kDqKBlocks : 0;
    using DqLayout = DqAccumLayout<kHeadDim>;
    float* dq_accum = Traits::kFusedDq
                          ? p.dq_accum + int64_t(batch * p.kv_heads + hk) * p.n_row_steps * DqLayout::kBlockFloats
                          : nullptr;
    int ds_buf = 0;  // alternates every step (see the barrier below)
    // Adds this warpgroup's part of step m's dQ (tdQrdQ, complete) into the buffer with vector
    // atomics: its column groups, or (kDqOwnKeys) all of them.
    auto add_dq = [&](auto const& tdQrdQ, int m) {
        float* dst = dq_accum + int64_t(m) * DqLayout::kBlockFloats;
        constexpr int kVectors = decltype(size(tdQrdQ))::value / 4;
        const int g0 = Traits::kDqOwnKeys ? 0 : wg * kVectors;
        CUTLASS_PRAGMA_UNROLL
        for (int q = 0; q < kVectors; ++q) {
            red_add_f32x4(dst + DqLayout::vector_offset(g0 + q, wg_tid), tdQrdQ(4 * q), tdQrdQ(4 * q + 1),
                          tdQrdQ(4 * q + 2), tdQrdQ(4 * q + 3));
        }
    };

    PipelineState read, done;
    for (int j = work.j_begin; j < work.j_end; ++j) {
        const int w = j - work.j_begin, buf = w % Traits::kKVBuffers;
        const KeyBlock kb = KeyBlock::make<kCausal>(p, j);
        const int m_begin = first_step(kb), m_end = end_step(kb);

        // This thread's two keys (accumulator rows): row in the block, position, slot, whether
        // they exist, and the query positions [read_lo, read_hi) that read them (none if not).
        int key_row[2], key_pos[2], read_lo[2], read_hi[2];
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
            readers_of<kCausal>(p, kb.is_seq, key_pos[h], read_lo[h], read_hi[h]);
            if (!key_ok[h]) read_hi[h] = read_lo[h];
        }
        // May the query at position t read this thread's key h?
        auto visible = [&](int h, int t) { return t >= read_lo[h] && t < read_hi[h]; };
        // P^T = exp2(S^T scale log2(e) - lse log2(e)), zero where the step's row may not read
        // the key: in float in S^T's registers (for dS^T) and as the element type (for dV).
        auto probabilities = [&](auto masked, auto& tSrS, int m, const float* lse2) {
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < size(tSrS); ++e) {
                const int c = frag_col(e, lane);
                float prob = exp2f(tSrS(e) * p.scale_log2 - lse2[c]);
                if constexpr (decltype(masked)::value) {
                    prob = visible(frag_row_half(e), (m * kBlockM + c) >> p.group_log2) ? prob : 0.f;
                }
                tSrS(e) = prob;
                tPrP(e) = static_cast<Element>(prob);
            }
        };
        // A step needs no mask when all its rows read all of the block's keys (KeyBlock's
        // full range: a full sequence block of one document). CTA-uniform.
        auto step_unmasked = [&](int m) {
            const int t_lo = (m * kBlockM) >> p.group_log2, t_hi = (m * kBlockM + kBlockM - 1) >> p.group_log2;
            return t_lo >= kb.full_lo && t_hi < kb.full_hi;
        };

        // With Traits::kOverlapSteps a step's dV and dK are left running while the next step's
        // S^T and dP^T are issued; the wait for S^T also sees them complete, and only then is
        // their stage released. Otherwise each step drains its wgmmas before the next starts.
        // S^T and dP^T are fresh per step, so no accumulator of a wgmma in flight is ever
        // written by ordinary instructions (ptxas would serialize the wgmmas).
        Barrier::wait(&smem.kv_full[buf], (w / Traits::kKVBuffers) & 1);
        for (int m = m_begin; m < m_end; ++m) {
            pipe.consumer_wait(read);
            const int stage = read.index();
            const float* lse2 = smem.row_stats.data() + stage * 2 * kBlockM;
            const float* delta = lse2 + kBlockM;
            Tensor tSrS = partition_fragment_C(mma_sdp, ScoreShape{});
            Tensor tdPrdP = partition_fragment_C(mma_sdp, ScoreShape{});
            wgmma_issue<true, false>(mma_sdp, tSrK(_, _, _, buf), tSrQ(_, _, _, stage), tSrS);
            wgmma_issue<true, false>(mma_sdp, tdPrV(_, _, _, buf), tdPrdO(_, _, _, stage), tdPrdP);
            wgmma_wait<1>(tSrS);  // S^T ready, and the previous step's dV and dK; dP^T may still run
            warpgroup_fence_operand(tdKrdK);
            warpgroup_fence_operand(tdVrdV);
            if (Traits::kOverlapSteps && m > m_begin) pipe.consumer_release(done);
            if (step_unmasked(m)) {
                probabilities(cute::false_type{}, tSrS, m, lse2);
            } else {
                probabilities(cute::true_type{}, tSrS, m, lse2);
            }
            // dV and dK start from zero at the block's first step (scale-out 0), not from
            // cleared registers: zeroing is an ordinary write to an accumulator.
            const auto accumulate = m > m_begin ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero;
            mma_kv.accumulate_ = accumulate;
            wgmma_issue<false, true>(mma_kv, tPrP, tdVrdO(_, _, _, stage), tdVrdV);  // dV += P^T dO
            wgmma_wait<1>(tdPrdP);  // dP^T ready; dV may still run
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < size(tdPrdP); ++e) {
                tdSrdS(e) = static_cast<Element>(tSrS(e) * (tdPrdP(e) - delta[frag_col(e, lane)]));
            }
            Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
            if constexpr (Traits::kFusedDq) {
                // dS^T to shared memory, pairs of adjacent rows (one register) per 4-byte store.
                // The dQ product reads both warpgroups' halves (one's own with kDqOwnKeys), so
                // they must be there first. A buffer is written again two steps later, after the
                // barrier of the step between, which each warpgroup reaches only once its dQ
                // product of the step before has completed: one barrier per step suffices.
                Tensor tdSsdS = thr_sdp.partition_C(sDst(_, _, ds_buf));
                Tensor tdSrdS_pairs = recast<uint32_t>(tdSrdS);
                CUTLASS_PRAGMA_UNROLL
                for (int e = 0; e < size(tdSrdS); e += 2) {
                    *reinterpret_cast<uint32_t*>(raw_pointer_cast(&tdSsdS(e))) = tdSrdS_pairs(e / 2);
                }
                cutlass::arch::fence_view_async_shared();  // generic-proxy writes, read by wgmma
                if constexpr (Traits::kDqOwnKeys) {
                    cutlass::arch::NamedBarrier::sync(128, kOwnDsReadyBarrier + wg);
                } else {
                    cutlass::arch::NamedBarrier::sync(128 * Traits::kConsumerWGs, kDsReadyBarrier);
                }
                warpgroup_fence_operand(tdQrdQ);
                warpgroup_arrive();
                mma_dq.accumulate_ = GMMA::ScaleOut::Zero;
                CUTLASS_PRAGMA_UNROLL
                for (int k = 0; k < kDqKBlocks; ++k) {
                    cute::gemm(mma_dq, tdQrdS(_, _, dq_k0 + k, ds_buf), tdQrK(_, _, dq_k0 + k, buf), tdQrdQ);
                    mma_dq.accumulate_ = GMMA::ScaleOut::One;
                }
                warpgroup_commit_batch();
                warpgroup_fence_operand(tdQrdQ);
            }
            mma_kv.accumulate_ = accumulate;
            wgmma_issue<false, true>(mma_kv, tdSrdS, tdKrQ(_, _, _, stage), tdKrdK);  // dK += dS^T Q
            if constexpr (Traits::kFusedDq) {
                wgmma_wait<1>(tdQrdQ);  // dQ_step ready; dK may still run
                add_dq(tdQrdQ, m);
                ds_buf ^= 1;
            }
            if constexpr (Traits::kOverlapSteps) {
                done = read;
            } else {
                wgmma_wait<0>(tdKrdK);
                warpgroup_fence_operand(tdVrdV);
                pipe.consumer_release(read);
            }
            ++read;
        }
        wgmma_wait<0>(tdKrdK);
        warpgroup_fence_operand(tdVrdV);
        cutlass::arch::ClusterBarrier::arrive(&smem.kv_empty[buf]);  // K and V of this buffer no longer read
        if (m_begin < m_end) {
            if (Traits::kOverlapSteps) pipe.consumer_release(done);
        } else {  // no query row reads these keys: zero gradients
            clear(tdVrdV);
            clear(tdKrdK);
        }

        // ------------------------------------------------------------------ epilogue
        // dK = scale * sum dS^T Q (S was scaled); dV as accumulated. Rows past T or L are dropped.
        // With accumulate_depth_grads a depth box's gradients are added to what the buffers
        // hold (a depth stream's running sum over the layers that read these slots). Each
        // element still has one writer, so the sum stays deterministic; all old values are
        // loaded before the first store, so their latencies overlap.
        Element* gk = static_cast<Element*>(kb.is_seq ? p.grad_k : p.grad_depth_k);
        Element* gv = static_cast<Element*>(kb.is_seq ? p.grad_v : p.grad_depth_v);
        using Pair = cutlass::Array<Element, 2>;
        constexpr int kPairs = decltype(size(tdKrdK))::value / 4;  // per row h, for dK and for dV
        Element* k_row[2];
        Element* v_row[2];
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
            if (kb.is_seq) {
                k_row[h] = gk + batch * p.gk_batch_stride + key_pos[h] * p.gk_seq_stride + hk * p.gk_head_stride;
                v_row[h] = gv + batch * p.gv_batch_stride + key_pos[h] * p.gv_seq_stride + hk * p.gv_head_stride;
            } else {
                const int l = kb.l0 + key_row[h] % p.depth_box_slots;
                k_row[h] = gk + batch * p.gdk_batch_stride + key_pos[h] * p.gdk_seq_stride +
                           l * p.gdk_slot_stride + hk * p.gdk_head_stride;
                v_row[h] = gv + batch * p.gdv_batch_stride + key_pos[h] * p.gdv_seq_stride +
                           l * p.gdv_slot_stride + hk * p.gdv_head_stride;
            }
        }
        // Pair i of row h: elements 4i + 2h and 4i + 2h + 1, adjacent columns (one 4-byte access).
        auto pair_at = [&](Element* row, int i) { return reinterpret_cast<Pair*>(row + frag_col(4 * i, lane)); };
        Pair k_old[2][kPairs], v_old[2][kPairs];
        const bool add_to_old = !kb.is_seq && p.accumulate_depth_grads;
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
            CUTLASS_PRAGMA_UNROLL
            for (int i = 0; i < kPairs; ++i) {
                k_old[h][i].clear();
                v_old[h][i].clear();
                if (add_to_old && key_ok[h]) {
                    k_old[h][i] = *pair_at(k_row[h], i);
                    v_old[h][i] = *pair_at(v_row[h], i);
                }
            }
        }
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
            if (!key_ok[h]) continue;
            CUTLASS_PRAGMA_UNROLL
            for (int i = 0; i < kPairs; ++i) {
                Pair k_pair, v_pair;
                CUTLASS_PRAGMA_UNROLL
                for (int j = 0; j < 2; ++j) {
                    const int e = 4 * i + 2 * h + j;
                    k_pair[j] = static_cast<Element>(tdKrdK(e) * p.scale + static_cast<float>(k_old[h][i][j]));
                    v_pair[j] = static_cast<Element>(tdVrdV(e) + static_cast<float>(v_old[h][i][j]));
                }
                *pair_at(k_row[h], i) = k_pair;
                *pair_at(v_row[h], i) = v_pair;
            }
        }
    }
}

}  // namespace moda
