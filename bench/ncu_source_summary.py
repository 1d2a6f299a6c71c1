"""Where a kernel's warps spend their time, from Nsight Compute's per-instruction samples.

Input: the source page of a report as CSV, e.g.

    ncu --set full --import-source yes -k regex:moda_fwd_kernel -c 1 -o fwd <program>
    ncu -i fwd.ncu-rep --page source --csv --print-source sass > fwd_sass.csv
    python bench/ncu_source_summary.py fwd_sass.csv

(``bench/sweep_config.sh --ncu CFG`` makes that CSV.) Prints the share of warp-state
samples per opcode and the instructions with the most samples, with their main stall reasons.
With ``--against OTHER.csv`` (the same compiled kernel on another problem, e.g. the shape
without depth rows) it lists instead the instructions whose samples grew the most from OTHER
to CSV, matched by their offset from the kernel's first instruction:

    python bench/ncu_source_summary.py fwd_L64_sass.csv --against fwd_L0_sass.csv
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
from typing import Dict, List

SAMPLES = "Warp Stall Sampling (All Samples)"


def read_rows(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    # The first line names the kernel; the header follows.
    start = next(i for i, row in enumerate(lines) if SAMPLES in row)
    header = lines[start]
    return [dict(zip(header, row)) for row in lines[start + 1:] if len(row) == len(header)]


def opcode(sass: str) -> str:
    match = re.match(r"\s*(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass)
    return match.group(1) if match else sass.strip()


def number(text: str) -> int:
    return int(text) if text and text.strip("-") else 0


def offset_rows(rows: List[Dict[str, str]]) -> Dict[int, Dict[str, str]]:
    """Rows by their address's offset from the first instruction (loads differ in base)."""
    base = int(rows[0]["Address"], 16)
    return {int(r["Address"], 16) - base: r for r in rows}


def print_growth(rows: List[Dict[str, str]], other: List[Dict[str, str]], top: int) -> None:
    now, before = offset_rows(rows), offset_rows(other)
    # Branch targets are absolute addresses: compare the instructions without them.
    strip = lambda r: re.sub(r"0x[0-9a-f]{8,}", "", r["Source"])  # noqa: E731
    if list(now) != list(before) or [strip(r) for r in now.values()] != [strip(r) for r in before.values()]:
        raise SystemExit("the two profiles are not of the same compiled kernel")
    grown = sorted(now, key=lambda k: number(before[k][SAMPLES]) - number(now[k][SAMPLES]))
    total = sum(number(r[SAMPLES]) for r in rows)
    total_before = sum(number(r[SAMPLES]) for r in other)
    print(f"{total} samples against {total_before}: {total - total_before:+d}\n")
    print("| offset | instruction | samples (this / other) | executed (this / other) |\n|---|---|---|---|")
    for k in grown[:top]:
        a, b = now[k], before[k]
        print(f"| {k:x} | `{a['Source'].strip()[:60]}` | {number(a[SAMPLES])} / {number(b[SAMPLES])} | "
              f"{a['Instructions Executed']} / {b['Instructions Executed']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=25, help="instructions to list")
    parser.add_argument("--against", help="a second profile of the same kernel: list what grew from it")
    args = parser.parse_args(argv)

    rows = read_rows(args.csv)
    if args.against:
        print_growth(rows, read_rows(args.against), args.top)
        return 0
    stall_columns = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    total = sum(number(r[SAMPLES]) for r in rows) or 1
    per_opcode = collections.Counter()
    for r in rows:
        per_opcode[opcode(r["Source"])] += number(r[SAMPLES])

    print(f"{len(rows)} instructions, {total} samples\n\n| opcode | share of samples |\n|---|---|")
    for name, n in per_opcode.most_common(15):
        print(f"| {name} | {100 * n / total:.1f}% |")
    print("\n| address | instruction | share | executed | main stalls |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -number(r[SAMPLES]))[: args.top]:
        stalls = sorted(((number(r[c]), c[len("stall_"):]) for c in stall_columns), reverse=True)[:2]
        reasons = ", ".join(f"{name} {n}" for n, name in stalls if n)
        print(f"| {r['Address'][-5:]} | `{r['Source'].strip()[:60]}` | {100 * number(r[SAMPLES]) / total:.1f}% | "
              f"{r['Instructions Executed']} | {reasons} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
