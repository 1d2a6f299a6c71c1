"""MoDA building blocks: attention, decoder block, a small causal LM and a ViT classifier.

Every block writes keys/values into a :class:`~moda_cuda.DepthStream` that later blocks
read as depth keys (same position, or same depth chunk) in the one softmax of
:func:`moda_cuda.moda_attention`:

* the attention's own k/v (after rotary), slot ``2 * layer_idx``;
* an extra light k/v projection of the MLP input (the "FFN KV projection"), slot
  ``2 * layer_idx + 1``.

The last block writes nothing (no later block would read it), so it has no FFN k/v
projection: every parameter receives a gradient, as DDP expects.

Packed documents: every ``forward`` takes ``cu_seqlens`` (and optionally ``max_seqlen``)
for inputs of batch 1 holding several documents back to back, as
:func:`moda_cuda.moda_attention` does; rotary positions restart at each document
(:func:`document_positions`), so a packed document is computed exactly as it would be alone.

Context parallelism: :meth:`MoDAForCausalLM.enable_context_parallel` shards the sequence
over the ranks of a process group. Each rank then runs the model on its shard of the
positions: rotary tables of those positions, a depth stream of those positions only (depth
never leaves its position's rank) and attention through
:func:`moda_cuda.distributed.context_parallel_moda_attention`.

``MoDAConfig(use_depth=False)`` is the plain-attention baseline: the same modules and the
same kernel call, with no depth stream and no FFN k/v projection.
:meth:`MoDAConfig.matched_baseline` widens the baseline's MLP so that both models have
(almost exactly) the same number of parameters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import rotary as _rotary
from .depth_stream import DepthStream
from .rotary import Rope, RotaryEmbedding, apply_rotary, document_positions, rotary_tables

__all__ = [
    "MoDAConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "rotary_tables",
    "apply_rotary",
    "document_positions",
    "MoDAAttention",
    "SwiGLU",
    "MoDABlock",
    "MoDADecoderLayer",
    "MoDAForCausalLM",
    "MoDAViT",
    "ModelOutput",
    "count_parameters",
]


@dataclass
class MoDAConfig:
    """Sizes and switches shared by :class:`MoDAForCausalLM` and :class:`MoDAViT`.

    Attributes:
        d_model, n_layers: width and depth.
        n_heads, n_kv_heads: query heads and k/v heads (GQA: ``n_heads % n_kv_heads == 0``).
        head_dim: per-head size; default ``d_model // n_heads``.
        mlp_hidden: SwiGLU hidden size; default ``8/3 * d_model`` rounded up to 8.
        use_depth: False gives the plain-attention baseline (no depth stream).
        ffn_kv: also append a k/v projection of each MLP input to the depth stream.
        depth_chunk: C of :func:`moda_cuda.moda_attention` (1: depth of the own position).
        causal: None picks the model's natural choice (LM: True, ViT: False).
        norm: ``"pre"`` (x + f(norm(x))) or ``"post"`` (norm(x + f(x))).
        rope: rotary position embedding on queries and keys (depth keys included).
        gradient_checkpointing: recompute each block's activations in backward.
        backend: passed to :func:`moda_cuda.moda_attention`.
        vocab_size, max_seq_len, tie_embeddings: LM only.
        image_size, patch_size, in_channels, num_classes: ViT only.
    """

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: Optional[int] = None
    mlp_hidden: Optional[int] = None
    use_depth: bool = True
    ffn_kv: bool = True
    depth_chunk: int = 1
    causal: Optional[bool] = None
    norm: str = "pre"
    rope: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    gradient_checkpointing: bool = False
    backend: str = "auto"
    vocab_size: int = 256
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    image_size: int = 8
    patch_size: int = 2
    in_channels: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "depth_chunk", "vocab_size", "max_seq_len",
                     "image_size", "patch_size", "in_channels", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads}) "
                                 "unless head_dim is given")
            self.head_dim = self.d_model // self.n_heads
        if self.rope and self.head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {self.head_dim}")
        if self.mlp_hidden is None:
            self.mlp_hidden = 8 * math.ceil(self.d_model * 8 / 3 / 8)
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")

    @property
    def slots_per_layer(self) -> int:
        """Depth-stream slots each block writes (0 for the baseline)."""
        return 0 if not self.use_depth else (2 if self.ffn_kv else 1)

    @property
    def depth_slots(self) -> int:
        """Lmax of the model's depth stream: every block but the last writes."""
        return (self.n_layers - 1) * self.slots_per_layer

    def matched_baseline(self) -> "MoDAConfig":
        """The plain-attention baseline with the MLP widened to match this model's parameters.

        The only parameters MoDA adds are the FFN k/v projections (``2 * Hk * head_dim`` per
        input feature, in all blocks but the last); a SwiGLU hidden unit costs ``3 * d_model``
        in each of the ``n_layers`` blocks. The added units are rounded to a multiple of 8
        where that moves the width by at most 1% (tiny models keep the nearest count): cuBLAS
        runs a bf16 GEMM whose rows are not 16-byte aligned with slow kernels (1443 units in
        the byte-level LM spent 15 of its 37 ms of kernel time per step in the MLP's GEMMs on
        the H100), a handicap no real baseline has.
        """
        if not (self.use_depth and self.ffn_kv):
            return dataclasses.replace(self, use_depth=False)
        exact = 2 * self.n_kv_heads * self.head_dim * (self.n_layers - 1) / (3 * self.n_layers)
        aligned = 8 * round((self.mlp_hidden + exact) / 8) - self.mlp_hidden  # the whole width aligned
        extra = aligned if abs(aligned - exact) <= 0.01 * (self.mlp_hidden + exact) else round(exact)
        return dataclasses.replace(self, use_depth=False, mlp_hidden=self.mlp_hidden + extra)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


