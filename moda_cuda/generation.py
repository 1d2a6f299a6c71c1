"""Decoding with :class:`moda_cuda.layers.MoDAForCausalLM`: a KV cache and ``generate()``.

Only the sequence keys/values are cached: with ``depth_chunk = 1`` a new token's depth rows
are the k/v its own earlier layers produce in the same step, so each decode step builds a
depth stream of one position per sequence (``L`` rows per layer stack), never ``T x L``.

The prompt is prefilled with the training op (every layer writes its rotated k/v at
positions ``[0, T)``); each following step runs the new token through the layers with
:func:`moda_cuda.moda_attention_with_kvcache`, which writes its k/v at ``seqlens[b]`` and
attends to the cache. Prompts of different lengths are right-padded (``attention_mask``):
causal attention keeps a prompt's positions blind to the padding after it, and its first
generated token overwrites the padding's cache rows.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

__all__ = ["MoDAKVCache", "LayerCache", "generate"]


class LayerCache(NamedTuple):
    """One layer's view of the cache for one forward: its buffers, the tokens cached per
    sequence, and whether this forward is the prefill (training op) or a decode step."""

    k: torch.Tensor  # [B, Tmax, Hk, D]
    v: torch.Tensor
    seqlens: torch.Tensor  # int32 [B]
    prefill: bool


class MoDAKVCache:
    """Per-layer sequence keys/values of a MoDA LM, ``[B, max_len, Hk, D]`` each, allocated at
    the first write (in the dtype the layers produce), and ``seqlens`` (int32 ``[B]``): the
    tokens cached per sequence. ``prefill`` is True until the prompt has been written."""

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 device: Optional[torch.device] = None) -> None:
        self.shape = (batch, max_len, kv_heads, head_dim)
        self.k: List[Optional[torch.Tensor]] = [None] * n_layers
        self.v: List[Optional[torch.Tensor]] = [None] * n_layers
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.prefill = True

    def layer(self, i: int, like: torch.Tensor) -> LayerCache:
        if self.k[i] is None:
            self.k[i] = torch.empty(self.shape, dtype=like.dtype, device=like.device)
            self.v[i] = torch.empty(self.shape, dtype=like.dtype, device=like.device)
        return LayerCache(self.k[i], self.v[i], self.seqlens, self.prefill)

    @property
    def max_len(self) -> int:
        return self.shape[1]


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
                 top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, vocab] logits -> [B] tokens: argmax, or a sample after temperature, top-k, top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest set whose mass reaches top_p (the most likely token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, do_sample: bool = False,
             eos_token_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[B, T + max_new_tokens]`` ids: each prompt's tokens, then its generated ones (then
    ``eos_token_id``, or 0, where a shorter prompt or an early end leaves room).

    ``attention_mask`` ``[B, T]`` (1 for prompt tokens, right-padded) gives prompts of
    different lengths; without it every prompt is ``T`` long. A sequence that produced
    ``eos_token_id`` keeps producing it.
    """
    cfg = model.config
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {list(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    B, T = input_ids.shape
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"{T} prompt tokens + {max_new_tokens} new ones exceed max_seq_len {cfg.max_seq_len}")
    if cfg.depth_chunk != 1:
        raise ValueError("generate() needs depth_chunk = 1 (a new token's depth rows are its own)")
    device = input_ids.device
    lengths = torch.full((B,), T, dtype=torch.int32, device=device)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be shaped like input_ids {list(input_ids.shape)}")
        lengths = attention_mask.sum(-1).to(torch.int32)
    pad = eos_token_id if eos_token_id is not None else 0
    out = torch.full((B, T + max_new_tokens), pad, dtype=input_ids.dtype, device=device)
    out[:, :T] = torch.where(torch.arange(T, device=device) < lengths[:, None].long(), input_ids, pad)
    if max_new_tokens == 0:
        return out

    cache = MoDAKVCache(cfg.n_layers, B, T + max_new_tokens, cfg.n_kv_heads, cfg.head_dim, device)
    logits = model(input_ids, cache=cache).logits  # prefill: writes positions [0, T)
    cache.prefill = False
    cache.seqlens.copy_(lengths)
    next_logits = logits[torch.arange(B, device=device), lengths.long() - 1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)
    for step in range(max_new_tokens):
        token = _next_tokens(next_logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        out[rows, lengths.long() + step] = token
        if step + 1 < max_new_tokens:
            next_logits = model(token[:, None], cache=cache).logits[:, -1]  # advances cache.seqlens
    return out
