"""Drop-in for the reference MoDA Triton package's ``parallel_moda``.

That package folds GQA into time and flattens depth:

* ``q [B, T*G, Hk, D]``: row ``t*G + g`` of head column ``j`` is query head ``j*G + g`` at
  position ``t`` (it reads kv head ``j``); ``k, v [B, T, Hk, D]``;
* ``cached_k, cached_v [B, T*L, Hk, D]``: rows ``t*L .. t*L+L-1`` belong to position ``t``;
* ``lse`` comes back in base 2 with shape ``[B, T*G, Hk]``;
* ``head_first=True`` moves the head axis before time in every tensor.

Depth is a zero-copy view; q/out are rearranged once (the folded head order is not a
strided view of ``[B, T, Hq, D]``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

__all__ = ["parallel_moda"]


def _time_major(x: Optional[torch.Tensor], head_first: bool) -> Optional[torch.Tensor]:
    return x.transpose(1, 2) if (x is not None and head_first) else x


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
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """MoDA in the reference package's layout; see the module docstring.

    ``moda_group_num`` is G, the query heads per kv head. ``g`` (log gates) and
    ``cu_seqlens`` (packed variable-length batches) are not supported and raise.
    """
    from . import moda_attention

    if g is not None:
        raise ValueError("parallel_moda: gated attention (g) is not supported by moda_cuda; pass g=None")
    if cu_seqlens is not None:
        raise ValueError("parallel_moda: cu_seqlens (packed variable-length batches) is not supported; "
                         "pad the batch to one length instead")
    if isinstance(moda_group_num, bool) or not isinstance(moda_group_num, int) or moda_group_num < 1:
        raise ValueError(f"moda_group_num must be a positive int, got {moda_group_num!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T*G, Hk, D] (or [B, Hk, T*G, D] with head_first), got {list(q.shape)}")
    G = moda_group_num
    qt = _time_major(q, head_first)
    B, TG, Hk, D = qt.shape
    if TG % G:
        raise ValueError(f"q has {TG} rows, not a multiple of moda_group_num={G}")
    T = TG // G
    k, v = _time_major(k, head_first), _time_major(v, head_first)
    cached_k, cached_v = _time_major(cached_k, head_first), _time_major(cached_v, head_first)
    depth_k = depth_v = None
    if (cached_k is None) != (cached_v is None):
        raise ValueError("cached_k and cached_v must be given together or both be None")
    if cached_k is not None:
        if cached_k.dim() != 4 or cached_k.shape[1] % T:
            raise ValueError(f"cached_k must be [B, T*L, Hk, D] with T={T}, got {list(cached_k.shape)}")
        L = cached_k.shape[1] // T
        depth_k = cached_k.unflatten(1, (T, L))
        depth_v = cached_v.unflatten(1, (T, L))

    # [B, T*G, Hk, D] -> [B, T, Hk*G, D]: query head j*G + g <- row t*G + g, column j.
    q_std = qt.reshape(B, T, G, Hk, D).transpose(2, 3).reshape(B, T, Hk * G, D)
    out, lse = moda_attention(q_std, k, v, depth_k, depth_v, scale=scale, causal=is_causal, return_lse=True)
    out = out.reshape(B, T, Hk, G, D).transpose(2, 3).reshape(B, TG, Hk, D)
    out = _time_major(out, head_first)
    if not need_lse:
        return out
    # [B, Hq, T] natural log -> [B, T*G, Hk] base 2.
    lse2 = (lse / math.log(2.0)).reshape(B, Hk, G, T).permute(0, 3, 2, 1).reshape(B, TG, Hk)
    return out, (lse2.transpose(1, 2) if head_first else lse2)
