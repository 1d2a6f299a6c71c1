// What a CTA of the backward's key-stationary kernel works on: its key blocks (CtaWork), and
// the keys of one block with the query positions that may read them (KeyBlock).
#pragma once

#include "moda_bwd_kernel_params.h"

namespace moda {

// What one CTA works on: key blocks [j_begin, j_end) of one (batch, kv head); j <
// n_seq_blocks is sequence block j, else depth box j - n_seq_blocks. Sequence blocks come
// first, one per CTA, block-major over all heads and batches: causal block 0 reads every
// query row, the last one only the diagonal, so the longest CTAs start first. Then runs of
// depth_boxes_per_cta depth boxes: a box is one short step, so a CTA walks several, loading
// the next box's keys while it works on the current one.
struct CtaWork {
    int hk, batch, j_begin, j_end;
    __device__ static CtaWork of(BwdKernelParams const& p, int i) {
        const int heads = p.kv_heads * p.batch;
        const int seq_ctas = p.n_seq_blocks * heads;
        if (i < seq_ctas) {
            const int head = i % heads, j = i / heads;
            return {head % p.kv_heads, head / p.kv_heads, j, j + 1};
        }
        i -= seq_ctas;
        const int head = i / p.depth_ctas_per_head;
        const int box = i % p.depth_ctas_per_head * p.depth_boxes_per_cta;
        const int j = p.n_seq_blocks + box;
        return {head % p.kv_heads, head / p.kv_heads, j, j + min(p.depth_boxes_per_cta, p.n_depth_boxes - box)};
    }
};

// The 128 keys of one key block: key r is sequence key n * 128 + r, or depth row (s0 + r / Lb,
// l0 + r % Lb); and the query positions [t_first, t_last] that may read any of them.
struct KeyBlock {
    bool is_seq;
    int n, s0, l0;
    int t_first, t_last;

    template <bool kCausal>
    __device__ static KeyBlock make(BwdKernelParams const& p, int j) {
        KeyBlock kb{};
        const int T = p.seqlen;
        kb.is_seq = j < p.n_seq_blocks;
        if (kb.is_seq) {
            kb.n = j;
            kb.t_first = kCausal ? j * 128 : 0;
            kb.t_last = T - 1;
        } else {
            const int d = j - p.n_seq_blocks;
            kb.s0 = d / p.depth_slot_blocks * p.depth_box_positions;
            kb.l0 = d % p.depth_slot_blocks * p.depth_box_slots;
            const int C = p.depth_chunk;
            const int s_last = min(kb.s0 + p.depth_box_positions, T) - 1;
            // t reads s iff first(t) <= s <= last(t): t in [s (causal) or s's chunk start, s's chunk end].
            kb.t_first = kCausal ? kb.s0 : kb.s0 / C * C;
            kb.t_last = min((s_last / C + 1) * C, T) - 1;
        }
        return kb;
    }
};

}  // namespace moda
