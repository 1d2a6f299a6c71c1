"""Pure-PyTorch MoDA: the contract every backend is tested against.

Query ``(b, t, h)`` takes one softmax over

* sequence keys ``k[b, s, h // G]`` for ``s <= t`` (causal) or every ``s``, and
* depth keys ``depth_k[b, s, l, h // G]`` for every ``l < L`` and every ``s`` in the same
  depth chunk as ``t`` (``s // C == t // C``, and ``s <= t`` when causal),

and returns the softmax-weighted sum of the matching values. Everything is vectorised: the
depth part is computed chunk by chunk as a batched product of ``C`` queries against the
``C * L`` depth rows of their chunk, so memory stays ``O(T * C * L)`` for depth.

With ``cu_seqlens`` (documents packed into batch 1) each document is its own problem: the
reference runs the dense computation once per document, on views of its positions, so a
query never sees another document's keys and depth chunks restart at each document.

Arithmetic runs in float64 for float64 inputs and in float32 otherwise.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from ._spec import (MoDAShape, check_cu_seqlens, check_inputs, default_scale, effective_depth_chunk, lse_dtype,
                    packed_documents)

__all__ = ["moda_attention_ref", "moda_attention_ref_backward"]


def _group_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, T, Hq, D] -> [B, T, Hk, G, D]: query head h = hk * G + g."""
    B, T, Hq, D = x.shape
    return x.reshape(B, T, kv_heads, Hq // kv_heads, D)


def _chunk_rows(x: torch.Tensor, C: int) -> torch.Tensor:
    """Pad the time axis (dim 1) to a multiple of C and split it into [n_chunks, C]."""
    T = x.shape[1]
    n = -(-T // C)
    if n * C != T:
        pad = x.new_zeros((x.shape[0], n * C - T) + tuple(x.shape[2:]))
        x = torch.cat([x, pad], dim=1)
    return x.reshape((x.shape[0], n, C) + tuple(x.shape[2:]))


def _chunk_depth(d: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, L, Hk, D] -> [B, n_chunks, C * L, Hk, D]: the depth rows each chunk can see."""
    B, _, L, Hk, D = d.shape
    x = _chunk_rows(d, C)
    return x.reshape(B, x.shape[1], C * L, Hk, D)


def _unchunk_queries(x: torch.Tensor, T: int) -> torch.Tensor:
    """[..., n_chunks, C, X] -> [..., T, X]."""
    shape = x.shape
    return x.reshape(shape[:-3] + (shape[-3] * shape[-2], shape[-1]))[..., :T, :]


def _depth_visible(T: int, L: int, C: int, causal: bool, device) -> torch.Tensor:
    """Bool [T, C*L]: may query t see column j of its chunk's depth rows (position c*C + j // L)?"""
    t = torch.arange(T, device=device)
    j = torch.arange(C * L, device=device)
    offset_q = (t % C)[:, None]
    offset_s = (j // L)[None, :]
    visible = (t // C * C)[:, None] + offset_s < T
    if causal:
        visible = visible & (offset_s <= offset_q)
    return visible


class _Logits(NamedTuple):
    seq: Optional[torch.Tensor]  # [B, Hk, G, T, T]
    depth: Optional[torch.Tensor]  # [B, Hk, G, T, C*L]


def _logits(q, k, depth_k, shape: MoDAShape, scale: float, causal: bool, C: int) -> _Logits:
    cd = lse_dtype(q.dtype)
    T, Hk = shape.seqlen, shape.kv_heads
    qg = _group_heads(q.to(cd), Hk)
    seq = depth = None
    if k is not None:
        seq = torch.einsum("bthgd,bshd->bhgts", qg, k.to(cd)) * scale
        if causal:
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
            seq = seq.masked_fill(future, float("-inf"))
    if shape.depth > 0:
        qc = _chunk_rows(qg, C)  # [B, n, C, Hk, G, D]
        dk = _chunk_depth(depth_k.to(cd), C)  # [B, n, C*L, Hk, D]
        depth = torch.einsum("bcihgd,bcjhd->bhgcij", qc, dk) * scale
        depth = _unchunk_queries(depth, T)
        visible = _depth_visible(T, shape.depth, C, causal, q.device)
        depth = depth.masked_fill(~visible, float("-inf"))
    return _Logits(seq, depth)


def _lse(logits: _Logits) -> torch.Tensor:
    parts = [x for x in logits if x is not None]
    return torch.logsumexp(torch.cat(parts, dim=-1), dim=-1)  # [B, Hk, G, T]


def _weighted_values(p_seq, p_depth, v, depth_v, shape: MoDAShape, C: int) -> torch.Tensor:
    """sum_j p[.., t, j] * value_j, back in [B, T, Hk, G, D]."""
    cd = p_seq.dtype if p_seq is not None else p_depth.dtype
    out = 0
    if p_seq is not None:
        out = torch.einsum("bhgts,bshd->bthgd", p_seq, v.to(cd))
    if p_depth is not None:
        pc = _chunk_rows(p_depth.permute(0, 3, 1, 2, 4), C)  # [B, n, C, Hk, G, CL]
        dv = _chunk_depth(depth_v.to(cd), C)
        od = torch.einsum("bcihgj,bcjhd->bcihgd", pc, dv)
        out = out + od.reshape((od.shape[0], -1) + tuple(od.shape[3:]))[:, : shape.seqlen]
    return out


def _empty_result(q: torch.Tensor, shape: MoDAShape) -> Tuple[torch.Tensor, torch.Tensor]:
    """Depth-only attention with L = 0: nothing is visible, the output is 0 and lse is -inf."""
    lse = torch.full((shape.batch, shape.q_heads, shape.seqlen), float("-inf"), device=q.device)
    return torch.zeros_like(q), lse


def _document_views(docs, *tensors):
    """Per non-empty document: (start, end, the tensors' views of its positions, time axis 1)."""
    for a, b in docs.spans():
        yield a, b, [None if t is None else t[:, a:b] for t in tensors]


def moda_attention_ref(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    depth_k: Optional[torch.Tensor] = None,
    depth_v: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    depth_chunk: int = 1,
    return_lse: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Reference MoDA attention (any device, any float dtype, differentiable by autograd).

    Args and result are those of :func:`moda_cuda.moda_attention`: ``out [B, T, Hq, D]`` in
    q's dtype and, with ``return_lse``, ``lse [B, Hq, T]`` (float32, natural log; float64
    for float64 inputs). ``cu_seqlens`` packs documents into batch 1 (see the module docstring).
    """
    shape = check_inputs(q, k, v, depth_k, depth_v, scale, causal, depth_chunk)
    if cu_seqlens is not None:
        check_cu_seqlens(q, cu_seqlens, max_seqlen)
        docs = packed_documents(cu_seqlens, shape.seqlen, max_seqlen)
        outs, lses = [], []
        for _, _, views in _document_views(docs, q, k, v, depth_k, depth_v):
            o, s = moda_attention_ref(*views, scale=scale, causal=causal, depth_chunk=depth_chunk, return_lse=True)
            outs.append(o)
            lses.append(s)
        out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=2)
        return (out, lse) if return_lse else out
    if not shape.has_keys:
        out, lse = _empty_result(q, shape)
        return (out, lse) if return_lse else out
    sc = default_scale(shape.head_dim, scale)
    depth_chunk = effective_depth_chunk(depth_chunk, shape.seqlen)  # its blocks are C x C L
    logits = _logits(q, k, depth_k, shape, sc, causal, depth_chunk)
    lse = _lse(logits)
    probs = [None if x is None else torch.exp(x - lse[..., None]) for x in logits]
    out = _weighted_values(probs[0], probs[1], v, depth_v, shape, depth_chunk)
    out = out.reshape(q.shape).to(q.dtype)
    if not return_lse:
        return out
    B, Hq, T = shape.batch, shape.q_heads, shape.seqlen
    lse = lse.reshape(B, Hq, T)
    return out, (lse if q.dtype == torch.float64 else lse.float())


def moda_attention_ref_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    depth_k: Optional[torch.Tensor],
    depth_v: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    depth_chunk: int = 1,
    grad_lse: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> Tuple[torch.Tensor, ...]:
    """Analytic gradients (dq, dk, dv, d depth_k, d depth_v), the flash-attention way.

    With P = exp(S - lse) and delta = rowsum(dO * O) - dlse: dV = P^T dO,
    dS = P * (dO V^T - delta), dQ = scale * dS K, dK = scale * dS^T Q; depth keys and values
    are just more columns. ``grad_lse`` ([B, Hq, T], optional) is the gradient reaching lse
    (d lse / d S = P). Absent inputs get ``None``. ``cu_seqlens``: packed documents, each
    differentiated on its own.
    """
    shape = check_inputs(q, k, v, depth_k, depth_v, scale, causal, depth_chunk)
    if cu_seqlens is not None:
        check_cu_seqlens(q, cu_seqlens, max_seqlen)
        docs = packed_documents(cu_seqlens, shape.seqlen, max_seqlen)
        grads = [None if t is None else torch.zeros_like(t) for t in (q, k, v, depth_k, depth_v)]
        time_major = (grad_out, q, k, v, depth_k, depth_v, out)
        for a, b, views in _document_views(docs, *time_major):
            g_lse = None if grad_lse is None else grad_lse[..., a:b]
            doc_grads = moda_attention_ref_backward(*views, lse[..., a:b], scale=scale, causal=causal,
                                                    depth_chunk=depth_chunk, grad_lse=g_lse)
            for into, g in zip(grads, doc_grads):
                if into is not None:
                    into[:, a:b] = g
        return tuple(grads)
    if not shape.has_keys:
        zero = torch.zeros_like(q)
        return zero, None, None, torch.zeros_like(depth_k), torch.zeros_like(depth_v)
    C = effective_depth_chunk(depth_chunk, shape.seqlen)  # its blocks are C x C L
    sc = default_scale(shape.head_dim, scale)
    cd = lse_dtype(q.dtype)
    B, T, Hk, G = shape.batch, shape.seqlen, shape.kv_heads, shape.group
    logits = _logits(q, k, depth_k, shape, sc, causal, C)
    lse_g = lse.to(cd).reshape(B, Hk, G, T, 1)
    dout = _group_heads(grad_out.to(cd), Hk)  # [B, T, Hk, G, D]
    qg = _group_heads(q.to(cd), Hk)
    delta = (dout * _group_heads(out.to(cd), Hk)).sum(-1).permute(0, 2, 3, 1)[..., None]  # [B, Hk, G, T, 1]
    if grad_lse is not None:
        delta = delta - grad_lse.to(cd).reshape(B, Hk, G, T, 1)

    dq = torch.zeros_like(qg)
    dk = dv = ddk = ddv = None
    if logits.seq is not None:
        p = torch.exp(logits.seq - lse_g)
        dp = torch.einsum("bthgd,bshd->bhgts", dout, v.to(cd))
        ds = p * (dp - delta) * sc
        dq = dq + torch.einsum("bhgts,bshd->bthgd", ds, k.to(cd))
        dk = torch.einsum("bhgts,bthgd->bshd", ds, qg).to(k.dtype)
        dv = torch.einsum("bhgts,bthgd->bshd", p, dout).to(v.dtype)
    if logits.depth is not None:
        p = torch.exp(logits.depth - lse_g)
        to_chunks = lambda x: _chunk_rows(x.permute(0, 3, 1, 2, 4), C)  # noqa: E731  [B, n, C, Hk, G, CL]
        dvc = _chunk_depth(depth_v.to(cd), C)
        dkc = _chunk_depth(depth_k.to(cd), C)
        doc, qc = _chunk_rows(dout, C), _chunk_rows(qg, C)
        dp = _unchunk_queries(torch.einsum("bcihgd,bcjhd->bhgcij", doc, dvc), T)
        ds = p * (dp - delta) * sc
        ds_c, p_c = to_chunks(ds), to_chunks(p)
        dq_d = torch.einsum("bcihgj,bcjhd->bcihgd", ds_c, dkc)
        dq = dq + dq_d.reshape((B, -1) + tuple(dq_d.shape[3:]))[:, :T]
        L = shape.depth
        unchunk = lambda x: x.reshape(B, -1, L, Hk, shape.head_dim)[:, :T]  # noqa: E731
        ddk = unchunk(torch.einsum("bcihgj,bcihgd->bcjhd", ds_c, qc)).to(depth_k.dtype)
        ddv = unchunk(torch.einsum("bcihgj,bcihgd->bcjhd", p_c, doc)).to(depth_v.dtype)
    elif depth_k is not None:  # L = 0
        ddk, ddv = torch.zeros_like(depth_k), torch.zeros_like(depth_v)
    return dq.reshape(q.shape).to(q.dtype), dk, dv, ddk, ddv