class ModelOutput(NamedTuple):
    """``logits`` and, when targets/labels were given, the mean cross-entropy ``loss``."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor]


# ----------------------------------------------------------------------------- pieces


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision upcast to float32 for stable arithmetic; float64 kept (exact checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 (at least) for stability under bf16."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _at_least_float32(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * _at_least_float32(self.weight)).to(x.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, gate and up one GEMM (``gate_up``: its rows are the
    gate's, then the up projection's), which also projects x to ``extra`` more features (a
    MoDA block's FFN k/v): one GEMM where three would read x, each with a launch and, in
    training, two more GEMMs and a gradient sum in backward."""

    def __init__(self, d_model: int, hidden: int, extra: int = 0) -> None:
        super().__init__()
        self.hidden, self.extra = hidden, extra
        self.gate_up = nn.Linear(d_model, 2 * hidden + extra, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_extra(x)[0]

    def forward_with_extra(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The MLP's output and the ``extra`` features of x ``[..., extra]`` (a view)."""
        gate, up, extra = self.gate_up(x).split((self.hidden, self.hidden, self.extra), dim=-1)
        return self.down(F.silu(gate) * up), extra


def _stream_dtype(reference: torch.Tensor) -> torch.dtype:
    """The dtype the k/v projections produce: the autocast dtype when autocast is on."""
    kind = reference.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return reference.dtype


# ----------------------------------------------------------------------------- attention


class MoDAAttention(nn.Module):
    """GQA attention over the sequence plus the depth stream, appending its own k/v.

    ``forward(x, stream, slot)`` reads depth slots ``[0, slot)``, attends, and writes its
    rotated k and its v to ``slot`` (default: the next free slot; ``append=False`` skips the
    write). With ``stream=None`` it is plain (causal or not) attention through the same kernel.
    """

    def __init__(self, config: MoDAConfig, causal: bool = True) -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        hd, hq, hk = config.head_dim, config.n_heads, config.n_kv_heads
        # q, k and v in one GEMM (rows: the Hq query heads, then the Hk key and Hk value heads).
        self.qkv_proj = nn.Linear(config.d_model, (hq + 2 * hk) * hd, bias=False)
        self.o_proj = nn.Linear(hq * hd, config.d_model, bias=False)
        self.layer_idx = 0  # its slot in a KV cache (MoDABlock sets it)
        # A moda_cuda.distributed.ContextParallel: x holds this rank's shard of the sequence.
        self.context_parallel = None

    def forward(
        self,
        x: torch.Tensor,
        stream: Optional[DepthStream] = None,
        slot: Optional[int] = None,
        rope: Optional[Rope] = None,
        *,
        append: bool = True,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        cache=None,
    ) -> torch.Tensor:
        """``x [B, T, d_model]`` -> ``[B, T, d_model]``.

        Args:
            stream: depth stream to read and write (None: no depth).
            slot: this layer's slot; depth slots ``[0, slot)`` are read.
            rope: shared ``(cos, sin)`` tables, one row per position of ``x``; computed here
                when None and rope is on (restarting per document with ``cu_seqlens``).
            append: write this layer's k/v to ``slot`` (False for a last layer).
            cu_seqlens, max_seqlen: documents packed into batch 1 (module docstring).
            cache: a :class:`moda_cuda.generation.MoDAKVCache`: while prefilling, this layer's
                rotated k/v are written at positions ``[0, T)``; after that, x holds new tokens
                that attend to the cache (``moda_attention_with_kvcache``), their k/v written at
                ``cache.seqlens``.
        """
        from . import moda_attention, moda_attention_with_kvcache  # looked up per call: the public ops

        cfg = self.config
        cp = self.context_parallel
        if cp is not None and (cu_seqlens is not None or cache is not None):
            raise ValueError("context parallelism takes neither packed documents (cu_seqlens) nor a KV cache")
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, cfg.n_heads + 2 * cfg.n_kv_heads, cfg.head_dim).split(
            (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads), dim=2)  # views of one GEMM's rows
        if cfg.rope:
            rope = rope if rope is not None else _rope_tables(cfg, T, x.device, cu_seqlens, cp)
            q = apply_rotary(q, rope)
        rope = rope if cfg.rope else None
        k, v = _keys_and_values(k, v, rope, _slot_to_write(stream, k, slot, append, rope))
        options = dict(causal=self.causal, depth_chunk=cfg.depth_chunk, backend=cfg.backend, cu_seqlens=cu_seqlens,
                       max_seqlen=max_seqlen)
        if stream is not None:
            slot = stream.length if slot is None else slot
            # The kernel wants one dtype; under autocast the projections already match.
            q, k, v = q.to(stream.dtype), k.to(stream.dtype), v.to(stream.dtype)
        layer_cache = cache.layer(self.layer_idx, k) if cache is not None else None
        if layer_cache is not None and not layer_cache.prefill:
            depth = stream.read(slot) if stream is not None and slot > 0 else (None, None)
            out = moda_attention_with_kvcache(q, layer_cache.k, layer_cache.v, *depth, k=k, v=v,
                                              cache_seqlens=layer_cache.seqlens, depth_chunk=cfg.depth_chunk)
        elif cp is not None:
            depth = stream.read(slot) if stream is not None and slot > 0 else (None, None)
            out = cp.attention(q, k, v, *depth, causal=self.causal, depth_chunk=cfg.depth_chunk, backend=cfg.backend)
        elif stream is not None and slot > 0:
            # Reads the earlier slots; their gradients are summed in the stream, in place.
            out = stream.attention(q, k, v, slot, **options)
        else:  # no depth, or none yet (the first block): skip the empty depth pass
            out = moda_attention(q, k, v, None, None, **options)
        if layer_cache is not None and layer_cache.prefill:
            layer_cache.k[:, :T] = k.detach()
            layer_cache.v[:, :T] = v.detach()
        if stream is not None and append:
            stream.append(k, v, slot=slot)
        return self.o_proj(out.reshape(B, T, cfg.n_heads * cfg.head_dim).to(x.dtype))


def _slot_to_write(stream: Optional[DepthStream], k: torch.Tensor, slot: Optional[int], append: bool,
                   rope: Optional[Rope]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The views of the depth slot a layer is about to append, where it may write its k/v
    there directly (the slot next, k already in the stream's dtype, not traced); with
    gradients only where the fused rotary kernel writes them (``RotaryIntoSlot``: its outputs
    are the views, carrying k's and v's history). The rotary kernel then stores the rotated
    keys and copies the values into the slot in one launch, and the append copies nothing."""
    if stream is None or not append or k.dtype != stream.dtype \
            or torch.compiler.is_compiling():  # traced: plain appends (no data pointers to compare)
        return None
    if slot is not None and slot != stream.length:  # e.g. a checkpointed layer's recomputation
        return None
    if torch.is_grad_enabled() and (rope is None or not _rotary.fused_rotary_serves(k, rope)):
        return None
    return stream.next_slot()


def _keys_and_values(k: torch.Tensor, v: torch.Tensor, rope: Optional[Rope],
                     slot_views: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """k rotated (with ``rope``) and v, written into ``slot_views`` where given (the rotary
    kernel stores both in one launch) and then those views: the k, v a layer uses and appends.

    k and v are views of one projection's rows. Without gradients and slot, a rotated k and
    that view of v would have different layouts, and the decode kernel, which writes both
    into the cache, would copy both to contiguous tensors: they go into new contiguous
    tensors in the rotary launch instead."""
    if slot_views is None and rope is not None and not torch.is_grad_enabled():
        slot_views = (torch.empty_like(k, memory_format=torch.contiguous_format),
                      torch.empty_like(v, memory_format=torch.contiguous_format))
    if slot_views is None:
        return (apply_rotary(k, rope) if rope is not None else k), v
    if rope is not None and torch.is_grad_enabled():  # _slot_to_write checked that the kernel serves
        from .triton_ref.rotary import RotaryIntoSlot

        return RotaryIntoSlot.apply(k, v, *rope, *slot_views)
    if rope is not None:
        apply_rotary(k, rope, slot_views[0], copy=(v, slot_views[1]))
    else:
        slot_views[0].copy_(k)
        slot_views[1].copy_(v)
    return slot_views


def _rope_tables(cfg: MoDAConfig, seqlen: int, device: torch.device,
                 cu_seqlens: Optional[torch.Tensor] = None, context_parallel=None) -> Rope:
    """Rotary tables for a module used on its own (models share one cached table); with
    ``context_parallel``, the rows of this rank's positions in the whole sequence."""
    if context_parallel is not None:
        positions = context_parallel.positions(seqlen, device)
        cos, sin = rotary_tables(cfg.head_dim, seqlen * context_parallel.world_size, cfg.rope_theta, device)
        return cos[positions], sin[positions]
    return _rotary.packed_rope(rotary_tables(cfg.head_dim, seqlen, cfg.rope_theta, device), cu_seqlens, seqlen)


class MoDABlock(nn.Module):
    """Attention + SwiGLU MLP; with depth on, the MLP input is also projected to k/v for the stream.

    Pre-norm: ``h = x + attn(n1(x)); y = h + mlp(n2(h))``, FFN k/v from ``n2(h)``.
    Post-norm: ``h = n1(x + attn(x)); y = n2(h + mlp(h))``, FFN k/v from ``h``.
    """

    def __init__(self, config: MoDAConfig, layer_idx: int, causal: bool = True) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attn = MoDAAttention(config, causal=causal)
        self.attn.layer_idx = layer_idx
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        self.norm2 = RMSNorm(config.d_model, config.norm_eps)
        self.writes_depth = config.use_depth and layer_idx < config.n_layers - 1
        # "Light" FFN k/v: Hk heads of k and v projected from the MLP's input, no MLP of their
        # own; the projection is rows of the MLP's input GEMM (SwiGLU's extra features).
        self.writes_ffn_kv = self.writes_depth and config.ffn_kv
        kv_features = 2 * config.n_kv_heads * config.head_dim if self.writes_ffn_kv else 0
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden, kv_features)

    def _mlp(self, h: torch.Tensor, stream: Optional[DepthStream], rope: Optional[Rope],
             cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
        """The MLP of h; with a stream, the FFN k/v of h (from the same GEMM) appended to it."""
        if stream is None or not self.writes_ffn_kv:
            return self.mlp(h)
        out, kv = self.mlp.forward_with_extra(h)
        cfg = self.config
        B, T, _ = h.shape
        k, v = kv.view(B, T, 2, cfg.n_kv_heads, cfg.head_dim).unbind(2)
        slot = self.layer_idx * cfg.slots_per_layer + 1
        if cfg.rope and rope is None:
            # Depth keys sit at their own position s: rotating them like sequence keys keeps
            # q_t . k_s a function of t - s (exactly position-free for depth_chunk = 1).
            rope = _rope_tables(cfg, T, h.device, cu_seqlens, self.attn.context_parallel)
        rope = rope if cfg.rope else None
        k, v = _keys_and_values(k, v, rope, _slot_to_write(stream, k, slot, True, rope))
        stream.append(k.to(stream.dtype), v.to(stream.dtype), slot=slot)
        return out

    def forward(self, x: torch.Tensor, stream: Optional[DepthStream] = None, rope: Optional[Rope] = None,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                cache=None) -> torch.Tensor:
        """``x [B, T, d_model]`` -> same shape; reads/writes ``stream`` when given.
        ``cu_seqlens``, ``max_seqlen``: packed documents (module docstring); ``cache``: a KV
        cache (``MoDAAttention``)."""
        slot = None
        if stream is not None:
            slot = self.layer_idx * self.config.slots_per_layer
        if cu_seqlens is not None and rope is None and self.config.rope:
            rope = _rope_tables(self.config, x.shape[1], x.device, cu_seqlens)  # shared by attn and FFN k
        attn_options = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cache=cache)
        if self.config.norm == "pre":
            h = x + self.attn(self.norm1(x), stream, slot, rope, append=self.writes_depth, **attn_options)
            return h + self._mlp(self.norm2(h), stream, rope, cu_seqlens)
        h = self.norm1(x + self.attn(x, stream, slot, rope, append=self.writes_depth, **attn_options))
        return self.norm2(h + self._mlp(h, stream, rope, cu_seqlens))


# The name decoder-only model code (Hugging Face style) looks for; the same block serves the
# bidirectional ViT as MoDABlock.
MoDADecoderLayer = MoDABlock


class _Trunk(nn.Module):
    """The stack of blocks with its depth stream, shared by the LM and the ViT."""

    def __init__(self, config: MoDAConfig, causal: bool) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(MoDABlock(config, i, causal=causal) for i in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: torch.Tensor, rope: Optional[Rope], cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, cache=None) -> torch.Tensor:
        cfg = self.config
        stream = None
        if cfg.depth_slots > 0:
            B, T, _ = x.shape
            # One stream per forward: backward of this graph may still read it, so it is
            # never reused across steps (a new one costs one allocation, no memset needed).
            stream = DepthStream(B, T, cfg.depth_slots, cfg.n_kv_heads, cfg.head_dim,
                                 dtype=_stream_dtype(x), device=x.device)
        # (Not with a KV cache: its writes are no part of the graph a recomputation replays.)
        use_ckpt = cfg.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for block in self.blocks:
            if use_ckpt:
                x = checkpoint(block, x, stream, rope, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = block(x, stream, rope, cu_seqlens, max_seqlen, cache)
        return self.final_norm(x)


def _init_weights(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- models


class MoDAForCausalLM(nn.Module):
    """A small decoder-only LM: token embedding, MoDA blocks, RMSNorm, (tied) LM head."""

    def __init__(self, config: MoDAConfig) -> None:
        super().__init__()
        if config.causal is False:
            raise ValueError("MoDAForCausalLM is causal: leave config.causal as None or True")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.trunk = _Trunk(config, causal=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta) if config.rope else None
        self.context_parallel = None
        _init_weights(self, config.init_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def enable_context_parallel(self, group=None, layout: str = "contiguous"):
        """Shard the sequence over the ranks of ``group`` (None: the default process group).

        Afterwards every rank calls ``forward`` with its shard of each sequence
        (``ContextParallel.shard``: ``layout`` ``"contiguous"`` or ``"zigzag"``, see
        :func:`moda_cuda.distributed.context_parallel_moda_attention`), all ranks together;
        ``logits`` and ``loss`` are those of the rank's positions (the loss is their mean).
        Returns the :class:`moda_cuda.distributed.ContextParallel`.
        """
        from .distributed import ContextParallel

        cp = ContextParallel(group, layout)
        self._set_context_parallel(cp)
        return cp

    def disable_context_parallel(self) -> None:
        """Back to whole sequences on every rank."""
        self._set_context_parallel(None)

    def _set_context_parallel(self, cp) -> None:
        self.context_parallel = cp
        for block in self.trunk.blocks:
            block.attn.context_parallel = cp

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                cache=None) -> ModelOutput:
        """``input_ids [B, T]`` -> logits ``[B, T, vocab]``; ``targets [B, T]`` (the next tokens,
        already shifted; -100 is ignored) add the mean cross-entropy loss.

        ``cu_seqlens`` (int32 ``[n_docs + 1]``, on the ids' device): documents packed into one
        row, ``input_ids [1, N]``; each attends only within itself and its positions restart
        at 0. Its targets must not cross documents (put -100 at each document's last token).
        ``max_seqlen`` (the longest document) spares reading the offsets for the length check.

        ``cache`` (:class:`moda_cuda.generation.MoDAKVCache`): the prompt's keys are written
        into it (prefill), or ``input_ids`` are new tokens at positions ``cache.seqlens[b] + i``
        that attend to it; ``cache.seqlens`` then advances. See :meth:`generate`.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
        T = input_ids.shape[1]
        longest = T
        cp = self.context_parallel
        if cp is not None:
            if cu_seqlens is not None or cache is not None:
                raise ValueError("context parallelism takes neither packed documents (cu_seqlens) nor a KV cache")
            longest = T * cp.world_size  # the whole sequence, of which input_ids is this rank's shard
        if cache is not None and (cu_seqlens is not None or self.config.depth_chunk != 1):
            # A decoding token's depth rows are its own position's (depth_chunk 1), and the
            # cache holds whole sequences, not packed documents.
            raise ValueError("a KV cache needs depth_chunk = 1 and no cu_seqlens")
        if cu_seqlens is not None:
            from ._spec import check_cu_seqlens, packed_documents

            check_cu_seqlens(input_ids[..., None, None], cu_seqlens, max_seqlen)
            # The offsets' values checked here, before the rotary tables are sized and gathered
            # by them (read once per cu_seqlens tensor: the attention calls reuse the reading).
            documents = packed_documents(cu_seqlens, T, max_seqlen)
            longest = max_seqlen if max_seqlen is not None else documents.max_seqlen
        else:
            from ._spec import check_max_seqlen_alone

            check_max_seqlen_alone(cu_seqlens, max_seqlen)
        if longest > self.config.max_seq_len:
            raise ValueError(f"sequence length {longest} exceeds max_seq_len {self.config.max_seq_len}")
        decoding = cache is not None and not cache.prefill
        rope = None
        if self.rotary is not None and decoding:
            positions = cache.seqlens.long()[:, None] + torch.arange(T, device=input_ids.device)
            rope = (self.rotary.cos[positions], self.rotary.sin[positions])
        elif self.rotary is not None and cp is not None:
            positions = cp.positions(T, input_ids.device)
            rope = (self.rotary.cos[positions], self.rotary.sin[positions])
        elif self.rotary is not None:
            rope = _rotary.packed_rope(self.rotary(longest if cu_seqlens is not None else T), cu_seqlens, T)
        h = self.trunk(self.embed(input_ids), rope, cu_seqlens, max_seqlen, cache)
        if decoding:
            cache.seqlens += T
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(_at_least_float32(logits).flatten(0, 1), targets.flatten(), ignore_index=-100)
        return ModelOutput(logits, loss)


    def save_pretrained(self, directory) -> None:
        """``config.json`` (the :class:`MoDAConfig`) and ``model.safetensors`` (the weights, a tied
        head stored once) in ``directory``; :meth:`from_pretrained` reads them back."""
        import json
        from pathlib import Path

        from safetensors.torch import save_model

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=1) + "\n")
        save_model(self, str(path / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype: Optional[torch.dtype] = None) -> "MoDAForCausalLM":
        """The model :meth:`save_pretrained` wrote to ``directory`` (weights in their saved dtype
        unless ``dtype`` is given), in eval mode."""
        import json
        from pathlib import Path

        from safetensors import safe_open
        from safetensors.torch import load_model

        path = Path(directory)
        config = MoDAConfig(**json.loads((path / "config.json").read_text()))
        weights = str(path / "model.safetensors")
        with safe_open(weights, framework="pt") as f:  # the saved dtype (one for the whole model)
            saved_dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
        model = cls(config)
        saved = getattr(torch, {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}.get(
            saved_dtype, "float32"))
        model = model.to(saved)  # else load_model would convert the weights into float32 parameters
        load_model(model, weights, device=str(device) if device is not None else "cpu")
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device).eval() if device is not None else model.eval()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """``[B, T + max_new_tokens]`` token ids: prefill with the training op, then decode steps
        against a KV cache (:func:`moda_cuda.generation.generate`: ``temperature``, ``top_k``,
        ``top_p``, ``do_sample``, ``eos_token_id``, ``attention_mask``, ``generator``)."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, **options)


class MoDAViT(nn.Module):
    """A ViT classifier with non-causal MoDA: patches + [CLS] token, learned positions."""

    def __init__(self, config: MoDAConfig) -> None:
        super().__init__()
        if config.causal:
            raise ValueError("MoDAViT attends bidirectionally: leave config.causal as None or False")
        self.config = config
        p, c = config.patch_size, config.in_channels
        self.n_patches = (config.image_size // p) ** 2
        self.patch_embed = nn.Linear(c * p * p, config.d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_patches + 1, config.d_model))
        self.trunk = _Trunk(config, causal=False)
        self.head = nn.Linear(config.d_model, config.num_classes)
        self.rotary = RotaryEmbedding(config.head_dim, self.n_patches + 1, config.rope_theta) if config.rope else None
        _init_weights(self, config.init_std)
        nn.init.normal_(self.pos_embed, std=config.init_std)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> ModelOutput:
        """``images [B, C, H, W]`` -> class logits ``[B, num_classes]`` (+ loss with ``labels [B]``)."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}], got {list(images.shape)}")
        p = cfg.patch_size
        patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # [B, N, C*p*p]
        x = self.patch_embed(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed.to(x.dtype)
        rope = self.rotary(x.shape[1]) if self.rotary is not None else None
        logits = self.head(self.trunk(x, rope)[:, 0])
        loss = F.cross_entropy(_at_least_float32(logits), labels) if labels is not None else None
        return ModelOutput(logits, loss)
