"""Where the CUDA forward's time goes, CTA by CTA (a diagnostic).

Needs a build with `bench/patches/fwd_timeline.patch` applied: each CTA of the forward then
records, when MODA_FWD_TIMELINE names a file, its SM, its tile counts, and clock readings at
its start, when each consumer warpgroup reaches its first depth tile, when its main loop is
done and when its output is written (moda_fwd_kernel.h, kTimelineFields). This script runs
the issue shapes with and without depth rows, one recorded launch each after a warm-up, and
prints per shape:
  - the mean CTA time split into sequence tiles, depth tiles and epilogue (us), and the same
    summed over CTAs and divided by the SMs (ms: what each phase adds to the kernel if
    nothing overlaps it);
  - the kernel's span, the SMs' busy share of it, the gap between one CTA's end and the
    next CTA's start on an SM, and the tail (last end minus the median SM's last end);
  - how many SMs are in their depth phase at once, and the depth phase's time per depth tile
    against that number (DRAM contention would make it grow).

    git apply bench/patches/fwd_timeline.patch && pip install --no-build-isolation -e .
    python bench/timeline_fwd.py --out DIR [--label NAME] [--depth-only]
    python bench/timeline_fwd.py --summarize DIR/NAME.npz   # saved records again, no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moda_cuda  # noqa: E402

SHAPES = [(16384, 64, 8, 64, 64), (8192, 32, 8, 128, 32), (4096, 64, 8, 64, 64)]  # T, Hq, Hk, D, L


def record(args: tuple, path: Path) -> np.ndarray:
    run = lambda: moda_cuda.moda_attention(*args, backend="cuda")  # noqa: E731
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    os.environ["MODA_FWD_TIMELINE"] = str(path)
    try:
        run()
    finally:
        del os.environ["MODA_FWD_TIMELINE"]
    torch.cuda.synchronize()
    raw = np.fromfile(path, dtype=np.uint64)
    ctas, fields = int(raw[0]), int(raw[1])
    return raw[2:2 + ctas * fields].reshape(ctas, fields).astype(np.int64)


def summarize(r: np.ndarray, sms: int) -> dict:
    sm, n_seq, n_depth, g0, c0, g1 = r[:, 0], r[:, 1], r[:, 2], r[:, 3], r[:, 4], r[:, 15]
    wgs = (r[:, 12:15] > 0).any(0)  # consumer warpgroups that recorded (two or three)
    c_depth, c_loop, c_end = r[:, 6:9][:, wgs], r[:, 9:12][:, wgs], r[:, 12:15][:, wgs]
    has_depth = n_depth > 0
    c_first_depth = np.where(has_depth, c_depth.min(1), c_loop.max(1))
    # Clock cycles per ns from warpgroup 0's clock and globaltimer readings at its end; the
    # CTA ends when its last warpgroup's output is written.
    ghz = (c_end[:, 0] - c0) / np.maximum(g1 - g0, 1)

    def us(c: np.ndarray, rows=slice(None)) -> np.ndarray:  # clock cycles of the CTAs `rows` -> us
        g = ghz[rows]
        return c / (g[:, None] if c.ndim == 2 else g) / 1e3

    seq, depth, epi = us(c_first_depth - c0), us(c_loop.max(1) - c_first_depth), us(c_end.max(1) - c_loop.max(1))
    start_ns = g0 - g0.min()
    end_ns = g1 - g0.min() + (c_end.max(1) - c_end[:, 0]) / ghz
    gaps, last_end = [], []
    for s in np.unique(sm):
        order = np.argsort(start_ns[sm == s])
        st, en = start_ns[sm == s][order], end_ns[sm == s][order]
        gaps.extend((st[1:] - en[:-1]).tolist())
        last_end.append(en.max())
    out = {
        "ctas": int(len(r)), "clock_ghz": float(np.median(ghz)), "span_us": float(end_ns.max() / 1e3),
        "busy_share": float((end_ns - start_ns).sum() / (sms * end_ns.max())),
        "gap_between_ctas_us": float(np.median(gaps) / 1e3) if gaps else 0.0,
        "tail_us": float((end_ns.max() - np.median(last_end)) / 1e3),
        "tiles_per_cta": {"sequence": float(n_seq.mean()), "depth": float(n_depth.mean())},
        "mean_cta_us": {"sequence": float(seq.mean()), "depth": float(depth.mean()), "epilogue": float(epi.mean())},
        "summed_over_sms_ms": {"sequence": float(seq.sum() / sms / 1e3), "depth": float(depth.sum() / sms / 1e3),
                               "epilogue": float(epi.sum() / sms / 1e3)},
    }
    if has_depth.any():
        # Per warpgroup: how long after the CTA's first warpgroup reached depth each one did,
        # how long each spent on the depth tiles, and how long after the first one it ended.
        h = has_depth
        out["depth_by_warpgroup_us"] = {
            "reaches_depth_after_first": us(c_depth[h] - c_first_depth[h][:, None], h).mean(0).tolist(),
            "in_depth": us(c_loop[h] - c_depth[h], h).mean(0).tolist(),
            "ends_after_first": us(c_end[h] - c_end[h].min(1)[:, None], h).mean(0).tolist(),
        }
        # The producer's last depth tile issued, from the first warpgroup at depth; the last
        # warpgroup done, from that issue.
        c_producer = r[:, 5]
        out["producer_us"] = {"done_after_depth_start": float(np.median(us(c_producer - c_first_depth)[h])),
                              "depth_end_after_done": float(np.median(us(c_loop.max(1) - c_producer)[h]))}
        d0 = (start_ns + (c_first_depth - c0) / ghz)[h]
        d1 = (start_ns + (c_loop.max(1) - c0) / ghz)[h]
        per_tile = depth[h] / n_depth[h]  # us
        # Phases under way at each phase's midpoint: begun by then, less ended before it.
        mid = (d0 + d1) / 2
        concurrent = np.searchsorted(np.sort(d0), mid, "right") - np.searchsorted(np.sort(d1), mid, "left")
        out["sms_in_depth_phase_at_once"] = {"mean": float(concurrent.mean()), "p90": float(np.percentile(concurrent, 90))}
        bins = [0, 8, 16, 32, 64, 1000]
        table = []
        for lo, hi in zip(bins[:-1], bins[1:]):
            sel = (concurrent >= lo) & (concurrent < hi)
            if sel.any():
                table.append({"sms_at_once": f"{lo}-{hi - 1}", "ctas": int(sel.sum()),
                              "us_per_depth_tile": float(per_tile[sel].mean())})
        out["depth_tile_time_by_concurrency"] = table
    return out


def report(label: str, records: dict, sms: int) -> dict:
    summary = {}
    for name, r in records.items():
        s = summarize(r, sms)
        summary[name] = s
        print(f"{label} {name}: span {s['span_us']:.1f} us, busy {s['busy_share']:.3f}, "
              f"gap {s['gap_between_ctas_us']:.2f} us, tail {s['tail_us']:.1f} us; mean CTA (us) "
              + ", ".join(f"{k} {v:.2f}" for k, v in s["mean_cta_us"].items())
              + "; over SMs (ms) " + ", ".join(f"{k} {v:.4f}" for k, v in s["summed_over_sms_ms"].items()))
        if "depth_by_warpgroup_us" in s:
            w, pr = s["depth_by_warpgroup_us"], s["producer_us"]
            print("    warpgroups reach depth after the first (us): "
                  + " ".join(f"{x:.2f}" for x in w["reaches_depth_after_first"])
                  + "; time in depth (us): " + " ".join(f"{x:.2f}" for x in w["in_depth"])
                  + "; ends after the first (us): " + " ".join(f"{x:.2f}" for x in w["ends_after_first"]))
            print(f"    producer issues its last depth tile {pr['done_after_depth_start']:.2f} us into the depth "
                  f"phase, which ends {pr['depth_end_after_done']:.2f} us later; SMs in depth at once: mean "
                  f"{s['sms_in_depth_phase_at_once']['mean']:.1f}, p90 {s['sms_in_depth_phase_at_once']['p90']:.0f}")
            print("    us per depth tile by SMs in depth at once: " + ", ".join(
                f"{row['sms_at_once']}: {row['us_per_depth_tile']:.3f} ({row['ctas']})"
                for row in s["depth_tile_time_by_concurrency"]))
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory for the records (LABEL.npz) and the summary (LABEL_summary.json)")
    ap.add_argument("--label", default="base", help="name of this build in the file names")
    ap.add_argument("--summarize", nargs="+", metavar="NPZ", help="print the summaries of saved records (no GPU)")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the GPU the saved records come from")
    ap.add_argument("--depth-only", action="store_true",
                    help="also record each shape without sequence keys (k = v = None): its depth tiles alone")
    args = ap.parse_args()
    if args.summarize:
        for path in args.summarize:
            with np.load(path) as saved:
                summary = report(Path(path).stem, {name: saved[name] for name in saved.files}, args.sms)
            Path(path).with_name(Path(path).stem + "_summary.json").write_text(json.dumps(summary, indent=1))
        return 0
    if not args.out:
        ap.error("--out is required unless --summarize is given")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    records = {}
    for T, Hq, Hk, D, L in SHAPES:
        q = torch.randn(1, T, Hq, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, T, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        dk, dv = (torch.randn(1, T, L, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        variants = {f"T{T}_D{D}_L{L}": (q, k, v, dk, dv), f"T{T}_D{D}_L0": (q, k, v)}
        if args.depth_only:
            variants[f"T{T}_D{D}_L{L}_depth_only"] = (q, None, None, dk, dv)
        for name, inputs in variants.items():
            path = out / f"{args.label}_{name}.bin"
            records[name] = record(inputs, path)
            path.unlink()
    np.savez_compressed(out / f"{args.label}.npz", **records)
    summary = report(args.label, records, torch.cuda.get_device_properties(0).multi_processor_count)
    (out / f"{args.label}_summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
