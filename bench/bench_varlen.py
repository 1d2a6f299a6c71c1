"""Packed documents (``cu_seqlens``) on one GPU, side by side with the baselines, in one run.

Each problem packs N tokens into documents of seeded log-normal lengths (bf16, causal, depth
chunk 1) and times ``moda_attention`` with ``cu_seqlens`` (each fast backend), the same
documents one call each (what a user without packed documents does), FlexAttention MoDA with a
document mask, and FlexAttention with the same document mask WITHOUT depth (the sequence
part's speed of light here). The ``one_document`` problems time the dense op against the
packed op over a single document, which must cost the same. Times are
``triton.testing.do_bench`` medians (ms), forward and forward+backward; outputs are checked
against the per-document calls (or the dense op) first.

    python bench/bench_varlen.py --out DIR [--only NAME,...] [--providers cuda,triton,flex,...]

Providers are timed in the order of ``PROVIDERS``, the slowest to set up last (FlexAttention
MoDA builds a block mask over N x N(1 + L) keys: minutes at 64k tokens), and the JSON is
written after each one, so a run cut short keeps every row it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import moda_cuda
from bench_common import bench_ms, fwd_bwd_step, rel_err
from bench_moda import Shape, make_inputs

# name: (N tokens, documents, Hq, Hk, D, L); mean document length N / documents.
PROBLEMS = {
    "16k_mean1k_d128": (16384, 14, 32, 8, 128, 32),
    "16k_mean2k_d64": (16384, 8, 64, 8, 64, 64),
    "64k_mean2k_d128": (65536, 32, 32, 8, 128, 32),
    "16k_short_d128": (16384, 256, 32, 8, 128, 32),
}
# What bench_problem times, in this order: ours with cu_seqlens per fast backend, FlexAttention
# without depth (document mask), ours one call per document, FlexAttention MoDA (document mask).
PROVIDERS = ("cuda", "triton", "flex", "per_document", "flex_moda")
FLEX_LABELS = {"flex": "flex_attention no depth, document mask", "flex_moda": "flex_attention MoDA, document mask"}
# name: (N, Hq, Hk, D, L): the dense op against cu_seqlens = [0, N].
ONE_DOCUMENT = {
    "one_document_d128": (16384, 32, 8, 128, 32),
    "one_document_d64": (16384, 64, 8, 64, 64),
}


def document_lengths(total: int, docs: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(docs).log_normal_(mean=0.0, std=1.0, generator=g)
    lengths = (w / w.sum() * total).floor().long().clamp(min=1)
    lengths[-1] += total - lengths.sum()
    return lengths.tolist()


def flex_documents(N, G, L, Hk, D, lengths, depth: bool):
    """FlexAttention with a document mask: GQA folded into query rows, keys [sequence ; depth]."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))

    def mask_mod(b, h, qi, ki):
        t = qi // G
        s = torch.clamp(ki, max=N - 1)
        seq = (ki < N) & (s <= t) & (doc[s] == doc[t])
        if not depth:
            return seq
        return seq | ((ki >= N) & ((ki - N) // L == t))

    kv_len = N + (N * L if depth else 0)
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=N * G, KV_LEN=kv_len, device="cuda",
                                   _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)

    def to_flex(q, k, v, dk, dv):
        qf = q.reshape(1, N, Hk, G, D).permute(0, 2, 1, 3, 4).reshape(1, Hk, N * G, D)
        kf, vf = k.transpose(1, 2), v.transpose(1, 2)
        if depth:
            kf = torch.cat([kf, dk.permute(0, 3, 1, 2, 4).reshape(1, Hk, N * L, D)], dim=2)
            vf = torch.cat([vf, dv.permute(0, 3, 1, 2, 4).reshape(1, Hk, N * L, D)], dim=2)
        return [x.detach().contiguous().requires_grad_() for x in (qf, kf, vf)]

    def from_flex(o):
        return o.reshape(1, Hk, N, G, D).permute(0, 2, 1, 3, 4).reshape(1, N, Hk * G, D)

    return to_flex, (lambda qf, kf, vf: flex(qf, kf, vf, block_mask=block_mask)), from_flex


def bench_problem(N, docs, Hq, Hk, D, L, providers=PROVIDERS, measured=lambda problem: None):
    """Times ``providers`` on one problem; ``measured(problem)`` is called with the problem's
    record after each provider's row."""
    G = Hq // Hk
    lengths = document_lengths(N, docs)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    inputs = [r(1, N, Hq, D), r(1, N, Hk, D), r(1, N, Hk, D), r(1, N, L, Hk, D), r(1, N, L, Hk, D)]
    grad_out = torch.randn(1, N, Hq, D, device="cuda", dtype=torch.bfloat16)
    spans = [(a, b) for a, b in zip(cu.tolist(), cu.tolist()[1:]) if b > a]

    def packed(*x, backend="auto"):
        return moda_cuda.moda_attention(*x, cu_seqlens=cu, max_seqlen=max(lengths), backend=backend)

    def per_document(*x):
        return torch.cat([moda_cuda.moda_attention(*[t[:, a:b] for t in x]) for a, b in spans], dim=1)

    rows, want = [], per_document(*inputs).detach()
    problem = {"N": N, "documents": docs, "lengths": lengths, "Hq": Hq, "Hk": Hk, "D": D, "L": L, "results": rows}
    useful = 4.0 * Hq * D * sum(n * (n + 1) / 2 + n * L for n in lengths)

    def record(name, fwd, step, err=None):
        rows.append({"impl": name, "fwd_ms": fwd, "fwd_bwd_ms": step, "rel_err_vs_per_document": err,
                     "fwd_tflops": useful / fwd / 1e9, "fwd_bwd_tflops": 3.5 * useful / step / 1e9})
        print(f"  {name:<34} fwd {fwd:8.3f} ms  fwd+bwd {step:8.3f} ms"
              + ("" if err is None else f"  err {err:.1e}"), flush=True)
        measured(problem)

    for provider in providers:
        if provider in ("cuda", "triton"):
            if provider not in moda_cuda.available_backends():
                continue

            def fn(*x, _b=provider):
                return packed(*x, backend=_b)

            record(f"moda_cuda[{provider}] cu_seqlens", bench_ms(lambda: fn(*inputs)),
                   bench_ms(fwd_bwd_step(fn, inputs, grad_out)), rel_err(fn(*inputs).detach(), want))
        elif provider == "per_document":
            record("moda_cuda one call per document", bench_ms(lambda: per_document(*inputs)),
                   bench_ms(fwd_bwd_step(per_document, inputs, grad_out)))
        else:
            depth = provider == "flex_moda"
            to_flex, run, from_flex = flex_documents(N, G, L, Hk, D, lengths, depth)
            f_in = to_flex(*inputs)
            err = rel_err(from_flex(run(*f_in)).detach(), want) if depth else None
            f_grad = grad_out.reshape(1, N, Hk, G, D).permute(0, 2, 1, 3, 4).reshape(1, Hk, -1, D)
            record(FLEX_LABELS[provider], bench_ms(lambda: run(*f_in)), bench_ms(fwd_bwd_step(run, f_in, f_grad)), err)
    return problem


def bench_one_document(N, Hq, Hk, D, L):
    """Dense op and packed op over one document: same result, and the packed form must cost the same."""
    inputs = make_inputs(Shape(1, N, Hq, Hk, D, L))
    grad_out = torch.randn(1, N, Hq, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, N], dtype=torch.int32, device="cuda")
    rows = []
    for backend in [b for b in ("cuda", "triton") if b in moda_cuda.available_backends()]:
        def dense(*x, _b=backend):
            return moda_cuda.moda_attention(*x, backend=_b)

        def packed(*x, _b=backend):
            return moda_cuda.moda_attention(*x, cu_seqlens=cu, max_seqlen=N, backend=_b)

        err = rel_err(packed(*inputs).detach(), dense(*inputs).detach())
        # Alternate the two twice so drift in clocks hits both alike; keep each one's best median.
        times = {"dense": [], "packed": []}
        for _ in range(2):
            for name, fn in (("dense", dense), ("packed", packed)):
                times[name].append((bench_ms(lambda: fn(*inputs)), bench_ms(fwd_bwd_step(fn, inputs, grad_out))))
        (df, db), (pf, pb) = (tuple(map(min, zip(*times[k]))) for k in ("dense", "packed"))
        rows.append({"backend": backend, "dense_fwd_ms": df, "dense_fwd_bwd_ms": db, "packed_fwd_ms": pf,
                     "packed_fwd_bwd_ms": pb, "fwd_ratio": pf / df, "fwd_bwd_ratio": pb / db,
                     "rel_err_packed_vs_dense": err})
        print(f"  {backend:<7} dense {df:7.3f} / {db:7.3f} ms  packed {pf:7.3f} / {pb:7.3f} ms  "
              f"ratio {pf / df:.3f} / {pb / db:.3f}  err {err:.1e}", flush=True)
    return {"N": N, "documents": 1, "Hq": Hq, "Hk": Hk, "D": D, "L": L, "one_document": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the raw JSON")
    parser.add_argument("--only", default=",".join([*PROBLEMS, *ONE_DOCUMENT]),
                        help="comma-separated problem names (default: all): " + ", ".join([*PROBLEMS, *ONE_DOCUMENT]))
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="what the packed problems time (default: all, in this order): " + ", ".join(PROVIDERS))
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = [n for n in names if n not in PROBLEMS and n not in ONE_DOCUMENT]
    if unknown:
        parser.error(f"unknown problem(s): {', '.join(unknown)}")
    providers = [p for p in PROVIDERS if p in args.providers.split(",")]
    if not providers or set(args.providers.split(",")) - set(PROVIDERS):
        parser.error(f"--providers takes a comma list of {', '.join(PROVIDERS)}")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "backends": moda_cuda.available_backends()}
    path = os.path.join(args.out, "bench_varlen.json")
    results = []

    def save(current=None):  # a run cut short keeps what it measured
        with open(path, "w") as f:
            json.dump({"meta": meta, "problems": results + ([current] if current else [])}, f, indent=1)

    for name in names:
        if name in PROBLEMS:
            print("{}: N={} docs={} Hq={} Hk={} D={} L={}".format(name, *PROBLEMS[name]), flush=True)
            results.append({"name": name, **bench_problem(*PROBLEMS[name], providers,
                                                          lambda problem, _n=name: save({"name": _n, **problem}))})
        else:
            print("{}: N={} Hq={} Hk={} D={} L={}".format(name, *ONE_DOCUMENT[name]), flush=True)
            results.append({"name": name, **bench_one_document(*ONE_DOCUMENT[name])})
        save()
    print(f"wrote {path}")
    print(summary_table(results))
    return 0


