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

On CUDA the decode step of the whole model is captured once in a CUDA graph and replayed per
token (:class:`DecodeStep`): a step's host work, dozens of kernel launches, becomes one
replay. Nothing of a step is read on the host (``seqlens`` is a device tensor the step
advances itself), which is what makes it capturable.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

__all__ = ["MoDAKVCache", "LayerCache", "DecodeStep", "generate"]


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


class DecodeStep:
    """``step(token [B]) -> logits [B, vocab]`` of the next token: one new token per sequence
    through the model against ``cache``, which it advances (k/v written, ``seqlens += 1``).

    With ``cuda_graph`` (CUDA only) the first ``WARMUP`` steps run eagerly on a side stream
    (they compile the kernels and set up the libraries' per-stream state, as capture needs).
    The next step is captured: the capture records the kernels, ``seqlens += 1`` included,
    and runs none of them; every step from then on copies its token into the captured input
    buffer and replays the graph, whose output buffer then holds the logits (valid until the
    next replay). The caches, ``seqlens``, the weights and those two buffers stay where the
    graph recorded them.
    """

    WARMUP = 2

    def __init__(self, model, cache: MoDAKVCache, cuda_graph: bool = False) -> None:
        self.model, self.cache, self.cuda_graph = model, cache, cuda_graph
        self.warmed = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.side = torch.cuda.Stream() if cuda_graph else None

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, cache=self.cache).logits[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph:
            return self._step(token[:, None])
        if self.warmed < self.WARMUP:
            self.warmed += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                logits = self._step(token[:, None])
            torch.cuda.current_stream().wait_stream(self.side)
            return logits
        if self.graph is None:
            self.ids = token[:, None].clone()  # the captured input buffer
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records only: the replay below runs this step
                self.logits = self._step(self.ids)  # the captured output buffer
        else:
            self.ids.copy_(token[:, None])
        self.graph.replay()
        return self.logits


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
                 top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, vocab] logits -> [B] tokens: argmax, or a sample after temperature, top-k, top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)  # temperature 0: greedy, as the limit
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:  # (at 1 every token stays; float sums could drop a tail)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest set whose mass reaches top_p; the most likely token always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, do_sample: bool = False,
             eos_token_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, cuda_graph: bool = True) -> torch.Tensor:
    """``[B, T + max_new_tokens]`` ids: each prompt's tokens, then its generated ones (then
    ``eos_token_id``, or 0, where a shorter prompt or an early end leaves room).

    ``attention_mask`` ``[B, T]`` (1 for prompt tokens, right-padded) gives prompts of
    different lengths; without it every prompt is ``T`` long. A sequence that produced
    ``eos_token_id`` keeps producing it. ``cuda_graph``: on CUDA, replay one captured decode
    step per token (:class:`DecodeStep`; the same tokens as eager steps); other devices
    ignore it.
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
    _check_sampling(temperature, top_k, top_p)
    device = input_ids.device
    lengths = torch.full((B,), T, dtype=torch.int32, device=device)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be shaped like input_ids {list(input_ids.shape)}")
        lengths = attention_mask.sum(-1).to(torch.int32)
        # Right padding only: each row's ones first, at least one (a host read, once per call).
        prefix = torch.arange(T, device=device) < lengths[:, None].long()
        if not bool(((attention_mask != 0) == prefix).all()) or int(lengths.min()) < 1:
            raise ValueError("attention_mask must be right-padded (each row 1s, then 0s) with at least one 1 per "
                             "row; left padding is not supported")
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
    decode = DecodeStep(model, cache, cuda_graph=bool(cuda_graph) and device.type == "cuda")
    for step in range(max_new_tokens):
        token = _next_tokens(next_logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        out[rows, lengths.long() + step] = token
        if step + 1 < max_new_tokens:
            next_logits = decode(token)  # advances cache.seqlens
    return out
