"""Drop-ins for the three attention entry points of the original MoDA Triton package (whose
own test suite passes against these functions).

* :func:`parallel_moda`: sequence keys of the layer (causal or not) plus the depth rows of
  the query's own position.
* :func:`parallel_moda_chunk_visible`: causal; a query at position ``t`` sees the depth rows
  of every position ``s`` of its chunk with ``s <= t`` (``s // C == t // C``), where the
  chunk is ``C = BT // moda_group_num`` positions.
* :func:`parallel_fda`: depth-only attention (``k = v = None``): each query sees the depth
  rows of its own position only.

All three take the package's layout, which folds GQA into time and flattens depth:

* ``q [B, T*G, Hk, D]``: row ``t*G + g`` of head column ``j`` is query head ``j*G + g`` at
  position ``t`` (it reads kv head ``j``); ``k, v [B, T, Hk, D]``;
* ``cached_k, cached_v [B, T*L, Hk, D]``: rows ``t*L .. t*L+L-1`` belong to position ``t``;
* ``lse`` comes back in base 2 with shape ``[B, T*G, Hk]``;
* ``head_first=True`` moves the head axis before time in every tensor.

Depth is a zero-copy view; q/out are rearranged once (the folded head order is not a
strided view of ``[B, T, Hq, D]``).

Arguments the package takes only to tune its kernels (block sizes, warps, stages, ...) are
accepted by :func:`parallel_moda_chunk_visible` and :func:`parallel_fda` as extra keywords and
ignored (``moda_attention`` chooses its own kernels; a misspelt keyword is ignored too).
:func:`parallel_moda` keeps its fixed signature. ``customized_BT`` is not tuning here: it sets
the chunk (``DEFAULT_BT = 128`` rows when None, whatever the GPU). Arguments that change the
result and are not supported raise ``ValueError``: ``g`` (log gates).

``cu_seqlens`` packs documents into batch 1 as in the package's varlen ops: offsets over the
k/v token axis (int32, or the int64 the package passes), so folded q holds ``G`` rows and
flattened depth ``L`` rows per token. Each document attends within itself and depth chunks
restart at its first token (``moda_attention``'s ``cu_seqlens``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple, Union

import torch

__all__ = ["parallel_moda", "parallel_moda_chunk_visible", "parallel_fda", "DEFAULT_BT"]

# The package's query block for the chunk-visible kernel on H100/H200 (it picks 64 on some
# other GPUs by name). Here the chunk never depends on the GPU: 128 unless customized_BT.
DEFAULT_BT = 128

Result = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class _Folded(NamedTuple):
    """One call's inputs in moda_attention's layout, plus what undoing the folding needs."""

    q: torch.Tensor  # [B, T, Hk*G, D]
    k: Optional[torch.Tensor]  # [B, T, Hk, D]
    v: Optional[torch.Tensor]
    depth_k: Optional[torch.Tensor]  # [B, T, L, Hk, D]
    depth_v: Optional[torch.Tensor]
    group: int  # G
    head_first: bool
    cu_seqlens: Optional[torch.Tensor]  # int32 token offsets of packed documents


def _time_major(x: Optional[torch.Tensor], head_first: bool) -> Optional[torch.Tensor]:
    return x.transpose(1, 2) if (x is not None and head_first) else x


def _check_moda_group_num(moda_group_num: Any) -> int:
    if isinstance(moda_group_num, bool) or not isinstance(moda_group_num, int) or moda_group_num < 1:
        raise ValueError(f"moda_group_num must be a positive int, got {moda_group_num!r}")
    return moda_group_num


def _unflatten_depth(name: str, cached: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, T*L, Hk, D]`` -> ``[B, T, L, Hk, D]`` (a view)."""
    if cached.dim() != 4 or cached.shape[1] % T:
        raise ValueError(f"{name} must be [B, T*L, Hk, D] with T={T}, got {list(cached.shape)}")
    return cached.unflatten(1, (T, cached.shape[1] // T))


def _fold(fn: str, q, k, v, g, cached_k, cached_v, cu_seqlens, moda_group_num, head_first) -> _Folded:
    """The argument checks and layout changes every entry point shares."""
    if g is not None:
        raise ValueError(f"{fn}: gated attention (g) is not supported by moda_cuda; pass g=None")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{fn}: cu_seqlens must be an int32 or int64 tensor of token offsets")
        cu_seqlens = cu_seqlens.to(torch.int32)
    G = _check_moda_group_num(moda_group_num)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T*G, Hk, D] (or [B, Hk, T*G, D] with head_first), got {list(q.shape)}")
    qt = _time_major(q, head_first)
    B, TG, Hk, D = qt.shape
    if TG % G:
        raise ValueError(f"q has {TG} rows, not a multiple of moda_group_num={G}")
    if TG == 0:
        raise ValueError("q has no rows (T = 0)")
    T = TG // G
    if (cached_k is None) != (cached_v is None):
        raise ValueError("cached_k and cached_v must be given together or both be None")
    # q's head axis holds the kv heads (its query heads are folded into time): the keys must
    # have as many, or moda_attention would see another, valid GQA problem.
    for name, x in (("k", k), ("v", v), ("cached_k", cached_k), ("cached_v", cached_v)):
        if x is not None and (x.dim() != 4 or _time_major(x, head_first).shape[2] != Hk):
            raise ValueError(f"{name} must have q's {Hk} kv heads in the layout of q, got shape {list(x.shape)}")
    depth_k = depth_v = None
    if cached_k is not None:
        depth_k = _unflatten_depth("cached_k", _time_major(cached_k, head_first), T)
        depth_v = _unflatten_depth("cached_v", _time_major(cached_v, head_first), T)
    # [B, T*G, Hk, D] -> [B, T, Hk*G, D]: query head j*G + g <- row t*G + g, column j.
    q_std = qt.reshape(B, T, G, Hk, D).transpose(2, 3).reshape(B, T, Hk * G, D)
    return _Folded(q_std, _time_major(k, head_first), _time_major(v, head_first), depth_k, depth_v, G, head_first,
                   cu_seqlens)


def _attend(x: _Folded, scale: Optional[float], causal: bool, depth_chunk: int, need_lse: bool) -> Result:
    """Run moda_attention on folded inputs and fold its results back into the package's layout."""
    from . import moda_attention

    out, lse = moda_attention(x.q, x.k, x.v, x.depth_k, x.depth_v, cu_seqlens=x.cu_seqlens, scale=scale,
                              causal=causal, depth_chunk=depth_chunk, return_lse=True)
    B, T, Hq, D = out.shape
    G, Hk = x.group, Hq // x.group
    out = _time_major(out.reshape(B, T, Hk, G, D).transpose(2, 3).reshape(B, T * G, Hk, D), x.head_first)
    if not need_lse:
        return out
    # [B, Hq, T] natural log -> [B, T*G, Hk] base 2.
    lse2 = (lse / math.log(2.0)).reshape(B, Hk, G, T).permute(0, 3, 2, 1).reshape(B, T * G, Hk)
    return out, (lse2.transpose(1, 2) if x.head_first else lse2)


def parallel_moda(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    g: Optional[torch.Tensor] = None,
    cached_k: Optional[torch.Tensor] = None,
    cached_v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    moda_group_num: int = 1,
    is_causal: bool = True,
    head_first: bool = False,
    need_lse: bool = False,
) -> Result:
    """MoDA in the original package's layout; see the module docstring.

    ``moda_group_num`` is G, the query heads per kv head. ``g`` (log gates) is not supported
    and raises; ``cu_seqlens``: packed documents (module docstring).
    """
    x = _fold("parallel_moda", q, k, v, g, cached_k, cached_v, cu_seqlens, moda_group_num, head_first)
    return _attend(x, scale, is_causal, 1, need_lse)


def _chunk_tokens(customized_BT: Optional[int], G: int) -> int:
    """The depth chunk ``C`` (in positions) of :func:`parallel_moda_chunk_visible`.

    ``BT`` (folded query rows per block) is ``customized_BT``, else :data:`DEFAULT_BT`; it must
    be a positive multiple of ``G`` and ``C = BT // G``.
    """
    BT = DEFAULT_BT if customized_BT is None else customized_BT
    if isinstance(BT, bool) or not isinstance(BT, int) or BT < 1 or BT % G:
        raise ValueError(f"customized_BT must be a positive int multiple of moda_group_num={G}, got {BT!r}")
    return BT // G


def parallel_moda_chunk_visible(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    g: Optional[torch.Tensor] = None,
    cached_k: Optional[torch.Tensor] = None,
    cached_v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    moda_group_num: int = 1,
    head_first: bool = False,
    need_lse: bool = False,
    customized_BT: Optional[int] = None,
    **tuning: Any,
) -> Result:
    """Causal MoDA whose depth part spans chunks of positions; see the module docstring.

    The query at position ``t`` sees sequence keys ``s <= t`` and the depth rows of every
    position ``s <= t`` with ``s // C == t // C``, where ``C = BT // moda_group_num`` and
    ``BT = customized_BT``, else 128 (:data:`DEFAULT_BT`; the package's default on H100/H200,
    chosen here on every GPU). ``BT`` must be a positive multiple of ``moda_group_num``.
    Always causal: ``is_causal=False`` raises. ``g`` raises; extra keywords (kernel tuning)
    are ignored.
    """
    if not tuning.get("is_causal", True):
        raise ValueError("parallel_moda_chunk_visible is always causal; is_causal=False is not supported")
    x = _fold("parallel_moda_chunk_visible", q, k, v, g, cached_k, cached_v, cu_seqlens, moda_group_num,
              head_first)
    return _attend(x, scale, True, _chunk_tokens(customized_BT, x.group), need_lse)


def parallel_fda(
    q: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    g: Optional[torch.Tensor] = None,
    cached_k: Optional[torch.Tensor] = None,
    cached_v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    moda_group_num: int = 1,
    head_first: bool = False,
    need_lse: bool = False,
    **tuning: Any,
) -> Result:
    """Depth-only attention: each query attends to the depth rows of its own position.

    ``k`` and ``v`` must be None and ``cached_k``/``cached_v`` given; layouts as in the
    module docstring. ``g`` raises; extra keywords (kernel tuning, and ``is_causal``, which
    cannot matter here) are ignored.
    """
    if k is not None or v is not None:
        raise ValueError("parallel_fda is depth-only attention: k and v must be None")
    if cached_k is None or cached_v is None:
        raise ValueError("parallel_fda needs cached_k and cached_v ([B, T*L, Hk, D])")
    x = _fold("parallel_fda", q, None, None, g, cached_k, cached_v, cu_seqlens, moda_group_num, head_first)
    return _attend(x, scale, True, 1, need_lse)
