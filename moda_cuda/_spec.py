"""Input validation shared by every backend.

All checks happen here, before any kernel runs, so that every backend sees the same
well-formed problem and every user sees the same error message for the same mistake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The kernels index a batch entry (dispatch) or a cache row (kvcache) with 32-bit offsets.
MAX_INT32 = 2**31 - 1


def check_max_seqlen_alone(cu_seqlens, max_seqlen) -> None:
    """``max_seqlen`` describes packed documents: given without ``cu_seqlens`` it is a mistake."""
    if cu_seqlens is None and max_seqlen is not None:
        raise ValueError(f"max_seqlen ({max_seqlen!r}) is given without cu_seqlens; it is the longest packed document")


def effective_depth_chunk(depth_chunk: int, seqlen: int) -> int:
    """``depth_chunk`` capped at the sequence length: every C >= T means one chunk (with packed
    documents, T is the packed length, at least any document's), and the backends size work
    and 32-bit offsets by C."""
    return min(depth_chunk, max(seqlen, 1))


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of lse (and of the arithmetic behind it): float32, except that float64 inputs
    keep float64 (exact gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class MoDAShape:
    """Sizes of one MoDA problem, derived from validated inputs."""

    batch: int
    seqlen: int
    q_heads: int
    kv_heads: int
    head_dim: int
    depth: int  # L: depth slots per position (0 when there is no depth)
    has_seq: bool  # sequence keys/values present (False: depth-only attention)

    @property
    def group(self) -> int:
        """G: query heads sharing one kv head."""
        return self.q_heads // self.kv_heads

    @property
    def has_keys(self) -> bool:
        """False only for depth-only attention with L = 0: every query sees nothing."""
        return self.has_seq or self.depth > 0


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_pair(a: Optional[torch.Tensor], b: Optional[torch.Tensor], names: str) -> None:
    if (a is None) != (b is None):
        raise ValueError(f"{names} must be given together or both be None")
    for name, t in zip(names.split(" and "), (a, b)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")


def check_inputs(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    depth_k: Optional[torch.Tensor],
    depth_v: Optional[torch.Tensor],
    scale: Optional[float],
    causal: bool,
    depth_chunk: int,
) -> MoDAShape:
    """Validate a MoDA call and return its sizes; raise ValueError/TypeError on bad input."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, T, Hq, D] (4 dims), got {_shape(q)}")
    _check_pair(k, v, "k and v")
    _check_pair(depth_k, depth_v, "depth_k and depth_v")
    if k is None and depth_k is None:
        raise ValueError("nothing to attend to: give k/v, depth_k/depth_v, or both")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if isinstance(depth_chunk, bool) or not isinstance(depth_chunk, int):
        raise TypeError(f"depth_chunk must be an int, got {type(depth_chunk).__name__}")
    if depth_chunk < 1:
        raise ValueError(f"depth_chunk must be >= 1, got {depth_chunk}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")

    B, T, Hq, D = q.shape
    if T < 1 or B < 1 or Hq < 1 or D < 1:
        raise ValueError(f"q must have non-empty B, T, Hq and D, got {_shape(q)}")
    named = [("k", k), ("v", v), ("depth_k", depth_k), ("depth_v", depth_v)]
    for name, t in named:
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all inputs share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs share one device")

    Hk = None
    if k is not None:
        if k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"k and v must have shape [B, T, Hk, D], got {_shape(k)} and {_shape(v)}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {_shape(k)} and {_shape(v)}")
        if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
            raise ValueError(f"k must have shape [B={B}, T={T}, Hk, D={D}] to match q {_shape(q)}, got {_shape(k)}")
        Hk = k.shape[2]
    L = 0
    if depth_k is not None:
        if depth_k.dim() != 5 or depth_v.dim() != 5:
            raise ValueError(
                f"depth_k and depth_v must have shape [B, T, L, Hk, D], got {_shape(depth_k)} and {_shape(depth_v)}"
            )
        if depth_k.shape != depth_v.shape:
            raise ValueError(f"depth_k and depth_v must have the same shape, got {_shape(depth_k)} and {_shape(depth_v)}")
        dB, dT, L, dHk, dD = depth_k.shape
        if dB != B or dT != T or dD != D:
            raise ValueError(
                f"depth_k must have shape [B={B}, T={T}, L, Hk, D={D}] to match q {_shape(q)}, got {_shape(depth_k)}"
            )
        if Hk is not None and dHk != Hk:
            raise ValueError(f"depth_k has {dHk} kv heads but k has {Hk}; they must match")
        Hk = dHk
    if Hk < 1 or Hq % Hk != 0:
        raise ValueError(f"q heads ({Hq}) must be a positive multiple of kv heads ({Hk})")
    return MoDAShape(B, T, Hq, Hk, D, L, k is not None)


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    return float(scale) if scale is not None else head_dim**-0.5


