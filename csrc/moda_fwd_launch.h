// Host side of the Hopper forward: tensor maps, grid, shared memory, launch. Included by the
// instantiation files (one element type and head dim each, compiled in parallel).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "moda_fwd_config.h"
#include "moda_fwd_depth_kernel.h"
#include "moda_fwd_kernel.h"
#include "moda_params.h"
#include "moda_tma_maps.h"

namespace moda {

// What the parameters of every forward kernel share: the outputs, the shape, the scale.
template <class KernelParams>
void set_outputs_and_shape(const FwdParams& a, KernelParams& p) {
    p.out = a.out;
    p.lse = a.lse;
    p.out_batch_stride = a.out_batch_stride;
    p.out_seq_stride = a.out_seq_stride;
    p.out_head_stride = a.out_head_stride;
    p.seqlen = a.seqlen;
    p.kv_heads = a.kv_heads;
    p.group = a.q_heads / a.kv_heads;
    p.depth = a.depth;
    p.scale_log2 = a.scale * 1.4426950408889634f;
}

// The query-stationary kernels' parameters (the forward's, and the backward's dQ kernel's):
// tensor maps with query boxes of kBlockM G-folded rows and key boxes of kBlockN rows, the
// depth-box geometry, the tile order, and the outputs. Returns an error message, or an empty string.
inline std::string make_fwd_kernel_params(const FwdParams& a, int kBlockM, int kBlockN, bool stripe_depth,
                                          FwdKernelParams& p) {
    const bool bf16 = a.dtype == DType::kBFloat16;
    const int B = a.batch, T = a.seqlen, Hk = a.kv_heads, G = a.q_heads / a.kv_heads, L = a.depth;
    std::string err = make_folded_rows_map(&p.tma_q, bf16, a.q, a.head_dim, G, Hk, T, B, a.q_batch_stride,
                                           a.q_seq_stride, a.q_head_stride, kBlockM);
    if (!err.empty()) return "q: " + err;
    err = make_key_maps(a, kBlockN, &p.tma_k, &p.tma_v, &p.tma_dk, &p.tma_dv);
    if (!err.empty()) return err;
    const int Lb = depth_box_slots(L, kBlockN);
    set_outputs_and_shape(a, p);
    p.depth_chunk = a.depth_chunk;
    p.depth_box_slots = Lb;
    p.depth_box_positions = kBlockN / Lb;
    p.depth_slot_blocks = L > 0 ? (L + Lb - 1) / Lb : 0;
    p.num_m_blocks = (T * G + kBlockM - 1) / kBlockM;
    p.has_seq = a.has_seq;
    p.depth_stripes = stripe_depth ? kBlockM / 64 : 1;  // one stripe per 64-row consumer warpgroup
    p.depth_k_bytes = static_cast<const char*>(a.depth_k);
    p.depth_v_bytes = static_cast<const char*>(a.depth_v);
    const int64_t dk[4] = {a.dk_batch_stride, a.dk_seq_stride, a.dk_slot_stride, a.dk_head_stride};
    const int64_t dv[4] = {a.dv_batch_stride, a.dv_seq_stride, a.dv_slot_stride, a.dv_head_stride};
    for (int i = 0; i < 4; ++i) {  // 16-bit elements
        p.dk_byte_strides[i] = 2 * dk[i];
        p.dv_byte_strides[i] = 2 * dv[i];
    }
    return {};
}

// The depth kernel's launch (FwdConfig::kDepthBeside): its tensor maps and CTAs, one per SM.
template <class Element, int D, int kSlots>
std::string launch_fwd_depth(const FwdParams& a, const DepthBesidePlan& plan, const FwdMergeParams& merge,
                             int block_rows, cudaStream_t stream) {
    using Traits = FwdDepthTraits<Element, D, kSlots>;
    const bool bf16 = a.dtype == DType::kBFloat16;
    const int B = a.batch, T = a.seqlen, Hk = a.kv_heads, G = a.q_heads / a.kv_heads, L = a.depth;
    constexpr int kRows = kSlots * Traits::kPositions;
    FwdDepthParams p{};
    std::string err = make_folded_rows_map(&p.tma_q, bf16, a.q, D, G, Hk, T, B, a.q_batch_stride, a.q_seq_stride,
                                           a.q_head_stride, Traits::kPositions * G);
    if (!err.empty()) return "q: " + err;
    err = make_depth_box_map(&p.tma_dk, bf16, a.depth_k, D, Hk, L, T, B, a.dk_batch_stride, a.dk_seq_stride,
                             a.dk_slot_stride, a.dk_head_stride, kRows, kSlots);
    if (!err.empty()) return "depth_k: " + err;
    err = make_depth_box_map(&p.tma_dv, bf16, a.depth_v, D, Hk, L, T, B, a.dv_batch_stride, a.dv_seq_stride,
                             a.dv_slot_stride, a.dv_head_stride, kRows, kSlots);
    if (!err.empty()) return "depth_v: " + err;
    set_outputs_and_shape(a, p);
    p.merge = merge;
    p.batch = B;
    p.block_rows = block_rows;
    p.num_m_blocks = (T * G + block_rows - 1) / block_rows;
    const size_t smem = sizeof(typename Traits::SharedStorage);
    auto kernel = &moda_fwd_depth_kernel<Traits>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return std::string("cudaFuncSetAttribute (depth kernel): ") + cudaGetErrorString(e);
    kernel<<<plan.ctas, Traits::kThreads, smem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return std::string("depth kernel launch: ") + cudaGetErrorString(e);
    return {};
}

template <class Element, int D>
std::string launch_fwd_depth_for(const FwdParams& a, const DepthBesidePlan& plan, const FwdMergeParams& merge,
                                 int block_rows, cudaStream_t stream) {
    switch (plan.slots) {
        case 16: return launch_fwd_depth<Element, D, 16>(a, plan, merge, block_rows, stream);
        case 32: return launch_fwd_depth<Element, D, 32>(a, plan, merge, block_rows, stream);
        case 64: return launch_fwd_depth<Element, D, 64>(a, plan, merge, block_rows, stream);
        case 128: return launch_fwd_depth<Element, D, 128>(a, plan, merge, block_rows, stream);
        default:
            if constexpr (D == 64) return launch_fwd_depth<Element, D, 256>(a, plan, merge, block_rows, stream);
            return "no depth kernel for this many depth slots";
    }
}

// The stream the depth kernel runs on (one per device, highest priority, so that its CTAs
// take the first SMs that free up), and the events of the fork and join.
struct BesideStream {
    cudaStream_t stream = nullptr;
    cudaEvent_t fork = nullptr, join = nullptr;
};
inline std::string beside_stream(BesideStream& out) {
    constexpr int kMaxDevices = 64;
    static BesideStream streams[kMaxDevices];
    int device = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess || device >= kMaxDevices) return "cudaGetDevice failed";
    BesideStream& s = streams[device];
    if (s.stream == nullptr) {
        int least = 0, greatest = 0;
        cudaDeviceGetStreamPriorityRange(&least, &greatest);
        if (cudaStreamCreateWithPriority(&s.stream, cudaStreamNonBlocking, greatest) != cudaSuccess ||
            cudaEventCreateWithFlags(&s.fork, cudaEventDisableTiming) != cudaSuccess ||
            cudaEventCreateWithFlags(&s.join, cudaEventDisableTiming) != cudaSuccess) {
            return "could not create the depth kernel's stream";
        }
    }
    out = s;
    return {};
}

