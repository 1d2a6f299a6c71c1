// Host side of the Hopper backward: the delta preprocess, then either the key-stationary
// kernel with the fused dQ (atomics into an fp32 buffer) and its conversion, where
// bwd_fuses_dq says so, or the key-stationary kernel (dK, dV, depth gradients) and the
// query-stationary one (dQ); where each query reads only its own position's depth rows, those
// kernels run without depth rows and the per-position depth kernel follows them. Tensor maps,
// grids, shared memory, launches. Included by the instantiation files.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "moda_bwd_config.h"
#include "moda_bwd_depth_kernel.h"
#include "moda_bwd_dq_kernel.h"
#include "moda_bwd_kernel.h"
#include "moda_bwd_preprocess.h"
#include "moda_fwd_kernel_params.h"
#include "moda_params.h"
#include "moda_tma_maps.h"

namespace moda {

// The depth gradients' strides, named alike in the kernels' parameter structs.
template <class KernelParams>
void set_depth_grad_strides(KernelParams& p, const BwdParams& a) {
    p.gdk_batch_stride = a.gdk_batch_stride, p.gdk_seq_stride = a.gdk_seq_stride;
    p.gdk_slot_stride = a.gdk_slot_stride, p.gdk_head_stride = a.gdk_head_stride;
    p.gdv_batch_stride = a.gdv_batch_stride, p.gdv_seq_stride = a.gdv_seq_stride;
    p.gdv_slot_stride = a.gdv_slot_stride, p.gdv_head_stride = a.gdv_head_stride;
}

// kFusedDq: the key-stationary kernel also adds dQ into a.dq_accum (not deterministic).
template <class Element, int D, bool kFusedDq>
std::string launch_bwd_dkdv(const BwdParams& a, cudaStream_t stream) {  // after the preprocess
    using Config = BwdConfig<D>;
    using Traits = BwdTraits<Element, D, Config::kStages, Config::kOverlapSteps, kFusedDq, Config::kKVBuffers,
                             Config::kDqOwnKeys>;
    constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
    const FwdParams& f = a.fwd;
    const bool bf16 = f.dtype == DType::kBFloat16;
    const int B = f.batch, T = f.seqlen, Hq = f.q_heads, Hk = f.kv_heads, G = Hq / Hk, L = f.depth;

    BwdKernelParams p{};
    std::string err = make_folded_rows_map(&p.tma_q, bf16, f.q, D, G, Hk, T, B, f.q_batch_stride, f.q_seq_stride,
                                           f.q_head_stride, kBlockM);
    if (!err.empty()) return "q: " + err;
    err = make_folded_rows_map(&p.tma_do, bf16, a.dout, D, G, Hk, T, B, a.do_batch_stride, a.do_seq_stride,
                               a.do_head_stride, kBlockM);
    if (!err.empty()) return "dout: " + err;
    err = make_key_maps(f, kBlockN, &p.tma_k, &p.tma_v, &p.tma_dk, &p.tma_dv);
    if (!err.empty()) return err;
    const int Lb = depth_box_slots(L, kBlockN);

    p.row_stats = a.row_stats;
    p.grad_k = a.grad_k;
    p.grad_v = a.grad_v;
    p.grad_depth_k = a.grad_depth_k;
    p.grad_depth_v = a.grad_depth_v;
    p.gk_batch_stride = a.gk_batch_stride, p.gk_seq_stride = a.gk_seq_stride, p.gk_head_stride = a.gk_head_stride;
    p.gv_batch_stride = a.gv_batch_stride, p.gv_seq_stride = a.gv_seq_stride, p.gv_head_stride = a.gv_head_stride;
    set_depth_grad_strides(p, a);
    p.accumulate_depth_grads = a.accumulate_depth_grads;
    p.doc_start = f.doc_start;
    p.doc_end = f.doc_end;
    p.batch = B;
    p.seqlen = T;
    p.kv_heads = Hk;
    p.group = G;
    p.group_log2 = __builtin_ctz(G);
    p.depth = L;
    p.depth_chunk = f.depth_chunk;
    p.depth_box_slots = Lb;
    p.depth_box_positions = kBlockN / Lb;
    p.depth_slot_blocks = L > 0 ? (L + Lb - 1) / Lb : 0;
    p.n_seq_blocks = f.has_seq ? (T + kBlockN - 1) / kBlockN : 0;
    p.n_depth_boxes = L > 0 ? (T + p.depth_box_positions - 1) / p.depth_box_positions * p.depth_slot_blocks : 0;
    // Runs of depth boxes per CTA: long enough that loading the next box's keys hides behind
    // the current one, short enough to leave a few runs per SM for the tail (at most 16).
    int device = 0, sms = 132;
    if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const int64_t all_boxes = int64_t(p.n_depth_boxes) * Hk * B;
    p.depth_boxes_per_cta = int(std::max<int64_t>(1, std::min<int64_t>(16, all_boxes / (4 * int64_t(sms)))));
    p.depth_ctas_per_head = (p.n_depth_boxes + p.depth_boxes_per_cta - 1) / p.depth_boxes_per_cta;
    p.n_row_steps = bwd_row_steps(T, G);
    p.dq_accum = a.dq_accum;
    p.scale = f.scale;
    p.scale_log2 = f.scale * 1.4426950408889634f;

    const size_t smem = sizeof(typename Traits::SharedStorage);
    auto kernel = f.causal ? &moda_bwd_dkdv_kernel<Traits, true> : &moda_bwd_dkdv_kernel<Traits, false>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
    const int64_t ctas = int64_t(p.n_seq_blocks + p.depth_ctas_per_head) * Hk * B;  // ordered by CtaWork::of
    if (ctas >= (int64_t(1) << 31)) return "too many key blocks for one grid";
    kernel<<<unsigned(ctas), Traits::kThreads, smem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return std::string("kernel launch: ") + cudaGetErrorString(e);
    return {};
}

template <class Element, int D>
std::string launch_bwd_dq(const BwdParams& a, cudaStream_t stream) {  // after the preprocess
    using Config = BwdConfig<D>;
    using Traits = BwdDqTraits<Element, D, Config::kStagesDq, Config::kOverlapTiles>;
    const FwdParams& f = a.fwd;
    BwdDqKernelParams p{};
    std::string err = make_fwd_kernel_params(f, Traits::kBlockM, Traits::kBlockN, p.fwd);
    if (!err.empty()) return err;
    err = make_folded_rows_map(&p.tma_do, f.dtype == DType::kBFloat16, a.dout, D, f.q_heads / f.kv_heads,
                               f.kv_heads, f.seqlen, f.batch, a.do_batch_stride, a.do_seq_stride, a.do_head_stride,
                               Traits::kBlockM);
    if (!err.empty()) return "dout: " + err;
    p.delta = a.delta;
    p.dq = a.grad_q;
    p.dq_batch_stride = a.gq_batch_stride, p.dq_seq_stride = a.gq_seq_stride, p.dq_head_stride = a.gq_head_stride;
    p.scale = f.scale;

    const size_t smem = sizeof(typename Traits::SharedStorage);
    auto kernel = f.causal ? &moda_bwd_dq_kernel<Traits, true> : &moda_bwd_dq_kernel<Traits, false>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
    dim3 grid(p.fwd.num_m_blocks, f.kv_heads, f.batch);
    kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return std::string("dq kernel launch: ") + cudaGetErrorString(e);
    return {};
}

// Whether the per-position depth kernel can take a problem's depth gradients (BwdConfig::
// kDepthKernel): each query reads only its own position's rows and its 16-byte row accesses
// are aligned (the inputs' are, as TMA needs; the gradients' are checked here). G <= 16 (two
// head tiles) holds already: check_supported allows no more.
template <int D>
bool bwd_depth_kernel_serves(const BwdParams& a) {
    const FwdParams& f = a.fwd;
    if (!BwdConfig<D>::kDepthKernel || f.depth == 0 || f.depth_chunk != 1) return false;
    for (const void* ptr : {a.grad_q, a.grad_depth_k, a.grad_depth_v}) {
        if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
    }
    for (int64_t s : {a.gq_batch_stride, a.gq_seq_stride, a.gq_head_stride, a.gdk_batch_stride, a.gdk_seq_stride,
                      a.gdk_slot_stride, a.gdk_head_stride, a.gdv_batch_stride, a.gdv_seq_stride, a.gdv_slot_stride,
                      a.gdv_head_stride}) {
        if (s % 8 != 0) return false;
    }
    return true;
}

// The depth gradients (and dQ's depth part, added to grad_q when add_to_dq) of a problem
// bwd_depth_kernel_serves, after the preprocess (row statistics) and the sequence kernels.
template <class Element, int D, int kGroupTiles>
std::string launch_bwd_depth(const BwdParams& a, bool add_to_dq, cudaStream_t stream) {
    using Config = BwdConfig<D>;
    using Traits = BwdDepthTraits<Element, D, kGroupTiles, Config::kDepthSlotRows, Config::kDepthStages,
                                  Config::kDepthWarps>;
    const FwdParams& f = a.fwd;
    BwdDepthParams p{};
    p.q = f.q, p.dout = a.dout, p.depth_k = f.depth_k, p.depth_v = f.depth_v, p.row_stats = a.row_stats;
    p.grad_q = a.grad_q, p.grad_depth_k = a.grad_depth_k, p.grad_depth_v = a.grad_depth_v;
    p.q_batch_stride = f.q_batch_stride, p.q_seq_stride = f.q_seq_stride, p.q_head_stride = f.q_head_stride;
    p.do_batch_stride = a.do_batch_stride, p.do_seq_stride = a.do_seq_stride, p.do_head_stride = a.do_head_stride;
    p.dk_batch_stride = f.dk_batch_stride, p.dk_seq_stride = f.dk_seq_stride;
    p.dk_slot_stride = f.dk_slot_stride, p.dk_head_stride = f.dk_head_stride;
    p.dv_batch_stride = f.dv_batch_stride, p.dv_seq_stride = f.dv_seq_stride;
    p.dv_slot_stride = f.dv_slot_stride, p.dv_head_stride = f.dv_head_stride;
    p.gq_batch_stride = a.gq_batch_stride, p.gq_seq_stride = a.gq_seq_stride, p.gq_head_stride = a.gq_head_stride;
    set_depth_grad_strides(p, a);
    p.batch = f.batch, p.seqlen = f.seqlen, p.kv_heads = f.kv_heads, p.group = f.q_heads / f.kv_heads;
    p.depth = f.depth;
    p.row_steps = bwd_row_steps(f.seqlen, p.group);
    p.scale = f.scale;
    p.scale_log2 = f.scale * 1.4426950408889634f;
    p.add_to_dq = add_to_dq;

    const size_t smem = sizeof(typename Traits::SharedStorage);
    // The in-place mode is an instantiation of its own: its loads of the sums would hold
    // registers (up to 64 at D = 128) in the plain mode too.
    auto kernel = a.accumulate_depth_grads ? &moda_bwd_depth_kernel<Traits, true>
                                           : &moda_bwd_depth_kernel<Traits, false>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
    // Persistent warps: as many CTAs as fit at once (each warp walks its units).
    int device = 0, sms = 132, per_sm = 1;
    if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Traits::kThreads, smem);
    const int64_t units = int64_t(f.batch) * f.seqlen * f.kv_heads;
    const int64_t ctas = std::min<int64_t>((units + Traits::kWarps - 1) / Traits::kWarps,
                                           int64_t(sms) * std::max(per_sm, 1));
    kernel<<<unsigned(ctas), Traits::kThreads, smem, stream>>>(p);
    e = cudaGetLastError();
    return e == cudaSuccess ? std::string() : std::string("depth kernel launch: ") + cudaGetErrorString(e);
}

