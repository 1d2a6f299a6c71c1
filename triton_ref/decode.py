"""MoDA decoding: new tokens against a KV cache, split over the cache (flash-decoding).

``_decode_split_kernel``, grid (splits, B * Hk, row blocks). A program takes the G-folded
query rows of one (batch, kv head): row ``R = i * G + g`` is new token ``i``, query head
``hk * G + g``, so all G heads and all S tokens share each K/V tile (one row block holds up
to 128 rows: every decode step, S = 1). Its keys are one slice of cache positions,
``[j * SPLIT_LEN, (j + 1) * SPLIT_LEN)``, cut at the last position its rows see
(token i sees ``p <= cache_seqlens[b] + i``):

1. positions below ``cache_seqlens[b]``, which every new token sees: tiles without a mask;
2. the rest, masked. With new ``k``/``v`` given, their positions are read from ``k``/``v``
   rather than the cache, and the program of the last row block writes them into the cache:
   no program reads a cache row that another one writes, so writing and attending are one
   launch;
3. the new tokens' own depth rows (token i: its L rows of ``depth_k/v [B, S, L, Hk, D]``)
   are taken by one program, so they count exactly once: where the grid has room for it
   (``DEPTH_APART``), an extra program past the last slice whose cache range is empty, so
   the depth rows do not lengthen any slice's program (at B = 1 a step is as long as its
   longest program); else the program whose slice holds the last visible key.

It writes the normalised output and lse of its slice (float32); a slice that starts past the
last visible key writes lse = -inf only. ``_decode_combine_kernel`` merges the slices of each
row with weights ``exp(lse_j - max lse)``. With one split the first kernel writes ``out``
and ``lse`` itself and the second does not run. On sm_90 and later, where the combine's
programs fit beside the split grid (:func:`_pdl`), the combine kernel is a programmatic
dependent launch: the split kernel lets it be scheduled as soon as every split program has
started, and it waits (``griddepcontrol.wait``) until the split grid has finished and its
writes are visible, so its launch overlaps the split kernel.

The number of splits depends on shapes only (B * Hk against the SM count, Tmax), never on
the lengths, so the host reads nothing from the GPU and a decode step can be captured in a
CUDA graph.
"""

import functools
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from ._common import LOG2E, MASKED, dot_precision, row_tile_ptrs, softmax_step
from ._configs import INTERPRET
from ._launch import Launcher

try:  # grid dependency control (Triton >= 3.4): Hopper's programmatic dependent launch
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # the kernels then never reference them (PDL is False)
    gdc_launch_dependents = gdc_wait = None

MAX_BLOCK_M = 128  # folded rows per program (64 above D = 128)


