"""moda_cuda: Mixture-of-Depths Attention (MoDA) for PyTorch.

Each query head attends, under one softmax, to the sequence keys of its layer (causal or
not) and to the depth keys that earlier layers wrote for the same position (or depth chunk).

Entry points:

* :func:`moda_attention` -- the differentiable op (``torch.ops.moda.attention`` underneath;
  ``cu_seqlens``: packed documents, ``torch.ops.moda.attention_varlen``).
* :func:`moda_attention_with_kvcache` -- new tokens against a KV cache (decoding).
* :mod:`moda_cuda.reference` -- the pure-PyTorch definition every backend is tested against.
* :mod:`moda_cuda.compat` -- ``parallel_moda``, ``parallel_moda_chunk_visible``, ``parallel_fda``:
  drop-ins for the original MoDA Triton package's entry points.
* :func:`context_parallel_moda_attention` (:mod:`moda_cuda.distributed`) -- the op over a
  sequence sharded across the ranks of a process group (a ring of point-to-point sends).
* :mod:`moda_cuda.layers`, :mod:`moda_cuda.generation` -- blocks, the LM and ViT, ``generate()``.
* :func:`available_backends`, :func:`info` -- what can run here.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import eager as _eager
from . import kvcache_op as _kvcache_op  # registers torch.ops.moda.attention_with_kvcache
from . import ops as _ops  # registers torch.ops.moda.*
from ._spec import check_inputs  # noqa: F401  (public: validate without running)
from ._version import __version__
from .dispatch import available_backends
from .info import info

__all__ = ["moda_attention", "moda_attention_with_kvcache", "available_backends", "info", "__version__",
           "DepthStream", "context_parallel_moda_attention"]


def moda_attention(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    depth_k: Optional[torch.Tensor] = None,
    depth_v: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    depth_chunk: int = 1,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Mixture-of-Depths attention.

    Args:
        q: ``[B, T, Hq, D]`` queries.
        k, v: ``[B, T, Hk, D]`` sequence keys/values, or both ``None`` (depth-only attention).
        depth_k, depth_v: ``[B, T, L, Hk, D]`` keys/values written by earlier layers, or both
            ``None``. Strided views (e.g. ``buf[:, :, :l]``) are read without copying.
        cu_seqlens: packed documents (flash-attn's varlen convention): int32 ``[n_docs + 1]``
            on q's device, ``0 = cu_seqlens[0] <= ... <= cu_seqlens[-1] = N``, with every tensor
            packed into batch 1 (``q [1, N, Hq, D]``, ``depth_k [1, N, L, Hk, D]``). Query row
            ``t`` of document ``i`` (first position ``a``) sees only keys of its document, and
            the depth rows of its document's positions ``s`` with ``(s - a) // C == (t - a) // C``:
            depth chunks restart at each document. Empty documents are allowed.
        max_seqlen: the longest document (optional; checked against ``cu_seqlens``).
        scale: logit scale, default ``D ** -0.5``.
        causal: sequence key ``s`` is visible to query ``t`` only if ``s <= t``.
        depth_chunk: ``C``; query ``t`` sees the depth rows of every position ``s`` with
            ``s // C == t // C`` (and ``s <= t`` when causal). 1 = its own position only.
        return_lse: also return ``lse [B, Hq, T]`` (float32, float64 for float64 inputs; natural log).
            With ``cu_seqlens``: ``[1, Hq, N]``.
        deterministic: ask for bitwise-repeatable gradients. By default the compiled
            backward (cuda backend) accumulates dQ with float32 atomics where that measured
            faster (D = 64, except G >= 8 with T <= 4096: ``bwd_fuses_dq`` in
            ``csrc/moda_bwd_config.h``), so dQ may differ in its last bits from run to run;
            with ``True`` dQ always comes from a kernel of its own, with no atomics. The
            Triton and reference backwards always are repeatable (every gradient element is
            reduced by one program in a fixed order).
        backend: ``"auto"`` (fastest available that serves the input; ``MODA_BACKEND``
            overrides), or one of :func:`available_backends`, which then must serve it.

    ``Hq`` must be a multiple of ``Hk``; query head ``h`` reads kv head ``h // (Hq // Hk)``.
    Returns ``out [B, T, Hq, D]`` in q's dtype (and ``lse`` when ``return_lse``).
    Differentiable in q, k, v, depth_k and depth_v.
    """
    if _eager.usable(q):  # the same kernels without the op dispatcher: less host time per call
        out, lse = _eager.attention(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend,
                                    cu_seqlens, max_seqlen)
    else:  # torch.compile, fake tensors, modes: the registered op
        _ops.check_call(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend, cu_seqlens,
                        max_seqlen)
        out, lse = _ops.attention_op(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend,
                                     cu_seqlens, max_seqlen)
    return (out, lse) if return_lse else out


def moda_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    depth_k: Optional[torch.Tensor] = None,
    depth_v: Optional[torch.Tensor] = None,
    *,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    cache_seqlens: torch.Tensor,
    scale: Optional[float] = None,
    depth_chunk: int = 1,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """MoDA attention of ``S`` new tokens per sequence against a KV cache (decoding).

    Args:
        q: ``[B, S, Hq, D]``, the new tokens' queries.
        k_cache, v_cache: ``[B, Tmax, Hk, D]``, the sequence keys/values cached so far.
        depth_k, depth_v: ``[B, S, L, Hk, D]``, the new tokens' own depth rows (what their
            earlier layers produced for them), or None.
        k, v: ``[B, S, Hk, D]``, the new tokens' keys/values: written into the caches at
            ``cache_seqlens[b] + i`` in place before attending. None: already there.
        cache_seqlens: int32 ``[B]``, tokens cached per sequence before these (sequences of
            different lengths in one batch); ``cache_seqlens[b] + S <= Tmax``. Not read on the
            host (no synchronization), so not checked.
        depth_chunk: 1 (a new token's depth rows are its own).
        backend: ``"auto"`` (the Triton split-KV kernel on CUDA tensors it serves, else the
            reference; ``MODA_BACKEND`` overrides), ``"triton"`` (raises where it cannot
            serve) or ``"reference"``. The compiled ``"cuda"`` backend has no decode kernel.

    New token ``i`` of sequence ``b`` at position ``p = cache_seqlens[b] + i`` sees the cache
    at positions ``<= p`` and its depth rows: the training op's output at position ``p``.
    Returns ``out [B, S, Hq, D]`` (and ``lse [B, Hq, S]``, float32, natural log). Not
    differentiable. The inputs are validated by the op (no tensor values are read).
    """
    if backend not in _KVCACHE_BACKENDS:
        raise ValueError(f"backend {backend!r} has no KV-cache attention; use 'auto', 'triton' or 'reference'")
    args = (q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale, depth_chunk, backend)
    # Eager: the op's kernel without the dispatcher (host time per decode step); else the op.
    out, lse = _eager.with_kvcache(*args) if _eager.usable(q) else torch.ops.moda.attention_with_kvcache(*args)
    return (out, lse) if return_lse else out


_KVCACHE_BACKENDS = ("auto", "triton", "reference")


def __getattr__(name: str):
    # Layers and the depth stream import lazily: the kernels do not need them.
    if name == "DepthStream":
        from .depth_stream import DepthStream

        return DepthStream
    if name == "context_parallel_moda_attention":
        from .distributed import context_parallel_moda_attention

        return context_parallel_moda_attention
    if name == "layers":
        import importlib

        return importlib.import_module(".layers", __name__)
    raise AttributeError(f"module 'moda_cuda' has no attribute {name!r}")
