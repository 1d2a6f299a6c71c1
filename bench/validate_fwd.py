"""Forward of one backend against the float64 reference over the variants, as a table.

A quick check to run before the full test suite (and the case compute-sanitizer runs):
fresh random inputs, the output poisoned with NaN before the call, relative L2 error of out
and lse. Exits non-zero when any case is over tolerance. Inputs, poisoning, error measure
and tolerances are the test suite's own (tests/helpers.py, tests/kernel_checks.py).

    python bench/validate_fwd.py --backend cuda
    python bench/validate_fwd.py --backend cuda --small     # one tiny case (for compute-sanitizer)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import moda_cuda
from moda_cuda.reference import moda_attention_ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import Case, as_double, make_inputs, rel_err  # noqa: E402
from kernel_checks import TOLERANCE, poisoned_allocations  # noqa: E402

# (case, depth_slots): slots > L passes the depth tensors as strided views of a larger buffer.
CASES = [
    (Case(B=2, T=1000, Hq=16, Hk=2, D=64, L=8), None),
    (Case(B=2, T=1000, Hq=16, Hk=2, D=64, L=8, causal=False), None),
    (Case(B=2, T=1000, Hq=16, Hk=2, D=128, L=8, chunk=4), None),
    (Case(B=1, T=1000, Hq=16, Hk=2, D=64, L=8, chunk=5, causal=False), None),
    (Case(B=1, T=777, Hq=16, Hk=2, D=128, L=8, seq=False), None),
    (Case(B=1, T=777, Hq=8, Hk=8, D=64, L=3, chunk=3, causal=False, seq=False), None),
    (Case(B=1, T=555, Hq=16, Hk=2, D=64, L=0), None),
    (Case(B=1, T=300, Hq=2, Hk=2, D=64, L=1), None),
    (Case(B=1, T=300, Hq=32, Hk=2, D=128, L=5), None),
    (Case(B=1, T=1, Hq=8, Hk=4, D=64, L=4), None),
    (Case(B=1, T=1, Hq=8, Hk=1, D=128, L=3, causal=False), None),
    (Case(B=1, T=333, Hq=8, Hk=2, D=64, L=256), None),
    (Case(B=1, T=257, Hq=8, Hk=2, D=128, L=33, chunk=2), None),
    (Case(B=1, T=1000, Hq=16, Hk=2, D=64, L=6, chunk=2), 24),
    (Case(B=1, T=4096, Hq=64, Hk=8, D=64, L=64), None),
    (Case(B=1, T=4500, Hq=16, Hk=2, D=64, L=8), None),  # G = 8 past T = 4096: the fused dQ (bwd_fuses_dq)
    (Case(B=1, T=2048, Hq=32, Hk=8, D=128, L=32), None),
    (Case(B=1, T=129, Hq=16, Hk=4, D=64, L=7), None),
    # What bench/patches/fwd_depth_groups.patch's depth groups and stripe boxes take (G | 64, T a
    # multiple of 64 / G): two batches, causal or not, depth only, and a strided view.
    (Case(B=2, T=520, Hq=16, Hk=2, D=64, L=16), None),
    (Case(B=2, T=512, Hq=16, Hk=2, D=64, L=64, causal=False), None),
    (Case(B=2, T=256, Hq=16, Hk=2, D=64, L=32, seq=False), None),
    (Case(B=2, T=512, Hq=16, Hk=2, D=64, L=60), 64),
]
# For compute-sanitizer: a tiny case, and one with enough depth boxes that the backward's CTAs
# walk runs of several (the last run shorter).
SMALL = [(Case(B=1, T=77, Hq=8, Hk=2, D=64, L=5), None), (Case(B=1, T=2048, Hq=4, Hk=2, D=64, L=64, seq=False), None)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_case(case: Case, slots, dtype, backend: str, seed: int):
    inputs = make_inputs(case, dtype, "cuda", seed=seed, depth_slots=slots)
    kw = dict(causal=case.causal, depth_chunk=case.chunk)
    with poisoned_allocations():
        out, lse = moda_cuda.moda_attention(*inputs, return_lse=True, backend=backend, **kw)
    ref, ref_lse = moda_attention_ref(*as_double(inputs), return_lse=True, **kw)
    return {"out": rel_err(out, ref), "lse": rel_err(lse, ref_lse)}


def run_table(cases, dtypes: str, columns, measure) -> int:
    """One row per case and dtype: the relative errors ``measure(case, slots, dtype, index)``
    returns (column -> error; a column it leaves out prints as -), marked FAIL past the dtype's
    tolerance; an exception is reported in its row. Returns the number of failing rows."""
    failures = 0
    print(f"{'case':<52} {'dtype':>6} " + " ".join(f"{c:>10}" for c in columns))
    for i, (case, slots) in enumerate(cases):
        label = str(case) + (f"-slots{slots}" if slots else "")
        for name in dtypes.split(","):
            dtype = DTYPES[name]
            try:
                errors = measure(case, slots, dtype, i)
                ok = all(e < TOLERANCE[dtype] for e in errors.values())
                cells = " ".join(f"{errors[c]:10.2e}" if c in errors else f"{'-':>10}" for c in columns)
                print(f"{label:<52} {name:>6} {cells}{'' if ok else '   FAIL'}", flush=True)
            except Exception as exc:  # report and go on: one bad case must not hide the others
                ok = False
                print(f"{label:<52} {name:>6} error: {str(exc).splitlines()[0][:120]}", flush=True)
            failures += not ok
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # an asynchronous kernel error surfaces here, not after the table
    print(f"{failures} failing case(s)")
    return failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--small", action="store_true")
    p.add_argument("--dtypes", default="bf16,fp16")
    a = p.parse_args()
    failures = run_table(SMALL if a.small else CASES, a.dtypes, ["out", "lse"],
                         lambda case, slots, dtype, i: run_case(case, slots, dtype, a.backend, seed=i))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
