"""Where a kernel's warps spend their time, from Nsight Compute's per-instruction samples.

Input: the source page of a report as CSV, e.g.

    ncu --set full --import-source yes -k regex:moda_fwd_kernel -c 1 -o fwd <program>
    ncu -i fwd.ncu-rep --page source --csv --print-source sass > fwd_sass.csv
    python bench/ncu_source_summary.py fwd_sass.csv

(``bench/sweep_config.sh --ncu CFG`` makes that CSV.) Prints the share of warp-state
samples per opcode and the instructions with the most samples, with their main stall reasons.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=25, help="instructions to list")
    args = parser.parse_args(argv)

    rows = read_rows(args.csv)
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
