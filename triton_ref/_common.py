"""Helpers shared by the MoDA Triton kernels: index arithmetic, the online-softmax step, dot precision.

Every kernel works on one (batch, kv head) pair at a time and folds the G query heads of
that kv head into the row axis: folded row ``R = t * G + g`` is query head ``hk * G + g`` at
position ``t``. One K/V (or depth) tile is then loaded once for all G heads, and the depth
rows a query tile needs are those of the few consecutive positions its rows cover.

Packed documents (``VARLEN``, batch 1): every position ``t`` carries its document's bounds
``[a_t, e_t)`` (``DOC_START`` / ``DOC_END``). A query sees only keys of its own document and
depth chunks restart at ``a_t``. Tiles are those of one long sequence; a tile that straddles
a document boundary is masked like the causal diagonal, so the dense kernels' loops serve
packed documents unchanged.
"""

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
MASKED = tl.constexpr(-1.0e30)  # finite: a fully masked block can never make exp2 see inf - inf


@triton.jit
def row_tile_ptrs(base, rows, t_row, g_row, hk, stride_t, stride_h, offs_d, G: tl.constexpr):
    """Pointers to [rows, D] of a [B, T, Hq, D] tensor (batch already applied to base)."""
    heads = hk * G + g_row
    return base + t_row[:, None] * stride_t + heads[:, None] * stride_h + offs_d[None, :]


@triton.jit
def row_stat_offsets(b, hk, t_row, g_row, T, HK, G: tl.constexpr):
    """Offsets of folded rows into a contiguous [B, Hq, T] statistics tensor (lse, delta)."""
    return (b * HK * G + hk * G + g_row).to(tl.int64) * T + t_row


@triton.jit
def key_positions(offs_j, L, IS_DEPTH: tl.constexpr):
    """Key index -> (position s, depth slot l). Depth keys are flattened as j = s * L + l."""
    if IS_DEPTH:
        s = offs_j // L
        slot = offs_j - s * L
    else:
        s = offs_j
        slot = offs_j * 0
    return s, slot


@triton.jit
def key_tile_offsets(s, slot, offs_d, stride_t, stride_l, TRANSPOSED: tl.constexpr):
    """Element offsets of a key/value tile: [N, D], or [D, N] when TRANSPOSED."""
    if TRANSPOSED:
        return s[None, :] * stride_t + slot[None, :] * stride_l + offs_d[:, None]
    else:
        return s[:, None] * stride_t + slot[:, None] * stride_l + offs_d[None, :]


