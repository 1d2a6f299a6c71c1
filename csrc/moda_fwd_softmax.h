// The forward's online softmax in base 2, over the scores of one consumer thread's two query
// rows (wgmma accumulator fragments: see frag_row_half / frag_col). The running max and sum
// are the kernel's own registers, passed by reference: held in a struct instead, the same
// arithmetic came out of ptxas scheduled differently.
#pragma once

#include <cutlass/cutlass.h>

#include "moda_sm90_common.h"

namespace moda {

// A row's scores are spread over the four threads of a quad (lane % 4): reduce over them.
template <class T>
__device__ __forceinline__ T quad_allreduce_max(T x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

template <class T>
__device__ __forceinline__ T quad_allreduce_sum(T x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// One tile's scores: updates the running max and sum (row_sum holds this thread's partial
// sums, reduced over the quad in softmax_finalize), turns the scores into probabilities
// (fp32, in place) and returns in alpha the factor by which the output accumulated so far
// must be rescaled. scale_log2 = softmax scale * log2(e).
template <class Frag>
__device__ __forceinline__ void softmax_step(Frag& scores, float (&row_max)[2], float (&row_sum)[2], float scale_log2,
                                             float (&alpha)[2]) {
    float tile_max[2] = {row_max[0], row_max[1]};
    CUTLASS_PRAGMA_UNROLL
    for (int e = 0; e < size(scores); ++e) {
        tile_max[frag_row_half(e)] = fmaxf(tile_max[frag_row_half(e)], scores(e));
    }
    float offset[2];
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        tile_max[h] = quad_allreduce_max(tile_max[h]);
        // A row that has seen only masked scores keeps max -inf: exponentiate against 0
        // instead, so that exp2(-inf - -inf) never makes a NaN.
        offset[h] = tile_max[h] == -INFINITY ? 0.f : tile_max[h] * scale_log2;
        alpha[h] = exp2f(row_max[h] * scale_log2 - offset[h]);
        row_max[h] = tile_max[h];
        row_sum[h] *= alpha[h];
    }
    CUTLASS_PRAGMA_UNROLL
    for (int e = 0; e < size(scores); ++e) {
        const int h = frag_row_half(e);
        scores(e) = exp2f(scores(e) * scale_log2 - offset[h]);
        row_sum[h] += scores(e);
    }
}

// After the last tile: the factor that normalizes each row's output, and the row's
// natural-log logsumexp of the scaled scores (0 and -inf for a row that saw nothing).
__device__ __forceinline__ void softmax_finalize(float const (&row_max)[2], float const (&row_sum)[2], float scale_log2,
                                                 float (&inv_sum)[2], float (&lse)[2]) {
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
        const float l = quad_allreduce_sum(row_sum[h]);
        inv_sum[h] = l > 0.f ? 1.f / l : 0.f;
        lse[h] = l > 0.f ? (row_max[h] * scale_log2 + log2f(l)) * 0.6931471805599453f : -INFINITY;
    }
}

// Rescale the output accumulated so far by alpha, and convert the probabilities to the
// element type of the P V product's register operand.
template <class FragO, class FragP, class FragS>
__device__ __forceinline__ void rescale_and_convert(FragO& out, FragP& probs, FragS const& scores,
                                                    float const (&alpha)[2]) {
    using Element = typename FragP::value_type;
    CUTLASS_PRAGMA_UNROLL
    for (int e = 0; e < size(out); ++e) out(e) *= alpha[frag_row_half(e)];
    CUTLASS_PRAGMA_UNROLL
    for (int e = 0; e < size(scores); ++e) probs(e) = static_cast<Element>(scores(e));
}

}  // namespace moda
