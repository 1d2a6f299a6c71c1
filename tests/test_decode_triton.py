"""The Triton decode kernel (split-KV) against the float64 reference of attention with a KV cache.

On a CPU-only machine it runs in Triton's interpreter (conftest.py), with 16-key tiles, so
that the small odd caches below span several tiles and several splits; the ``cuda`` tests
run it compiled in bf16. Every cache row a sequence does not hold yet is NaN (a cache is
never cleared), and every output buffer is NaN-poisoned: an unmasked read or an unwritten
element shows up.
"""

import pytest
import torch
import triton

import moda_cuda
from helpers import rel_err
from kernel_checks import poisoned_allocations
from moda_cuda.kvcache import decode_backend
from moda_cuda.triton_ref.decode import decode_plan, moda_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def _problem(B, S, Hq, Hk, D, L, Tmax, lens, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    k_cache, v_cache = r(B, Tmax, Hk, D), r(B, Tmax, Hk, D)
    for b, n in enumerate(lens):  # rows not cached yet hold anything: NaN here
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
    depth = (r(B, S, L, Hk, D), r(B, S, L, Hk, D)) if L else (None, None)
    return dict(q=r(B, S, Hq, D), k_cache=k_cache, v_cache=v_cache, depth_k=depth[0], depth_v=depth[1],
                k=r(B, S, Hk, D), v=r(B, S, Hk, D), cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device))


def _reference(p):
    """(out, lse, k_cache, v_cache) in float64 through the reference, caches written."""
    d = {name: (t.double() if t is not None and t.is_floating_point() else t) for name, t in p.items()}
    d["k_cache"], d["v_cache"] = d["k_cache"].clone(), d["v_cache"].clone()
    out, lse = moda_cuda.moda_attention_with_kvcache(d.pop("q"), d.pop("k_cache"), d.pop("v_cache"),
                                                     d.pop("depth_k"), d.pop("depth_v"), return_lse=True,
                                                     backend="reference", **d)
    return out, lse


def _expected_caches(p):
    k_cache, v_cache = p["k_cache"].clone(), p["v_cache"].clone()
    S = p["q"].shape[1]
    for b, n in enumerate(p["cache_seqlens"].tolist()):
        k_cache[b, n:n + S] = p["k"][b]
        v_cache[b, n:n + S] = p["v"][b]
    return k_cache, v_cache