// After the preprocess: the key-stationary kernel, and dQ fused into it or from its own kernel.
template <class Element, int D>
std::string launch_bwd_sequence(const BwdParams& a, cudaStream_t stream) {
    const FwdParams& f = a.fwd;
    const int B = f.batch, T = f.seqlen, Hk = f.kv_heads, G = f.q_heads / Hk;
    const int steps = bwd_row_steps(T, G);
    if constexpr (BwdConfig<D>::kFusedDq) {
        if (bwd_fuses_dq(f, a.deterministic)) {
            std::string err = launch_bwd_dkdv<Element, D, true>(a, stream);
            if (!err.empty()) return err;
            const int threads = 256;
            const int blocks = B * Hk * steps;
            const int64_t vectors = int64_t(blocks) * (DqAccumLayout<D>::kBlockFloats / 4);
            moda_bwd_dq_convert_kernel<Element, D><<<unsigned((vectors + threads - 1) / threads), threads, 0, stream>>>(
                a.dq_accum, static_cast<Element*>(a.grad_q), blocks, steps, Hk, T, __builtin_ctz(G), f.scale,
                a.gq_batch_stride, a.gq_seq_stride, a.gq_head_stride);
            const cudaError_t e = cudaGetLastError();
            return e == cudaSuccess ? std::string() : std::string("dq convert launch: ") + cudaGetErrorString(e);
        }
    }
    // Every gradient reduced inside one CTA, in a fixed order: deterministic.
    std::string err = launch_bwd_dkdv<Element, D, false>(a, stream);
    return err.empty() ? launch_bwd_dq<Element, D>(a, stream) : err;
}

