"""Rotary position embeddings (rotate-half convention) for the layers: the tables, positions
that restart per packed document, and :func:`apply_rotary`, which runs the one-launch Triton
kernel (``triton_ref/rotary.py``) where it serves the input and PyTorch's ops elsewhere.

What runs where is decided here, by :func:`fused_rotary_serves`; the kernels know nothing of
it. Both paths give the same result and gradient bit for bit (the kernel's float32 math is
PyTorch's, in the same order), so a model's numbers do not depend on which one ran.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .eager import usable

__all__ = ["Rope", "rotary_tables", "RotaryEmbedding", "document_positions", "packed_rope", "fused_rotary_serves",
           "apply_rotary"]

Rope = Tuple[torch.Tensor, torch.Tensor]  # cos, sin: [T, head_dim // 2] each ([B, T, head_dim // 2] decoding)


def rotary_tables(head_dim: int, seqlen: int, theta: float = 10000.0, device=None) -> Rope:
    """``cos, sin [seqlen, head_dim // 2]`` (float32) for :func:`apply_rotary`."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for rotary embeddings (rotate-half convention), cached up to ``max_len``."""

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        cos, sin = rotary_tables(head_dim, max_len, theta)
        # Not persistent: derived from the config, so checkpoints stay small and portable.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, seqlen: int) -> Rope:
        if seqlen > self.cos.shape[0]:
            raise ValueError(f"sequence length {seqlen} exceeds the rotary table ({self.cos.shape[0]})")
        return self.cos[:seqlen], self.sin[:seqlen]


def document_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each packed position's index within its document: ``[total]`` int64, on the device of
    ``cu_seqlens`` (computed there, no host sync)."""
    cu = cu_seqlens.long()
    lengths = cu.diff()
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu.device) - starts


def packed_rope(rope: Optional[Rope], cu_seqlens: Optional[torch.Tensor], total: int) -> Optional[Rope]:
    """Rotary tables for packed documents: the rows of each position's in-document index."""
    if rope is None or cu_seqlens is None:
        return rope
    positions = document_positions(cu_seqlens, total)
    return rope[0][positions], rope[1][positions]


def fused_rotary_serves(x: torch.Tensor, rope: Rope) -> bool:
    """Where the one-launch kernel (``triton_ref.rotary``, PyTorch's result and gradient bit
    for bit) runs instead of nine PyTorch kernels: plain CUDA tensors, tables without
    gradients, outside tracing, modes and functorch transforms (``eager.usable``)."""
    if not x.is_cuda or not usable(x) or rope[0].requires_grad or rope[1].requires_grad:
        return False
    try:
        from .triton_ref.rotary import ROTARY_DTYPES  # imports Triton: only where it can run
    except ImportError:  # no Triton on this machine
        return False
    cos, sin = rope
    B, T, _, D = x.shape
    return (x.dtype in ROTARY_DTYPES and x.stride(-1) == 1
            and tuple(cos.shape) in ((T, D // 2), (B, T, D // 2)) and cos.shape == sin.shape
            and cos.device == x.device and sin.device == x.device
            and cos.dtype in ROTARY_DTYPES and cos.dtype == sin.dtype
            and cos.stride(-1) == 1 and cos.stride() == sin.stride())


def apply_rotary(x: torch.Tensor, rope: Rope, out: Optional[torch.Tensor] = None,
                 copy: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by position (float32 math or wider, result in x's dtype). The
    tables are ``[T, D / 2]``, or ``[B, T, D / 2]`` where sequences sit at different positions
    (decoding). ``out`` (x's shape and dtype; not differentiable): written and returned.
    ``copy = (src, dst)`` (not differentiable): ``dst.copy_(src)`` as well, in the same launch
    where the fused kernel runs (a layer's values going into its depth slot beside the keys)."""
    others = ([] if out is None else [out]) + ([] if copy is None else list(copy))
    differentiable = torch.is_grad_enabled() and x.requires_grad
    if fused_rotary_serves(x, rope) and all(t.shape == x.shape and t.dtype == x.dtype and t.device == x.device
                                             and t.stride(-1) == 1 for t in others):
        from .triton_ref.rotary import FusedRotary, rotary

        if not differentiable:
            return rotary(x, *rope, out=out, copy=copy)
        if not others:  # out and copy are not differentiable: those take the PyTorch ops
            return FusedRotary.apply(x, *rope, False)
    cos, sin = (t[None, :, None, :] if t.dim() == 2 else t[:, :, None, :] for t in rope)
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # float64 kept
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    if copy is not None:
        copy[1].copy_(copy[0])
    return rotated if out is None else out.copy_(rotated)
