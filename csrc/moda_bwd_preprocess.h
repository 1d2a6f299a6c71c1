// The backward's preprocess: delta = rowsum(dO * O) - grad_lse, and the row statistics in the
// layout the key-stationary kernel loads them in.
#pragma once

#include <cstdint>

#include <cutlass/array.h>
#include <cutlass/cutlass.h>

namespace moda {

// delta = rowsum(dO * O) - grad_lse per G-folded query row (b, hk, row = t G + g), rows
// padded to whole steps of kRows. Writes delta as [B, Hq, T] (for dQ) and both row
// statistics as [B, Hk, steps, 2, kRows]: lse * log2(e), then delta, so that the
// key-stationary kernel brings a step's statistics with one bulk copy. Padding rows get
// zeros: finite, and their probabilities are masked to zero. out and dout are [B, T, Hq, D]
// with the given strides (elements); lse, grad_lse and delta [B, Hq, T] contiguous.
// kLanesPerRow = D / 8 adjacent threads share a row, one 16-byte chunk each, so that a warp's
// loads cover whole rows (one thread per row made each load instruction touch 32 rows).
template <class Element, int D, int kRows>
__global__ void moda_bwd_preprocess_kernel(const Element* out, const Element* dout, const float* lse,
                                           const float* grad_lse, float* delta, float* row_stats, int B, int T,
                                           int Hk, int group_log2, int steps, int64_t o_batch, int64_t o_seq,
                                           int64_t o_head, int64_t do_batch, int64_t do_seq, int64_t do_head) {
    constexpr int kLanesPerRow = D / 8;
    static_assert(kLanesPerRow <= 32 && 32 % kLanesPerRow == 0, "a row's lanes lie in one warp");
    const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t i = thread / kLanesPerRow;  // ((b Hk + hk) steps + step) kRows + c
    const int chunk = int(thread % kLanesPerRow);
    // Whole rows per warp and a grid of whole warps: every lane of a row takes the shuffles.
    const bool in_range = i < int64_t(B) * Hk * steps * kRows;
    const int64_t block = i / kRows;  // (b Hk + hk) steps + step
    const int row = int(block % steps) * kRows + int(i % kRows);
    const int bh = int(block / steps), b = bh / Hk;
    const int G = 1 << group_log2, t = row >> group_log2, h = bh % Hk * G + (row & (G - 1));
    const bool real = in_range && t < T;
    float acc = 0.f;
    if (real) {
        using Chunk = cutlass::Array<Element, 8>;
        const Chunk ov = *reinterpret_cast<const Chunk*>(out + b * o_batch + t * o_seq + h * o_head + chunk * 8);
        const Chunk gv = *reinterpret_cast<const Chunk*>(dout + b * do_batch + t * do_seq + h * do_head + chunk * 8);
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < 8; ++e) acc += float(ov[e]) * float(gv[e]);
    }
    CUTLASS_PRAGMA_UNROLL
    for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffff, acc, offset);
    if (!in_range || chunk != 0) return;
    float lse2 = 0.f, d = 0.f;
    if (real) {
        const int64_t j = (int64_t(b) * Hk * G + h) * T + t;
        d = acc - (grad_lse != nullptr ? grad_lse[j] : 0.f);
        delta[j] = d;
        lse2 = lse[j] * 1.4426950408889634f;
    }
    float* stats = row_stats + block * 2 * kRows;
    stats[i % kRows] = lse2;
    stats[kRows + i % kRows] = d;
}

}  // namespace moda