template <class Element, int D>
std::string launch_bwd(const BwdParams& a, cudaStream_t stream) {
    const FwdParams& f = a.fwd;
    const int B = f.batch, T = f.seqlen, Hk = f.kv_heads, G = f.q_heads / Hk;
    // delta = rowsum(dO * O) - grad_lse, and the row statistics in the key-stationary kernel's layout
    const int steps = bwd_row_steps(T, G);
    const int64_t lanes = int64_t(B) * Hk * steps * kBwdStepRows * (D / 8);  // D / 8 threads per row
    const int threads = 256;
    moda_bwd_preprocess_kernel<Element, D, kBwdStepRows>
        <<<unsigned((lanes + threads - 1) / threads), threads, 0, stream>>>(
            static_cast<const Element*>(f.out), static_cast<const Element*>(a.dout), f.lse, a.grad_lse, a.delta,
            a.row_stats, B, T, Hk, __builtin_ctz(G), steps, f.out_batch_stride, f.out_seq_stride, f.out_head_stride,
            a.do_batch_stride, a.do_seq_stride, a.do_head_stride);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return std::string("preprocess launch: ") + cudaGetErrorString(e);

    if (!bwd_depth_kernel_serves<D>(a)) return launch_bwd_sequence<Element, D>(a, stream);
    // The sequence kernels without depth rows (their gradients add up: lse and delta are the
    // whole softmax's), then the depth kernel adds dQ's depth part.
    BwdParams seq = a;
    seq.fwd.depth = 0;
    seq.fwd.depth_k = seq.fwd.depth_v = nullptr;
    seq.grad_depth_k = seq.grad_depth_v = nullptr;
    if (f.has_seq) {
        std::string err = launch_bwd_sequence<Element, D>(seq, stream);
        if (!err.empty()) return err;
    }
    return G <= 8 ? launch_bwd_depth<Element, D, 1>(a, f.has_seq, stream)
                  : launch_bwd_depth<Element, D, 2>(a, f.has_seq, stream);
}

}  // namespace moda