def _same(a, b):
    """Equal, NaN where the other is NaN."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def _run(p, num_splits, with_new=True, depth_apart=None):
    """moda_decode on the problem (caches written in place); out, lse."""
    scale = p["q"].shape[-1] ** -0.5
    new = (p["k"], p["v"]) if with_new else (None, None)
    with poisoned_allocations():
        return moda_decode(p["q"], p["k_cache"], p["v_cache"], *new, p["depth_k"], p["depth_v"],
                           p["cache_seqlens"], scale, num_splits=num_splits, depth_apart=depth_apart)


def _check(p, num_splits, dtype=torch.float32, depth_apart=None):
    want_out, want_lse = _reference(p)
    want_k, want_v = _expected_caches(p)
    out, lse = _run(p, num_splits, depth_apart=depth_apart)
    assert out.dtype == p["q"].dtype and lse.dtype == torch.float32
    assert rel_err(out, want_out) < TOL[dtype], rel_err(out, want_out)
    assert rel_err(lse, want_lse) < TOL[torch.float32], rel_err(lse, want_lse)
    # The new keys are in the caches at cache_seqlens[b] .. + S, and nothing else changed.
    assert _same(p["k_cache"], want_k) and _same(p["v_cache"], want_v)


# (S, L, G, D): every S with every L, the two head dims and group sizes alternating; the
# caches are 37 long, with lengths 0 (the new tokens only), odd, and filling the cache.
CASES = [(S, L, G, D) for S in (1, 4, 17) for L in (0, 1, 64) for G, D in ((1, 64), (8, 128))]


@pytest.mark.parametrize("S, L, G, D", CASES, ids=lambda x: str(x))
def test_decode_kernel_matches_reference(S, L, G, D):
    """The depth rows in the slice of the last key, or (L > 0) in a program of their own."""
    Hk = 2 if G == 1 else 1
    Tmax = 37
    for apart in (False, True) if L else (False,):
        p = _problem(3, S, G * Hk, Hk, D, L, Tmax, [0, 13, Tmax - S], seed=S * 100 + L)
        plan = decode_plan(3, S, G, Hk, D, Tmax, p["q"].device, 4, 3, L > 0, apart)
        assert plan.splits == 3 + apart and plan.depth_apart == apart and plan.split_len < Tmax
        _check(p, num_splits=3, depth_apart=apart)


@pytest.mark.parametrize("num_splits", [1, 2, 5, None])
def test_split_counts_agree(num_splits):
    p = _problem(2, 1, 8, 1, 64, 3, 70, [5, 69])
    _check(p, num_splits)
    if num_splits is not None:
        assert decode_plan(2, 1, 8, 1, 64, 70, p["q"].device, 4, num_splits).splits == num_splits


@pytest.mark.parametrize("G, D", [(8, 64), (1, 128), (4, 24)], ids=["G8-D64", "G1-D128", "G4-D24"])
def test_other_groups_and_head_dims(G, D):
    p = _problem(2, 2, G * 2, 2, D, 3, 29, [7, 27])
    _check(p, num_splits=2)


def test_keys_already_in_the_cache():
    p = _problem(2, 3, 4, 2, 32, 2, 40, [4, 31])
    written = _expected_caches(p)
    p["k_cache"], p["v_cache"] = written
    want_out, want_lse = _reference(dict(p, k=None, v=None))
    out, lse = _run(p, num_splits=3, with_new=False)
    assert rel_err(out, want_out) < 1e-5 and rel_err(lse, want_lse) < 1e-5
    assert _same(p["k_cache"], written[0]) and _same(p["v_cache"], written[1])


def test_strided_inputs():
    """q, k, v as head-major views, depth as the first slots of larger buffers (a depth stream's
    read), k and v of different layouts."""
    p = _problem(2, 2, 4, 2, 32, 3, 33, [9, 30])
    p["q"] = p["q"].transpose(1, 2).contiguous().transpose(1, 2)
    p["k"] = p["k"].transpose(1, 2).contiguous().transpose(1, 2)
    assert p["k"].stride() != p["v"].stride()
    for name in ("depth_k", "depth_v"):
        buf = torch.full((2, 2, 6, 2, 32), float("nan"), device=DEVICE)
        buf[:, :, :3] = p[name]
        p[name] = buf[:, :, :3]
    _check(p, num_splits=2)


def test_half_precision():
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    p = _problem(2, 4, 8, 2, 64, 5, 41, [0, 37], dtype=dtype)
    _check(p, num_splits=3, dtype=dtype)


def test_the_op_runs_the_kernel():
    """backend="triton" through moda_attention_with_kvcache; "auto" picks it on CUDA only."""
    p = _problem(2, 1, 4, 2, 32, 2, 25, [3, 24])
    want_out, want_lse = _reference(p)
    q, kc, vc, dk, dv = (p.pop(n) for n in ("q", "k_cache", "v_cache", "depth_k", "depth_v"))
    out, lse = moda_cuda.moda_attention_with_kvcache(q, kc, vc, dk, dv, return_lse=True, backend="triton", **p)
    assert rel_err(out, want_out) < 1e-5 and rel_err(lse, want_lse) < 1e-5
    assert decode_backend("auto", q, kc, vc) == ("triton" if DEVICE == "cuda" else "reference")
    assert decode_backend("reference", q, kc, vc) == "reference"
    with pytest.raises(ValueError, match="'triton' cannot run this KV-cache call: dtype torch.float64"):
        decode_backend("triton", q.double(), kc.double(), vc.double())
    with pytest.raises(ValueError, match="must share one layout"):
        decode_backend("triton", q, kc, vc.transpose(1, 2).contiguous().transpose(1, 2))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend):
    """Schema (the caches declared mutated, nothing else), fake implementation, tracing."""
    p = _problem(2, 2, 4, 2, 16, 2, 20, [3, 11])
    args = tuple(p[n] for n in ("q", "k_cache", "v_cache", "depth_k", "depth_v", "k", "v", "cache_seqlens"))
    torch.library.opcheck(torch.ops.moda.attention_with_kvcache.default, args,
                          dict(scale=None, depth_chunk=1, backend=backend))


def test_backend_from_the_environment(monkeypatch):
    p = _problem(1, 1, 2, 2, 16, 0, 8, [3])
    q, kc, vc = p["q"], p["k_cache"], p["v_cache"]
    monkeypatch.setenv("MODA_BACKEND", "reference")
    assert decode_backend("auto", q, kc, vc) == "reference"
    monkeypatch.setenv("MODA_BACKEND", "triton")
    assert decode_backend("auto", q, kc, vc) == "triton"
    monkeypatch.setenv("MODA_BACKEND", "cuda")  # no compiled decode kernel: auto's choice
    assert decode_backend("auto", q, kc, vc) == ("triton" if DEVICE == "cuda" else "reference")
    monkeypatch.setenv("MODA_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown MoDA backend 'fast'"):
        decode_backend("auto", q, kc, vc)


def test_plan_depends_on_shapes_only(monkeypatch):
    """One split where the programs fill the GPU, several for one long sequence; slices are
    whole tiles and cover the cache."""
    from moda_cuda.triton_ref import decode

    monkeypatch.setattr(decode, "_sm_count", lambda device: 132)
    monkeypatch.setattr(decode, "INTERPRET", False)  # the GPU's tiles: two programs per SM
    monkeypatch.setattr(decode, "_pdl", lambda device: True)  # a Hopper GPU
    decode_plan.cache_clear()
    try:
        many = decode_plan(32, 1, 4, 8, 128, 4096, torch.device("cpu"))
        one = decode_plan(1, 1, 4, 8, 128, 32768, torch.device("cpu"))
        # Depth rows apart where one more program per (batch, kv head) stays in the first
        # wave: B = 1 (8 x 17 programs), not B = 8 (64 x 5 > 264) nor one split (B = 32).
        depth = [decode_plan(B, 1, 4, 8, 128, 4096, torch.device("cpu"), 2, None, True) for B in (1, 8, 32)]
    finally:
        decode_plan.cache_clear()
    assert many.splits == 1 and many.grid == (1, 256, 1)
    assert one.splits == 32 and one.split_len % one.block_n == 0 and one.splits * one.split_len >= 32768
    assert [(p.depth_apart, p.splits) for p in depth] == [(True, 17), (False, 4), (False, 1)]
    # PDL where the combine's programs (B x Hq) fit beside the split grid: B = 1 (136 + 32 of
    # 264 slots), not B = 8 (256 + 256), not without a combine (B = 32), not 32 slices (one).
    assert [p.pdl for p in depth] == [True, False, False] and not one.pdl and not many.pdl


@pytest.mark.parametrize("programs, slots, max_splits, splits", [
    (64, 264, 64, 4),  # B=8 Hk=8 on 132 SMs x 2: 256 programs, not 5 splits' 320 (1.2 waves)
    (32, 264, 64, 8),
    (8, 264, 64, 32),  # B=1: 256 of 264 slots (33 would fill them all: within 5%, fewer splits)
    (8, 264, 16, 16),  # a short cache: as many splits as its tiles allow
    (128, 264, 64, 2),
    (256, 264, 64, 1),
    (300, 264, 64, 1),  # more than a wave already
    (5, 264, 1, 1),
])
def test_splits_fill_whole_waves(programs, slots, max_splits, splits):
    from moda_cuda.triton_ref.decode import _num_splits

    assert _num_splits(programs, slots, max_splits) == splits


# Compiled for sm_90 (H100/H200) on any machine: Triton's compiler and ptxas need no GPU. The
# interpreter runs the kernels' Python; this catches what only the compiler sees (types,
# layouts, shared memory). In a subprocess: the kernels of this one are interpreted.
_HOPPER_COMPILE = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from moda_cuda.triton_ref import decode as d

def compile(kernel, pointers, constexprs, **options):
    sig = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "fp32" if p.name == "sm_scale" else "i32")
           for p in kernel.params}
    return triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32), options=options)

# (dtype, elem bytes, G, D, S, partial outputs): a decode step in bf16, a speculative block
# in fp16 with float32 partials, float32 with an odd head dim
for dt, size, G, D, S, partial in (("bf16", 2, 4, 128, 1, False), ("fp16", 2, 8, 128, 17, True),
                                   ("fp32", 4, 4, 80, 2, False)):
    p = d.decode_plan(2, S, G, 2, D, 4096, torch.device("cuda"), size, 4)
    ptr = {n: "*" + dt for n in ("Q", "KC", "VC", "KN", "VN", "DK", "DV")}
    ptr.update(SEQLENS="*i32", O="*fp32" if partial else "*" + dt, LSE="*fp32")
    k = compile(d._decode_split_kernel, ptr, dict(G=G, HEAD_DIM=D, BLOCK_D=p.block_d, BLOCK_M=p.block_m,
                BLOCK_N=p.block_n, HAS_NEW=True, HAS_DEPTH=True, DEPTH_APART=partial, PRECISION=d.dot_precision(
                {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]), PDL=partial),
                num_warps=p.num_warps, num_stages=p.num_stages)
    print(dt, G, D, S, "shared", k.metadata.shared)
    assert k.metadata.shared <= 227 * 1024, k.metadata.shared
for pdl in (False, True):  # PDL: a programmatic dependent of the split kernel
    k = compile(d._decode_combine_kernel, dict(PART="*fp32", O="*bf16", LSE="*fp32"),
                dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_SPLITS=64, PDL=pdl), num_warps=4, launch_pdl=pdl)
    assert ("griddepcontrol.wait" in k.asm["ptx"]) == pdl
    print("combine shared", k.metadata.shared)
"""


