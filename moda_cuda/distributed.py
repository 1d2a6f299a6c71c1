"""Context parallelism: MoDA attention over a sequence sharded across the ranks of a group.

Each of the ``W`` ranks of a process group holds a shard of the sequence (``layout``, see
:mod:`moda_cuda._sequence_shards`): ``q [B, T/W, Hq, D]``, ``k, v [B, T/W, Hk, D]`` and the
depth rows of its own positions, ``depth_k, depth_v [B, T/W, L, Hk, D]``.
:func:`context_parallel_moda_attention` returns the rank's shard of what
:func:`moda_cuda.moda_attention` returns for the whole sequence, and its gradients.

The ring
--------
Only the sequence keys and values travel. At step ``s`` rank ``r`` holds the k/v of rank
``r - s`` (mod ``W``): step 0 its own, then each step it passes the block it holds to rank
``r + 1`` and receives one from rank ``r - 1`` (point-to-point, ``torch.distributed``). The
next exchange is posted before the current block is computed, so the transfer overlaps the
compute.

Why the result is exact
-----------------------
1. *Depth stays local.* A query's depth keys are the rows of positions in its own depth
   chunk. A chunk never crosses a piece boundary (checked, ValueError), so they all sit on
   the query's rank, in the same relative order as in the whole sequence (a rank's pieces
   are concatenated in position order), and chunk boundaries fall at the same local rows.
   Step 0, one call of the op on the own shard with the depth rows, ``causal`` and
   ``depth_chunk``, therefore sees exactly the query's depth keys and its own shard's
   sequence keys under the whole sequence's masks.
2. *The softmax splits over disjoint key blocks.* For a query row and key sets ``K1, K2``
   with no key in common, ``lse(K1 u K2) = logaddexp(lse(K1), lse(K2))`` and
   ``out(K1 u K2) = exp(lse(K1) - lse) out(K1) + exp(lse(K2) - lse) out(K2)``. Every key of
   the sequence is in exactly one block: step 0 holds the own shard's keys, step ``s`` the
   keys of rank ``r - s``. A piece of queries sees a piece of another rank's keys entirely
   or not at all (pieces do not overlap, so one lies wholly before the other), so each step
   is a few sequence-only, non-causal calls on pairs of equal-length pieces
   (``visible_blocks``: the op takes q and k of one length). The running ``(out, lse)`` is
   merged in float32 (float64 for float64 inputs). Step 0 always sees at least one key (the
   own position when causal), so the running lse is finite from the start.
3. *The backward splits the same way.* With the whole row's ``P = exp(S - lse)`` and
   ``delta = rowsum(dO * O) - dlse``, every gradient is a sum over columns:
   ``dS = P (dP - delta)``, ``dQ_i = scale sum_j dS_ij k_j``, ``dK_j = scale sum_i dS_ij q_i``,
   ``dV_j = sum_i P_ij dO_i``. The op's backward, given the *global* ``out`` and ``lse`` of its
   rows (and the global ``dlse``), computes exactly one block's columns of these sums. dQ
   is summed over the blocks on the query's rank; dK/dV of a rank's keys are summed over
   the ranks whose queries read them: an accumulator (float32) travels the ring with the
   k/v, each rank adds its part, and after ``W`` hops it is back with the keys' owner (as in
   ring-flash-attention). Depth gradients come from step 0 alone.

Communication per call: the forward passes k/v ``W - 1`` times; the backward passes k/v
``W - 1`` times and the dK/dV accumulator ``W`` times. Depth-only attention (``k = v =
None``) communicates nothing. Every rank must call with the same shapes and options, like
any collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._ring_exchange import RingExchange
from ._spec import lse_dtype
from ._sequence_shards import check_layout, pieces_per_rank, sequence_positions, shard_sequence, visible_blocks
from .ops import attention_op, check_call

__all__ = ["context_parallel_moda_attention", "ContextParallel", "shard_sequence", "sequence_positions"]


class _Options(NamedTuple):
    scale: Optional[float]
    causal: bool
    depth_chunk: int
    deterministic: bool
    backend: str


def context_parallel_moda_attention(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    depth_k: Optional[torch.Tensor] = None,
    depth_v: Optional[torch.Tensor] = None,
    *,
    group: Optional[dist.ProcessGroup] = None,
    layout: str = "contiguous",
    scale: Optional[float] = None,
    causal: bool = True,
    depth_chunk: int = 1,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`moda_cuda.moda_attention` of a sequence sharded over the ranks of ``group``.

    Args:
        q, k, v, depth_k, depth_v: this rank's shard (``[B, T/W, ...]``; depth rows of its own
            positions); k, v may both be None (depth-only: no communication).
        group: the process group (None: the default one); all its ranks call together.
        layout: ``"contiguous"`` (rank ``r`` holds positions ``[r*T/W, (r+1)*T/W)``) or
            ``"zigzag"`` (the sequence cut into ``2W`` pieces; rank ``r`` holds pieces ``r`` and
            ``2W-1-r``, in that order: balanced work under causal masking).
            :func:`shard_sequence` cuts a whole-sequence tensor accordingly.
        scale, causal, depth_chunk, deterministic, backend: as in ``moda_attention``, for the
            whole sequence. A depth chunk must not cross a shard (zigzag: a piece) boundary.
        return_lse: also return this rank's shard of ``lse [B, Hq, T/W]``.

    Returns this rank's shard of ``out`` (and ``lse``), equal to the whole-sequence op's at
    these positions up to rounding. Differentiable in all five inputs and through ``lse``.
    Raises ValueError/TypeError before any compute or communication on a bad call.
    """
    ring = _check_call(q, k, v, depth_k, depth_v, group, layout, scale, causal, depth_chunk, return_lse,
                       deterministic, backend)
    options = _Options(scale, causal, depth_chunk, deterministic, backend)
    if k is None:  # depth-only: every key of a query is on its own rank
        out, lse = attention_op(q, None, None, depth_k, depth_v, *options)
    else:
        out, lse = _RingAttention.apply(q, k, v, depth_k, depth_v, ring, layout, options)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- checks


