"""Index helpers shared by the MoDA Triton kernels.

Every kernel works on one (batch, kv head) pair at a time and folds the G query heads of
that kv head into the row axis: folded row ``R = t * G + g`` is query head ``hk * G + g`` at
position ``t``. One K/V (or depth) tile is then loaded once for all G heads, and the depth
rows a query tile needs are those of the few consecutive positions its rows cover.
"""

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
