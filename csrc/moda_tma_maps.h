// The TMA views of the MoDA tensors that the Hopper kernels load tiles from (host side).
// Each view puts the 64-element head-dim slice innermost and picks the outer dimensions so
// that one box is one shared-memory tile of consecutive rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "moda_params.h"
#include "tma_desc.h"

namespace moda {

inline int next_power_of_two(int x) {
    int p = 1;
    while (p < x) p *= 2;
    return p;
}

// Depth boxes hold Lb slots (L rounded up to a power of two, at most `rows`) of rows / Lb positions.
inline int depth_box_slots(int L, int rows) { return L > 0 ? std::min(next_power_of_two(L), rows) : 1; }

// q-like [B, T, Hq, D] (strides in elements) as [D, G, Hk, T, B]: a box of G heads x rows / G
// positions is `rows` consecutive G-folded rows t * G + g of one kv head.
inline std::string make_folded_rows_map(CUtensorMap* map, bool bf16, const void* base, int D, int G, int Hk, int T,
                                        int B, int64_t batch_stride, int64_t seq_stride, int64_t head_stride,
                                        int rows) {
    constexpr uint64_t kElem = 2;
    return make_tensor_map<5>(map, bf16, base, {uint64_t(D), uint64_t(G), uint64_t(Hk), uint64_t(T), uint64_t(B)},
                              {head_stride * kElem, head_stride * G * kElem, seq_stride * kElem, batch_stride * kElem},
                              {64, uint32_t(G), 1, uint32_t(rows / G), 1});
}

// k-like [B, T, Hk, D] as [D, Hk, T, B, 1]: a box is `rows` consecutive positions of one head.
inline std::string make_seq_rows_map(CUtensorMap* map, bool bf16, const void* base, int D, int Hk, int T, int B,
                                      int64_t batch_stride, int64_t seq_stride, int64_t head_stride, int rows) {
    constexpr uint64_t kElem = 2;
    return make_tensor_map<5>(map, bf16, base, {uint64_t(D), uint64_t(Hk), uint64_t(T), uint64_t(B), 1},
                              {head_stride * kElem, seq_stride * kElem, batch_stride * kElem,
                               batch_stride * B * kElem},
                              {64, 1, uint32_t(rows), 1, 1});
}

// depth [B, T, L, Hk, D] as [D, Hk, L, T, B]: a box is Lb slots of rows / Lb positions, row
// (s - s0) * Lb + (l - l0), with Lb = `slots` or, when that is 0, depth_box_slots(L, rows);
// strided views (a slice of a larger depth buffer) need no copy.
// L2 fetches 128 bytes per row, not 256: at D = 64 a row is 128 bytes, and the other half of
// a 256-byte fetch (the next kv head's row) is read by another CTA long after (ncu, forward at
// T = 4096 with 0.54 GB of depth rows: 0.88 GB moved through DRAM with 256, about 0.62 GB
// with 128; the forward took 0.492 against 0.503 ms).
inline std::string make_depth_box_map(CUtensorMap* map, bool bf16, const void* base, int D, int Hk, int L, int T,
                                      int B, int64_t batch_stride, int64_t seq_stride, int64_t slot_stride,
                                      int64_t head_stride, int rows, int slots = 0) {
    constexpr uint64_t kElem = 2;
    const int Lb = slots > 0 ? slots : depth_box_slots(L, rows);
    return make_tensor_map<5>(map, bf16, base, {uint64_t(D), uint64_t(Hk), uint64_t(L), uint64_t(T), uint64_t(B)},
                              {head_stride * kElem, slot_stride * kElem, seq_stride * kElem, batch_stride * kElem},
                              {64, 1, uint32_t(Lb), uint32_t(rows / Lb), 1}, CU_TENSOR_MAP_L2_PROMOTION_L2_128B);
}

// The key-side maps of a problem: sequence k, v (when present) with boxes of `rows`
// positions, and depth_k, depth_v (when L > 0) with depth boxes of `rows` rows.
inline std::string make_key_maps(const FwdParams& a, int rows, CUtensorMap* k, CUtensorMap* v, CUtensorMap* dk,
                                 CUtensorMap* dv) {
    const bool bf16 = a.dtype == DType::kBFloat16;
    const int D = a.head_dim, Hk = a.kv_heads, T = a.seqlen, B = a.batch, L = a.depth;
    std::string err;
    if (a.has_seq) {
        err = make_seq_rows_map(k, bf16, a.k, D, Hk, T, B, a.k_batch_stride, a.k_seq_stride, a.k_head_stride, rows);
        if (!err.empty()) return "k: " + err;
        err = make_seq_rows_map(v, bf16, a.v, D, Hk, T, B, a.v_batch_stride, a.v_seq_stride, a.v_head_stride, rows);
        if (!err.empty()) return "v: " + err;
    }
    if (L > 0) {
        err = make_depth_box_map(dk, bf16, a.depth_k, D, Hk, L, T, B, a.dk_batch_stride, a.dk_seq_stride,
                                 a.dk_slot_stride, a.dk_head_stride, rows);
        if (!err.empty()) return "depth_k: " + err;
        err = make_depth_box_map(dv, bf16, a.depth_v, D, Hk, L, T, B, a.dv_batch_stride, a.dv_seq_stride,
                                 a.dv_slot_stride, a.dv_head_stride, rows);
        if (!err.empty()) return "depth_v: " + err;
    }
    return {};
}

}  // namespace moda
