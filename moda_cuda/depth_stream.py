"""Preallocated depth key/value stream shared by the layers of one MoDA model.

Every MoDA layer reads the keys/values that earlier layers produced at the same positions
and then adds its own. The obvious implementation, ``torch.stack(previous_kvs, dim=2)`` in
every layer, copies O(L^2) slots over a forward pass and keeps all those copies alive for
backward. :class:`DepthStream` instead owns two buffers of shape ``[B, T, Lmax, Hk, D]``;
layer ``l`` copies its k/v into slot ``l`` once and reads slots ``[0, l)`` as a strided view
``buf[:, :, :l]`` that goes straight to the attention kernels: O(L) copies, O(L) memory.

How this stays correct under autograd
-------------------------------------
1. *Version counters.* A view shares the version counter of its base, so writing slot ``l``
   in place after an earlier layer saved ``buf[:, :, :l-1]`` for backward would make that
   backward fail ("modified by an inplace operation"). Readers therefore slice an *alias*
   of the buffer made with ``.data``: same storage, its own version counter. Appends write
   through the buffer itself and never bump the alias' counter. That is sound because a
   slot is written once per generation and every read only covers slots that were already
   written (``read(n)`` needs ``n <= length``), so no append ever changes data a reader saw.
2. *Gradient routing.* The alias carries no autograd history, so reads go through
   :class:`_DepthRead`, a custom autograd Function, and the gradients of all readers are
   summed in place into one pair of ``[B, T, Lmax, Hk, D]`` buffers per backward pass
   (:class:`_DepthGradSums`: the first gradient to arrive in a pass is stored, later ones
   added, and a second pass over a retained graph starts again). Each slot's gradient is
   handed to its appended tensor exactly once, by its *owner*: the first read that covered
   it. Every read takes the outputs of the read before it as (gradient-free) inputs, so the
   reads form one chain in creation order, and autograd's dependency counting
   runs a read's backward only after every consumer of its outputs and every later read
   (with, in turn, their consumers) has run. When an owner runs, every reader of its slots
   has therefore added its gradient, and the slot's sum is complete, exactly as the sum
   autograd forms over the copies of a stack-per-layer formulation.
   :meth:`DepthStream.attention` adds its depth gradients straight into the sums (the CUDA
   backward does it in its epilogue); gradients reaching a read from any other consumer are
   added by the read's backward (one add of ``[B, T, n]``).
3. *Reuse.* :meth:`DepthStream.reset` starts a new generation: it bumps the old aliases'
   version counters (``torch.autograd.graph.increment_version``; those of the readers and
   of the slots written in place with gradients, see :meth:`DepthStream.next_slot`), so a
   backward through a graph built before the reset fails loudly instead of reading
   overwritten slots, and later reads use a fresh alias. Reusing a stream is therefore
   always explicit.
4. *Activation checkpointing* (``torch.utils.checkpoint``, ``use_reentrant=False``)
   re-runs a layer's forward during backward, so the layer appends its slot a second
   time. Layers pass their slot index (``append(k, v, slot=i)``) and the slots they read
   (``read(n)``, ``attention(.., n)``): a default taken from the stream's length in a
   recomputation would differ from the forward's, so it raises there. A write to an
   already-written slot is accepted only while autograd is running a backward (that is,
   during recomputation) and then leaves the slot as it is: its contents are what the
   forward readers saw, so the recomputed graph sees the same values even when the
   recomputation is not bit-identical. Outside backward such a write is a ValueError. The
   recomputation's reads own no slot (every slot already has its owner), and autograd
   runs the original graph's nodes, so the gradient sums see each reader once.
   ``use_reentrant=True`` is refused (a RuntimeError in backward): it runs the forward
   without gradients, so no read owns the region's slots and its appends keep no history,
   and it backpropagates the recomputed nodes in a nested backward pass, whose sums would
   start from zero. Both are detected: a recomputed append that has a history its forward
   lacked, and a stream node built in one backward pass that runs in another.

Under ``torch.no_grad()`` / ``torch.inference_mode()`` reads return the plain view (no
autograd Function, no copy) and appended tensors are not kept alive. A layer may write the
next slot in place through :meth:`DepthStream.next_slot` (its rotary kernel stores the
rotated keys and the values there directly; with gradients, through an autograd Function
whose outputs are the slot's views) and append those views, which copies nothing.

Outside the kernels, whose gradient traffic for the depth rows is inherent, the depth part
of the backward thus moves O(L) slots, where the stack-per-layer formulation adds O(L^2)
slot gradients (one per reader and slot) and copies O(L^2) slots in the forward.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import eager

__all__ = ["DepthStream"]


def _graph_task_id() -> int:
    """The backward pass the autograd engine runs on this thread, or -1 outside backward."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id() if graph_task_id is not None else -1