@triton.jit
def _cache_tiles(acc, l_i, m_i, q, t_row, lo, hi, cs, write, KC, VC, KN, VN, stride_ct, stride_nt, offs_d, d_ok,
                 qk_scale, MASK: tl.constexpr, HAS_NEW: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr, STAGES: tl.constexpr):
    """Cache positions [lo, hi) into the softmax state; MASK: causal mask, new rows from k/v."""
    for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        s = start + tl.arange(0, BLOCK_N)
        c_off = s[:, None] * stride_ct + offs_d[None, :]
        if MASK:
            ld = (s < hi)[:, None] & d_ok[None, :]
            if HAS_NEW:
                new = (s >= cs)[:, None]
                n_off = (s - cs)[:, None] * stride_nt + offs_d[None, :]
                k = tl.where(new, tl.load(KN + n_off, mask=ld & new, other=0.0),
                             tl.load(KC + c_off, mask=ld & ~new, other=0.0))
                v = tl.where(new, tl.load(VN + n_off, mask=ld & new, other=0.0),
                             tl.load(VC + c_off, mask=ld & ~new, other=0.0))
                tl.store(KC + c_off, k, mask=ld & new & write)
                tl.store(VC + c_off, v, mask=ld & new & write)
            else:
                k = tl.load(KC + c_off, mask=ld, other=0.0)
                v = tl.load(VC + c_off, mask=ld, other=0.0)
        else:
            k = tl.load(KC + c_off, mask=d_ok[None, :], other=0.0)
            v = tl.load(VC + c_off, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK:
            qk = tl.where((s[None, :] < hi) & (s[None, :] <= cs + t_row[:, None]), qk, MASKED)
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, qk, v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _depth_tiles(acc, l_i, m_i, q, t_row, lo, hi, L, DK, DV, stride_dt, stride_dl, offs_d, d_ok, qk_scale,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Depth rows [lo, hi), flattened as j = i * L + l: row of token i sees only its own."""
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        t = j // L
        off = t[:, None] * stride_dt + (j - t * L)[:, None] * stride_dl + offs_d[None, :]
        ld = (j < hi)[:, None] & d_ok[None, :]
        k = tl.load(DK + off, mask=ld, other=0.0)
        v = tl.load(DV + off, mask=ld, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where((j[None, :] < hi) & (t[None, :] == t_row[:, None]), qk, MASKED)
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, qk, v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _decode_split_kernel(
    Q, KC, VC, KN, VN, DK, DV, SEQLENS, O, LSE,
    sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_nb, stride_nt, stride_nh,
    stride_db, stride_dt, stride_dl, stride_dh,
    S, HK, L, TMAX, SPLIT_LEN, PART_ROWS, LSE_BASE,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_NEW: tl.constexpr, HAS_DEPTH: tl.constexpr, DEPTH_APART: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # the combine kernel may be scheduled now: it waits for this grid's results itself
        gdc_launch_dependents()
    split = tl.program_id(0)
    bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = bh // HK
    hk = bh % HK
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S * G
    t_row = rows // G
    g_row = rows % G
    t_lo = pid_m * BLOCK_M // G
    t_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, S - 1)  # inclusive
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    cs = tl.maximum(tl.load(SEQLENS + b), 0)
    kv_hi = tl.minimum(cs + t_hi + 1, TMAX)  # keys [0, kv_hi) are visible to some row
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, kv_hi)
    full_hi = lo + tl.maximum(tl.minimum(hi, cs) - lo, 0) // BLOCK_N * BLOCK_N  # unmasked tiles end

    q = tl.load(row_tile_ptrs(Q + b.to(tl.int64) * stride_qb, rows, t_row, g_row, hk, stride_qt, stride_qh, offs_d,
                              G), mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    KCb = KC + b.to(tl.int64) * stride_cb + hk * stride_ch
    VCb = VC + b.to(tl.int64) * stride_cb + hk * stride_ch
    KNb = KN + b.to(tl.int64) * stride_nb + hk * stride_nh
    VNb = VN + b.to(tl.int64) * stride_nb + hk * stride_nh
    write = pid_m == tl.num_programs(2) - 1  # the row block of the last token sees every new position
    acc, l_i, m_i = _cache_tiles(acc, l_i, m_i, q, t_row, lo, full_hi, cs, write, KCb, VCb, KNb, VNb, stride_ct,
                                 stride_nt, offs_d, d_ok, qk_scale, False, HAS_NEW, BLOCK_N, PRECISION, None)
    # The masked tail is a tile or two: not pipelined (its four loads would double the buffers).
    acc, l_i, m_i = _cache_tiles(acc, l_i, m_i, q, t_row, full_hi, hi, cs, write, KCb, VCb, KNb, VNb, stride_ct,
                                 stride_nt, offs_d, d_ok, qk_scale, True, HAS_NEW, BLOCK_N, PRECISION, 1)
    if HAS_DEPTH:
        # One program per row block takes them (an empty range elsewhere): the extra last
        # one (its cache range [lo, hi) is empty: lo >= TMAX), or the slice of the last key.
        if DEPTH_APART:
            mine = split == tl.num_programs(0) - 1
        else:
            mine = (kv_hi - 1) // SPLIT_LEN == split
        depth_hi = tl.where(mine, (t_hi + 1) * L, t_lo * L)
        DKb = DK + b.to(tl.int64) * stride_db + hk * stride_dh
        DVb = DV + b.to(tl.int64) * stride_db + hk * stride_dh
        acc, l_i, m_i = _depth_tiles(acc, l_i, m_i, q, t_row, t_lo * L, depth_hi, L, DKb, DVb, stride_dt, stride_dl,
                                     offs_d, d_ok, qk_scale, BLOCK_N, PRECISION)

    # O and LSE are laid out as out [B, S, Hq, D] and lse [B, Hq, S], PART_ROWS apart per split.
    heads = hk * G + g_row
    part = split.to(tl.int64) * PART_ROWS
    o_rows = part + (b * S + t_row) * (HK * G) + heads
    seen = l_i > 0  # False only in a slice past the last visible key: it writes lse = -inf
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O + o_rows[:, None] * HEAD_DIM + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=(row_ok & seen)[:, None] & d_ok[None, :])
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / LOG2E, float("-inf"))
    tl.store(LSE + LSE_BASE + part + (b * HK * G + heads) * S + t_row, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(PART, O, LSE, N_ROWS, S, HQ, SPLITS, LSE_BASE, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr, PDL: tl.constexpr):
    """One row (b, h, t) of out and lse from the SPLITS partial results in PART (outputs, then
    lse from LSE_BASE on). PDL: launched as a programmatic dependent of the split kernel, it
    waits here until that grid has finished and its writes are visible."""
    if PDL:
        gdc_wait()
    row = tl.program_id(0)  # lse order: (b * HQ + h) * S + t
    b = row // (HQ * S)
    h = row // S % HQ
    t = row % S
    o_row = (b * S + t) * HQ + h  # out order
    sp = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    lse_part = tl.load(PART + LSE_BASE + sp * N_ROWS + row, mask=sp < SPLITS, other=float("-inf"))
    m = tl.max(lse_part, 0)
    w = tl.exp(lse_part - m)
    seen = (sp < SPLITS) & (lse_part > float("-inf"))  # a skipped slice wrote no output
    o = tl.load(PART + (sp[:, None].to(tl.int64) * N_ROWS + o_row) * HEAD_DIM + offs_d[None, :],
                mask=seen[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / total
    tl.store(O + o_row.to(tl.int64) * HEAD_DIM + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(LSE + row, m + tl.log(total))


class DecodePlan(NamedTuple):
    grid: tuple
    splits: int  # partial results to combine: the cache slices, plus the depth program if apart
    depth_apart: bool
    split_len: int
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    pdl: bool  # the combine kernel starts while the split kernel runs (Hopper and later)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, as on a small GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


_SMEM_PER_SM = 228 * 1024  # Hopper; each resident program also costs 1 KB of reserved shared memory
_MAX_SPLITS = 64


def _programs_per_sm(block_m: int, block_n: int, block_d: int, stages: int, elem_bytes: int) -> int:
    """Split programs one SM holds at once: its shared memory over a program's tiles (the
    q rows and ``stages`` buffers of one K and one V tile), at most 4."""
    tiles = elem_bytes * block_d * (block_m + 2 * stages * block_n)
    return max(1, min(4, _SMEM_PER_SM // (tiles + 1024)))


def _num_splits(programs: int, slots: int, max_splits: int) -> int:
    """The fewest splits whose programs fill the GPU's ``slots`` (programs resident at once)
    in whole waves, as nearly as any count up to ``max_splits`` does (at least 95% of the
    best wave efficiency; efficiency = waves / waves rounded up).

    Why whole waves: the step is memory-bound and each program streams a slice of equal
    length, so a last wave that is partly full costs a whole slice's time. B = 8, Hk = 8
    (64 programs) on 132 SMs x 2: 5 splits are 320 programs, 1.2 waves; 4 are 0.97.
    """
    if programs >= slots:
        return 1

    def efficiency(splits: int) -> float:
        waves = programs * splits / slots
        return waves / -(-waves // 1)

    best = max(efficiency(s) for s in range(1, max_splits + 1))
    return next(s for s in range(1, max_splits + 1) if efficiency(s) >= 0.95 * best)


@functools.lru_cache(maxsize=1024)
def decode_plan(B: int, S: int, G: int, Hk: int, D: int, Tmax: int, device: torch.device, elem_bytes: int = 2,
                num_splits=None, has_depth: bool = False, depth_apart=None) -> DecodePlan:
    """Tiles and splits of a call, from its shapes alone (cached per shape).

    Splits by :func:`_num_splits`: whole waves of the (batch, kv head, row block) programs,
    each slice at least 4 key tiles long, at most 64 slices. ``num_splits`` forces a count
    (tests); slices are whole tiles, so fewer may result. With depth rows, a program of its
    own takes them where the cache is split and one more program per row block still fits
    in the first wave (B = 1: the step is one slice long, not one slice and the depth
    rows); ``depth_apart`` forces the choice (tests).
    """
    block_d = max(16, triton.next_power_of_2(D))
    block_m = min(max(16, triton.next_power_of_2(S * G)), MAX_BLOCK_M if D <= 128 else MAX_BLOCK_M // 2)
    block_n, stages = _key_tiles(D, elem_bytes)
    m_blocks = triton.cdiv(S * G, block_m)
    programs = B * Hk * m_blocks

    def slots() -> int:  # split programs resident at once (asked only where needed: tests plan for absent GPUs)
        return _sm_count(device) * _programs_per_sm(block_m, block_n, block_d, stages, elem_bytes)

    if num_splits is None:
        num_splits = _num_splits(programs, slots(), max(1, min(triton.cdiv(Tmax, 4 * block_n), _MAX_SPLITS)))
    split_len = triton.cdiv(triton.cdiv(Tmax, max(1, num_splits)), block_n) * block_n
    splits = triton.cdiv(Tmax, split_len)
    if depth_apart is None:
        depth_apart = has_depth and splits > 1 and programs * (splits + 1) <= slots()
    parts = splits + bool(has_depth and depth_apart)
    # PDL where the combine kernel's programs (one per query row) fit beside the split grid.
    pdl = parts > 1 and _pdl(device) and programs * parts + B * S * G * Hk <= slots()
    return DecodePlan((parts, B * Hk, m_blocks), parts, parts > splits, split_len, block_m, block_n, block_d,
                      _num_warps(block_m, block_d), stages, pdl)


def _key_tiles(D: int, elem_bytes: int) -> Tuple[int, int]:
    """(keys per tile, pipeline stages) of the split kernel; ``bench/decode_tiles.py`` times
    the alternatives. Two stages where three would not fit shared memory (float32 tiles)."""
    stages = 3 if D <= 128 and elem_bytes <= 2 else 2
    if INTERPRET:
        return 16, stages
    return (128 if D <= 64 else 64 if D <= 128 or elem_bytes <= 2 else 32), stages


def _num_warps(block_m: int, block_d: int) -> int:
    return 4 if block_m * block_d <= 128 * 64 else 8


def _pdl(device: torch.device) -> bool:
    """Whether this device can launch the combine kernel as a programmatic dependent of the
    split kernel (sm_90's griddepcontrol); :func:`decode_plan` decides where it does.

    Why only where both grids fit at once (H100, CUDA-graph replay, Hq 32 Hk 8 D 128, 4k
    cache): at B = 1 the split grid takes 136 of 264 program slots, the combine's 32 programs
    start beside it and the step took 15.7 us instead of 16.5; at B = 8 the split grid takes
    256 slots, the combine's 256 programs do not fit beside it, and the step took 57.5 us
    instead of 55.5 (docs/performance.md, "Decoding")."""
    return (not INTERPRET and gdc_wait is not None and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _same_strides(a: torch.Tensor, b: torch.Tensor):
    """a and b with one layout (both made contiguous where they differ) and unit last stride."""
    if a.stride() != b.stride() or a.stride(-1) != 1:
        return a.contiguous(), b.contiguous()
    return a, b


def _operands(q, k_cache, v_cache, k, v, depth_k, depth_v, copies: bool = True):
    """The kernel's operands: q with unit last stride, k and v (and the depth pair) each with
    one layout, placeholders for absent ones (never read). Returns (q, k, v, depth_k,
    depth_v, has_new, L). ``copies=False``: the caller knows no input needs a copy for that
    (a prepared layout that needed none), only the placeholders are filled in."""
    if copies and q.stride(-1) != 1:
        q = q.contiguous()
    has_new = k is not None
    if not has_new:
        k, v = k_cache, v_cache
    elif copies:
        k, v = _same_strides(k, v)
    L = depth_k.shape[2] if depth_k is not None else 0
    if not L:
        depth_k = depth_v = q.unsqueeze(2)
    elif copies:
        depth_k, depth_v = _same_strides(depth_k, depth_v)
    return q, k, v, depth_k, depth_v, has_new, L


class PreparedDecode:
    """The launches of a decode call, worked out once for every later call of the same
    layout: the plan, each kernel's scalar arguments (sizes and strides) and constexprs, and
    their compiled kernels (``_launch.Launcher``). What is left per call is allocating the
    outputs and two launches with the tensors' addresses.

    The caller guarantees the layout: the shapes, strides, dtypes and devices of every
    input and whether each address is 16-byte aligned, which is everything the scalars and
    Triton's specialisation depend on (``moda_cuda.eager.with_kvcache`` keys its cache on
    exactly those).
    """

    def __init__(self, q, k_cache, k, depth_k, has_new: bool, L: int, sm_scale: float, num_splits=None,
                 depth_apart=None, copies: bool = True):
        """From the operands of :func:`_operands` (their layout is what counts); ``copies``:
        whether inputs of this layout need copies to become those operands."""
        B, S, Hq, D = q.shape
        Tmax, Hk = k_cache.shape[1], k_cache.shape[2]
        p = decode_plan(B, S, Hq // Hk, Hk, D, Tmax, q.device, q.element_size(), num_splits, L > 0, depth_apart)
        n_rows = B * Hq * S
        self.lse_shape = (B, Hq, S)
        self.copies = copies
        # Partial outputs [splits, B, S, Hq, D], then partial lse [splits, B, Hq, S], one buffer.
        self.partial_numel = p.splits * n_rows * (D + 1) if p.splits > 1 else 0
        part_rows, lse_base = (n_rows, p.splits * n_rows * D) if p.splits > 1 else (0, 0)
        sq, sc, sn, sd = q.stride(), k_cache.stride(), k.stride(), depth_k.stride()
        scalars = (sm_scale, sq[0], sq[1], sq[2], sc[0], sc[1], sc[2], sn[0], sn[1], sn[2],
                   sd[0], sd[1], sd[2], sd[3], S, Hk, L, Tmax, p.split_len, part_rows, lse_base)
        self.split = Launcher(_decode_split_kernel, p.grid,
                              dict(G=Hq // Hk, HEAD_DIM=D, BLOCK_D=p.block_d, BLOCK_M=p.block_m, BLOCK_N=p.block_n,
                                   HAS_NEW=has_new, HAS_DEPTH=L > 0, DEPTH_APART=p.depth_apart,
                                   PRECISION=dot_precision(q.dtype), PDL=p.pdl),
                              scalars, num_warps=p.num_warps, num_stages=p.num_stages)
        self.combine = None
        if p.splits > 1:
            self.combine = Launcher(_decode_combine_kernel, (n_rows,),
                                    dict(HEAD_DIM=D, BLOCK_D=p.block_d,
                                         BLOCK_SPLITS=max(2, triton.next_power_of_2(p.splits)), PDL=p.pdl),
                                    (n_rows, S, Hq, p.splits, lse_base), num_warps=4,
                                    **(dict(launch_pdl=True) if p.pdl else {}))

    def launch(self, q, k_cache, v_cache, k, v, depth_k, depth_v, cache_seqlens):
        """(out, lse) from the operands of :func:`_operands`."""
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=q.device)
        if self.partial_numel:
            o_t = lse_t = torch.empty(self.partial_numel, dtype=torch.float32, device=q.device)
        else:  # one split: the kernel writes the outputs itself
            o_t, lse_t = out, lse
        self.split(q, k_cache, v_cache, k, v, depth_k, depth_v, cache_seqlens, o_t, lse_t)
        if self.combine is not None:
            self.combine(o_t, out, lse)
        return out, lse

    def __call__(self, q, k_cache, v_cache, k, v, depth_k, depth_v, cache_seqlens):
        """:func:`moda_decode` for inputs of the prepared layout."""
        q, k, v, depth_k, depth_v, _, _ = _operands(q, k_cache, v_cache, k, v, depth_k, depth_v, self.copies)
        return self.launch(q, k_cache, v_cache, k, v, depth_k, depth_v, cache_seqlens)


def prepare_decode(q, k_cache, v_cache, k, v, depth_k, depth_v, sm_scale: float) -> PreparedDecode:
    """A :class:`PreparedDecode` for calls laid out as these inputs (see its caveat)."""
    oq, ok, ov, odk, odv, has_new, L = _operands(q, k_cache, v_cache, k, v, depth_k, depth_v)
    # Which inputs _operands replaced by copies follows from the layout: same for every call.
    copies = oq is not q or (has_new and (ok is not k or ov is not v)) or (
        L > 0 and (odk is not depth_k or odv is not depth_v))
    return PreparedDecode(oq, k_cache, ok, odk, has_new, L, sm_scale, copies=copies)


def moda_decode(q, k_cache, v_cache, k, v, depth_k, depth_v, cache_seqlens, sm_scale: float, num_splits=None,
                depth_apart=None):
    """Attention of ``q [B, S, Hq, D]`` against the caches (``k``, ``v`` written into them at
    ``cache_seqlens[b] + i`` first, by the kernel), with the depth rows ``[B, S, L, Hk, D]``.

    The caller validates the inputs; the caches must share one layout with unit last stride
    (they are written in place). Returns (out [B, S, Hq, D] in q's dtype, lse [B, Hq, S]
    float32, natural log).
    """
    q, k, v, depth_k, depth_v, has_new, L = _operands(q, k_cache, v_cache, k, v, depth_k, depth_v)
    prepared = PreparedDecode(q, k_cache, k, depth_k, has_new, L, sm_scale, num_splits, depth_apart)
    return prepared.launch(q, k_cache, v_cache, k, v, depth_k, depth_v, cache_seqlens)
