"""Nsight Compute report for the MoDA kernels: one table row per kernel.

Runs one backend on one shape under ``ncu --clock-control none`` (the card's clocks are left
as they are) and collects, per kernel: duration, SM and DRAM throughput, tensor-pipe
utilisation, registers per thread, shared memory per block and achieved occupancy. Only the
measured region is profiled (``cudaProfilerStart``/``Stop``): autotuning and warm-up launches
before it are not.

    python bench/profile_ncu.py --backend triton --shape 1,16384,64,8,64,64 --out bench/results
    python bench/profile_ncu.py --direction fwd --shape 1,4096,64,8,64,64 --out /tmp/ncu
    python bench/profile_ncu.py --backend cuda --direction bwd --out DIR

(the last one reports the compiled backward's kernels: preprocess, dK/dV, dQ).

Metrics the installed ncu does not know are dropped with a note, so one script serves
several ncu versions. Writes ``ncu_<backend>_<shape>.csv`` (ncu's raw output) and ``.md``
(the table) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Sequence

METRICS = {
    "gpu__time_duration.sum": "time (us)",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM %",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "mem %",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM %",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": "tensor (gmma) %",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "tensor (hmma) %",
    "launch__registers_per_thread": "regs",
    "launch__shared_mem_per_block_dynamic": "dyn smem (B)",
    "launch__shared_mem_per_block_static": "static smem (B)",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy %",
    "launch__grid_size": "grid",
    "launch__block_size": "block",
}

# With --stalls: why warps did not issue, as warps stalled per issued instruction (ncu's
# "warp state" breakdown). "sleeping" and "barrier" are mbarrier / named-barrier waits,
# "long_scoreboard" global loads, "math_pipe_throttle" a busy unit (MUFU, tensor cores), "wait"
# fixed-latency dependencies (wgmma waits land here and in "barrier").
STALL_REASONS = ("barrier", "sleeping", "long_scoreboard", "wait", "math_pipe_throttle", "short_scoreboard",
                 "mio_throttle", "dispatch_stall", "no_instruction", "membar", "branch_resolving", "selected")
STALL_METRICS = {f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio": f"stall {r}"
                 for r in STALL_REASONS}


def parse_shape(text: str) -> Dict[str, int]:
    try:
        B, T, Hq, Hk, D, L = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants B,T,Hq,Hk,D,L (six integers), got {text!r}") from None
    return dict(B=B, T=T, Hq=Hq, Hk=Hk, D=D, L=L)


def run_workload(args: argparse.Namespace) -> None:
    """The profiled process: warm up (and autotune), then run the region ncu records."""
    import torch

    import moda_cuda

    s = args.shape
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    seq = None if args.depth_only else (r(s["B"], s["T"], s["Hk"], s["D"]), r(s["B"], s["T"], s["Hk"], s["D"]))
    inputs = (r(s["B"], s["T"], s["Hq"], s["D"]), *(seq or (None, None)),
              r(s["B"], s["T"], s["L"], s["Hk"], s["D"]), r(s["B"], s["T"], s["L"], s["Hk"], s["D"]))
    leaves = [x for x in inputs if x is not None]
    kw = dict(causal=not args.full, depth_chunk=args.depth_chunk, backend=args.backend)

    def start_recording():
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()

    def region(record: bool):
        if record and args.direction != "bwd":
            start_recording()
        if args.direction == "fwd":
            with torch.no_grad():
                moda_cuda.moda_attention(*inputs, **kw)
            return
        out = moda_cuda.moda_attention(*inputs, **kw)
        if record and args.direction == "bwd":
            start_recording()
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    for _ in range(3):  # compiles, autotunes and warms every kernel of the region
        region(record=False)
    region(record=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def known_metrics(ncu: str, wanted: Sequence[str]) -> List[str]:
    """The wanted metrics this ncu can collect on this GPU (base names before the rollup).

    Launch attributes (``launch__*``) are always collected but not listed by
    ``--query-metrics``, so they are kept without asking.
    """
    res = subprocess.run([ncu, "--query-metrics", "--csv"], capture_output=True, text=True)
    if res.returncode != 0:
        return list(wanted)  # cannot tell: let ncu itself complain
    bases = {row[0].strip('"') for row in csv.reader(io.StringIO(res.stdout)) if row}
    kept = [m for m in wanted if m.startswith("launch__") or m.split(".")[0] in bases]
    if not kept:  # an output format this parser does not know: let ncu itself judge
        return list(wanted)
    for m in wanted:
        if m not in kept:
            print(f"note: this ncu does not offer {m}; column dropped", file=sys.stderr)
    return kept


def table(rows: List[Dict[str, str]], metrics: Sequence[str]) -> str:
    """Markdown: one row per kernel (ncu's 'ID' order), short names, the chosen columns."""
    names = {**METRICS, **STALL_METRICS}
    head = ["kernel"] + [names[m] for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        name = row["Kernel Name"].split("(")[0][:48]
        cells = []
        for m in metrics:
            value = row.get(m, "")
            if m == "gpu__time_duration.sum" and value:
                unit = row.get(f"{m}__unit", "ns")
                scale = {"ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit, 1e-3)
                value = f"{float(value.replace(',', '')) * scale:.1f}"
            cells.append(value)
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def parse_ncu_csv(text: str) -> List[Dict[str, str]]:
    """ncu --csv --page raw: a header row, a units row, then one row per kernel launch."""
    rows = list(csv.reader(io.StringIO(text[text.find('"ID"'):])))
    if len(rows) < 2:
        return []
    header, units = rows[0], rows[1]
    out = []
    for row in rows[2:]:
        if len(row) != len(header):
            continue
        entry = dict(zip(header, row))
        entry.update({f"{h}__unit": u for h, u in zip(header, units)})
        out.append(entry)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="triton")
    p.add_argument("--shape", type=parse_shape, default=parse_shape("1,16384,64,8,64,64"), help="B,T,Hq,Hk,D,L")
    p.add_argument("--direction", choices=["fwd", "bwd", "both"], default="both")
    p.add_argument("--full", action="store_true", help="non-causal")
    p.add_argument("--depth-chunk", type=int, default=1)
    p.add_argument("--depth-only", action="store_true", help="no sequence keys (k = v = None): the depth part alone")
    p.add_argument("--out", default=None, help="directory for the CSV and the table (required unless --worker)")
    p.add_argument("--stalls", action="store_true", help="add the warp stall reasons (why warps did not issue)")
    p.add_argument("--ncu", default=shutil.which("ncu") or "ncu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the profiled child
    args = p.parse_args(argv)
    if args.worker:
        run_workload(args)
        return 0
    if not args.out:
        p.error("--out is required")

    metrics = known_metrics(args.ncu, list(METRICS) + (list(STALL_METRICS) if args.stalls else []))
    child = [sys.executable, os.path.abspath(__file__), "--worker", "--backend", args.backend,
             "--shape", ",".join(str(v) for v in args.shape.values()), "--direction", args.direction,
             "--depth-chunk", str(args.depth_chunk)] + (["--full"] if args.full else []) + \
        (["--depth-only"] if args.depth_only else [])
    cmd = [args.ncu, "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
           "--csv", "--page", "raw", "--metrics", ",".join(metrics)] + child
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-4000:], sep="\n", file=sys.stderr)
        return res.returncode
    os.makedirs(args.out, exist_ok=True)
    stem = f"ncu_{args.backend}_{args.direction}_" + "_".join(f"{k}{v}" for k, v in args.shape.items()) + \
        ("_depth_only" if args.depth_only else "")
    with open(os.path.join(args.out, stem + ".csv"), "w") as f:
        f.write(res.stdout)
    report = table(parse_ncu_csv(res.stdout), metrics)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(f"`{' '.join(['python', 'bench/profile_ncu.py'] + (argv or sys.argv[1:]))}`\n\n{report}\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
