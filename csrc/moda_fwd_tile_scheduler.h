// What a query-stationary CTA (the forward's, the backward dQ kernel's) works on: its block
// of G-folded query rows, and the list of key tiles it walks. Producer and consumers derive
// both identically from the block index, so no schedule is passed between them.
#pragma once

#include "moda_documents.h"
#include "moda_fwd_kernel_params.h"

namespace moda {

__device__ inline Document document_of(FwdKernelParams const& p, int t) {
    return Document::at(p.doc_start, p.doc_end, p.seqlen, t);
}

// The depth rows a query at position t may read are those written at positions
// [first, last]: its own position (depth_chunk = 1), or the positions of its chunk (counted
// from its document's start), up to t when causal. The window is contiguous and moves
// monotonically with t (a later document's chunks lie after an earlier one's), so the union
// over a range of query positions is the window from the first one's `first` to the last
// one's `last`.
struct DepthWindow {
    int first, last;
    template <bool kCausal>
    __device__ static DepthWindow of(int t, int chunk, Document doc) {
        const int first = doc.chunk_start(t, chunk);
        return {first, kCausal ? t : min(first + chunk, doc.end) - 1};
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
//
// With packed documents the sequence tiles start at the tile of the first row's document, and
// the tiles that hold keys of an earlier document than the last row's are masked too.
struct TileSchedule {
    int seq_first;      // the first sequence tile
    int n_seq;          // sequence tiles, walked from seq_first + n_seq - 1 down to seq_first
    int first_masked;   // sequence tiles >= this one need the causal / ragged-end mask,
    int unmasked_from;  // and those below this one the mask of an earlier document
    int n_depth;        // depth tiles after them
    int s_lo, s_hi;     // depth rows of positions [s_lo, s_hi) may be visible

    template <bool kCausal, int kBlockN>
    __device__ static TileSchedule make(FwdKernelParams const& p, int t_lo, int t_hi) {
        TileSchedule s{};
        const Document first = document_of(p, t_lo), last = document_of(p, t_hi);
        if (p.has_seq) {
            int seq_end = kCausal ? t_hi + 1 : last.end;
            s.seq_first = first.start / kBlockN;
            s.n_seq = (seq_end + kBlockN - 1) / kBlockN - s.seq_first;
            // Every row sees the keys [last.start, t_lo] (causal) or [last.start, first.end).
            s.first_masked = (kCausal ? t_lo + 1 : first.end) / kBlockN;
            s.unmasked_from = (last.start + kBlockN - 1) / kBlockN;
        }
        if (p.depth > 0) {
            s.s_lo = DepthWindow::of<kCausal>(t_lo, p.depth_chunk, first).first;
            s.s_hi = DepthWindow::of<kCausal>(t_hi, p.depth_chunk, last).last + 1;
            int position_blocks = (s.s_hi - s.s_lo + p.depth_box_positions - 1) / p.depth_box_positions;
            s.n_depth = position_blocks * p.depth_slot_blocks;
        }
        return s;
    }
    __device__ int size() const { return n_seq + n_depth; }
    // Whether a sequence tile's scores need the mask (depth tiles always do).
    __device__ bool seq_tile_masked(int n) const { return n >= first_masked || n < unmasked_from; }
};

// Tile i of a schedule: sequence tile n (walked last to first), or depth tile d with the
// first position s0 and first slot l0 of its box. Depth boxes are position-major, so the
// boxes that one consumer warpgroup's rows see are consecutive.
struct TileAt {
    bool is_seq;
    int n;
    int s0 = 0, l0 = 0;
    __device__ TileAt(FwdKernelParams const& p, TileSchedule const& sched, int i)
        : is_seq(i < sched.n_seq), n(sched.seq_first + sched.n_seq - 1 - i) {
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
