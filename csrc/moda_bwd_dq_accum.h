// The fused dQ's fp32 accumulation buffer (moda_bwd_kernel.h with BwdTraits::kFusedDq): its
// layout, the vector atomics that add a step's dQ into it, and the kernel that turns it into dQ.
//
// One block of kRows x D floats per (batch, kv head, row step), blocks in the order of the
// row statistics ([B, Hk, row steps]). Inside a block the floats are in the order of the dQ
// product's accumulator registers, not row-major: a warpgroup thread t (0..127) holds, per
// group g of 8 columns, the four elements of two rows (frag_row(t, 0 / 1)) and two adjacent
// columns (8 g + frag_col(e, t % 32) for e = 0..3, moda_sm90_common.h); those four floats go
// to vector (g, t), the vectors of a group side by side. So each warp's atomic adds cover
// 512 contiguous bytes.
#pragma once

#include <cstdint>

#include <cutlass/numeric_types.h>

#include "moda_bwd_traits.h"
#include "moda_sm90_common.h"

namespace moda {

template <int D>
struct DqAccumLayout {
    static constexpr int kRows = kBwdStepRows;
    static constexpr int kBlockFloats = kRows * D;
    // Offset in floats, inside a block, of column group g's vector of warpgroup thread t.
    __host__ __device__ static constexpr int vector_offset(int g, int t) { return (g * 128 + t) * 4; }
};

// Adds four floats to global memory with one vector reduction (sm_90): no return value,
// so the thread does not wait for it.
__device__ __forceinline__ void red_add_f32x4(float* dst, float a, float b, float c, float d) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
}

// dQ (scaled by the softmax scale) from the accumulation buffer: one thread per float4
// vector, rows past T * G (padding of the last step) skipped. dq is [B, T, Hq, D] with the
// given strides (elements); query head h of folded row r = t G + g is hk G + g.
template <class Element, int D>
__global__ void moda_bwd_dq_convert_kernel(const float* accum, Element* dq, int blocks, int steps, int Hk, int T,
                                           int group_log2, float scale, int64_t dq_batch, int64_t dq_seq,
                                           int64_t dq_head) {
    using Layout = DqAccumLayout<D>;
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (block, g, t)
    if (i >= int64_t(blocks) * (Layout::kBlockFloats / 4)) return;
    const int64_t block = i / (Layout::kBlockFloats / 4);
    const int in_block = int(i % (Layout::kBlockFloats / 4));
    const int t = in_block % 128, g = in_block / 128;
    const float4 v = *reinterpret_cast<const float4*>(accum + block * Layout::kBlockFloats + Layout::vector_offset(g, t));
    const int step = int(block % steps), bh = int(block / steps), b = bh / Hk, hk = bh % Hk;
    const int col = 8 * g + frag_col(0, t % 32);
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        const int row = step * Layout::kRows + frag_row(t, h);
        const int pos = row >> group_log2;
        if (pos >= T) continue;
        const int head = (hk << group_log2) + (row & ((1 << group_log2) - 1));
        cutlass::Array<Element, 2> pair;
        pair[0] = static_cast<Element>((h == 0 ? v.x : v.z) * scale);
        pair[1] = static_cast<Element>((h == 0 ? v.y : v.w) * scale);
        *reinterpret_cast<cutlass::Array<Element, 2>*>(dq + b * dq_batch + pos * dq_seq + head * dq_head + col) = pair;
    }
}

}  // namespace moda
