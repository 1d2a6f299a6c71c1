// What a CTA of the backward's key-stationary kernel works on: its key blocks (CtaWork), and
// the keys of one block with the query positions that may read them (KeyBlock).
#pragma once

#include "moda_bwd_kernel_params.h"
#include "moda_documents.h"

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

__device__ inline Document document_of(BwdKernelParams const& p, int t) {
    return Document::at(p.doc_start, p.doc_end, p.seqlen, t);
}

// The query positions [lo, hi) that may read key position s: a sequence key is read by its
// document from s on (causal) or all of it; a depth row by the positions of its depth chunk
// (from s on when causal), within its document.
template <bool kCausal>
__device__ inline void readers_of(BwdKernelParams const& p, bool is_seq, int s, int& lo, int& hi) {
    const Document doc = document_of(p, s);
    if (is_seq) {
        lo = kCausal ? s : doc.start;
        hi = doc.end;
    } else {
        const int chunk = doc.chunk_start(s, p.depth_chunk);
        lo = kCausal ? s : chunk;
        hi = min(chunk + p.depth_chunk, doc.end);
    }
}

// The 128 keys of one key block: key r is sequence key n * 128 + r, or depth row (s0 + r / Lb,
// l0 + r % Lb); the query positions [t_first, t_last] that may read any of them, and, for a
// sequence block, [full_lo, full_hi) that read every one of its keys (empty if none can: a
// block across a document boundary, or a depth box).
struct KeyBlock {
    bool is_seq;
    int n, s0, l0;
    int t_first, t_last;
    int full_lo, full_hi;

    template <bool kCausal>
    __device__ static KeyBlock make(BwdKernelParams const& p, int j) {
        KeyBlock kb{};
        const int T = p.seqlen;
        kb.is_seq = j < p.n_seq_blocks;
        int s_first, s_last;
        if (kb.is_seq) {
            kb.n = j;
            s_first = j * 128;
            s_last = min(s_first + 127, T - 1);
        } else {
            const int d = j - p.n_seq_blocks;
            kb.s0 = d / p.depth_slot_blocks * p.depth_box_positions;
            kb.l0 = d % p.depth_slot_blocks * p.depth_box_slots;
            s_first = kb.s0;
            s_last = min(kb.s0 + p.depth_box_positions, T) - 1;
        }
        // Readers of s move monotonically with s, so the block's are the first key's `lo` to
        // the last key's `hi`.
        int lo, hi, last_lo, last_hi;
        readers_of<kCausal>(p, kb.is_seq, s_first, lo, hi);
        readers_of<kCausal>(p, kb.is_seq, s_last, last_lo, last_hi);
        kb.t_first = lo;
        kb.t_last = last_hi - 1;
        // Every key of a full sequence block of one document is read by [last key's lo, its end).
        const bool one_document = kb.is_seq && s_last == s_first + 127 && last_hi == hi;
        kb.full_lo = one_document ? last_lo : 0;
        kb.full_hi = one_document ? hi : 0;
        return kb;
    }
};

}  // namespace moda
