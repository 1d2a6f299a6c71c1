// Host side of the Hopper forward: tensor maps, grid, shared memory, launch. Included by the
// instantiation files (one element type and head dim each, compiled in parallel).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "moda_fwd_config.h"
#include "moda_fwd_kernel.h"
#include "moda_fwd_traits.h"
#include "moda_params.h"
#include "moda_tma_maps.h"

namespace moda {

// The query-stationary kernels' parameters (the forward's, and the backward's dQ kernel's):
// tensor maps with query boxes of kBlockM G-folded rows and key boxes of kBlockN rows, the
// depth-box geometry, and the outputs. Returns an error message, or an empty string.
inline std::string make_fwd_kernel_params(const FwdParams& a, int kBlockM, int kBlockN, FwdKernelParams& p) {
    const bool bf16 = a.dtype == DType::kBFloat16;
    const int B = a.batch, T = a.seqlen, Hk = a.kv_heads, G = a.q_heads / a.kv_heads, L = a.depth;
    std::string err = make_folded_rows_map(&p.tma_q, bf16, a.q, a.head_dim, G, Hk, T, B, a.q_batch_stride,
                                           a.q_seq_stride, a.q_head_stride, kBlockM);
    if (!err.empty()) return "q: " + err;
    err = make_key_maps(a, kBlockN, &p.tma_k, &p.tma_v, &p.tma_dk, &p.tma_dv);
    if (!err.empty()) return err;
    const int Lb = depth_box_slots(L, kBlockN);
    p.out = a.out;
    p.lse = a.lse;
    p.out_batch_stride = a.out_batch_stride;
    p.out_seq_stride = a.out_seq_stride;
    p.out_head_stride = a.out_head_stride;
    p.seqlen = T;
    p.kv_heads = Hk;
    p.group = G;
    p.depth = L;
    p.depth_chunk = a.depth_chunk;
    p.depth_box_slots = Lb;
    p.depth_box_positions = kBlockN / Lb;
    p.depth_slot_blocks = L > 0 ? (L + Lb - 1) / Lb : 0;
    p.num_m_blocks = (T * G + kBlockM - 1) / kBlockM;
    p.has_seq = a.has_seq;
    p.scale_log2 = a.scale * 1.4426950408889634f;
    return {};
}

template <class Element, int D>
std::string launch_fwd(const FwdParams& a, cudaStream_t stream) {
    using Config = FwdConfig<D>;
    using Traits = FwdTraits<Element, D, Config::kBlockN, Config::kStages, Config::kConsumerWGs>;
    static_assert(sizeof(typename Traits::SharedStorage) <= 227 * 1024,
                  "shared memory over the 227 KB an SM90 CTA may have: fewer stages");
    FwdKernelParams p{};
    const std::string err = make_fwd_kernel_params(a, Traits::kBlockM, Traits::kBlockN, p);
    if (!err.empty()) return err;

    const size_t smem = sizeof(typename Traits::SharedStorage);
    auto kernel = a.causal ? &moda_fwd_kernel<Traits, true> : &moda_fwd_kernel<Traits, false>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
    const dim3 grid(p.num_m_blocks, a.kv_heads, a.batch);
    kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return std::string("kernel launch: ") + cudaGetErrorString(e);
    return {};
}

}  // namespace moda
