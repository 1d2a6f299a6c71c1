"""MoDA forward: one online softmax over the sequence keys and the depth rows.

A program owns BLOCK_M G-folded query rows of one (batch, kv head): positions
t_lo..t_hi, all G heads. It walks

1. sequence key tiles that every row sees in full (no mask),
2. the causal diagonal (or the ragged end of T), masked,
3. the depth rows of positions [s_lo, s_hi): the contiguous block its own positions (and
   their depth chunks) wrote, masked so each row keeps only its own position/chunk,

all into the same running max / sum / accumulator, then writes out and lse (natural log).
With packed documents (VARLEN) the sequence keys start at the first row's document and the
tiles every row sees in full lie between the masked ones at both ends (_common).
"""

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import (
    LOG2E,
    MASKED,
    depth_span,
    depth_span_in_documents,
    document_bounds,
    dot_precision,
    key_positions,
    key_tile_offsets,
    query_key_ranges_in_documents,
    row_stat_offsets,
    row_tile_ptrs,
    softmax_step,
    visible,
    visible_in_document,
)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, t_row, a_row, e_row, Kb, Vb, stride_kt, stride_kl, stride_vt, stride_vl, offs_d,
               d_ok, lo, hi, T, L, CHUNK, qk_scale, IS_DEPTH: tl.constexpr, CAUSAL: tl.constexpr,
               CHUNKED: tl.constexpr, MASK: tl.constexpr, VARLEN: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr):
    """Keys [lo, hi) (sequence positions, or flattened depth rows) into the softmax state."""
    for start in range(lo, hi, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        s, slot = key_positions(offs_j, L, IS_DEPTH)
        if MASK:
            ld = (offs_j[None, :] < hi) & d_ok[:, None]
        else:
            ld = d_ok[:, None]
        kt = tl.load(Kb + key_tile_offsets(s, slot, offs_d, stride_kt, stride_kl, True), mask=ld, other=0.0)
        v = tl.load(Vb + key_tile_offsets(s, slot, offs_d, stride_vt, stride_vl, False), mask=tl.trans(ld),
                    other=0.0)
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASK:
            if VARLEN:
                ok = visible_in_document(t_row[:, None], s[None, :], a_row[:, None], e_row[:, None], CHUNK,
                                         IS_DEPTH, CAUSAL, CHUNKED)
            else:
                ok = visible(t_row[:, None], s[None, :], T, CHUNK, IS_DEPTH, CAUSAL, CHUNKED)
            qk = tl.where(ok, qk, MASKED)
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, qk, v, PRECISION)
    return acc, l_i, m_i


@triton.autotune(configs=_configs.FWD_CONFIGS, key=_configs.SHAPE_KEY,
                 prune_configs_by={"early_config_prune": _configs.pruner("M")})
