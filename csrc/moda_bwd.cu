// Entry point of the CUDA backward: checks, then the instantiation for the element type and
// head dim. The kernels are in moda_bwd_preprocess.h (delta, row statistics),
// moda_bwd_kernel.h (dK, dV, depth gradients, the fused dQ), moda_bwd_dq_kernel.h (dQ) and
// moda_bwd_depth_kernel.h (per-position depth gradients); which run: moda_bwd_launch.h.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <cutlass/numeric_types.h>

#include "moda_bwd_config.h"
#include "moda_bwd_traits.h"
#include "moda_params.h"

namespace moda {

template <class Element, int D>
std::string launch_bwd(const BwdParams& params, cudaStream_t stream);

namespace {

// dO is loaded with TMA like q; the gradients are written as pairs of elements (4 bytes).
std::string check_bwd(const BwdParams& a) {
    if (a.dout == nullptr || a.delta == nullptr || a.row_stats == nullptr) {
        return "dout and the delta and row_stats scratch buffers are required";
    }
    if (reinterpret_cast<uintptr_t>(a.row_stats) % 16 != 0) return "row_stats must be 16-byte aligned (bulk copies)";
    if (reinterpret_cast<uintptr_t>(a.dout) % 16 != 0) return "dout must start at a 16-byte aligned address";
    for (int64_t s : {a.do_batch_stride, a.do_seq_stride, a.do_head_stride}) {
        if (s % 8 != 0) return "dout's strides but the last must be multiples of 8 elements (16 bytes)";
    }
    const int64_t grad_strides[] = {a.gq_batch_stride, a.gq_seq_stride, a.gq_head_stride, a.gk_batch_stride,  a.gk_seq_stride,   a.gk_head_stride,  a.gv_batch_stride,
                                    a.gv_seq_stride,    a.gv_head_stride,  a.gdk_batch_stride, a.gdk_seq_stride,
                                    a.gdk_slot_stride,  a.gdk_head_stride, a.gdv_batch_stride, a.gdv_seq_stride,
                                    a.gdv_slot_stride,  a.gdv_head_stride};
    for (int64_t s : grad_strides) {
        if (s % 2 != 0) return "gradient strides but the last must be even (pairs of elements are stored)";
    }
    for (const void* ptr : {a.grad_q, a.grad_k, a.grad_v, a.grad_depth_k, a.grad_depth_v}) {
        if (reinterpret_cast<uintptr_t>(ptr) % 4 != 0) return "gradients must start at 4-byte aligned addresses";
    }
    if (a.grad_q == nullptr) return "grad_q is required";
    if (bwd_fuses_dq(a.fwd, a.deterministic) &&
        (a.dq_accum == nullptr || reinterpret_cast<uintptr_t>(a.dq_accum) % 16 != 0)) {
        return "the dq_accum scratch buffer (16-byte aligned, bwd_dq_accum_floats) is required";
    }
    if (a.fwd.has_seq && (a.grad_k == nullptr || a.grad_v == nullptr)) return "grad_k and grad_v are required";
    if (a.fwd.depth > 0 && (a.grad_depth_k == nullptr || a.grad_depth_v == nullptr)) {
        return "grad_depth_k and grad_depth_v are required";
    }
    return {};
}

}  // namespace

int64_t bwd_row_stats_floats(const FwdParams& params) {
    if (params.kv_heads <= 0 || params.q_heads % params.kv_heads != 0) return 0;  // check_supported says why
    const int G = params.q_heads / params.kv_heads;
    return int64_t(params.batch) * params.kv_heads * bwd_row_steps(params.seqlen, G) * 2 * kBwdStepRows;
}

int64_t bwd_dq_accum_floats(const FwdParams& params, bool deterministic) {
    if (!bwd_fuses_dq(params, deterministic)) return 0;
    return bwd_row_stats_floats(params) / 2 * params.head_dim;  // kBwdStepRows x D per row step
}

const char* run_bwd(const BwdParams& params, void* stream) {
    static thread_local std::string error;
    error = check_supported(params.fwd);
    if (error.empty()) error = check_bwd(params);
    if (error.empty()) {
        auto s = static_cast<cudaStream_t>(stream);
        const bool bf16 = params.fwd.dtype == DType::kBFloat16;
        if (params.fwd.head_dim == 64) {
            error = bf16 ? launch_bwd<cutlass::bfloat16_t, 64>(params, s)
                         : launch_bwd<cutlass::half_t, 64>(params, s);
        } else {
            error = bf16 ? launch_bwd<cutlass::bfloat16_t, 128>(params, s)
                         : launch_bwd<cutlass::half_t, 128>(params, s);
        }
    }
    return error.c_str();
}

}  // namespace moda
