"""MoDA backward: flash-attention style, deterministic, no [T, T] or [T, T*L] buffers.

After a row-statistics preprocess (delta = rowsum(dO * O)) come three launches:

* ``_bwd_kv_kernel`` over sequence key tiles: dK, dV of BLOCK_N keys of one kv head,
  streaming the G-folded query rows that see them. All G heads of the kv head are rows of
  one stream, so GQA needs neither per-head copies nor atomics.
* the same kernel over depth-row tiles (``IS_DEPTH``): a tile of flattened depth rows
  ``j = s * L + l`` streams only the query rows of the positions (chunks) that read it,
  so each depth row's gradient is summed by exactly one program.
* ``_bwd_q_kernel`` over query row tiles: dQ from the sequence and depth keys, recomputing
  P like the forward.

Every gradient element is written once, by one program, after a fixed-order reduction:
the results are bitwise reproducible run to run (deterministic by construction).

Packed documents (VARLEN) take the same loops over document-clipped ranges (_common): a key
tile streams the rows of its documents only, masked where the tile straddles a boundary.
"""

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import (
    LOG2E,
    depth_span,
    depth_span_in_documents,
    document_bounds,
    dot_precision,
    key_positions,
    key_reader_ranges_in_documents,
    key_tile_offsets,
    query_key_ranges_in_documents,
    reader_span,
    reader_span_in_documents,
    row_stat_offsets,
    row_tile_ptrs,
    visible,
    visible_in_document,
)


