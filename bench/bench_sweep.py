"""MoDA speed where models are trained: one-factor-at-a-time sweeps around two centre shapes.

Centres (16k tokens per batch, causal, depth chunk 1, bf16):

    d64   B=4 T=4096 Hq=64 Hk=8 D=64  L=64
    d128  B=4 T=4096 Hq=32 Hk=8 D=128 L=32

Around each centre one factor moves at a time:

    split   B x T in 1x16384, 2x8192, 4x4096, 8x2048, 16x1024 (same 16k tokens)
    group   G = Hq / Hk in 1, 2, 4, 8, 16, 32 with Hk = 8 (Hq = 8 G)
    depth   L in 0, 8, 32, 64, 128, 256
    causal  non-causal
    chunk   depth_chunk 64
    long    64k tokens as 1x65536 and 8x8192 (plotted next to the 16k centre)

A point equal to the centre is measured once per centre and reused by every sweep that
contains it. For every point, forward and forward+backward (``triton.testing.do_bench``
medians, ms, through ``bench_common.bench_ms``):

* ``moda_attention`` with ``backend="auto"`` and with each available fast backend (``cuda``,
  ``triton``); a backend that cannot serve the input raises ValueError, recorded as null
  with its reason (so is an out-of-memory error, per provider);
* cuDNN SDPA WITHOUT depth (``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``, GQA through
  ``enable_gqa``, or expanded k/v where cuDNN refuses it) on the same B, T, Hq, Hk, D and
  causality: the speed of light of the sequence part;
* the bound ``max(cuDNN no-depth time, depth bytes / copy bandwidth)``. The depth rows are
  B*T*L*Hk*D elements each of depth_k and depth_v, read by every query's softmax and
  never reused across positions, so however well a kernel is fused they must cross DRAM at
  least once per read: depth bytes = depth_k + depth_v bytes for the forward, 4x that for
  forward+backward (the forward's read, the backward's two reads -- its dK/dV and its dQ
  passes -- and the write of the depth gradients). The copy bandwidth is measured once per
  run with a large device-to-device ``copy_`` (read + write: 2 * bytes / time). MoDA can be
  no faster than attention without depth, nor than streaming its depth tensors, so
  ours/bound near 1 means nothing is left on the table (the target: within 1.15x);
* ratios: auto/bound, best backend/bound and auto/best (auto must never be slower than the
  best backend: points with auto > 1.03 x best are flagged);
* useful TFLOP/s: useful FLOPs = 4 * B * Hq * D * (visible pairs + depth pairs), visible
  pairs T (T + 1) / 2 causal, T^2 non-causal; depth pairs T * L for chunk 1, and for chunk C
  (t - chunk start + 1) * L per query causal, (size of its chunk) * L non-causal;
  forward+backward counts 3.5x.

Unless ``--no-check``, every output of ours is checked finite and compared with the float32
reference on a cheap slice (batch entry 0, the query heads of kv head 0, the first 2048
positions when causal: a causal output's prefix depends only on the inputs' prefix).

The whole sweep (38 points) takes longer than one GPU call may run, so run it in interleaved
slices (each slice gets a share of the expensive points) and merge:

    python bench/bench_sweep.py --list                               # the points, no GPU needed
    python bench/bench_sweep.py --slice 1/4 --out DIR                # DIR/bench_sweep_slice1of4.json
    ...
    python bench/bench_sweep.py --slice 4/4 --out DIR
    python bench/bench_sweep.py --merge DIR/bench_sweep_slice*of4.json --out DIR
        # DIR/bench_sweep.json, DIR/bench_sweep_d64.png, DIR/bench_sweep_d128.png, the table

Without ``--slice`` one run measures every point and writes ``bench_sweep.json`` and the
PNGs. ``--centres d64``, ``--sweeps split,depth`` and ``--points 'd64 group=32'`` narrow the
sweep. The JSON is rewritten after every point, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import moda_cuda
from bench_common import bench_ms, fwd_bwd_step, rel_err
from bench_moda import Shape, make_inputs
from moda_cuda.reference import moda_attention_ref

# ----------------------------------------------------------------------------- the points

CENTRES = {
    "d64": dict(B=4, T=4096, Hq=64, Hk=8, D=64, L=64),
    "d128": dict(B=4, T=4096, Hq=32, Hk=8, D=128, L=32),
}

# sweep: [(x label, what differs from the centre)], in plotting order. Each list holds the
# centre's own value (an empty change), so that every sweep's plot is complete.
SWEEPS = {
    "split": [(f"{b}x{t}", dict(B=b, T=t)) for b, t in ((1, 16384), (2, 8192), (4, 4096), (8, 2048), (16, 1024))],
    "group": [(str(g), dict(Hq=8 * g, Hk=8)) for g in (1, 2, 4, 8, 16, 32)],
    "depth": [(str(l), dict(L=l)) for l in (0, 8, 32, 64, 128, 256)],
    "causal": [("causal", {}), ("non-causal", dict(causal=False))],
    "chunk": [("1", {}), ("64", dict(chunk=64))],
    "long": [("4x4096", {}), ("1x65536", dict(B=1, T=65536)), ("8x8192", dict(B=8, T=8192))],
}
SWEEP_TITLES = {
    "split": "split: B x T (16k tokens)",
    "group": "group: G = Hq / Hk (Hk = 8)",
    "depth": "depth: L",
    "causal": "causal",
    "chunk": "chunk: depth_chunk",
    "long": "long: B x T (16k centre, 64k)",
}
FAST_BACKENDS = ("cuda", "triton")
CUDNN = "cudnn_no_depth"
AUTO_SLOW = 1.03  # auto is flagged where it is slower than the best backend by more than this
TARGET = 1.15  # the target for ours / bound, drawn in the plots
CHECK_TOL = 1e-2  # relative error of ours against the float32 reference (bf16 inputs)
MODES = (("fwd", 1.0, 1), ("fwd_bwd", 3.5, 4))  # (mode, FLOP multiple, depth-read multiple)


@dataclass
class Point:
    centre: str
    B: int
    T: int
    Hq: int
    Hk: int
    D: int
    L: int
    causal: bool = True
    chunk: int = 1
    sweeps: List[Tuple[str, str]] = field(default_factory=list)  # (sweep, x label) it stands for

    def key(self) -> tuple:
        return (self.centre, self.B, self.T, self.Hq, self.Hk, self.D, self.L, self.causal, self.chunk)

    @property
    def id(self) -> str:
        return (f"{self.centre}:B{self.B}:T{self.T}:Hq{self.Hq}:Hk{self.Hk}:D{self.D}:L{self.L}:"
                f"{'causal' if self.causal else 'full'}:C{self.chunk}")

    @property
    def shape(self) -> Shape:
        return Shape(self.B, self.T, self.Hq, self.Hk, self.D, self.L)

    def is_centre(self) -> bool:
        return self.key() == centre_point(self.centre).key()

    def label(self) -> str:
        if self.is_centre():
            return f"{self.centre} centre"
        return f"{self.centre} " + ", ".join(f"{s}={x}" for s, x in self.sweeps)

    def describe(self) -> str:
        return (f"B={self.B} T={self.T} Hq={self.Hq} Hk={self.Hk} D={self.D} L={self.L} "
                f"{'causal' if self.causal else 'non-causal'} chunk={self.chunk}")

    def flops(self) -> float:
        return useful_flops(self.B, self.T, self.Hq, self.D, self.L, self.causal, self.chunk)

    def depth_bytes(self) -> int:
        return depth_bytes(self.B, self.T, self.L, self.Hk, self.D)


def centre_point(name: str) -> Point:
    return Point(name, **CENTRES[name])


def visible_pairs(T: int, causal: bool) -> int:
    return T * (T + 1) // 2 if causal else T * T


def depth_pairs(T: int, L: int, causal: bool, chunk: int) -> int:
    """Sum over queries t of the depth rows t sees: its chunk's positions (those <= t when
    causal) times L."""
    full, rest = divmod(T, chunk)
    if causal:  # query t sees t - chunk start + 1 positions
        per_l = full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2
    else:  # every query sees its whole chunk (the last one may be short)
        per_l = full * chunk * chunk + rest * rest
    return per_l * L


def useful_flops(B: int, T: int, Hq: int, D: int, L: int, causal: bool = True, chunk: int = 1) -> float:
    """Forward FLOPs of the visible logits and the weighted values (2 matmuls x 2 FLOPs)."""
    return 4.0 * B * Hq * D * (visible_pairs(T, causal) + depth_pairs(T, L, causal, chunk))


def depth_bytes(B: int, T: int, L: int, Hk: int, D: int, elem_bytes: int = 2) -> int:
    """Bytes of depth_k plus depth_v (bf16 unless told)."""
    return 2 * B * T * L * Hk * D * elem_bytes


def build_points(centres: Sequence[str] = tuple(CENTRES), sweeps: Sequence[str] = tuple(SWEEPS)) -> List[Point]:
    """Every point of the sweeps around each centre, in order: points equal within a centre
    are one point that stands for each of its sweeps."""
    points: List[Point] = []
    for c in centres:
        by_key: Dict[tuple, Point] = {}
        for sweep in sweeps:
            for xlabel, change in SWEEPS[sweep]:
                p = Point(c, **{**CENTRES[c], **change})
                by_key.setdefault(p.key(), p).sweeps.append((sweep, xlabel))
        points.extend(by_key.values())
    return points


def estimated_cost(p: Point) -> float:
    """A rough relative cost of measuring a point, to spread the expensive ones over slices."""
    return p.flops() * 4.5 / 4e14 + p.depth_bytes() * 5 / 2.5e12


def slice_points(points: Sequence[Point], i: int, n: int) -> List[Point]:
    """The i-th (1-based) of n interleaved subsets: points dealt round-robin in decreasing
    estimated cost, returned in their listed order."""
    if not 1 <= i <= n:
        raise ValueError(f"slice {i}/{n}: need 1 <= i <= n")
    order = sorted(range(len(points)), key=lambda j: (-estimated_cost(points[j]), j))
    mine = sorted(order[i - 1::n])
    return [points[j] for j in mine]


def parse_slice(text: str) -> Tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slice wants i/n (e.g. 1/4), got {text!r}")
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"--slice {text}: need 1 <= i <= n")
    return i, n


def list_text(points: Sequence[Point], total: Optional[int] = None) -> str:
    head = f"{len(points)} points" + ("" if total is None else f" (of {total})")
    lines = [head]
    for j, p in enumerate(points):
        lines.append(f"{j:3d}  {p.label():<34} {p.describe():<62} fwd {p.flops() / 1e12:7.2f} TFLOP  "
                     f"depth {p.depth_bytes() / 2**30:6.2f} GiB")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the ratios


def _ms(providers: dict, name: str, mode: str) -> Optional[float]:
    return (providers.get(name) or {}).get(f"{mode}_ms")


def summarize(rec: dict) -> dict:
    """Bound, ratios and TFLOP/s of a measured point, from its raw times (also run on merge)."""
    prov, bw = rec["providers"], rec.get("copy_bytes_per_s")
    out = {}
    for mode, flop_mult, read_mult in MODES:
        auto = _ms(prov, "auto", mode)
        fast = {b: _ms(prov, b, mode) for b in FAST_BACKENDS if _ms(prov, b, mode) is not None}
        best_backend = min(fast, key=fast.get) if fast else None
        best = fast.get(best_backend)
        cudnn = _ms(prov, CUDNN, mode)
        stream_ms = rec["depth_bytes"] * read_mult / bw * 1e3 if bw else None
        bound = max(cudnn, stream_ms or 0.0) if cudnn is not None else None
        flops = rec["flops_fwd"] * flop_mult
        div = lambda a, b: a / b if a is not None and b else None  # noqa: E731
        out[mode] = {
            "auto_ms": auto, "best_ms": best, "best_backend": best_backend, "cudnn_ms": cudnn,
            "depth_stream_ms": stream_ms, "bound_ms": bound,
            "bound_by": None if bound is None else ("cudnn" if cudnn >= (stream_ms or 0.0) else "depth bytes"),
            "auto_over_bound": div(auto, bound), "best_over_bound": div(best, bound),
            "auto_over_best": div(auto, best),
            "auto_slow": bool(auto is not None and best is not None and auto > AUTO_SLOW * best),
            "auto_tflops": div(flops / 1e9, auto), "best_tflops": div(flops / 1e9, best),
            "cudnn_tflops": div(4.0 * rec["shape"]["B"] * rec["shape"]["Hq"] * rec["shape"]["D"]
                                * visible_pairs(rec["shape"]["T"], rec["causal"]) * flop_mult / 1e9, cudnn),
        }
    return out


def _fmt(x, p=3) -> str:
    return "-" if x is None else f"{x:.{p}f}"


def _flags(rec: dict) -> str:
    notes = [f"point failed: {rec['error'][:80]}"] if rec.get("error") else []
    if rec.get("reference_error"):
        notes.append(f"reference check skipped: {rec['reference_error'][:60]}")
    for mode, _, _ in MODES:
        if rec["summary"][mode]["auto_slow"]:
            notes.append(f"auto > {AUTO_SLOW}x best ({mode})")
    for name, r in rec["providers"].items():
        for mode, _, _ in MODES:
            if r.get(f"{mode}_error"):
                notes.append(f"{name} {mode}: {r[f'{mode}_error'][:60]}")
                break
        if r.get("check") == "FAILED":
            notes.append(f"{name} check FAILED (rel err {r['rel_err']:.1e})")
    return "; ".join(notes)


def format_table(records: Sequence[dict]) -> str:
    """Markdown: per point, auto / best / cuDNN / bound (ms) and auto/bound, forward and
    forward+backward, and what is flagged."""
    lines = ["| point | fwd auto ms | best | cuDNN | bound | auto/bound | fwd+bwd auto ms | best | cuDNN | bound | "
             "auto/bound | flags |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        cells = [rec["label"]]
        for mode, _, _ in MODES:
            s = rec["summary"][mode]
            best = "-" if s["best_ms"] is None else f"{s['best_ms']:.3f} ({s['best_backend']})"
            bound = "-" if s["bound_ms"] is None else f"{s['bound_ms']:.3f}" + (
                " (bytes)" if s["bound_by"] == "depth bytes" else "")
            ratio = "-" if s["auto_over_bound"] is None else f"{s['auto_over_bound']:.2f}x"
            cells += [_fmt(s["auto_ms"]), best, _fmt(s["cudnn_ms"]), bound, ratio]
        cells.append(_flags(rec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- merge and plots


def merge_reports(reports: Sequence[dict]) -> dict:
    """One report from slice reports: points by id (the first of duplicates kept), summaries
    recomputed, ordered as the points are listed, with the ids expected but missing."""
    by_id: Dict[str, dict] = {}
    duplicates = []
    for rep in reports:
        for rec in rep["points"]:
            if rec["id"] in by_id:
                duplicates.append(rec["id"])
                continue
            by_id[rec["id"]] = rec
    expected: List[str] = []
    for rep in reports:
        for pid in rep.get("points_expected", []):
            if pid not in expected:
                expected.append(pid)
    order = {pid: j for j, pid in enumerate(expected)}
    records = sorted(by_id.values(), key=lambda r: (order.get(r["id"], len(order)), r["id"]))
    for rec in records:
        rec["summary"] = summarize(rec)
    metas = [rep.get("meta", {}) for rep in reports]
    gpus = sorted({m.get("gpu") for m in metas if m.get("gpu")})
    meta = {
        "merged": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": gpus[0] if len(gpus) == 1 else gpus,
        "torch": sorted({m.get("torch") for m in metas if m.get("torch")}),
        "copy_bytes_per_s": [m.get("copy_bytes_per_s") for m in metas],
        "slices": metas,
    }
    return {"meta": meta, "points_expected": expected, "missing": [p for p in expected if p not in by_id],
            "duplicates": duplicates, "points": records}


def centre_value(centre: str, sweep: str) -> str:
    """The x label at which a sweep passes through its centre."""
    return next(x for x, change in SWEEPS[sweep] if Point(centre, **{**CENTRES[centre], **change}).is_centre())


def sweep_series(records: Sequence[dict], centre: str, sweep: str) -> Tuple[List[str], Dict[str, list]]:
    """x labels of one sweep and, per series, one value per label (None where not measured)."""
    at = {}
    for rec in records:
        if rec["centre"] == centre:
            for s, x in rec["sweeps"]:
                at[(s, x)] = rec
    labels = [x for x, _ in SWEEPS[sweep]]
    series = {}
    for mode, _, _ in MODES:
        for who in ("auto", "best"):
            series[f"{who}/bound {mode}"] = [
                (at[(sweep, x)]["summary"][mode][f"{who}_over_bound"] if (sweep, x) in at else None) for x in labels]
    return labels, series


def draw_pngs(report: dict, out_dir: str) -> Tuple[List[str], Optional[str]]:
    """One PNG per centre, a subplot per sweep; returns (paths, why none were drawn)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no PNGs drawn (pip install matplotlib, then run --merge again)"
    records = report["points"]
    gpu = report.get("meta", {}).get("gpu")
    paths = []
    for centre in CENTRES:
        mine = [r for r in records if r["centre"] == centre]
        sweeps = [s for s in SWEEPS if any(sw == s for r in mine for sw, _ in r["sweeps"])]
        if not sweeps:
            continue
        cols = min(3, len(sweeps))
        rows = math.ceil(len(sweeps) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        styles = {"auto/bound fwd": ("C0", "-"), "best/bound fwd": ("C0", "--"),
                  "auto/bound fwd_bwd": ("C1", "-"), "best/bound fwd_bwd": ("C1", "--")}
        for ax, sweep in zip(axes.flat, sweeps):
            labels, series = sweep_series(records, centre, sweep)
            xs = list(range(len(labels)))
            for name, ys in series.items():
                color, ls = styles[name]
                ax.plot(xs, [math.nan if y is None else y for y in ys], color=color, linestyle=ls, marker="o",
                        label=name.replace("fwd_bwd", "fwd+bwd"))
            ax.axhline(TARGET, color="grey", linestyle=":", label=f"{TARGET}x")
            ax.axhline(1.0, color="black", linewidth=0.5)
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, rotation=30 if len(labels) > 3 else 0)
            for tick, x in zip(ax.get_xticklabels(), labels):
                if x == centre_value(centre, sweep):
                    tick.set_fontweight("bold")  # the centre, shared by every sweep
            ax.set_title(SWEEP_TITLES[sweep], fontsize=10)
            ax.set_ylabel("time / bound")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(sweeps):]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=7)
        c = CENTRES[centre]
        fig.suptitle(f"MoDA {centre}: B={c['B']} T={c['T']} Hq={c['Hq']} Hk={c['Hk']} D={c['D']} L={c['L']}, "
                     f"causal, chunk 1, bf16" + (f" -- {gpu}" if isinstance(gpu, str) else ""), fontsize=11)
        fig.tight_layout()
        path = os.path.join(out_dir, f"bench_sweep_{centre}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths, None


def finish(report: dict, out_dir: str, name: str, plots: bool) -> None:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {path}")
    if plots:
        paths, why = draw_pngs(report, out_dir)
        for p in paths:
            print(f"wrote {p}")
        if why:
            print(why)
    if report.get("missing"):
        print(f"missing {len(report['missing'])} point(s): " + ", ".join(report["missing"]))
    print()
    print(format_table(report["points"]))
    slow = [r["label"] for r in report["points"] if any(r["summary"][m]["auto_slow"] for m, _, _ in MODES)]
    if slow:
        print(f"\nauto slower than the best backend by more than {AUTO_SLOW}x at: " + "; ".join(slow))


# ----------------------------------------------------------------------------- measuring (GPU)


def copy_bandwidth(gib: float = 4.0) -> dict:
    """Device-to-device copy bandwidth (read + write), halving the buffer until it fits."""
    nbytes = int(gib * 2**30)
    while True:
        try:
            src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            break
        except torch.cuda.OutOfMemoryError:
            nbytes //= 2
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return {"copy_bytes": nbytes, "copy_ms": ms, "copy_bytes_per_s": 2 * nbytes / (ms * 1e-3)}


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _attempt(fn):
    """(value, None) or (None, why): a backend's refusal, out of memory, or another failure."""
    try:
        return fn(), None
    except ValueError as exc:
        why = f"ValueError: {exc}"
    except torch.cuda.OutOfMemoryError:
        why = "out of memory"
    except Exception as exc:  # a provider that cannot run is reported, not fatal
        why = f"{type(exc).__name__}: {str(exc)[:300]}"
    _free()
    return None, why


def _auto_picks(p: Point, inputs) -> Optional[dict]:
    """The backend auto picks for each direction (None if the policy cannot be asked)."""
    try:
        from moda_cuda import dispatch
        from moda_cuda._spec import check_inputs

        spec = check_inputs(*inputs, None, p.causal, p.chunk)
        return {d: dispatch.resolve("auto", inputs[0], spec, tuple(inputs), d).name for d in dispatch.DIRECTIONS}
    except Exception:
        return None


def _reference_slice(p: Point, inputs):
    """(slice of ours to compare, float32 reference) on batch entry 0 and kv head 0's query
    heads; the first 2048 positions when causal, all of them (if small) otherwise."""
    G = p.Hq // p.Hk
    if p.causal:
        Tc = min(p.T, 2048)
    elif G * p.T * p.T <= 2**28:
        Tc = p.T
    else:
        return None, None
    q, k, v, dk, dv = inputs
    sub = [q[:1, :Tc, :G], k[:1, :Tc, :1], v[:1, :Tc, :1], dk[:1, :Tc, :, :1], dv[:1, :Tc, :, :1]]
    ref = moda_attention_ref(*[x.detach().float() for x in sub], causal=p.causal, depth_chunk=p.chunk)
    return (lambda out: out[:1, :Tc, :G]), ref


def _cudnn_runner(p: Point, inputs, grad_out):
    """cuDNN SDPA without depth on q, k, v ([B, H, T, D] views): (run, its inputs, grad, how GQA is done)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = p.Hq // p.Hk
    qt = inputs[0].detach().transpose(1, 2).requires_grad_()
    gt = grad_out.transpose(1, 2)

    def run_gqa(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=p.causal, enable_gqa=True)

    def run_mha(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=p.causal)

    kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in inputs[1:3])
    if G == 1:
        return run_mha, (qt, kt, vt), gt, "mha"
    _, why = _attempt(lambda: run_gqa(qt, kt, vt))
    if why is None:
        return run_gqa, (qt, kt, vt), gt, "enable_gqa"
    kt, vt = (x.detach().repeat_interleave(G, dim=2).transpose(1, 2).requires_grad_() for x in inputs[1:3])
    return run_mha, (qt, kt, vt), gt, f"expanded k/v (enable_gqa: {why[:120]})"


def _time(run, args, grad) -> dict:
    r = {}
    r["fwd_ms"], r["fwd_error"] = _attempt(lambda: bench_ms(lambda: run(*args)))
    r["fwd_bwd_ms"], r["fwd_bwd_error"] = _attempt(lambda: bench_ms(fwd_bwd_step(run, args, grad)))
    _free()
    return r


def measure_point(p: Point, backends: Sequence[str], bw: dict, check: bool) -> dict:
    torch.cuda.reset_peak_memory_stats()
    inputs = make_inputs(p.shape)
    grad_out = torch.randn(p.B, p.T, p.Hq, p.D, device="cuda", dtype=torch.bfloat16)
    picks = _auto_picks(p, inputs)
    (view, ref), ref_error = _attempt(lambda: _reference_slice(p, inputs)) if check else ((None, None), None)
    if ref_error:
        (view, ref) = (None, None)
    providers = {}
    for name in ["auto", *backends]:
        def fn(*x, _b=name):
            return moda_cuda.moda_attention(*x, causal=p.causal, depth_chunk=p.chunk, backend=_b)

        if name == "auto" and picks and "reference" in picks.values():
            why = f"auto runs the reference backend here ({picks}): not timed"
            providers[name] = {"fwd_ms": None, "fwd_error": why, "fwd_bwd_ms": None, "fwd_bwd_error": why}
            continue
        out, why = _attempt(lambda: fn(*inputs).detach())
        if why is not None:  # the backend refuses this input (or it does not fit)
            providers[name] = {"fwd_ms": None, "fwd_error": why, "fwd_bwd_ms": None, "fwd_bwd_error": why}
            continue
        r = {}
        if check:
            r["finite"] = bool(torch.isfinite(out).all())
            if ref is not None:
                r["rel_err"] = rel_err(view(out), ref)
            r["check"] = "ok" if r["finite"] and r.get("rel_err", 0.0) <= CHECK_TOL else "FAILED"
        del out
        r.update(_time(fn, inputs, grad_out))
        providers[name] = r
    del ref
    _free()
    run, args, grad, gqa = _cudnn_runner(p, inputs, grad_out)
    providers[CUDNN] = {**_time(run, args, grad), "gqa": gqa}
    del run, args, grad
    rec = point_record(p, bw, providers, auto_picks=picks, reference_error=ref_error,
                       peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
    del inputs, grad_out
    _free()
    return rec


def point_record(p: Point, bw: dict, providers: dict, **extra) -> dict:
    """A point's JSON record: what it is, its raw times per provider, and their summary."""
    rec = {
        "id": p.id, "label": p.label(), "centre": p.centre, "sweeps": [list(s) for s in p.sweeps],
        "shape": asdict(p.shape), "causal": p.causal, "depth_chunk": p.chunk, "dtype": "bfloat16",
        "flops_fwd": p.flops(), "depth_bytes": p.depth_bytes(), "copy_bytes_per_s": bw["copy_bytes_per_s"],
        "providers": providers, **extra,
    }
    rec["summary"] = summarize(rec)
    return rec


def _print_point(rec: dict) -> None:
    for name, r in rec["providers"].items():
        err = r.get("fwd_error") or r.get("fwd_bwd_error")
        chk = "" if "check" not in r else f"  check {r['check']}" + (
            f" ({r['rel_err']:.1e})" if "rel_err" in r else "")
        print(f"    {name:<15} fwd {_fmt(r.get('fwd_ms')):>8} ms  fwd+bwd {_fmt(r.get('fwd_bwd_ms')):>8} ms{chk}"
              + (f"  [{err[:100]}]" if err else ""), flush=True)
    for mode, _, _ in MODES:
        s = rec["summary"][mode]
        print(f"    {mode:<7} bound {_fmt(s['bound_ms'])} ms ({s['bound_by']})  auto/bound "
              f"{_fmt(s['auto_over_bound'], 2)}  best/bound {_fmt(s['best_over_bound'], 2)}  "
              f"auto/best {_fmt(s['auto_over_best'], 2)}" + ("  AUTO SLOW" if s["auto_slow"] else ""), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for the JSON (and, without --slice or with --merge, the PNGs)")
    parser.add_argument("--slice", type=parse_slice, help="i/n: measure the i-th (1-based) of n interleaved subsets")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine slice JSONs into DIR/bench_sweep.json")
    parser.add_argument("--centres", default=",".join(CENTRES), help="comma-separated: " + ", ".join(CENTRES))
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help="comma-separated: " + ", ".join(SWEEPS))
    parser.add_argument("--points", help="comma-separated point labels (as --list prints them, e.g. "
                                         "'d64 group=32,d128 centre'): only those")
    parser.add_argument("--no-check", action="store_true", help="skip the finite / reference checks")
    parser.add_argument("--list", action="store_true", help="print the points and exit (no GPU needed)")
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the bandwidth probe (GiB)")
    args = parser.parse_args(argv)

    if args.merge:
        if not args.out:
            parser.error("--merge needs --out DIR")
        paths = [p for pattern in args.merge for p in (sorted(glob.glob(pattern)) or [pattern])]
        reports = []
        for path in paths:
            with open(path) as f:
                reports.append(json.load(f))
        report = merge_reports(reports)
        report["meta"]["merged_from"] = [os.path.basename(p) for p in paths]
        if isinstance(report["meta"]["gpu"], list):
            print(f"warning: the slices ran on different GPUs ({', '.join(report['meta']['gpu'])}); each point's "
                  "ratios use its own slice's times, but points are not comparable across GPUs", file=sys.stderr)
        if report["duplicates"]:
            print(f"warning: measured twice, the first kept: {', '.join(report['duplicates'])}", file=sys.stderr)
        finish(report, args.out, "bench_sweep.json", plots=True)
        return 0

    centres = [c for c in args.centres.split(",") if c]
    sweeps = [s for s in args.sweeps.split(",") if s]
    bad = [c for c in centres if c not in CENTRES] + [s for s in sweeps if s not in SWEEPS]
    if bad or not centres or not sweeps:
        parser.error(f"unknown or empty centre/sweep: {', '.join(bad) or '(none given)'}")
    everything = build_points(centres, sweeps)
    if args.points:
        wanted = [w.strip() for w in args.points.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {p.label() for p in everything}]
        if unknown:
            parser.error(f"no such point in these sweeps: {', '.join(unknown)} (see --list)")
        everything = [p for p in everything if p.label() in wanted]
    points = slice_points(everything, *args.slice) if args.slice else everything
    if args.list:
        print(list_text(points, len(everything) if args.slice else None))
        return 0
    if not args.out:
        parser.error("--out DIR is required (except with --list)")
    if not torch.cuda.is_available():
        print("bench_sweep.py needs a CUDA GPU (--list and --merge run without one)", file=sys.stderr)
        return 2

    backends = [b for b in FAST_BACKENDS if b in moda_cuda.available_backends()]
    print(f"copy bandwidth probe ({args.copy_gib:g} GiB) ...", flush=True)
    bw = copy_bandwidth(args.copy_gib)
    print(f"  {bw['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write)", flush=True)
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "triton": triton.__version__, "moda_cuda": moda_cuda.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "backends": backends, "MODA_BACKEND": os.environ.get("MODA_BACKEND"), **bw,
        "slice": None if not args.slice else "{}/{}".format(*args.slice), "centres": centres, "sweeps": sweeps,
        "command": "python " + " ".join([os.path.relpath(__file__)] + list(argv if argv is not None else sys.argv[1:])),
    }
    name = "bench_sweep.json" if not args.slice else "bench_sweep_slice{}of{}.json".format(*args.slice)
    report = {"meta": meta, "points_expected": [p.id for p in everything], "points": []}
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    for j, p in enumerate(points):
        print(f"[{j + 1}/{len(points)}] {p.label()}: {p.describe()}  ({time.time() - start:.0f} s)", flush=True)
        try:
            rec = measure_point(p, backends, bw, check=not args.no_check)
        except Exception as exc:  # e.g. the inputs themselves do not fit: the point is recorded as failed
            why = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else \
                f"{type(exc).__name__}: {str(exc)[:300]}"
            _free()
            rec = point_record(p, bw, {}, error=why)
        _print_point(rec)
        report["points"].append(rec)
        with open(os.path.join(args.out, name), "w") as f:  # after every point: a cut-short call keeps its points
            json.dump(report, f, indent=1)
    report["meta"]["seconds"] = time.time() - start
    if not args.slice:
        report["missing"] = []
    finish(report, args.out, name, plots=not args.slice)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
