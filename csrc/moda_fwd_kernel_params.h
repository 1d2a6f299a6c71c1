// Parameters of the query-stationary kernels (the forward, and the backward's dQ kernel,
// which walks the same key tiles): the device struct, and how the host fills it.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <string>

#include "moda_params.h"
#include "moda_tma_maps.h"

namespace moda {

// Everything the kernel reads, passed by value as a __grid_constant__ parameter (the TMA
// unit reads the tensor maps straight from parameter space).
struct FwdKernelParams {
    // Five-dimensional maps, innermost first (make_fwd_kernel_params builds them):
    CUtensorMap tma_q;   // q as [D, G, Hk, T, B]; box [64, G, 1, 128 / G, 1] -> rows t * G + g
    CUtensorMap tma_k;   // k as [D, Hk, T, B, 1]; box [64, 1, kBlockN, 1, 1]
    CUtensorMap tma_v;
    CUtensorMap tma_dk;  // depth_k as [D, Hk, L, T, B]; box [64, 1, Lb, Tb, 1] -> rows t * Lb + l
    CUtensorMap tma_dv;
    void* out;
    float* lse;
    const int* doc_start;  // packed documents: each position's document [start, end); null: none
    const int* doc_end;
    int64_t out_batch_stride, out_seq_stride, out_head_stride;
    int seqlen, kv_heads, group, depth, depth_chunk;
    int depth_box_slots;      // Lb
    int depth_box_positions;  // Tb
    int depth_slot_blocks;    // ceil(L / Lb)
    int num_m_blocks;
    int has_seq;
    float scale_log2;         // softmax scale * log2(e): scores are exponentiated with exp2
};

// Tensor maps with query boxes of kBlockM G-folded rows and key boxes of kBlockN rows, the
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
    p.doc_start = a.doc_start;
    p.doc_end = a.doc_end;
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

}  // namespace moda
