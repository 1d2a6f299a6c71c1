// Plain description of one MoDA forward call: what the host launcher needs, no torch types.
//
// Layouts (strides in elements, last dimension contiguous):
//   q, out  [B, T, Hq, D]      k, v  [B, T, Hk, D]      depth_k, depth_v  [B, T, L, Hk, D]
//   lse     [B, Hq, T] float32, contiguous, natural log.
// Query head h reads kv head h / G (G = Hq / Hk). A query at position t sees sequence keys
// s <= t (causal) or all s, and the depth rows (s, l) with s in t's depth chunk
// (s / C == t / C, and s <= t when causal); C = depth_chunk, C = 1 means its own position.
//
// Packed documents (batch 1): doc_start[t], doc_end[t] (int32, one per position) bound the
// document of position t; a query sees only keys of its own document, and depth chunks start
// at its first position: s and t share a chunk when (s - a) / C == (t - a) / C, a = doc_start[t].
#pragma once

#include <cstdint>
#include <string>

namespace moda {

enum class DType { kFloat16, kBFloat16 };

struct FwdParams {
    DType dtype;
    int batch, seqlen, q_heads, kv_heads, head_dim, depth;  // B, T, Hq, Hk, D, L
    int depth_chunk;                                           // C >= 1
    bool causal;
    bool has_seq;    // false: depth-only (no k, v)
    float scale;     // softmax scale applied to q.k

    const void* q;
    const void* k;        // null when !has_seq
    const void* v;
    const void* depth_k;  // null when depth == 0
    const void* depth_v;
    void* out;
    float* lse;
    const int* doc_start;  // packed documents, [T] each (batch 1); null: one sequence per batch entry
    const int* doc_end;

    int64_t q_batch_stride, q_seq_stride, q_head_stride;
    int64_t k_batch_stride, k_seq_stride, k_head_stride;
    int64_t v_batch_stride, v_seq_stride, v_head_stride;
    int64_t dk_batch_stride, dk_seq_stride, dk_slot_stride, dk_head_stride;
    int64_t dv_batch_stride, dv_seq_stride, dv_slot_stride, dv_head_stride;
    int64_t out_batch_stride, out_seq_stride, out_head_stride;
};

// The gradients of one MoDA call, from the forward's inputs and outputs (`fwd`: q, k, v,
// depth_k, depth_v, out, lse) and dO. Gradients have the shapes of q, k, v, depth_k, depth_v,
// with their own strides (elements).
struct BwdParams {
    FwdParams fwd;
    const void* dout;  // [B, T, Hq, D]
    int64_t do_batch_stride, do_seq_stride, do_head_stride;
    const float* grad_lse;  // [B, Hq, T] contiguous, or null
    float* delta;           // scratch [B, Hq, T] contiguous: rowsum(dO * O) - grad_lse
    float* row_stats;       // scratch of bwd_row_stats_floats(fwd) floats (see moda_bwd_kernel.h)
    // true: bitwise-repeatable gradients (dQ from its own kernel); false: where that is
    // faster (bwd_fuses_dq), dQ accumulated by the dK / dV kernel with fp32 atomics.
    bool deterministic;
    float* dq_accum;        // scratch of bwd_dq_accum_floats(fwd, deterministic) floats, zeroed
    void* grad_q;
    void* grad_k;
    void* grad_v;
    void* grad_depth_k;
    void* grad_depth_v;
    int64_t gq_batch_stride, gq_seq_stride, gq_head_stride;
    int64_t gk_batch_stride, gk_seq_stride, gk_head_stride;
    int64_t gv_batch_stride, gv_seq_stride, gv_head_stride;
    int64_t gdk_batch_stride, gdk_seq_stride, gdk_slot_stride, gdk_head_stride;
    int64_t gdv_batch_stride, gdv_seq_stride, gdv_slot_stride, gdv_head_stride;
    // true: add the depth gradients to what grad_depth_k / grad_depth_v hold instead of
    // overwriting them (a depth stream summing its readers' gradients in place).
    bool accumulate_depth_grads;
};

// Returns an empty string on success, else what went wrong (unsupported input, CUDA error).
// Launches on `stream` (a cudaStream_t passed as void* to keep this header CUDA-free).
const char* run_fwd(const FwdParams& params, void* stream);
const char* run_bwd(const BwdParams& params, void* stream);
// Size of BwdParams::row_stats and of BwdParams::dq_accum (0: not used), in floats.
int64_t bwd_row_stats_floats(const FwdParams& params);
int64_t bwd_dq_accum_floats(const FwdParams& params, bool deterministic);

// What the kernels support of a problem: an empty string, or why not.
std::string check_supported(const FwdParams& params);

}  // namespace moda