def _check_call(q, k, v, depth_k, depth_v, group, layout, scale, causal, depth_chunk, return_lse, deterministic,
                backend) -> RingExchange:
    check_layout(layout)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    check_call(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend)
    _check_process_group(group)
    ring = RingExchange(group)
    _check_depth_chunk(q.shape[1], ring.world_size, layout, depth_chunk)
    return ring


def _check_process_group(group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("context parallelism needs torch.distributed initialised (init_process_group)")
    if group is None:
        return
    # new_group() hands ranks outside the group this marker rather than a ProcessGroup.
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("this rank is not a member of the given group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("this rank is not a member of the given group")


def _check_depth_chunk(local_len: int, world_size: int, layout: str, depth_chunk: int) -> None:
    n = pieces_per_rank(layout)
    if local_len % n:
        raise ValueError(f"a {layout} shard holds {n} equal pieces: its length {local_len} must be a multiple of {n}")
    piece = local_len // n
    if world_size * n > 1 and piece % depth_chunk:
        raise ValueError(f"depth_chunk {depth_chunk} would cross a piece boundary: the {layout} layout over "
                         f"{world_size} ranks cuts the sequence into pieces of {piece} positions, and a depth "
                         "chunk must lie within one (depth never leaves its rank)")


# ----------------------------------------------------------------------------- the ring


def _per_row(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T]`` row statistics -> ``[B, T, H, 1]``, to scale ``out [B, T, H, D]``."""
    return x.transpose(1, 2).unsqueeze(-1)


class _RunningSoftmax:
    """``out`` and ``lse`` of each query row over the key blocks merged so far."""

    def __init__(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        dtype = lse_dtype(out.dtype)
        self.out, self.lse = out.to(dtype), lse.to(dtype)

    def merge(self, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Add a block of keys seen by query ``rows`` (disjoint from the blocks merged before)."""
        acc_out, acc_lse = self.out[:, rows], self.lse[:, :, rows]
        lse = lse.to(acc_lse.dtype)
        merged = torch.logaddexp(acc_lse, lse)
        acc_out.mul_(_per_row(torch.exp(acc_lse - merged)))
        acc_out.add_(out.to(acc_out.dtype) * _per_row(torch.exp(lse - merged)))
        acc_lse.copy_(merged)


def _ring_forward(q, k, v, depth_k, depth_v, ring: RingExchange, layout: str, o: _Options):
    W, rank = ring.world_size, ring.rank
    kv = torch.stack((k, v))  # one message per step
    incoming = ring.pass_on(kv) if W > 1 else None
    out, lse = attention_op(q, k, v, depth_k, depth_v, *o)  # own block, with the depth rows
    if W == 1:
        return out, lse
    running = _RunningSoftmax(out, lse)
    for step in range(1, W):
        kv = incoming.wait()
        if step + 1 < W:
            incoming = ring.pass_on(kv)
        for rows, cols in visible_blocks(rank, (rank - step) % W, W, layout, o.causal, q.shape[1]):
            block_out, block_lse = attention_op(q[:, rows], kv[0][:, cols], kv[1][:, cols], None, None, o.scale,
                                                False, 1, o.deterministic, o.backend)
            running.merge(rows, block_out, block_lse)
    return running.out.to(q.dtype), running.lse.to(lse.dtype)


def _op_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, causal, depth_chunk, o: _Options):
    # Row statistics are read as contiguous [B, Hq, T] by the kernels: slices are copied.
    return torch.ops.moda.attention_backward(grad_out, grad_lse.contiguous(), q, k, v, depth_k, depth_v, out,
                                             lse.contiguous(), o.scale, causal, depth_chunk, o.deterministic,
                                             o.backend)


def _ring_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, ring: RingExchange, layout: str,
                   o: _Options):
    W, rank = ring.world_size, ring.rank
    kv = torch.stack((k, v))
    incoming = ring.pass_on(kv) if W > 1 else None
    dq, dk, dv, ddk, ddv = _op_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, o.causal,
                                        o.depth_chunk, o)
    if depth_k is None:
        ddk = ddv = None  # the op's placeholders for absent inputs
    if W == 1:
        return dq, dk, dv, ddk, ddv
    acc = lse_dtype(q.dtype)
    dq = dq.to(acc)
    # The dK/dV accumulator of the k/v this rank holds; it follows them around the ring.
    returning = ring.pass_on(torch.stack((dk, dv)).to(acc))
    for step in range(1, W):
        kv = incoming.wait()
        if step + 1 < W:
            incoming = ring.pass_on(kv)
        block_grads = []
        for rows, cols in visible_blocks(rank, (rank - step) % W, W, layout, o.causal, q.shape[1]):
            gq, gk, gv, _, _ = _op_backward(grad_out[:, rows], grad_lse[:, :, rows], q[:, rows], kv[0][:, cols],
                                            kv[1][:, cols], None, None, out[:, rows], lse[:, :, rows], False, 1, o)
            dq[:, rows] += gq
            block_grads.append((cols, gk, gv))
        dkv = returning.wait()  # the held k/v's gradients from the ranks before this one
        for cols, gk, gv in block_grads:
            dkv[0][:, cols] += gk
            dkv[1][:, cols] += gv
        returning = ring.pass_on(dkv)
    dkv = returning.wait()  # this rank's own k/v, every rank's part added
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), ddk, ddv


