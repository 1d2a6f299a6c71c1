"""Autotuning spaces for the MoDA Triton kernels.

Configs are chosen by measurement (``triton.autotune``) per shape class, never by GPU name.
The shape class is (group size, head dim, which parts exist, causality, and power-of-two
buckets of T and L), so a model whose layers differ only in L reuses a few tunings.
Under ``TRITON_INTERPRET=1`` (CPU testing) one small config is used so that tiles are
smaller than the odd test sizes and every loop and mask path runs. ``MODA_TRITON_TUNING=off``
skips tuning (the first config of each space that fits the head dim): quick compiles for
correctness suites.
"""

from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TUNING = os.environ.get("MODA_TRITON_TUNING", "on").lower() not in ("off", "0", "false")

# Shared by every kernel's autotune key.
SHAPE_KEY = ["G", "HEAD_DIM", "HAS_SEQ", "HAS_DEPTH", "CAUSAL", "CHUNKED", "VARLEN", "T_CLASS", "L_CLASS"]


def seqlen_class(T: int) -> int:
    """Autotune bucket of T: powers of two from 1024 to 65536."""
    return min(1 << 16, max(1024, triton.next_power_of_2(T)))


def depth_class(L: int) -> int:
    """Autotune bucket of L: 0, then powers of two from 16 to 256."""
    return 0 if L == 0 else min(256, max(16, triton.next_power_of_2(L)))


def _cfg(m: int, n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def _space(candidates):
    if INTERPRET:
        return [_cfg(16, 16, 1, 1)]
    return [_cfg(*c) for c in candidates]


# (BLOCK_M query rows, BLOCK_N keys, warps, stages). Query rows are G-folded: a 128-row
# tile of G = 8 covers 16 positions, so K/V tiles are shared by all heads of a kv head.
FWD_CONFIGS = _space([
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4), (128, 64, 8, 2), (64, 32, 4, 2),
])
# dK/dV: BLOCK_N keys held in registers, BLOCK_M query rows streamed.
BWD_KV_CONFIGS = _space([
    (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4),
    (16, 128, 4, 3), (16, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 4), (32, 32, 4, 2),
])
# dQ: BLOCK_M query rows held, BLOCK_N keys streamed.
BWD_Q_CONFIGS = _space([
    (128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 4, 3),
    (64, 32, 4, 4), (128, 128, 8, 2), (64, 32, 4, 2),
])


_SMEM_BYTES = 220 * 1024  # what a Hopper block may use, less a margin for Triton's scratch
_ACC_REGS = 192  # fp32 accumulator registers per thread before spills become likely


def _fits(cfg: triton.Config, head_dim: int, held: str) -> bool:
    """Rough shared-memory and register budget of a config at this head dim.

    ``held`` names the tile kept in registers for the whole program ("M": query rows, as in
    the forward and dQ; "N": keys, as in dK/dV); the other one is streamed through
    ``num_stages`` shared-memory buffers of two operands each (K and V, or Q and dO).
    """
    m, n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    held_rows, streamed_rows = (m, n) if held == "M" else (n, m)
    width = triton.next_power_of_2(head_dim)  # Triton tiles are padded to a power of two (D=192: 256)
    smem = 2 * width * (cfg.num_stages * 2 * streamed_rows + held_rows)  # bf16 tiles
    accumulators = (1 if held == "M" else 2) * held_rows * width  # acc / dq, or dk + dv
    regs = (accumulators + m * n) / (32 * cfg.num_warps)
    return smem <= _SMEM_BYTES and regs <= _ACC_REGS


def pruner(held: str):
    """An ``early_config_prune`` hook; with tuning off it keeps the first config that fits."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        head_dim = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM"))
        kept = [c for c in configs if _fits(c, head_dim, held)]
        kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return kept if TUNING else kept[:1]

    return prune
