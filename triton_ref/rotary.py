"""Rotary embedding in one launch, with or without autograd.

``moda_cuda.layers.apply_rotary`` computes ``[x1 cos - x2 sin, x2 cos + x1 sin]`` in float32
with PyTorch ops: an upcast, four products, a difference, a sum, a concatenation and a
downcast, nine kernels per call. A decode step of the byte-level LM calls it three times per
block (queries, keys, the MLP's depth keys), a third of the kernels its CUDA graph replays
(``docs/performance.md``, "In a model"). This kernel does the same arithmetic in one launch,
and can copy a second tensor of the same shape in it: the values that a layer writes into
its depth slot beside the rotated keys, one launch instead of two.

Why the result is PyTorch's bit for bit: the inputs are widened to float32 exactly, each
product, the difference and the sum are rounded to float32 once each, in the same order
(floating-point contraction into fused multiply-adds is switched off for this kernel), and
the result is rounded to x's dtype once, as ``Tensor.to`` does. Tables in half precision (a
model moved to bf16 moves its rotary buffers too) are widened exactly, as PyTorch's type
promotion widens them.

Training: :class:`RotaryIntoSlot` writes a layer's rotated keys and its values into the depth
slot it appends, differentiably (the slot's views carry the history of k and v), so the
append copies nothing there either. :class:`FusedRotary` is the differentiable form of the
plain rotation, one launch forward and one backward (autograd through the PyTorch ops runs
about seven kernels each way). The gradient
of ``y1 = x1 c - x2 s, y2 = x2 c + x1 s`` is ``dx1 = dy1 c + dy2 s, dx2 = dy2 c - dy1 s``:
the rotation by the negated angles, which the kernel computes with ``sin`` negated. It is
PyTorch's gradient bit for bit: autograd forms the same two products per output, negates
one (exact) and adds them (addition commutes exactly), in float32, then rounds to x's dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import launch


@triton.jit
def _rotary_kernel(X, COS, SIN, OUT, V, V_OUT, BT, T, H, stride_xb, stride_xt, stride_xh, stride_cb, stride_ct,
                   stride_ob, stride_ot, stride_oh, stride_vb, stride_vt, stride_vh, stride_wb, stride_wt, stride_wh,
                   HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   COPY_V: tl.constexpr, INVERSE: tl.constexpr):
    # BLOCK_T positions (b, t) of the flattened B * T, all their heads: [BLOCK_T, BLOCK_H, BLOCK_HALF].
    pos = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = (pos // T).to(tl.int64)[:, None, None]
    t = (pos % T).to(tl.int64)[:, None, None]
    h = tl.arange(0, BLOCK_H)[None, :, None]
    i = tl.arange(0, BLOCK_HALF)[None, None, :]
    i_ok = (pos < BT)[:, None, None] & (i < HALF)
    ok = i_ok & (h < H)
    x = X + b * stride_xb + t * stride_xt + h * stride_xh + i
    x1 = tl.load(x, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=ok, other=0.0).to(tl.float32)
    table = b * stride_cb + t * stride_ct + i
    cos = tl.load(COS + table, mask=i_ok, other=0.0).to(tl.float32)
    sin = tl.load(SIN + table, mask=i_ok, other=0.0).to(tl.float32)
    if INVERSE:  # rotation by -angle: the gradient of the rotation (module docstring)
        sin = -sin
    out = OUT + b * stride_ob + t * stride_ot + h * stride_oh + i
    tl.store(out, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=ok)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=ok)
    if COPY_V:  # the values beside their keys: same shape, copied as they are
        v = V + b * stride_vb + t * stride_vt + h * stride_vh + i
        v_out = V_OUT + b * stride_wb + t * stride_wt + h * stride_wh + i
        tl.store(v_out, tl.load(v, mask=ok), mask=ok)
        tl.store(v_out + HALF, tl.load(v + HALF, mask=ok), mask=ok)


ROTARY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Elements of each half that one program rotates: a position of the byte-level LM's keys
# (2 heads x 32) is 64, and one program per position (the kernel's first form) left most of
# its 128 threads idle on a memory-bound copy; positions are grouped up to this many.
_ELEMENTS_PER_PROGRAM = 2048


def _positions_per_program(positions: int, heads: int, half: int) -> int:
    per_position = triton.next_power_of_2(heads) * triton.next_power_of_2(half)
    return min(triton.next_power_of_2(positions), max(1, _ELEMENTS_PER_PROGRAM // per_position))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: Optional[torch.Tensor] = None,
           copy: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, inverse: bool = False) -> torch.Tensor:
    """``x [B, T, H, D]`` (unit last stride, D even) rotated by the tables ``cos, sin``
    (``[T, D / 2]``, or ``[B, T, D / 2]`` per sequence; one layout, unit last stride; widened to
    float32 as PyTorch's type promotion does), in x's dtype: into ``out`` (x's shape and dtype,
    unit last stride, e.g. a depth slot's view) or a new contiguous tensor. ``copy = (src,
    dst)``: two more tensors of x's shape and dtype (unit last stride); ``dst`` gets ``src`` in
    the same launch. ``inverse``: rotate by the negated angles. The caller checks devices and
    dtypes (``ROTARY_DTYPES`` for x and the tables)."""
    B, T, H, D = x.shape
    half = D // 2
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    per_sequence = cos.dim() == 3
    src, dst = copy if copy is not None else (x, out)  # unused without a copy
    sc, sx, so, sv, sw = cos.stride(), x.stride(), out.stride(), src.stride(), dst.stride()
    block_t = _positions_per_program(B * T, H, half)
    launch(_rotary_kernel, (triton.cdiv(B * T, block_t),),
           (x, cos, sin, out, src, dst, B * T, T, H, sx[0], sx[1], sx[2], sc[0] if per_sequence else 0, sc[-2],
            so[0], so[1], so[2], sv[0], sv[1], sv[2], sw[0], sw[1], sw[2]),
           dict(HALF=half, BLOCK_T=block_t, BLOCK_H=triton.next_power_of_2(H),
                BLOCK_HALF=triton.next_power_of_2(half), COPY_V=copy is not None, INVERSE=inverse),
           num_warps=4, enable_fp_fusion=False)
    return out


class FusedRotary(torch.autograd.Function):
    """``rotary(x, cos, sin, inverse=inverse)``, differentiable in x: the gradient is the
    rotation the other way, by this Function again (so it is differentiable too, to any
    order); the tables get none (they are buffers). ``FusedRotary.apply(x, cos, sin, False)``."""

    @staticmethod
    def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
        return rotary(x, cos, sin, inverse=inverse)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, cos, sin, inverse = inputs
        ctx.save_for_backward(cos, sin)
        ctx.inverse = inverse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return FusedRotary.apply(grad, cos, sin, not ctx.inverse), None, None, None


class RotaryIntoSlot(torch.autograd.Function):
    """``k`` rotated into ``k_slot`` and ``v`` copied into ``v_slot`` in one launch (a depth
    slot's views, ``DepthStream.next_slot``), differentiable in ``k`` and ``v``: returns the two
    views (same storage, shape and strides), whose gradients go to ``v`` as they are and to
    ``k`` rotated back (:class:`FusedRotary` with the angles negated).
    ``RotaryIntoSlot.apply(k, v, cos, sin, k_slot, v_slot)``."""

    @staticmethod
    def forward(k, v, cos, sin, k_slot, v_slot):
        rotary(k, cos, sin, out=k_slot, copy=(v, v_slot))
        # Detached: plain tensors on the slots' storage, which autograd makes outputs of this
        # Function (not views of a base it would track); they share the slots' version counter.
        return k_slot.detach(), v_slot.detach()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, _, cos, sin, _, _ = inputs
        ctx.save_for_backward(cos, sin)

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        if grad_k is not None:
            grad_k = FusedRotary.apply(grad_k if grad_k.stride(-1) == 1 else grad_k.contiguous(), cos, sin, True)
        return grad_k, grad_v, None, None, None, None