class _RingAttention(torch.autograd.Function):
    """``(out, lse)`` of this rank's queries over the whole sequence's keys (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, depth_k, depth_v, ring: RingExchange, layout: str, options: _Options):
        out, lse = _ring_forward(q, k, v, depth_k, depth_v, ring, layout, options)
        ctx.save_for_backward(q, k, v, depth_k, depth_v, out, lse)
        ctx.ring, ctx.layout, ctx.options = ring, layout, options
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, depth_k, depth_v, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grads = _ring_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, ctx.ring, ctx.layout,
                               ctx.options)
        return grads + (None, None, None)


# ----------------------------------------------------------------------------- for models


@dataclass(frozen=True)
class ContextParallel:
    """A process group over which the sequence is sharded, and the layout of the shards
    (what :meth:`moda_cuda.layers.MoDAForCausalLM.enable_context_parallel` takes)."""

    group: Optional[dist.ProcessGroup] = None
    layout: str = "contiguous"

    def __post_init__(self) -> None:
        check_layout(self.layout)
        _check_process_group(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def positions(self, local_len: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Positions in the whole sequence of this rank's ``local_len`` rows (int64)."""
        return sequence_positions(local_len, self.rank, self.world_size, self.layout, device)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of the whole-sequence tensor ``x``."""
        return shard_sequence(x, self.rank, self.world_size, self.layout, dim)

    def attention(self, q, k, v, depth_k=None, depth_v=None, **options):
        """:func:`context_parallel_moda_attention` over this group and layout."""
        return context_parallel_moda_attention(q, k, v, depth_k, depth_v, group=self.group, layout=self.layout,
                                               **options)