@triton.jit
def _moda_fwd_kernel(
    Q, K, V, DK, DV, O, LSE, DOC_START, DOC_END,
    sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dkb, stride_dkt, stride_dkl, stride_dkh,
    stride_dvb, stride_dvt, stride_dvl, stride_dvh,
    stride_ob, stride_ot, stride_oh,
    T, HK, L, CHUNK,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DEPTH: tl.constexpr, CAUSAL: tl.constexpr, CHUNKED: tl.constexpr,
    VARLEN: tl.constexpr, T_CLASS: tl.constexpr, L_CLASS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Heaviest causal tiles (largest t) first, so the tail of the grid is short work.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    qk_scale = sm_scale * LOG2E

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T * G
    t_row = rows // G
    g_row = rows % G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    t_lo = pid_m * BLOCK_M // G
    t_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, T - 1)  # inclusive

    q_ptrs = row_tile_ptrs(Q + b.to(tl.int64) * stride_qb, rows, t_row, g_row, hk, stride_qt, stride_qh, offs_d, G)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if VARLEN:
        a_row, e_row = document_bounds(DOC_START, DOC_END, t_row, row_ok)
    else:
        a_row, e_row = t_row, t_row  # unused
    if HAS_SEQ:
        Kb = K + b.to(tl.int64) * stride_kb + hk * stride_kh
        Vb = V + b.to(tl.int64) * stride_vb + hk * stride_vh
        if VARLEN:
            seq_lo, full_lo, full_hi, seq_hi = query_key_ranges_in_documents(DOC_START, DOC_END, t_lo, t_hi, CAUSAL,
                                                                             BLOCK_N)
        elif CAUSAL:
            seq_lo, full_lo = 0, 0
            full_hi = (t_lo + 1) // BLOCK_N * BLOCK_N  # keys < full_hi precede every row of the tile
            seq_hi = t_hi + 1
        else:
            seq_lo, full_lo = 0, 0
            full_hi = T // BLOCK_N * BLOCK_N
            seq_hi = T
        if VARLEN:  # keys before the last row's document: masked
            acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, t_row, a_row, e_row, Kb, Vb, stride_kt, 0, stride_vt, 0,
                                       offs_d, d_ok, seq_lo, full_lo, T, 1, CHUNK, qk_scale, False, CAUSAL, CHUNKED,
                                       True, VARLEN, BLOCK_N, PRECISION)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, t_row, a_row, e_row, Kb, Vb, stride_kt, 0, stride_vt, 0,
                                   offs_d, d_ok, full_lo, full_hi, T, 1, CHUNK, qk_scale, False, CAUSAL, CHUNKED,
                                   False, VARLEN, BLOCK_N, PRECISION)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, t_row, a_row, e_row, Kb, Vb, stride_kt, 0, stride_vt, 0,
                                   offs_d, d_ok, full_hi, seq_hi, T, 1, CHUNK, qk_scale, False, CAUSAL, CHUNKED,
                                   True, VARLEN, BLOCK_N, PRECISION)
    if HAS_DEPTH:
        if VARLEN:
            s_lo, s_hi = depth_span_in_documents(DOC_START, DOC_END, t_lo, t_hi, CHUNK, CAUSAL)
        else:
            s_lo, s_hi = depth_span(t_lo, t_hi, T, CHUNK, CAUSAL)
        DKb = DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh
        DVb = DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, t_row, a_row, e_row, DKb, DVb, stride_dkt, stride_dkl,
                                   stride_dvt, stride_dvl, offs_d, d_ok, s_lo * L, s_hi * L, T, L, CHUNK, qk_scale,
                                   True, CAUSAL, CHUNKED, True, VARLEN, BLOCK_N, PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = row_tile_ptrs(O + b.to(tl.int64) * stride_ob, rows, t_row, g_row, hk, stride_ot, stride_oh, offs_d, G)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.math.log2(l_i)) / LOG2E
    tl.store(LSE + row_stat_offsets(b, hk, t_row, g_row, T, HK, G), lse, mask=row_ok)


def moda_fwd(q, k, v, depth_k, depth_v, sm_scale: float, causal: bool, depth_chunk: int, documents=None):
    """Launch the forward. Shapes are validated by the caller; last dims must be contiguous.

    ``documents``: packed documents (``moda_cuda._spec.PackedDocuments``, batch 1) or None.
    Returns (out [B, T, Hq, D] in q's dtype, lse [B, Hq, T] float32).
    """
    B, T, Hq, D = q.shape
    depth_chunk = min(depth_chunk, T)  # every C >= T is one chunk; the kernels add C in 32 bits
    has_seq = k is not None
    L = depth_k.shape[2] if depth_k is not None else 0
    has_depth = L > 0
    Hk = k.shape[2] if has_seq else depth_k.shape[3]
    G = Hq // Hk
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
    # Absent operands are never read (HAS_SEQ / HAS_DEPTH are compile-time): pass q as a stand-in.
    k_, v_ = (k, v) if has_seq else (q, q)
    dk_, dv_ = (depth_k, depth_v) if has_depth else (q.unsqueeze(2), q.unsqueeze(2))

    def grid(meta):
        return (triton.cdiv(T * G, meta["BLOCK_M"]), B * Hk)

    doc_start, doc_end = documents.bounds() if documents is not None else (lse, lse)
    _moda_fwd_kernel[grid](
        q, k_, v_, dk_, dv_, out, lse, doc_start, doc_end,
        sm_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k_.stride(0), k_.stride(1), k_.stride(2),
        v_.stride(0), v_.stride(1), v_.stride(2),
        dk_.stride(0), dk_.stride(1), dk_.stride(2), dk_.stride(3),
        dv_.stride(0), dv_.stride(1), dv_.stride(2), dv_.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        T, Hk, L, depth_chunk,
        G=G, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_SEQ=has_seq, HAS_DEPTH=has_depth, CAUSAL=causal, CHUNKED=depth_chunk > 1,
        VARLEN=documents is not None, T_CLASS=_configs.seqlen_class(T), L_CLASS=_configs.depth_class(L), PRECISION=dot_precision(q.dtype),
    )
    return out, lse
