"""moda_cuda: Mixture-of-Depths Attention (MoDA) for PyTorch.

Each query head attends, under one softmax, to the sequence keys of its layer (causal or
not) and to the depth keys that earlier layers wrote for the same position (or depth chunk).

Entry points:

* :func:`moda_attention` -- the differentiable op (``torch.ops.moda.attention`` underneath).
* :mod:`moda_cuda.reference` -- the pure-PyTorch definition every backend is tested against.
* :mod:`moda_cuda.compat` -- ``parallel_moda``, a drop-in for the reference MoDA Triton package.
* :func:`available_backends`, :func:`info` -- what can run here.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import ops as _ops  # registers torch.ops.moda.*
from ._spec import check_inputs  # noqa: F401  (public: validate without running)
from ._version import __version__
from .dispatch import available_backends
from .info import info

__all__ = ["moda_attention", "available_backends", "info", "__version__", "DepthStream"]


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
        return_lse: also return ``lse [B, Hq, T]`` (float32, natural log).
            With ``cu_seqlens``: ``[1, Hq, N]``.
        deterministic: ask for bitwise-repeatable gradients. By default the compiled
            backward (cuda backend, D = 64) accumulates dQ with float32 atomics, so dQ may
            differ in its last bits from run to run; with ``True`` it computes dQ in a
            kernel of its own (slower). The Triton and reference backwards always are
            repeatable (every gradient element is reduced by one program in a fixed order).
        backend: ``"auto"`` (fastest available that serves the input; ``MODA_BACKEND``
            overrides), or one of :func:`available_backends`, which then must serve it.

    ``Hq`` must be a multiple of ``Hk``; query head ``h`` reads kv head ``h // (Hq // Hk)``.
    Returns ``out [B, T, Hq, D]`` in q's dtype (and ``lse`` when ``return_lse``).
    Differentiable in q, k, v, depth_k and depth_v.
    """
    _ops.check_call(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend, cu_seqlens,
                    max_seqlen)
    out, lse = _ops.attention_op(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend,
                                 cu_seqlens, max_seqlen)
    return (out, lse) if return_lse else out


def __getattr__(name: str):
    # Layers and the depth stream import lazily: the kernels do not need them.
    if name == "DepthStream":
        from .depth_stream import DepthStream

        return DepthStream
    if name == "layers":
        import importlib

        return importlib.import_module(".layers", __name__)
    raise AttributeError(f"module 'moda_cuda' has no attribute {name!r}")