def _in_backward() -> bool:
    """True while the autograd engine runs a backward on this thread (checkpoint recompute)."""
    return _graph_task_id() != -1


_REENTRANT = ("torch.utils.checkpoint with use_reentrant=True is not supported around DepthStream reads "
              "and appends: it runs the forward without gradients and backpropagates the recomputed "
              "layer in a nested backward pass, which the stream's per-pass gradient sums cannot follow "
              "(the depth gradients would come out wrong). Use checkpoint(..., use_reentrant=False).")


def _refuse_implicit_in_recomputation(method: str, argument: str) -> None:
    """A checkpointed region runs again in backward, when the stream holds every layer's slot:
    ``length`` then is not what it was in the forward, so a default taken from it would read
    or write other slots than the forward did (wrong gradients, or a checkpoint error)."""
    if _in_backward() and torch.is_grad_enabled():
        raise ValueError(f"DepthStream.{method}() inside a checkpointed region needs an explicit {argument}= "
                         f"(its default, the stream's current length, changes by the time the region is "
                         f"recomputed in backward)")


def _check_not_nested(created_in: int) -> None:
    """Refuse the backward of a stream node that was built during one backward pass (a
    checkpoint recomputation) and runs in another: only a reentrant checkpoint does that.
    (A non-reentrant recomputation only refills saved tensors; its nodes never run.)"""
    if created_in != -1 and created_in != _graph_task_id():
        raise RuntimeError(_REENTRANT)