def check_cu_seqlens(q: torch.Tensor, cu_seqlens, max_seqlen) -> None:
    """Everything about ``cu_seqlens`` / ``max_seqlen`` that needs no look at the offsets'
    values (those are checked by :func:`packed_documents`, which reads them once)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 (as in flash-attn's varlen API), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [n_docs + 1] with n_docs >= 1, got {_shape(cu_seqlens)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; it must be on q's device")
    if q.dim() == 4 and q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the documents are packed into batch 1: q must be [1, N, Hq, D], "
                         f"got {_shape(q)}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
        raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")


def packed_documents(cu_seqlens: torch.Tensor, total: int, max_seqlen: Optional[int]) -> "PackedDocuments":
    """Check the offsets' values and describe the documents.

    Reading the offsets is a device-to-host copy, which waits for the GPU. A model calls the
    op with the same ``cu_seqlens`` in every layer, forward and backward, so the result is
    kept on the tensor (keyed by its version counter, which any in-place change bumps): one
    read per ``cu_seqlens`` tensor, not one per call. A change that bumps no version (through
    ``.data`` or memory shared with numpy) is not seen.
    """
    cached = getattr(cu_seqlens, "_moda_documents", None)
    if cached is not None and cached[0] == cu_seqlens._version and cached[1].offsets[-1] == total:
        docs = cached[1]
    else:
        docs = _read_documents(cu_seqlens, total)
        cu_seqlens._moda_documents = (cu_seqlens._version, docs)
    if max_seqlen is not None and max_seqlen < docs.max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest document ({docs.max_seqlen})")
    return docs


def _read_documents(cu_seqlens: torch.Tensor, total: int) -> "PackedDocuments":
    offsets = tuple(int(x) for x in cu_seqlens.tolist())
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {list(offsets)}")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens must end at the packed length N = {total}, got {offsets[-1]}")
    return PackedDocuments(cu_seqlens, offsets, max(b - a for a, b in zip(offsets, offsets[1:])))


class PackedDocuments:
    """Documents packed into the time axis: document i holds positions
    ``[offsets[i], offsets[i + 1])``; empty documents hold none.

    ``bounds()`` gives every position its document's ``[start, end)`` as two int32 device
    tensors (what the Triton and CUDA kernels read), computed on the device at the first
    call and kept (the object itself is kept per ``cu_seqlens`` tensor: ``packed_documents``).
    """

    def __init__(self, cu_seqlens: torch.Tensor, offsets: Tuple[int, ...], max_seqlen: int):
        self.cu_seqlens, self.offsets, self.max_seqlen = cu_seqlens, offsets, max_seqlen
        self._bounds = None

    def spans(self):
        """(start, end) of every non-empty document."""
        return [(a, b) for a, b in zip(self.offsets, self.offsets[1:]) if b > a]

    def bounds(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._bounds is None:
            cu = self.cu_seqlens.long()
            total = self.offsets[-1]
            doc = torch.repeat_interleave(torch.arange(len(self.offsets) - 1, device=cu.device), cu.diff(),
                                          output_size=total)
            self._bounds = (cu[doc].int().contiguous(), cu[doc + 1].int().contiguous())
        return self._bounds