def test_kernels_compile_for_hopper(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    ptxas = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "ptxas", None)
    if ptxas is None or not Path(str(ptxas.path)).is_file():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # this moda_cuda
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert res.stdout.count("shared") == 5


# ----------------------------------------------------------------------------- GPU, bf16


@pytest.mark.cuda
@pytest.mark.parametrize("S, L, G, D", [(1, 32, 4, 128), (1, 0, 8, 64), (4, 32, 8, 128), (1, 32, 1, 128)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_bf16_on_gpu(S, L, G, D, num_splits):
    """7 splits with depth rows: in a program of their own (chosen here) and in the last slice."""
    Tmax, Hk = 3000, 2
    for apart in (None, False) if num_splits == 7 and L else (None,):
        p = _problem(4, S, G * Hk, Hk, D, L, Tmax, [0, 1, 1777, Tmax - S], dtype=torch.bfloat16, device="cuda")
        _check(p, num_splits, dtype=torch.bfloat16, depth_apart=apart)


@pytest.mark.cuda
@pytest.mark.parametrize("num_splits", [1, 7])
def test_repeated_calls_take_the_compiled_launch_and_stay_right(num_splits):
    """The first call of a layout binds through Triton; the next ones go straight to the
    compiled kernels (triton_ref._launch). Fresh values each call, same shapes and strides."""
    from moda_cuda.triton_ref import _launch

    _launch._compiled.clear()
    for seed in range(3):
        p = _problem(3, 1, 8, 2, 128, 5, 600, [0, 311, 599], seed=seed, dtype=torch.bfloat16, device="cuda")
        _check(p, num_splits, dtype=torch.bfloat16)
        assert len(_launch._compiled) == (1 if num_splits == 1 else 2)


def _prepared_against_moda_decode(device, dtype, Tmax, lens, with_new, splits, copies=False):
    """A PreparedDecode (the eager path's cached launches) made from one call's inputs, on
    fresh inputs of that layout: moda_decode's outputs bit for bit, the caches written alike."""
    from moda_cuda.triton_ref.decode import prepare_decode

    def problem(seed):
        p = _problem(len(lens), 1, 8, 2, 64, 3, Tmax, lens, dtype=dtype, device=device, seed=seed)
        p["q"] = p["q"].transpose(1, 2).contiguous().transpose(1, 2)  # strided: the layout is what is kept
        if copies:  # depth_v laid out unlike depth_k: the kernel takes copies of both
            p["depth_v"] = p["depth_v"].transpose(1, 3).contiguous().transpose(1, 3)
        if not with_new:  # the new tokens' keys already in the caches
            p["k_cache"], p["v_cache"] = _expected_caches(p)
            p["k"] = p["v"] = None
        return p

    first, scale = problem(0), 64 ** -0.5
    prepared = prepare_decode(first["q"], first["k_cache"], first["v_cache"], first["k"], first["v"],
                              first["depth_k"], first["depth_v"], scale)
    assert (prepared.combine is not None) == splits and prepared.copies == copies
    for seed in range(1, 4):
        p = problem(seed)
        caches = p["k_cache"].clone(), p["v_cache"].clone()
        want = moda_decode(p["q"], *caches, p["k"], p["v"], p["depth_k"], p["depth_v"], p["cache_seqlens"], scale)
        with poisoned_allocations():
            got = prepared(p["q"], p["k_cache"], p["v_cache"], p["k"], p["v"], p["depth_k"], p["depth_v"],
                           p["cache_seqlens"])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert _same(p["k_cache"], caches[0]) and _same(p["v_cache"], caches[1])
    return prepared


@pytest.mark.parametrize("Tmax, with_new, splits, copies", [(70, True, True, False), (70, False, True, False),
                                                             (9, True, False, False), (70, True, True, True)],
                         ids=["splits", "no-new", "one-split", "copies"])
def test_prepared_calls_equal_moda_decode(Tmax, with_new, splits, copies):
    _prepared_against_moda_decode(DEVICE, torch.float32, Tmax, [5, Tmax - 1], with_new, splits, copies)


@pytest.mark.cuda
@pytest.mark.parametrize("Tmax, splits", [(500, False), (32768, True)], ids=["one-split", "splits"])
def test_prepared_calls_on_gpu_take_the_compiled_kernels(Tmax, splits):
    """Through the compiled launchers (``_launch.Launcher``) after the first call, and from the
    third call through the extension's ``KernelLaunch`` where it is built (Triton 3.6)."""
    from moda_cuda import _cuda_ext

    prepared = _prepared_against_moda_decode("cuda", torch.bfloat16, Tmax, [0, 311, Tmax - 1], True, splits)
    if _cuda_ext.load() is not None and triton.__version__.startswith("3.6."):
        assert prepared.split.native and (prepared.combine is None or prepared.combine.native)


@pytest.mark.cuda
def test_auto_runs_the_kernel_on_gpu():
    p = _problem(2, 1, 8, 2, 128, 8, 512, [100, 511], dtype=torch.bfloat16, device="cuda")
    want_out, _ = _reference(p)
    q, kc, vc, dk, dv = (p.pop(n) for n in ("q", "k_cache", "v_cache", "depth_k", "depth_v"))
    assert decode_backend("auto", q, kc, vc) == "triton"
    out = moda_cuda.moda_attention_with_kvcache(q, kc, vc, dk, dv, **p)
    assert rel_err(out, want_out) < 1e-2


@pytest.mark.cuda
def test_decode_step_in_a_cuda_graph():
    """Captured once, replayed with cache_seqlens advanced in place: each replay attends to the
    keys the earlier replays wrote."""
    B, Hq, Hk, D, L, Tmax = 2, 8, 2, 64, 4, 300
    p = _problem(B, 1, Hq, Hk, D, L, Tmax, [10, 200], dtype=torch.bfloat16, device="cuda")
    static = dict(p)
    seqlens = p["cache_seqlens"]

    def step():
        return moda_cuda.moda_attention_with_kvcache(static["q"], static["k_cache"], static["v_cache"],
                                                     static["depth_k"], static["depth_v"], k=static["k"],
                                                     v=static["v"], cache_seqlens=seqlens)

    step()  # compiles (writes the keys at 10 and 200; the first replay writes them again)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records, runs nothing: cache_seqlens stays [10, 200]
        out = step()
        seqlens.add_(1)
    for _ in range(3):
        for name in ("q", "k", "v", "depth_k", "depth_v"):
            static[name].normal_()  # this step's inputs, in the captured buffers
        want_out, _ = _reference({name: t.clone() for name, t in static.items()})
        graph.replay()
        assert rel_err(out, want_out) < 1e-2
    assert seqlens.tolist() == [13, 203]
