"""The key-stationary backward kernel's schedule (csrc/moda_bwd_kernel.h), emulated in float64
on the CPU: the same CTAs (one block of 128 sequence keys, or a run of depth boxes), the same
query-row steps (64 G-folded rows over [t_first, t_last]), the same masks, the same
unmasked-step rule, and the same delta / grad_lse handling.
Prints the relative error of dK, dV, d depth_k, d depth_v against autograd on the reference,
for a few small cases. Checks the tiling arithmetic, not the CUDA code.

    python bench/emulate_bwd_schedule.py
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import Case, as_double, make_inputs  # noqa: E402

from moda_cuda.reference import moda_attention_ref  # noqa: E402

def next_pow2(x):
    p = 1
    while p < x:
        p *= 2
    return p


def key_block(j, n_seq, T, L, C, causal, BN, Lb, Tb, slot_blocks):
    """The 128 keys of CTA j as (position, slot, exists) and the query positions that may read them."""
    if j < n_seq:
        keys = [(j * BN + r, 0, j * BN + r < T) for r in range(BN)]
        return True, keys, (j * BN if causal else 0), T - 1
    d = j - n_seq
    s0, l0 = d // slot_blocks * Tb, d % slot_blocks * Lb
    keys = [(s0 + r // Lb, l0 + r % Lb, s0 + r // Lb < T and l0 + r % Lb < L) for r in range(BN)]
    s_last = min(s0 + Tb, T) - 1
    return False, keys, (s0 if causal else s0 // C * C), min((s_last // C + 1) * C, T) - 1


def cta_work(i, Hk, B, n_seq, n_depth, per_cta):
    """(hk, b, j_begin, j_end) of CTA i, as CtaWork::of orders them."""
    heads = Hk * B
    if i < n_seq * heads:
        head, j = i % heads, i // heads
        return head % Hk, head // Hk, j, j + 1
    i -= n_seq * heads
    runs = (n_depth + per_cta - 1) // per_cta
    head, box = i // runs, i % runs * per_cta
    return head % Hk, head // Hk, n_seq + box, n_seq + box + min(per_cta, n_depth - box)


def emulate(case, q, k, v, dk, dv, out, lse, dout, glse, per_cta=3):
    B, T, Hq, D = q.shape
    Hk, L, C, causal = case.Hk, case.L, case.chunk, case.causal
    G, scale, log2e = Hq // Hk, D ** -0.5, math.log2(math.e)
    BN, BM = 128, 64
    Lb = min(next_pow2(L), BN) if L > 0 else 1
    Tb = BN // Lb
    slot_blocks = (L + Lb - 1) // Lb if L > 0 else 0
    n_seq = (T + BN - 1) // BN if k is not None else 0
    n_depth = (T + Tb - 1) // Tb * slot_blocks if L > 0 else 0
    delta = (out * dout).sum(-1).permute(0, 2, 1)  # [B, Hq, T]
    if glse is not None:
        delta = delta - glse
    grads = {name: torch.zeros_like(t) if t is not None and t.numel() else None
             for name, t in (("k", k), ("v", v), ("dk", dk), ("dv", dv))}

    def window(t):
        first = t // C * C
        return first, (t if causal else min(first + C, T) - 1)

    n_ctas = (n_seq + (n_depth + per_cta - 1) // per_cta) * Hk * B
    blocks = [(hk, b, j) for i in range(n_ctas) for hk, b, j0, j1 in [cta_work(i, Hk, B, n_seq, n_depth, per_cta)]
              for j in range(j0, j1)]
    assert sorted(blocks) == sorted((hk, b, j) for hk in range(Hk) for b in range(B) for j in range(n_seq + n_depth))
    for hk, b, j in blocks:
        is_seq, keys, t_first, t_last = key_block(j, n_seq, T, L, C, causal, BN, Lb, Tb, slot_blocks)
        Kt = torch.zeros(BN, D, dtype=torch.float64)
        Vt = torch.zeros(BN, D, dtype=torch.float64)
        for r, (s, l, ok) in enumerate(keys):
            if ok:
                Kt[r] = k[b, s, hk] if is_seq else dk[b, s, l, hk]
                Vt[r] = v[b, s, hk] if is_seq else dv[b, s, l, hk]
        dK = torch.zeros(BN, D, dtype=torch.float64)
        dV = torch.zeros(BN, D, dtype=torch.float64)
        for m in range(t_first * G // BM, ((t_last + 1) * G + BM - 1) // BM):
            Q = torch.zeros(BM, D, dtype=torch.float64)
            dO = torch.zeros(BM, D, dtype=torch.float64)
            lse2 = torch.zeros(BM, dtype=torch.float64)
            dl = torch.zeros(BM, dtype=torch.float64)
            ts = [(m * BM + c) // G for c in range(BM)]
            for c in range(BM):
                t, h = ts[c], hk * G + (m * BM + c) % G
                if t < T:
                    Q[c], dO[c] = q[b, t, h], dout[b, t, h]
                    lse2[c], dl[c] = lse[b, h, t] * log2e, delta[b, h, t]
            S, dP = Kt @ Q.T, Vt @ dO.T  # keys x rows
            key_end = (j + 1) * BN if is_seq else 0
            unmasked = is_seq and key_end <= T and ts[-1] < T and (not causal or ts[0] >= key_end - 1)
            P = torch.zeros_like(S)
            for r, (s, l, ok) in enumerate(keys):
                for c in range(BM):
                    t = ts[c]
                    if not ok or t >= T:
                        continue
                    first, last = window(t)
                    visible = ((not causal) or s <= t) if is_seq else first <= s <= last
                    if visible:
                        P[r, c] = 2 ** (S[r, c] * scale * log2e - lse2[c])
            # The kernel skips the mask on such steps: every entry must be visible.
            assert not unmasked or bool((P > 0).all()), "a step taken as unmasked has a masked entry"
            dV += P @ dO
            dK += (P * (dP - dl[None, :])) @ Q
        for r, (s, l, ok) in enumerate(keys):
            if ok and is_seq:
                grads["k"][b, s, hk], grads["v"][b, s, hk] = dK[r] * scale, dV[r]
            elif ok:
                grads["dk"][b, s, l, hk], grads["dv"][b, s, l, hk] = dK[r] * scale, dV[r]
    return grads["k"], grads["v"], grads["dk"], grads["dv"]


def check(case, with_glse):
    """Print the emulated gradients' errors against autograd on the float64 reference."""
    inputs = as_double(make_inputs(case, torch.float64, "cpu", seed=3))
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out, lse = moda_attention_ref(*leaves, causal=case.causal, depth_chunk=case.chunk, return_lse=True)
    dout = torch.randn(out.shape, dtype=torch.float64)
    glse = torch.randn(lse.shape, dtype=torch.float64) if with_glse else None
    loss = (out * dout).sum() + ((torch.nan_to_num(lse, neginf=0.0) * glse).sum() if with_glse else 0)
    wanted = [t for t in leaves[1:] if t is not None and t.numel() > 0]
    gr = iter(torch.autograd.grad(loss, wanted))
    refs = [next(gr) if t is not None and t.numel() > 0 else None for t in leaves[1:]]
    got = emulate(case, *[t.detach() if t is not None else None for t in inputs], out.detach(), lse.detach(), dout, glse)
    errs = [((g - r).norm() / r.norm()).item() if r is not None else None for g, r in zip(got, refs)]
    print(case, with_glse, ["-" if e is None else f"{e:.1e}" for e in errs])


CASES = [
    (Case(B=1, T=150, Hq=16, Hk=2, D=8, L=3), False),
    (Case(B=1, T=150, Hq=16, Hk=2, D=8, L=3, causal=False), True),
    (Case(B=1, T=70, Hq=8, Hk=2, D=8, L=5, chunk=4), True),
    (Case(B=1, T=70, Hq=8, Hk=2, D=8, L=5, chunk=3, causal=False), False),
    (Case(B=1, T=40, Hq=4, Hk=4, D=8, L=2, seq=False), True),
    (Case(B=1, T=1, Hq=4, Hk=1, D=8, L=3), True),
    (Case(B=1, T=130, Hq=32, Hk=2, D=8, L=0), False),
]

if __name__ == "__main__":
    for case, glse in CASES:
        check(case, glse)