template <class Element, int D>
std::string launch_fwd(const FwdParams& a_in, cudaStream_t stream) {
    using Config = FwdConfig<D>;
    using Traits = FwdTraits<Element, D, Config::kBlockN, Config::kStages, Config::kConsumerWGs,
                             Config::kDepthPrefetch, Config::kSwapDepth, Config::kDepthLoop, Config::kLatePvWait,
                             Config::kDepthL2Lead>;
    static_assert(sizeof(typename Traits::SharedStorage) <= 227 * 1024,
                  "shared memory over the 227 KB an SM90 CTA may have: fewer stages");
    const DepthBesidePlan plan = a_in.workspace != nullptr ? plan_depth_beside(a_in) : DepthBesidePlan{};
    FwdParams a = a_in;
    FwdMergeParams merge{};
    if (plan.ctas > 0) {  // the sequence kernel runs without the depth rows
        a.depth = 0;
        a.depth_k = a.depth_v = nullptr;
        char* ws = static_cast<char*>(a_in.workspace);
        merge.claims = reinterpret_cast<int*>(ws);
        merge.ready = merge.claims + plan.blocks;
        float* f = reinterpret_cast<float*>(ws + plan.flag_bytes());
        merge.depth_out = f;
        merge.depth_lse = f + plan.partial_floats;
        merge.seq_out = merge.depth_lse + plan.lse_floats;
        merge.seq_lse = merge.seq_out + plan.partial_floats;
    }
    FwdKernelParams p{};
    const std::string err = make_fwd_kernel_params(a, Traits::kBlockM, Traits::kBlockN, Config::kStripeDepth, p);
    if (!err.empty()) return err;
    p.merge = merge;

    const size_t smem = sizeof(typename Traits::SharedStorage);
    auto kernel = a.causal ? &moda_fwd_kernel<Traits, true, Config::kOverlap, Config::kPingPong, Config::kWarpDepth>
                           : &moda_fwd_kernel<Traits, false, Config::kOverlap, Config::kPingPong, Config::kWarpDepth>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);

    BesideStream side;
    if (plan.ctas > 0) {
        // Zero the claims, then fork: the depth kernel first, on its high-priority stream.
        std::string serr = beside_stream(side);
        if (!serr.empty()) return serr;
        e = cudaMemsetAsync(a_in.workspace, 0, plan.flag_bytes(), stream);
        if (e == cudaSuccess) e = cudaEventRecord(side.fork, stream);
        if (e == cudaSuccess) e = cudaStreamWaitEvent(side.stream, side.fork, 0);
        if (e != cudaSuccess) return std::string("depth kernel fork: ") + cudaGetErrorString(e);
        serr = launch_fwd_depth_for<Element, D>(a_in, plan, merge, Traits::kBlockM, side.stream);
        if (!serr.empty()) return serr;
    }
    const dim3 grid(p.num_m_blocks, a.kv_heads, a.batch);
    kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return std::string("kernel launch: ") + cudaGetErrorString(e);
    if (plan.ctas > 0) {
        e = cudaEventRecord(side.join, side.stream);
        if (e == cudaSuccess) e = cudaStreamWaitEvent(stream, side.join, 0);
        if (e != cudaSuccess) return std::string("depth kernel join: ") + cudaGetErrorString(e);
    }
    return {};
}

}  // namespace moda