@triton.jit
def visible(t, s, T, CHUNK, IS_DEPTH: tl.constexpr, CAUSAL: tl.constexpr, CHUNKED: tl.constexpr):
    """May the query at position t see the key (sequence or depth) written at position s?

    t and s are broadcast against each other ([M, 1] x [1, N] or [1, M] x [N, 1]).
    """
    if IS_DEPTH:
        if CHUNKED:
            ok = (s // CHUNK == t // CHUNK) & (s < T)
            if CAUSAL:
                ok = ok & (s <= t)
        else:
            ok = s == t
    else:
        ok = s < T
        if CAUSAL:
            ok = ok & (s <= t)
    return ok


@triton.jit
def depth_span(t_lo, t_hi, T, CHUNK, CAUSAL: tl.constexpr):
    """Positions [s_lo, s_hi) whose depth rows queries at positions t_lo..t_hi may read."""
    s_lo = t_lo // CHUNK * CHUNK
    if CAUSAL:
        s_hi = t_hi + 1
    else:
        s_hi = tl.minimum((t_hi // CHUNK + 1) * CHUNK, T)
    return s_lo, s_hi


@triton.jit
def reader_span(s_lo, s_hi, T, CHUNK, CAUSAL: tl.constexpr):
    """Positions [t_lo, t_hi) whose queries may read depth rows written at s_lo..s_hi-1."""
    if CAUSAL:
        t_lo = s_lo
    else:
        t_lo = s_lo // CHUNK * CHUNK
    t_hi = tl.minimum(((s_hi - 1) // CHUNK + 1) * CHUNK, T)
    return t_lo, t_hi


@triton.jit
def visible_in_document(t, s, a, e, CHUNK, IS_DEPTH: tl.constexpr, CAUSAL: tl.constexpr, CHUNKED: tl.constexpr):
    """``visible`` for packed documents: the query at t lies in the document [a, e)."""
    if IS_DEPTH:
        if CHUNKED:
            chunk_lo = a + (t - a) // CHUNK * CHUNK
            ok = (s >= chunk_lo) & (s < chunk_lo + CHUNK) & (s < e)
            if CAUSAL:
                ok = ok & (s <= t)
        else:
            ok = s == t
    else:
        ok = (s >= a) & (s < e)
        if CAUSAL:
            ok = ok & (s <= t)
    return ok


@triton.jit
def document_bounds(DOC_START, DOC_END, t, mask):
    """[a_t, e_t) of the positions t (0, 0 where masked)."""
    return tl.load(DOC_START + t, mask=mask, other=0), tl.load(DOC_END + t, mask=mask, other=0)


@triton.jit
def query_key_ranges_in_documents(DOC_START, DOC_END, t_lo, t_hi, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sequence keys of queries at positions t_lo..t_hi (inclusive) of packed documents:
    [lo, hi) to visit, of which [full_lo, full_hi) every row sees (BLOCK_N-aligned from lo,
    so the three loops [lo, full_lo), [full_lo, full_hi), [full_hi, hi) tile it)."""
    a_lo = tl.load(DOC_START + t_lo)
    a_hi = tl.load(DOC_START + t_hi)
    if CAUSAL:
        hi = t_hi + 1
        all_see_below = t_lo + 1  # keys < this precede every row
    else:
        hi = tl.load(DOC_END + t_hi)
        all_see_below = tl.load(DOC_END + t_lo)
    # Keys >= a_hi are in every row's document, or after it.
    full_lo = tl.minimum(a_lo + tl.cdiv(a_hi - a_lo, BLOCK_N) * BLOCK_N, hi)
    full_hi = full_lo + tl.maximum(all_see_below - full_lo, 0) // BLOCK_N * BLOCK_N
    return a_lo, full_lo, full_hi, hi


@triton.jit
def depth_span_in_documents(DOC_START, DOC_END, t_lo, t_hi, CHUNK, CAUSAL: tl.constexpr):
    """``depth_span`` for packed documents: chunks start at each document's first position."""
    a_lo = tl.load(DOC_START + t_lo)
    s_lo = a_lo + (t_lo - a_lo) // CHUNK * CHUNK
    if CAUSAL:
        s_hi = t_hi + 1
    else:
        a_hi = tl.load(DOC_START + t_hi)
        s_hi = tl.minimum(a_hi + ((t_hi - a_hi) // CHUNK + 1) * CHUNK, tl.load(DOC_END + t_hi))
    return s_lo, s_hi


@triton.jit
def reader_span_in_documents(DOC_START, DOC_END, s_first, s_last, CHUNK, CAUSAL: tl.constexpr):
    """``reader_span`` for packed documents: queries [t_lo, t_hi) that may read depth rows
    written at positions s_first..s_last (inclusive)."""
    a_first = tl.load(DOC_START + s_first)
    a_last = tl.load(DOC_START + s_last)
    if CAUSAL:
        t_lo = s_first
    else:
        t_lo = a_first + (s_first - a_first) // CHUNK * CHUNK
    t_hi = tl.minimum(a_last + ((s_last - a_last) // CHUNK + 1) * CHUNK, tl.load(DOC_END + s_last))
    return t_lo, t_hi


@triton.jit
def key_reader_ranges_in_documents(DOC_START, DOC_END, s_first, s_last, CAUSAL: tl.constexpr):
    """Queries of packed documents that see sequence keys s_first..s_last (inclusive):
    [lo, hi), of which [full_lo, full_hi) see every key of the tile (only where the tile
    lies in one document)."""
    a_first = tl.load(DOC_START + s_first)
    e_first = tl.load(DOC_END + s_first)
    hi = tl.load(DOC_END + s_last)
    if CAUSAL:
        lo = s_first
        full_lo = s_last + 1
    else:
        lo = a_first
        full_lo = a_first
    one_document = a_first == tl.load(DOC_START + s_last)
    full_lo = tl.where(one_document, full_lo, hi)
    full_hi = tl.where(one_document, e_first, hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def softmax_step(acc, l_i, m_i, qk, v, PRECISION: tl.constexpr):
    """Fold one tile of base-2 logits qk [M, N] and its values v [N, D] into the state."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products; fp16/bf16 ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"