@triton.jit
def _bwd_preprocess_kernel(O, DO, GLSE, DELTA, stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh,
                           T, HQ, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                           HAS_GLSE: tl.constexpr):
    """delta[b, h, t] = sum_d dO * O - dlse, in float32 (d lse / d logits is P, so a gradient
    reaching lse folds into delta)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    offs_d = tl.arange(0, BLOCK_D)
    m = (offs_t[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :],
                mask=m, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h * stride_dh + offs_t[:, None] * stride_dt + offs_d[None, :],
                 mask=m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_GLSE:
        delta -= tl.load(GLSE + bh.to(tl.int64) * T + offs_t, mask=offs_t < T, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_t, delta, mask=offs_t < T)


@triton.jit
def _kv_rows(dk, dv, k, v, Qb, DOb, LSE, DELTA, DOC_START, DOC_END, b, hk, s_key, r_lo, r_hi, T, HK,
             stride_qt, stride_qh, stride_dot, stride_doh, offs_d, d_ok, qk_scale, CHUNK,
             G: tl.constexpr, IS_DEPTH: tl.constexpr, CAUSAL: tl.constexpr, CHUNKED: tl.constexpr,
             MASK: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV ([N, D]) of one key tile over the folded query rows [r_lo, r_hi)."""
    for start in range(r_lo, r_hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < r_hi
        t_row = rows // G
        g_row = rows % G
        ld = row_ok[:, None] & d_ok[None, :]
        q = tl.load(row_tile_ptrs(Qb, rows, t_row, g_row, hk, stride_qt, stride_qh, offs_d, G), mask=ld, other=0.0)
        do = tl.load(row_tile_ptrs(DOb, rows, t_row, g_row, hk, stride_dot, stride_doh, offs_d, G), mask=ld,
                     other=0.0)
        stat = row_stat_offsets(b, hk, t_row, g_row, T, HK, G)
        # lse = +inf on rows past r_hi makes their probabilities exactly 0.
        lse = tl.load(LSE + stat, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
        # Transposed logits [N keys, M rows]: the key tile stays put, rows stream past it.
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASK:
            if VARLEN:
                a_row, e_row = document_bounds(DOC_START, DOC_END, t_row, row_ok)
                ok = visible_in_document(t_row[None, :], s_key[:, None], a_row[None, :], e_row[None, :], CHUNK,
                                         IS_DEPTH, CAUSAL, CHUNKED)
            else:
                ok = visible(t_row[None, :], s_key[:, None], T, CHUNK, IS_DEPTH, CAUSAL, CHUNKED)
            pt = tl.where(ok, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_configs.BWD_KV_CONFIGS, key=_configs.SHAPE_KEY + ["IS_DEPTH"],
                 prune_configs_by={"early_config_prune": _configs.pruner("N")})
@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, GK, GV, DOC_START, DOC_END,
    sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kl, stride_kh,
    stride_vb, stride_vt, stride_vl, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_gkb, stride_gkt, stride_gkl, stride_gkh,
    stride_gvb, stride_gvt, stride_gvl, stride_gvh,
    T, HK, L, CHUNK,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_DEPTH: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DEPTH: tl.constexpr, CAUSAL: tl.constexpr, CHUNKED: tl.constexpr,
    VARLEN: tl.constexpr, T_CLASS: tl.constexpr, L_CLASS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of BLOCK_N keys of one (batch, kv head): sequence keys, or depth rows (IS_DEPTH)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    qk_scale = sm_scale * LOG2E
    n_keys = T * L  # L == 1 for sequence keys

    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = offs_j < n_keys
    s_key, slot = key_positions(offs_j, L, IS_DEPTH)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    ld = key_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk * stride_kh
                + key_tile_offsets(s_key, slot, offs_d, stride_kt, stride_kl, False), mask=ld, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk * stride_vh
                + key_tile_offsets(s_key, slot, offs_d, stride_vt, stride_vl, False), mask=ld, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    Qb = Q + b.to(tl.int64) * stride_qb
    DOb = DO + b.to(tl.int64) * stride_dob
    s_first = pid_n * BLOCK_N // L
    s_last = tl.minimum((pid_n * BLOCK_N + BLOCK_N - 1) // L, T - 1)
    # Query rows [r_lo, r_hi) to stream, of which [full_lo, full_hi) see every key of the tile.
    if IS_DEPTH:
        if VARLEN:
            t_lo, t_hi = reader_span_in_documents(DOC_START, DOC_END, s_first, s_last, CHUNK, CAUSAL)
        else:
            t_lo, t_hi = reader_span(s_first, s_last + 1, T, CHUNK, CAUSAL)
        r_lo, full_lo, full_hi, r_hi = t_lo * G, t_hi * G, t_hi * G, t_hi * G
    elif VARLEN:
        t_lo, t_full_lo, t_full_hi, t_hi = key_reader_ranges_in_documents(DOC_START, DOC_END, s_first, s_last, CAUSAL)
        r_lo, full_lo, full_hi, r_hi = t_lo * G, t_full_lo * G, t_full_hi * G, t_hi * G
    elif CAUSAL:
        # Rows at positions s_first..s_last see part of the tile; every later row sees all of it.
        r_lo, full_lo, full_hi, r_hi = s_first * G, (s_last + 1) * G, T * G, T * G
    else:
        # Keys past T are never stored, so every row may use the whole tile unmasked.
        r_lo, full_lo, full_hi, r_hi = 0, 0, T * G, T * G
    dk, dv = _kv_rows(dk, dv, k, v, Qb, DOb, LSE, DELTA, DOC_START, DOC_END, b, hk, s_key, r_lo, full_lo, T, HK,
                      stride_qt, stride_qh, stride_dot, stride_doh, offs_d, d_ok, qk_scale, CHUNK,
                      G, IS_DEPTH, CAUSAL, CHUNKED, True, VARLEN, BLOCK_M, PRECISION)
    dk, dv = _kv_rows(dk, dv, k, v, Qb, DOb, LSE, DELTA, DOC_START, DOC_END, b, hk, s_key, full_lo, full_hi, T, HK,
                      stride_qt, stride_qh, stride_dot, stride_doh, offs_d, d_ok, qk_scale, CHUNK,
                      G, IS_DEPTH, CAUSAL, CHUNKED, False, VARLEN, BLOCK_M, PRECISION)
    if VARLEN:
        dk, dv = _kv_rows(dk, dv, k, v, Qb, DOb, LSE, DELTA, DOC_START, DOC_END, b, hk, s_key, full_hi, r_hi, T, HK,
                          stride_qt, stride_qh, stride_dot, stride_doh, offs_d, d_ok, qk_scale, CHUNK,
                          G, IS_DEPTH, CAUSAL, CHUNKED, True, VARLEN, BLOCK_M, PRECISION)

    dk = dk * sm_scale
    tl.store(GK + b.to(tl.int64) * stride_gkb + hk * stride_gkh
             + key_tile_offsets(s_key, slot, offs_d, stride_gkt, stride_gkl, False), dk.to(GK.dtype.element_ty), mask=ld)
    tl.store(GV + b.to(tl.int64) * stride_gvb + hk * stride_gvh
             + key_tile_offsets(s_key, slot, offs_d, stride_gvt, stride_gvl, False), dv.to(GV.dtype.element_ty), mask=ld)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, t_row, a_row, e_row, Kb, Vb, stride_kt, stride_kl, stride_vt, stride_vl, offs_d,
              d_ok, lo, hi, T, L, CHUNK, qk_scale, IS_DEPTH: tl.constexpr, CAUSAL: tl.constexpr,
              CHUNKED: tl.constexpr, MASK: tl.constexpr, VARLEN: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):
    """dQ contribution of keys [lo, hi) (sequence positions, or flattened depth rows)."""
    for start in range(lo, hi, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        s, slot = key_positions(offs_j, L, IS_DEPTH)
        if MASK:
            ld = (offs_j[None, :] < hi) & d_ok[:, None]
        else:
            ld = d_ok[:, None]
        kt = tl.load(Kb + key_tile_offsets(s, slot, offs_d, stride_kt, stride_kl, True), mask=ld, other=0.0)
        vt = tl.load(Vb + key_tile_offsets(s, slot, offs_d, stride_vt, stride_vl, True), mask=ld, other=0.0)
        p = tl.math.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASK:
            if VARLEN:
                ok = visible_in_document(t_row[:, None], s[None, :], a_row[:, None], e_row[:, None], CHUNK,
                                         IS_DEPTH, CAUSAL, CHUNKED)
            else:
                ok = visible(t_row[:, None], s[None, :], T, CHUNK, IS_DEPTH, CAUSAL, CHUNKED)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.autotune(configs=_configs.BWD_Q_CONFIGS, key=_configs.SHAPE_KEY,
                 prune_configs_by={"early_config_prune": _configs.pruner("M")})
@triton.jit
def _bwd_q_kernel(
    Q, K, V, DK, DV, DO, LSE, DELTA, GQ, DOC_START, DOC_END,
    sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dkb, stride_dkt, stride_dkl, stride_dkh,
    stride_dvb, stride_dvt, stride_dvl, stride_dvh,
    stride_dob, stride_dot, stride_doh,
    stride_gqb, stride_gqt, stride_gqh,
    T, HK, L, CHUNK,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DEPTH: tl.constexpr, CAUSAL: tl.constexpr, CHUNKED: tl.constexpr,
    VARLEN: tl.constexpr, T_CLASS: tl.constexpr, L_CLASS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of BLOCK_M G-folded query rows: the forward's walk over keys, with dS in place of P."""
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
    t_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, T - 1)
    ld = row_ok[:, None] & d_ok[None, :]
    q = tl.load(row_tile_ptrs(Q + b.to(tl.int64) * stride_qb, rows, t_row, g_row, hk, stride_qt, stride_qh, offs_d, G),
                mask=ld, other=0.0)
    do = tl.load(row_tile_ptrs(DO + b.to(tl.int64) * stride_dob, rows, t_row, g_row, hk, stride_dot, stride_doh,
                               offs_d, G), mask=ld, other=0.0)
    stat = row_stat_offsets(b, hk, t_row, g_row, T, HK, G)
    lse = tl.load(LSE + stat, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

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
            full_hi = (t_lo + 1) // BLOCK_N * BLOCK_N
            seq_hi = t_hi + 1
        else:
            seq_lo, full_lo = 0, 0
            full_hi = T // BLOCK_N * BLOCK_N
            seq_hi = T
        if VARLEN:
            dq = _dq_tiles(dq, q, do, lse, delta, t_row, a_row, e_row, Kb, Vb, stride_kt, 0, stride_vt, 0, offs_d,
                           d_ok, seq_lo, full_lo, T, 1, CHUNK, qk_scale, False, CAUSAL, CHUNKED, True, VARLEN,
                           BLOCK_N, PRECISION)
        dq = _dq_tiles(dq, q, do, lse, delta, t_row, a_row, e_row, Kb, Vb, stride_kt, 0, stride_vt, 0, offs_d,
                       d_ok, full_lo, full_hi, T, 1, CHUNK, qk_scale, False, CAUSAL, CHUNKED, False, VARLEN,
                       BLOCK_N, PRECISION)
        dq = _dq_tiles(dq, q, do, lse, delta, t_row, a_row, e_row, Kb, Vb, stride_kt, 0, stride_vt, 0, offs_d,
                       d_ok, full_hi, seq_hi, T, 1, CHUNK, qk_scale, False, CAUSAL, CHUNKED, True, VARLEN,
                       BLOCK_N, PRECISION)
    if HAS_DEPTH:
        if VARLEN:
            s_lo, s_hi = depth_span_in_documents(DOC_START, DOC_END, t_lo, t_hi, CHUNK, CAUSAL)
        else:
            s_lo, s_hi = depth_span(t_lo, t_hi, T, CHUNK, CAUSAL)
        DKb = DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh
        DVb = DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh
        dq = _dq_tiles(dq, q, do, lse, delta, t_row, a_row, e_row, DKb, DVb, stride_dkt, stride_dkl, stride_dvt,
                       stride_dvl, offs_d, d_ok, s_lo * L, s_hi * L, T, L, CHUNK, qk_scale, True, CAUSAL, CHUNKED,
                       True, VARLEN, BLOCK_N, PRECISION)

    dq = dq * sm_scale
    gq_ptrs = row_tile_ptrs(GQ + b.to(tl.int64) * stride_gqb, rows, t_row, g_row, hk, stride_gqt, stride_gqh, offs_d, G)
    tl.store(gq_ptrs, dq.to(GQ.dtype.element_ty), mask=ld)


def moda_bwd(dout, q, k, v, depth_k, depth_v, out, lse, sm_scale: float, causal: bool, depth_chunk: int,
             grad_lse=None, documents=None):
    # dQ has its own pass rather than float32 atomics from the dK/dV pass: on an H200 the
    # atomic variant measured 10-18% slower end to end, and this way gradients are bitwise
    # reproducible without a separate deterministic mode.
    """Gradients (dq, dk, dv, d depth_k, d depth_v); entries for absent inputs are None.

    Gradients come back contiguous in their input's shape; inputs may be strided views.
    ``grad_lse`` ([B, Hq, T], optional) is a gradient flowing into the returned lse.
    ``documents``: packed documents (``moda_cuda._spec.PackedDocuments``, batch 1) or None.
    """
    B, T, Hq, D = q.shape
    depth_chunk = min(depth_chunk, T)  # every C >= T is one chunk; the kernels add C in 32 bits
    has_seq = k is not None
    L = depth_k.shape[2] if depth_k is not None else 0
    has_depth = L > 0
    Hk = k.shape[2] if has_seq else depth_k.shape[3]
    G = Hq // Hk
    BLOCK_D = max(16, triton.next_power_of_2(D))
    common = dict(
        G=G, HEAD_DIM=D, BLOCK_D=BLOCK_D, HAS_SEQ=has_seq, HAS_DEPTH=has_depth, CAUSAL=causal,
        CHUNKED=depth_chunk > 1, VARLEN=documents is not None, T_CLASS=_configs.seqlen_class(T),
        L_CLASS=_configs.depth_class(L), PRECISION=dot_precision(q.dtype),
    )

    delta = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
    doc_start, doc_end = documents.bounds() if documents is not None else (delta, delta)
    BLOCK_T = 16 if _configs.INTERPRET else 64
    glse = None if grad_lse is None else grad_lse.float().contiguous()
    _bwd_preprocess_kernel[(triton.cdiv(T, BLOCK_T), B * Hq)](
        out, dout, glse if glse is not None else delta, delta,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        T, Hq, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_T=BLOCK_T, HAS_GLSE=glse is not None,
    )

    def kv_grads(key, val, n_slots, is_depth):
        gk = torch.empty(key.shape, device=q.device, dtype=key.dtype)
        gv = torch.empty(val.shape, device=q.device, dtype=val.dtype)
        # View sequence tensors as [B, T, 1, Hk, D] so one kernel serves both kinds of keys.
        k5, v5, gk5, gv5 = (x if is_depth else x.unsqueeze(2) for x in (key, val, gk, gv))

        def grid(meta):
            return (triton.cdiv(T * n_slots, meta["BLOCK_N"]), B * Hk)

        _bwd_kv_kernel[grid](
            q, k5, v5, dout, lse, delta, gk5, gv5, doc_start, doc_end, sm_scale,
            q.stride(0), q.stride(1), q.stride(2),
            k5.stride(0), k5.stride(1), k5.stride(2), k5.stride(3),
            v5.stride(0), v5.stride(1), v5.stride(2), v5.stride(3),
            dout.stride(0), dout.stride(1), dout.stride(2),
            gk5.stride(0), gk5.stride(1), gk5.stride(2), gk5.stride(3),
            gv5.stride(0), gv5.stride(1), gv5.stride(2), gv5.stride(3),
            T, Hk, n_slots, depth_chunk, IS_DEPTH=is_depth, **common,
        )
        return gk, gv

    dk = dv = ddk = ddv = None
    if has_seq:
        dk, dv = kv_grads(k, v, 1, False)
    if has_depth:
        ddk, ddv = kv_grads(depth_k, depth_v, L, True)
    elif depth_k is not None:
        ddk, ddv = torch.zeros_like(depth_k), torch.zeros_like(depth_v)

    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    k_, v_ = (k, v) if has_seq else (q, q)
    dk_, dv_ = (depth_k, depth_v) if has_depth else (q.unsqueeze(2), q.unsqueeze(2))

    def q_grid(meta):
        return (triton.cdiv(T * G, meta["BLOCK_M"]), B * Hk)

    _bwd_q_kernel[q_grid](
        q, k_, v_, dk_, dv_, dout, lse, delta, dq, doc_start, doc_end, sm_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k_.stride(0), k_.stride(1), k_.stride(2),
        v_.stride(0), v_.stride(1), v_.stride(2),
        dk_.stride(0), dk_.stride(1), dk_.stride(2), dk_.stride(3),
        dv_.stride(0), dv_.stride(1), dv_.stride(2), dv_.stride(3),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        T, Hk, L, depth_chunk, **common,
    )
    return dq, dk, dv, ddk, ddv