def summary_table(results) -> str:
    """Markdown: each problem's times, and ours (best backend) over FlexAttention with and without depth."""
    lines = ["| problem | implementation | fwd ms | fwd+bwd ms |", "|---|---|---|---|"]
    for p in results:
        for row in p.get("results", []):
            lines.append(f"| {p['name']} | {row['impl']} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} |")
        for row in p.get("one_document", []):
            lines.append(f"| {p['name']} | {row['backend']} packed / dense | {row['fwd_ratio']:.3f}x | "
                         f"{row['fwd_bwd_ratio']:.3f}x |")
    lines += ["", "| problem | ours / flex no depth (fwd, fwd+bwd) | flex MoDA / ours (fwd, fwd+bwd) |", "|---|---|---|"]
    for p in results:
        rows = {r["impl"]: r for r in p.get("results", [])}
        ours = [r for name, r in rows.items() if "cu_seqlens" in name]
        if not ours:
            continue
        best = (min(r["fwd_ms"] for r in ours), min(r["fwd_bwd_ms"] for r in ours))
        bare, flex = rows.get(FLEX_LABELS["flex"]), rows.get(FLEX_LABELS["flex_moda"])
        ratios = [f"{best[0] / bare['fwd_ms']:.2f}x, {best[1] / bare['fwd_bwd_ms']:.2f}x" if bare else "not timed",
                  f"{flex['fwd_ms'] / best[0]:.2f}x, {flex['fwd_bwd_ms'] / best[1]:.2f}x" if flex else "not timed"]
        lines.append(f"| {p['name']} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