class _DepthGradSums:
    """Sums of the depth gradients of one stream generation, ``[B, T, Lmax, Hk, D]`` each.

    Allocated when a backward pass first asks for them, and again by the next backward pass
    (``retain_graph``), so that every pass sums from zero; slots handed out earlier stay views
    of the sums of their own pass. Not zeroed: the first gradient to arrive is *stored* into
    its slots (``for_backward``: the kernel writes instead of adding), and slots are zeroed
    only when a later reader covers more slots than were stored so far. A model's last layer
    reads every slot and runs its backward first, so there nothing is ever zeroed and the
    first depth backward reads no sums: a memset and a read of the whole buffer saved.
    """

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        self._like = dict(size=shape, dtype=dtype, device=device)
        self._task: Optional[int] = None
        self._k: Optional[torch.Tensor] = None
        self._v: Optional[torch.Tensor] = None
        self._valid = 0  # slots [0, _valid) hold this pass's sums (stored, added or zeroed)

    def _allocate(self) -> torch.Tensor:
        return torch.empty(**self._like)

    def _this_pass(self) -> None:
        task = _graph_task_id()
        if self._k is None or task != self._task:
            self._k, self._v = self._allocate(), self._allocate()
            self._task, self._valid = task, 0

    def _views(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._k[:, :, :n], self._v[:, :, :n]

    def first(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views of the sums of slots ``[0, n)``, in the current backward pass (zero where no
        gradient arrived yet), to add to or to hand out."""
        self._this_pass()
        if n > self._valid:
            self._k[:, :, self._valid:n].zero_()
            self._v[:, :, self._valid:n].zero_()
            self._valid = n
        return self._views(n)

    def for_backward(self, n: int) -> Tuple[Tuple[torch.Tensor, torch.Tensor], bool]:
        """``((sum_k, sum_v), accumulate)``: views of slots ``[0, n)`` for a backward that writes the
        depth gradients of all ``n`` slots, and whether it must add them to the sums (False: nothing
        arrived in this pass yet, it stores them)."""
        self._this_pass()
        if self._valid == 0:
            self._valid = n
            return self._views(n), False
        return self.first(n), True


class _DepthRead(torch.autograd.Function):
    """``(alias_k[:, :, :n], alias_v[:, :, :n])``, a link of the stream's chain of reads.

    Inputs: the gradient sums; the two aliases; ``n``; the slots ``k_idx``/``v_idx`` this read
    owns (hands gradients to); which outputs are differentiable; the previous read's outputs
    ``prev_k``/``prev_v`` (or None: inputs only to order the backward passes, they get no
    gradient); then the appended k tensors of ``k_idx`` followed by the v tensors of ``v_idx``.
    """

    @staticmethod
    def forward(ctx, sums: _DepthGradSums, alias_k, alias_v, n: int, k_idx: Tuple[int, ...],
                v_idx: Tuple[int, ...], k_differentiable: bool, v_differentiable: bool,
                prev_k: Optional[torch.Tensor], prev_v: Optional[torch.Tensor], *slots: torch.Tensor):
        ctx.sums, ctx.n, ctx.k_idx, ctx.v_idx = sums, n, k_idx, v_idx
        ctx.created_in = _graph_task_id()
        ctx.set_materialize_grads(False)
        # Slices of the aliases, not of the buffers: they share the alias' version counter,
        # which appends never touch (see the module docstring). `.detach()` makes them plain
        # (non-differentiable) views, so autograd treats them as ordinary outputs of this
        # Function rather than as views of its inputs, whose in-place rules would reject
        # the version bump of a later reset() with a confusing message.
        out_k, out_v = alias_k[:, :, :n].detach(), alias_v[:, :, :n].detach()
        if not k_differentiable:
            ctx.mark_non_differentiable(out_k)
        if not v_differentiable:
            ctx.mark_non_differentiable(out_v)
        return out_k, out_v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_k, grad_v):
        _check_not_nested(ctx.created_in)
        sum_k, sum_v = ctx.sums.first(ctx.n)
        if grad_k is not None:  # from consumers other than DepthStream.attention
            sum_k.add_(grad_k)
        if grad_v is not None:
            sum_v.add_(grad_v)
        # Every reader of the owned slots has run (module docstring, 2.): their sums are final.
        slot_gk = [sum_k[:, :, i] for i in ctx.k_idx]
        slot_gv = [sum_v[:, :, i] for i in ctx.v_idx]
        return (None,) * 10 + (*slot_gk, *slot_gv)


class _StreamAttention(torch.autograd.Function):
    """MoDA over ``(q, k, v)`` and a read's depth views whose depth gradients are added in
    place into the stream's gradient sums; autograd sees no gradient for the depth views.
    ``plan``/``documents`` come from ``eager.plan_call`` where the eager path is usable (the
    backends run directly), else None (the registered op runs)."""

    @staticmethod
    def forward(ctx, sums: _DepthGradSums, q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic,
                backend, cu_seqlens, max_seqlen, plan, documents):
        if plan is not None:
            out, lse = eager.forward(plan, q, k, v, depth_k, depth_v, causal, depth_chunk, documents)
        else:
            from .ops import attention_op

            out, lse = attention_op(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend,
                                    cu_seqlens, max_seqlen)
        ctx.save_for_backward(q, k, v, depth_k, depth_v, out, lse)
        ctx.sums, ctx.options = sums, (scale, causal, depth_chunk, deterministic, backend, cu_seqlens, max_seqlen)
        ctx.plan, ctx.documents = plan, documents
        ctx.created_in = _graph_task_id()
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from . import dispatch
        from .ops import resolve_and_backward_into_depth_sums

        _check_not_nested(ctx.created_in)
        q, k, v, depth_k, depth_v, out, lse = ctx.saved_tensors
        into, accumulate = ctx.sums.for_backward(depth_k.shape[2])
        plan = ctx.plan
        if plan is not None:
            _, causal, depth_chunk, deterministic = ctx.options[:4]
            grads = dispatch.backward_into_depth_sums(
                plan.backward_backend((q, k, v, depth_k, depth_v)), grad_out, q, k, v, depth_k, depth_v, out, lse, plan.scale,
                causal, depth_chunk, deterministic, into, ctx.documents, accumulate=accumulate)
        else:
            grads = resolve_and_backward_into_depth_sums(grad_out, q, k, v, depth_k, depth_v, out, lse,
                                                         *ctx.options, depth_grads_into=into, accumulate=accumulate)
        return (None, *grads) + (None,) * 11


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b address the same elements (same start, shape and strides). False while traced
    (fake tensors have no data pointer): the append then copies, as it always may."""
    if torch.compiler.is_compiling():
        return False
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class DepthStream:
    """Depth keys/values of up to ``max_layers`` slots for a ``[B, T]`` batch.

    Args:
        batch, seqlen: B and T of the activations that will be appended.
        max_layers: Lmax, the number of slots (for :class:`moda_cuda.layers.MoDABlock`,
            two per block: the attention k/v and the extra FFN k/v).
        kv_heads, head_dim: Hk and D of the appended k/v.
        dtype, device: of the buffers; appended tensors must match both.

    Typical use (one stream per forward pass)::

        stream = DepthStream(B, T, n_layers, Hk, D, dtype=x.dtype, device=x.device)
        for layer in layers:
            out = stream.attention(q, k, v)       # MoDA over k, v and all written slots
            stream.append(k, v)                   # k, v: [B, T, Hk, D]

    ``stream.read()`` gives the slots themselves (``[B, T, l, Hk, D]`` strided views) for
    any other use, e.g. ``moda_attention(q, k, v, *stream.read())``: the same values and
    gradients, with each layer's depth gradients returned and then summed by the stream.
    """

    def __init__(
        self,
        batch: int,
        seqlen: int,
        max_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ) -> None:
        sizes = dict(batch=batch, seqlen=seqlen, max_layers=max_layers, kv_heads=kv_heads, head_dim=head_dim)
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
        shape = (batch, seqlen, max_layers, kv_heads, head_dim)
        # Plain buffers: never require grad, never seen by autograd (appends run under no_grad).
        # Left uninitialised: a slot is only ever read after it was written.
        self._k = torch.empty(shape, dtype=dtype, device=device)
        self._v = torch.empty(shape, dtype=dtype, device=device)
        self._length = 0
        self._new_generation()

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> torch.Size:
        """``[B, T, Lmax, Hk, D]`` of each buffer."""
        return self._k.shape

    @property
    def max_layers(self) -> int:
        """Lmax: how many slots the stream can hold."""
        return self._k.shape[2]

    @property
    def length(self) -> int:
        """How many slots have been written since construction or the last :meth:`reset`."""
        return self._length

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    @property
    def device(self) -> torch.device:
        return self._k.device

    @property
    def k_buffer(self) -> torch.Tensor:
        """The whole key buffer ``[B, T, Lmax, Hk, D]`` (slots ``>= length`` hold stale or uninitialised data)."""
        return self._k

    @property
    def v_buffer(self) -> torch.Tensor:
        """The whole value buffer ``[B, T, Lmax, Hk, D]``."""
        return self._v

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        B, T, L, H, D = self.shape
        return (
            f"DepthStream(batch={B}, seqlen={T}, max_layers={L}, kv_heads={H}, head_dim={D}, "
            f"dtype={self.dtype}, device={self.device}, length={self._length})"
        )

    # ------------------------------------------------------------------ state
    def _new_generation(self) -> None:
        # `.data` gives an alias with its own version counter: reads slice it, appends write
        # through self._k/_v, so appends never invalidate tensors that readers saved.
        self._alias_k = self._k.data
        self._alias_v = self._v.data
        # Appended tensors that carry autograd history, per slot (None: appended without grad).
        self._k_slots: List[Optional[torch.Tensor]] = [None] * self.max_layers
        self._v_slots: List[Optional[torch.Tensor]] = [None] * self.max_layers
        # Whether a differentiable read already owns the slot (hands its gradient out).
        self._k_owned: List[bool] = [False] * self.max_layers
        self._v_owned: List[bool] = [False] * self.max_layers
        # Aliases behind the slot views next_slot() handed out with grad enabled, each with a
        # version counter of its own: reset() bumps them, as it bumps the readers' aliases.
        self._write_aliases: List[torch.Tensor] = []
        # Outputs of the last differentiable read: the next one chains onto them.
        self._last_read: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
        self._grad_sums = _DepthGradSums(self._k.shape, self._k.dtype, self._k.device)

    def reset(self) -> None:
        """Forget all slots so the buffers can be refilled (e.g. for the next batch).

        Any graph built from reads before the reset can no longer be backpropagated: its
        saved depth views, and the slot views :meth:`next_slot` gave out with gradients on
        (a layer attends with its own), are invalidated (a RuntimeError on backward),
        because the refill overwrites the values they point at. Call this after
        ``backward()`` (or build a new stream) when training.
        """
        torch.autograd.graph.increment_version([self._alias_k, self._alias_v, *self._write_aliases])
        self._length = 0
        self._new_generation()

    # ------------------------------------------------------------------ write
    def _check_slot_tensor(self, name: str, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        B, T, _, H, D = self.shape
        if tuple(x.shape) != (B, T, H, D):
            raise ValueError(f"{name} must have shape [B={B}, T={T}, Hk={H}, D={D}], got {list(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the stream holds {self.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the stream is on {self.device}")

    def append(self, k: torch.Tensor, v: torch.Tensor, *, slot: Optional[int] = None) -> int:
        """Write ``k, v [B, T, Hk, D]`` into the next slot and return its index.

        ``slot`` names the slot explicitly (layers do, so that activation checkpointing can
        replay them). It must equal :attr:`length`, except during a backward pass where a
        checkpointed layer recomputes its forward: then an already-written slot is left
        unchanged (see the module docstring).
        """
        self._check_slot_tensor("k", k)
        self._check_slot_tensor("v", v)
        if slot is None:
            _refuse_implicit_in_recomputation("append", "slot")
            slot = self._length
        elif isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"slot must be an int or None, got {type(slot).__name__}")
        if slot < 0 or slot > self._length:
            raise ValueError(f"slot {slot} is out of order: the next free slot is {self._length}")
        if slot < self._length:
            if _in_backward():  # checkpoint recomputation: keep what the forward readers saw
                if torch.is_grad_enabled() and ((k.requires_grad and self._k_slots[slot] is None)
                                                or (v.requires_grad and self._v_slots[slot] is None)):
                    # The forward appended this slot without gradients and the recomputation
                    # has them: a reentrant checkpoint, whose slot would get no depth gradient.
                    raise RuntimeError(_REENTRANT)
                return slot
            raise ValueError(
                f"slot {slot} was already written (length {self._length}); slots are write-once, "
                "call reset() to refill the stream"
            )
        if slot >= self.max_layers:
            raise ValueError(f"depth stream is full: all {self.max_layers} slots are written")
        with torch.no_grad():
            for src, dst in ((k, self._k[:, :, slot]), (v, self._v[:, :, slot])):
                if not _same_view(src, dst):  # written in place through next_slot(): nothing to copy
                    dst.copy_(src)
        if torch.is_grad_enabled():
            # Kept so that reads can route gradients to them (and only then).
            self._k_slots[slot] = k if k.requires_grad else None
            self._v_slots[slot] = v if v.requires_grad else None
        self._length = slot + 1
        return slot

    def next_slot(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views ``k, v [B, T, Hk, D]`` of the next free slot, to be written in place and then
        passed to :meth:`append`, which copies nothing for them.

        With gradients enabled, write them through an autograd Function that returns them
        (the layers' ``RotaryIntoSlot``): the appended tensors then carry the history through
        which the slot's gradient flows, as any appended tensor does. There the views belong
        to an alias of the buffers with a version counter of its own, so that later appends,
        which write through the buffers, never invalidate them where a layer's backward saved
        them (the argument of the module docstring, 1.); :meth:`reset` invalidates them. A
        slot written outside autograd gets no gradient, as any appended tensor without one."""
        if self._length >= self.max_layers:
            raise ValueError(f"depth stream is full: all {self.max_layers} slots are written")
        if torch.is_grad_enabled():
            aliases = self._k.data, self._v.data
            self._write_aliases += aliases
            return aliases[0][:, :, self._length], aliases[1][:, :, self._length]
        return self._k[:, :, self._length], self._v[:, :, self._length]

    # ------------------------------------------------------------------ read
    def read(self, n: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` slots (default: all written) as ``depth_k, depth_v [B, T, n, Hk, D]``.

        The results are strided views of the buffers (no copy; ``n = 0`` gives empty views)
        for :func:`moda_cuda.moda_attention`. With grad enabled they are differentiable with
        respect to the tensors that were appended to those slots.
        """
        if n is None:
            _refuse_implicit_in_recomputation("read", "n")
            n = self._length
        elif isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int or None, got {type(n).__name__}")
        if n < 0 or n > self._length:
            raise ValueError(f"cannot read {n} slots: only {self._length} are written")
        if not torch.is_grad_enabled():
            return self._alias_k[:, :, :n], self._alias_v[:, :, :n]
        k_differentiable = any(self._k_slots[i] is not None for i in range(n))
        v_differentiable = any(self._v_slots[i] is not None for i in range(n))
        if not (k_differentiable or v_differentiable):
            return self._alias_k[:, :, :n], self._alias_v[:, :, :n]  # nothing differentiable
        # This read owns the slots with gradients that no earlier read covered.
        k_idx = tuple(i for i in range(n) if self._k_slots[i] is not None and not self._k_owned[i])
        v_idx = tuple(i for i in range(n) if self._v_slots[i] is not None and not self._v_owned[i])
        for i in k_idx:
            self._k_owned[i] = True
        for i in v_idx:
            self._v_owned[i] = True
        tracked: Sequence[torch.Tensor] = [self._k_slots[i] for i in k_idx] + [self._v_slots[i] for i in v_idx]
        out_k, out_v = _DepthRead.apply(self._grad_sums, self._alias_k, self._alias_v, n, k_idx, v_idx,
                                        k_differentiable, v_differentiable, *self._last_read, *tracked)
        self._last_read = (out_k, out_v)
        return out_k, out_v

    def attention(
        self,
        q: torch.Tensor,
        k: Optional[torch.Tensor],
        v: Optional[torch.Tensor],
        n: Optional[int] = None,
        *,
        scale: Optional[float] = None,
        causal: bool = True,
        depth_chunk: int = 1,
        deterministic: bool = False,
        backend: str = "auto",
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        """:func:`moda_cuda.moda_attention` of ``q, k, v`` and the first ``n`` slots (default: all
        written), the depth read as in :meth:`read`. ``cu_seqlens``: documents packed into the
        stream's positions (batch 1), as in :func:`moda_cuda.moda_attention`.

        The same values and gradients as ``moda_attention(q, k, v, *self.read(n), ...)``, but
        the depth gradients are added in place into the stream's sums over all readers (the
        CUDA backward adds them in its epilogue) instead of being returned and summed by
        autograd: the backward's depth traffic is then that of the kernels alone.
        """
        from . import moda_attention  # looked up per call: the public op, whatever patches it
        from .ops import check_call

        depth_k, depth_v = self.read(n)
        if depth_k.shape[2] == 0 or not (depth_k.requires_grad or depth_v.requires_grad):
            return moda_attention(q, k, v, depth_k, depth_v, scale=scale, causal=causal, depth_chunk=depth_chunk,
                                  deterministic=deterministic, backend=backend, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen)
        plan = documents = None
        if eager.usable(q):
            plan, documents = eager.plan_call(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic,
                                              backend, cu_seqlens, max_seqlen)
        else:
            check_call(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend, cu_seqlens,
                       max_seqlen)
        return _StreamAttention.apply(self._grad_sums, q, k, v, depth_k, depth_v, scale, causal, depth_chunk,
                                      deterministic, backend, cu_seqlens, max_seqlen, plan, documents)
