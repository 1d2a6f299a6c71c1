// Parameters of the backward's key-stationary kernel (moda_bwd_kernel.h), passed by value as a
// __grid_constant__ parameter (the TMA unit reads the tensor maps straight from parameter space).
#pragma once

#include <cuda.h>

#include <cstdint>

namespace moda {

struct BwdKernelParams {
    CUtensorMap tma_q;    // q and dO as [D, G, Hk, T, B]; box [64, G, 1, 64 / G, 1] -> rows t * G + g
    CUtensorMap tma_do;
    CUtensorMap tma_k;    // k, v as [D, Hk, T, B, 1]; box [64, 1, 128, 1, 1]
    CUtensorMap tma_v;
    CUtensorMap tma_dk;   // depth_k, depth_v as [D, Hk, L, T, B]; box [64, 1, Lb, Tb, 1]
    CUtensorMap tma_dv;
    const float* row_stats;  // [B, Hk, row steps, 2, kBlockM]: log2-scaled lse, then delta (preprocess)
    void* grad_k;         // [B, T, Hk, D]        (unused without sequence keys)
    void* grad_v;
    void* grad_depth_k;   // [B, T, L, Hk, D]     (unused when L = 0)
    void* grad_depth_v;
    int64_t gk_batch_stride, gk_seq_stride, gk_head_stride;
    int64_t gv_batch_stride, gv_seq_stride, gv_head_stride;
    int64_t gdk_batch_stride, gdk_seq_stride, gdk_slot_stride, gdk_head_stride;
    int64_t gdv_batch_stride, gdv_seq_stride, gdv_slot_stride, gdv_head_stride;
    bool accumulate_depth_grads;  // add the depth gradients to grad_depth_k / _v (BwdParams)
    const int* doc_start;         // packed documents: each position's document [start, end); null: none
    const int* doc_end;
    int batch, seqlen, kv_heads, group, depth, depth_chunk;
    int group_log2;           // G is a power of two: row / G is a shift
    int depth_box_slots;      // Lb
    int depth_box_positions;  // Tb
    int depth_slot_blocks;    // ceil(L / Lb)
    int n_seq_blocks;         // ceil(T / 128) with sequence keys, else 0
    int n_depth_boxes;        // ceil(T / Tb) * depth_slot_blocks, 0 when L = 0
    int depth_boxes_per_cta;  // consecutive depth boxes one CTA walks
    int depth_ctas_per_head;  // ceil(n_depth_boxes / depth_boxes_per_cta)
    int n_row_steps;          // ceil(T * G / kBlockM)
    float* dq_accum;          // [B, Hk, row steps] blocks of DqAccumLayout, zeroed (fused dQ only)
    float scale;              // softmax scale
    float scale_log2;         // scale * log2(e)
};

}  // namespace moda
