// Entry point of the CUDA forward: checks what the kernels support (check_supported, shared
// with the backward), picks the instantiation.
// The kernels themselves are in moda_fwd_kernel.h, one instantiation per file under
// instantiations/.
#include <cuda_runtime.h>

#include <string>

#include <cutlass/numeric_types.h>

#include "moda_params.h"

namespace moda {

template <class Element, int D>
std::string launch_fwd(const FwdParams& params, cudaStream_t stream);

namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

// Everything the TMA boxes need: 16-byte aligned bases and strides (8 elements of 16 bits).
std::string check_supported(const FwdParams& a) {
    if (a.head_dim != 64 && a.head_dim != 128) return "head_dim must be 64 or 128";
    if (a.kv_heads <= 0 || a.q_heads % a.kv_heads != 0) return "q_heads must be a multiple of kv_heads";
    const int G = a.q_heads / a.kv_heads;
    if (G != 1 && G != 2 && G != 4 && G != 8 && G != 16) return "q_heads / kv_heads must be 1, 2, 4, 8 or 16";
    if (a.depth < 0 || a.depth > 256) return "depth (L) must be in [0, 256]";
    if (!a.has_seq && a.depth == 0) return "nothing to attend to (no sequence keys and L = 0)";
    if (a.seqlen < 1 || a.batch < 1) return "batch and seqlen must be >= 1";
    if (a.depth_chunk < 1) return "depth_chunk must be >= 1";
    if ((a.doc_start == nullptr) != (a.doc_end == nullptr)) return "doc_start and doc_end go together";
    if (a.doc_start != nullptr && a.batch != 1) return "packed documents need batch 1";
    const int64_t strides[] = {a.q_batch_stride,   a.q_seq_stride,    a.q_head_stride,   a.k_batch_stride,
                               a.k_seq_stride,     a.k_head_stride,   a.v_batch_stride,  a.v_seq_stride,
                               a.v_head_stride,    a.dk_batch_stride, a.dk_seq_stride,   a.dk_slot_stride,
                               a.dk_head_stride,   a.dv_batch_stride, a.dv_seq_stride,   a.dv_slot_stride,
                               a.dv_head_stride,   a.out_batch_stride, a.out_seq_stride, a.out_head_stride};
    for (int64_t s : strides) {
        if (s % 8 != 0) return "every stride but the last must be a multiple of 8 elements (16 bytes)";
    }
    const void* ptrs[] = {a.q, a.k, a.v, a.depth_k, a.depth_v, a.out};
    for (const void* ptr : ptrs) {
        if (ptr != nullptr && !aligned16(ptr)) return "tensors must start at 16-byte aligned addresses";
    }
    return {};
}

const char* run_fwd(const FwdParams& params, void* stream) {
    static thread_local std::string error;
    error = check_supported(params);
    if (error.empty()) {
        auto s = static_cast<cudaStream_t>(stream);
        const bool bf16 = params.dtype == DType::kBFloat16;
        if (params.head_dim == 64) {
            error = bf16 ? launch_fwd<cutlass::bfloat16_t, 64>(params, s) : launch_fwd<cutlass::half_t, 64>(params, s);
        } else {
            error = bf16 ? launch_fwd<cutlass::bfloat16_t, 128>(params, s) : launch_fwd<cutlass::half_t, 128>(params, s);
        }
    }
    return error.c_str();
}

}  // namespace moda
