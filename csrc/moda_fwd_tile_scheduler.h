// What a query-stationary CTA (the forward's, the backward dQ kernel's) works on: its block
// of G-folded query rows, and the list of key tiles it walks. Producer and consumers derive
// both identically from the block index, so no schedule is passed between them.
#pragma once

#include "moda_fwd_kernel_params.h"

namespace moda {

// The depth rows a query at position t may read are those written at positions
// [first, last]: its own position (depth_chunk = 1), or the positions of its chunk, up to t
// when causal. The window is contiguous and moves monotonically with t, so the union over a
// range of query positions is the window from the first one's `first` to the last one's `last`.
struct DepthWindow {
    int first, last;
    template <bool kCausal>
    __device__ static DepthWindow of(int t, int chunk, int seqlen) {
        const int first = t / chunk * chunk;
        return {first, kCausal ? t : min(first + chunk, seqlen) - 1};
    }
};

// The kBlockM G-folded query rows of a CTA: blocks are taken heaviest first (the last rows
// see the most causal keys); rows [row0, row0 + kBlockM) are the positions [t_lo, t_hi] with
// all their G heads.
template <int kBlockM>
struct QueryBlock {
    int row0, t_lo, t_hi;
    __device__ explicit QueryBlock(FwdKernelParams const& p)
        : row0((p.num_m_blocks - 1 - int(blockIdx.x)) * kBlockM),
          t_lo(row0 / p.group),
          t_hi(min((row0 + kBlockM - 1) / p.group, p.seqlen - 1)) {}
};

// The list of key tiles one CTA walks:
//   1. sequence tiles, last (causal diagonal, masked) first, then the fully visible ones;
//   2. depth tiles: the contiguous block of depth rows its own positions (and their depth
//      chunks) wrote, as [Tb positions x Lb slots] boxes of the depth tensor (Lb = L rounded
//      up to a power of two, capped at kBlockN; Tb = kBlockN / Lb), so that a box holds only
//      rows this CTA can see.
struct TileSchedule {
    int n_seq;         // sequence tiles, walked from n_seq - 1 down to 0
    int first_masked;  // sequence tiles >= this one need the causal / ragged-end mask
    int n_depth;       // depth tiles after them
    int s_lo, s_hi;    // depth rows of positions [s_lo, s_hi) may be visible

    template <bool kCausal, int kBlockN>
    __device__ static TileSchedule make(FwdKernelParams const& p, int t_lo, int t_hi) {
        TileSchedule s{};
        if (p.has_seq) {
            int seq_end = kCausal ? t_hi + 1 : p.seqlen;
            s.n_seq = (seq_end + kBlockN - 1) / kBlockN;
            s.first_masked = kCausal ? (t_lo + 1) / kBlockN : p.seqlen / kBlockN;
        }
        if (p.depth > 0) {
            int C = p.depth_chunk;
            s.s_lo = t_lo / C * C;
            s.s_hi = kCausal ? t_hi + 1 : min((t_hi / C + 1) * C, p.seqlen);
            int position_blocks = (s.s_hi - s.s_lo + p.depth_box_positions - 1) / p.depth_box_positions;
            s.n_depth = position_blocks * p.depth_slot_blocks;
        }
        return s;
    }
    __device__ int size() const { return n_seq + n_depth; }
};

// Tile i of a schedule: sequence tile n (walked last to first), or depth tile d with the
// first position s0 and first slot l0 of its box. Depth boxes are position-major, so the
// boxes that one consumer warpgroup's rows see are consecutive.
struct TileAt {
    bool is_seq;
    int n;
    int s0 = 0, l0 = 0;
    __device__ TileAt(FwdKernelParams const& p, TileSchedule const& sched, int i)
        : is_seq(i < sched.n_seq), n(sched.n_seq - 1 - i) {
        if (!is_seq) {
            const int d = i - sched.n_seq;
            // One slot block (L <= kBlockN) is the common case: no 32-bit division then,
            // which every consumer warp would otherwise run once per depth tile.
            const int blocks = p.depth_slot_blocks;
            const int position_block = blocks == 1 ? d : d / blocks;
            s0 = sched.s_lo + position_block * p.depth_box_positions;
            l0 = (d - position_block * blocks) * p.depth_box_slots;
        }
    }
};

}  // namespace moda
