// Which keys of a tile the query rows of a query-stationary CTA see (the forward's and the
// backward dQ kernel's masks).
#pragma once

#include <cutlass/cutlass.h>

#include "moda_fwd_kernel_params.h"
#include "moda_fwd_tile_scheduler.h"
#include "moda_sm90_common.h"

namespace moda {

// Which columns of a key tile one thread's two query rows (positions t[0], t[1]) see. In both
// kinds of tile a row sees one contiguous range of columns [lo, hi): sequence tiles from its
// document's start (0 without packed documents) up to the causal diagonal or its document's
// end; depth boxes (position-major: column c is position
// s0 + c / Lb, slot l0 + c % Lb) the positions of the row's depth window. Masking is then two
// compares per score against per-row bounds, plus the slot test in a box whose last slots lie
// past L: no divisions and no branches per element.
template <bool kCausal, int kBlockN>
struct RowVisibility {
    int t[2];
    Document doc[2];
    DepthWindow window[2];

    __device__ RowVisibility(FwdKernelParams const& p, int const (&t_row)[2]) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
            t[h] = t_row[h];
            doc[h] = document_of(p, t_row[h]);
            window[h] = DepthWindow::of<kCausal>(t_row[h], p.depth_chunk, doc[h]);
        }
    }

    __device__ void columns(FwdKernelParams const& p, TileAt const& tile, int (&lo)[2], int (&hi)[2]) const {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
            if (tile.is_seq) {
                const int end = kCausal ? min(t[h] + 1, doc[h].end) : doc[h].end;
                lo[h] = doc[h].start - tile.n * kBlockN;
                hi[h] = end - tile.n * kBlockN;
            } else {
                lo[h] = (window[h].first - tile.s0) * p.depth_box_slots;
                hi[h] = (window[h].last + 1 - tile.s0) * p.depth_box_slots;
            }
        }
    }

    // Scores of the columns these rows do not see -> -inf (an accumulator fragment, see frag_col).
    template <class Frag>
    __device__ void mask(FwdKernelParams const& p, TileAt const& tile, Frag& scores, int lane) const {
        int lo[2], hi[2];
        columns(p, tile, lo, hi);
        // Slot test, a no-op for sequence tiles: column c holds slot c & slot_mask.
        const int slot_mask = tile.is_seq ? kBlockN - 1 : p.depth_box_slots - 1;
        const int slot_end = tile.is_seq ? kBlockN : min(p.depth - tile.l0, p.depth_box_slots);
        if (slot_end > slot_mask) {
            // Every slot of the box exists (and sequence tiles have none): only the window.
            // Column c = frag_col(e, 0) + frag_col(0, lane); the first term is a constant, so
            // shifting the bounds by the second leaves two compares with immediates per score.
            const int lane_col = frag_col(0, lane);
            const int first[2] = {lo[0] - lane_col, lo[1] - lane_col};
            const int end[2] = {hi[0] - lane_col, hi[1] - lane_col};
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < size(scores); ++e) {
                const int c = frag_col(e, 0);
                const int h = frag_row_half(e);
                if (c < first[h] || c >= end[h]) scores(e) = -INFINITY;
            }
            return;
        }
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(scores); ++e) {
            const int c = frag_col(e, lane);
            const int h = frag_row_half(e);
            if (c < lo[h] || c >= hi[h] || (c & slot_mask) >= slot_end) scores(e) = -INFINITY;
        }
    }
};

}  // namespace moda
