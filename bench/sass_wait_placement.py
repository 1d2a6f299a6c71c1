"""Where ptxas puts the forward's P V wait against the softmax (reads SASS, needs no GPU).

The forward's overlapped main loop (csrc/moda_fwd_kernel.h) issues S = Q K^T for tile i and
O += P V for tile i - 1, waits for S only (wgmma.wait_group 1), runs tile i's softmax, and
only then waits for P V (wgmma.wait_group 0): the softmax is meant to run while the tensor
cores do P V. In SASS the second wait is `WARPGROUP.DEPBAR.LE gsb0, 0x0`. ptxas may move it
up, for instance when it gives P's registers (the A operand of the P V wgmma, still being
read) to the softmax's temporaries; then the overlap is gone.

For each forward kernel in the file this prints, for the loop body that holds the first
`DEPBAR.LE gsb0, 0x1`: the address of the P V wait, of the first and last exp2 after it,
whether the wait comes before the exp2s, and which instructions before the wait's
intended place (the last exp2) write P's registers.

    python bench/sass_wait_placement.py moda_cuda/_C*.so     (or a .o of csrc/instantiations)

cuobjdump (and nvdisasm) from the CUDA toolkit must be on PATH.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
A_OPERAND = re.compile(r"HGMMA\.\S+\s+R\d+,\s+R(\d+),")


def kernels(sass: str):
    name, body = None, []
    for line in sass.splitlines():
        if "Function :" in line:
            if name is not None:
                yield name, body
            name, body = line.split("Function :")[1].strip(), []
        elif name is not None:
            m = INSTR.search(line)
            if m:
                body.append((int(m.group(1), 16), m.group(2)))
    if name is not None:
        yield name, body


def placement(body):
    first_wait = next((i for i, (_, ins) in enumerate(body) if "DEPBAR.LE gsb0, 0x1" in ins), None)
    if first_wait is None:
        return None
    # P's registers: the A operands (4 registers each) of the register-sourced HGMMAs just before.
    p_regs = set()
    for _, ins in body[max(0, first_wait - 40):first_wait]:
        m = A_OPERAND.search(ins)
        if m:
            p_regs.update(range(int(m.group(1)), int(m.group(1)) + 4))
    wait = next(i for i in range(first_wait + 1, len(body)) if "DEPBAR.LE gsb0, 0x0" in body[i][1])
    exps = [i for i in range(first_wait + 1, len(body)) if re.match(r"(?:@!?P\d+\s+)?MUFU\.EX2", body[i][1])]
    first_exp = exps[0]
    # The exp2s of this softmax: the run of exp2s before the next HGMMA.
    next_mma = next((i for i in range(first_exp, len(body)) if "HGMMA" in body[i][1]), len(body))
    last_exp = max(i for i in exps if i < next_mma)
    writes_p = []
    for i in range(first_wait + 1, last_exp):
        ins = body[i][1]
        dst = re.match(r"(?:@!?P\d+\s+)?[A-Z0-9_.]+\s+R(\d+)\b", ins)
        if dst and int(dst.group(1)) in p_regs and "HGMMA" not in ins:
            writes_p.append(f"{body[i][0]:#06x} {ins}")
    return {"p_regs": (min(p_regs), max(p_regs)) if p_regs else None, "wait": body[wait][0],
            "first_exp": body[first_exp][0], "last_exp": body[last_exp][0],
            "wait_before_exps": wait < first_exp, "writes_p": writes_p}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("binaries", nargs="+", help="extension .so or object files")
    ap.add_argument("--kernel", default="moda_fwd_kernel", help="regex of the kernels to read")
    args = ap.parse_args()
    for path in args.binaries:
        sass = subprocess.run(["cuobjdump", "-sass", path], capture_output=True, text=True, check=True).stdout
        for name, body in kernels(sass):
            if not re.search(args.kernel, name):
                continue
            r = placement(body)
            if r is None:
                continue
            lo, hi = r["p_regs"] or (0, 0)
            print(f"{name}\n  P in R{lo}-R{hi}; P V wait at {r['wait']:#06x}, exp2 from {r['first_exp']:#06x} "
                  f"to {r['last_exp']:#06x}: the wait comes {'BEFORE' if r['wait_before_exps'] else 'after'} "
                  f"the softmax; {len(r['writes_p'])} instructions write P's registers before the last exp2"
                  + "".join(f"\n    {w}" for w in r["writes_p"][:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
