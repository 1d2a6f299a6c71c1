"""MoDA attention of new tokens against a KV cache (decoding), in flash-attn's
``flash_attn_with_kvcache`` form.

New token ``i`` of sequence ``b`` sits at position ``p = cache_seqlens[b] + i``. It sees the
sequence keys of the cache at positions ``<= p`` (the new tokens' own keys included, written
there first when ``k``/``v`` are given) and, in the same softmax, the depth rows its position
sees in the training op. With ``depth_chunk = 1`` those are the rows its own earlier layers
produced for it, which the caller passes with the new tokens (``depth_k``, ``depth_v``
``[B, S, L, Hk, D]``): nothing of depth is cached, so a decoding model's depth state is ``L``
rows per new token, never ``T x L``. The result equals :func:`moda_cuda.moda_attention`'s
output at those positions.

On CUDA tensors the Triton split-KV kernel computes it (``moda_cuda.triton_ref.decode``,
which also writes the new keys); what it does not serve (float64, D > 256, caches of two
layouts) runs the reference, with a one-time warning. The reference serves every device.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import warnings
from typing import Optional, Tuple

import torch

from ._spec import FLOAT_DTYPES, MAX_INT32, default_scale

__all__ = ["check_kvcache_inputs", "attention_with_kvcache_ref", "decode_backend", "triton_refuses"]

BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned: set = set()


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_kvcache_inputs(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale, depth_chunk) -> int:
    """Validate a decode call without reading any tensor's values; returns L (0 without depth).

    The lengths in ``cache_seqlens`` are not read (that would wait for the GPU, and a captured
    decode step may not): each must satisfy ``0 <= cache_seqlens[b]`` and
    ``cache_seqlens[b] + S <= Tmax``.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [B, S, Hq, D] and k_cache, v_cache one [B, Tmax, Hk, D] shape, got "
                         f"{_shape(q)}, {_shape(k_cache)}, {_shape(v_cache)}")
    B, S, Hq, D = q.shape
    _, Tmax, Hk, Dk = k_cache.shape
    if k_cache.shape[0] != B or Dk != D or min(B, S, Hq, D, Tmax, Hk) < 1:
        raise ValueError(f"k_cache must be [B={B}, Tmax, Hk, D={D}] with non-empty sizes, got {_shape(k_cache)}")
    if Hq % Hk:
        raise ValueError(f"q heads ({Hq}) must be a positive multiple of kv heads ({Hk})")
    if S > Tmax:
        raise ValueError(f"{S} new tokens do not fit a cache of {Tmax} positions")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together or both be None")
    if (depth_k is None) != (depth_v is None):
        raise ValueError("depth_k and depth_v must be given together or both be None")
    named = [("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v), ("depth_k", depth_k),
             ("depth_v", depth_v)]
    for name, t in named:
        if t is None:
            continue
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}: they must match")
    if k is not None and (tuple(k.shape) != (B, S, Hk, D) or k.shape != v.shape):
        raise ValueError(f"k and v must be [B={B}, S={S}, Hk={Hk}, D={D}], got {_shape(k)} and {_shape(v)}")
    L = 0
    if depth_k is not None:
        if depth_k.dim() != 5 or depth_k.shape != depth_v.shape or tuple(depth_k.shape[:2]) != (B, S) or \
                tuple(depth_k.shape[3:]) != (Hk, D):
            raise ValueError(f"depth_k and depth_v must be [B={B}, S={S}, L, Hk={Hk}, D={D}], got "
                             f"{_shape(depth_k)} and {_shape(depth_v)}")
        L = depth_k.shape[2]
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (B,) or cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be int32 [B={B}] on q's device, got {cache_seqlens.dtype} "
                         f"{_shape(cache_seqlens)} on {cache_seqlens.device}")
    if B > 1 and cache_seqlens.stride(0) != 1:  # the kernel reads entry b at offset b
        raise ValueError(f"cache_seqlens must be contiguous, got stride {cache_seqlens.stride(0)}")
    if isinstance(depth_chunk, bool) or not isinstance(depth_chunk, int) or depth_chunk != 1:
        raise ValueError(f"depth_chunk must be 1 with a KV cache (the new tokens carry their own depth rows), "
                         f"got {depth_chunk!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return L


def write_new_keys(k_cache, v_cache, k, v, cache_seqlens) -> None:
    """k, v [B, S, Hk, D] into the caches at positions cache_seqlens[b] + i, in place."""
    B, S = k.shape[:2]
    rows = torch.arange(B, device=k.device)[:, None]
    positions = cache_seqlens.long()[:, None] + torch.arange(S, device=k.device)
    k_cache[rows, positions] = k
    v_cache[rows, positions] = v


def attention_with_kvcache_ref(q, k_cache, v_cache, depth_k, depth_v, cache_seqlens, scale: Optional[float]
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B, S, Hq, D] in q's dtype, lse [B, Hq, S]) of new tokens against a written cache,
    in float32 (float64 for float64 inputs), all sequences at once."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, S, Hq, D = q.shape
    Tmax, Hk = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    sc = default_scale(D, scale)
    qg = q.to(cd).reshape(B, S, Hk, G, D)
    logits = [torch.einsum("bihgd,bshd->bhgis", qg, k_cache.to(cd)) * sc]
    position = cache_seqlens.long()[:, None] + torch.arange(S, device=q.device)  # [B, S]
    visible = torch.arange(Tmax, device=q.device)[None, None, :] <= position[:, :, None]  # [B, S, Tmax]
    logits[0] = logits[0].masked_fill(~visible[:, None, None], float("-inf"))
    if depth_k is not None and depth_k.shape[2] > 0:
        logits.append(torch.einsum("bihgd,bilhd->bhgil", qg, depth_k.to(cd)) * sc)
    lse = torch.logsumexp(torch.cat(logits, dim=-1), dim=-1)  # [B, Hk, G, S]
    # Cache rows no new token sees may hold anything (a preallocated cache is never cleared):
    # zero weights must not meet them, 0 * NaN being NaN.
    read = torch.arange(Tmax, device=q.device)[None, :] < position[:, -1:] + 1  # [B, Tmax]
    values = v_cache.to(cd).masked_fill(~read[:, :, None, None], 0.0)
    out = torch.einsum("bhgis,bshd->bihgd", torch.exp(logits[0] - lse[..., None]), values)
    if len(logits) > 1:
        out = out + torch.einsum("bhgil,bilhd->bihgd", torch.exp(logits[1] - lse[..., None]), depth_v.to(cd))
    lse = lse.reshape(B, Hq, S)
    return out.reshape(B, S, Hq, D).to(q.dtype), (lse if q.dtype == torch.float64 else lse.float())


@functools.lru_cache(maxsize=None)
def _triton_missing() -> Optional[str]:
    return None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def triton_refuses(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> Optional[str]:
    """Why the Triton decode kernel cannot serve a validated call, or None."""
    if not q.is_cuda and not (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return f"inputs are on {q.device.type}; the Triton decode kernel needs CUDA tensors"
    missing = _triton_missing()
    if missing:
        return missing
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32 are)"
    D = q.shape[-1]
    if D > 256:
        return f"head_dim {D} > 256"
    st = k_cache.stride()
    if st != v_cache.stride() or st[-1] != 1:
        return "k_cache and v_cache must share one layout with contiguous rows (they are written in place)"
    if st[1] * (k_cache.shape[1] - 1) + st[2] * (k_cache.shape[2] - 1) + D > MAX_INT32:
        return "one batch entry of the cache spans more than 2**31 elements (int32 offsets)"
    return None


def decode_backend(backend: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"``: what runs a validated call.

    "auto" (``MODA_BACKEND`` honoured; "cuda", which has no decode kernel, means auto): the
    Triton kernel on CUDA tensors it serves, else the reference (a warning once per reason on
    CUDA tensors). "triton" named explicitly raises where the kernel cannot serve.
    """
    if backend == "auto":
        backend = os.environ.get("MODA_BACKEND", "").strip() or "auto"
        if backend == "cuda":
            backend = "auto"
    if backend == "reference" or (backend == "auto" and not q.is_cuda):
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoDA backend {backend!r} for attention with a KV cache; allowed: "
                         f"{', '.join(BACKENDS)}")
    reason = triton_refuses(q, k_cache, v_cache)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"MoDA backend 'triton' cannot run this KV-cache call: {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"moda_cuda: attention with a KV cache runs the reference implementation ({reason})",
                      RuntimeWarning, stacklevel=3)
    return "reference"
