"""Where the GPU time of the byte-level LM goes: MoDA against its parameter-matched baseline.

``--mode train``: one training step (bf16 autocast, fused AdamW) at B=16 T=1024, the
configuration of ``examples/train_lm.py``; wall time per step over 20 steps, then
torch.profiler over 3 steps: kernels per step and the kernels by GPU time. Wall time above
kernel time means the host (Python, launches) sets the pace.

``--packed``: the same step with the batch's rows packed into one row of B*T tokens,
each row a document (``cu_seqlens`` every T tokens; rotary positions restart per document):
the same loss and arithmetic as the unpacked step, through the packed-document kernels and
layouts, so the two runs differ by layout alone.

``--mode decode``: one decode step (one new token per sequence against a KV cache, the
step ``generate()`` replays) captured in a CUDA graph, bf16; replay time per step over 200
replays, then the same kernel table. Within a graph launches cost no host time, so the
step's time is its kernels' plus a gap of about a microsecond between them.

    python bench/profile_lm.py --mode train --out DIR
    python bench/profile_lm.py --mode train --packed --out DIR
    python bench/profile_lm.py --mode decode --batch 1 --out DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moda_cuda.generation import DecodeStep, MoDAKVCache
from moda_cuda.layers import MoDAConfig, MoDAForCausalLM

LM = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=256, max_seq_len=1024)
PROMPT = 64  # decode: tokens in the cache before the profiled steps


def kernel_table(run, steps: int = 3, top: int = 25) -> dict:
    """torch.profiler over ``steps`` calls of ``run``: kernels and GPU time per step, and the
    ``top`` kernel names by GPU time (calls and microseconds per step)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = by_name[e.name[:80]]
            entry[0] += 1
            entry[1] += e.device_time
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {"kernels_per_step": sum(n for n, _ in by_name.values()) / steps,
            "kernel_us_per_step": sum(t for _, t in by_name.values()) / steps,
            "top": [{"kernel": k, "calls": n / steps, "us": t / steps} for k, (n, t) in rows[:top]]}


def train_step(cfg: MoDAConfig, batch: int, seqlen: int, packed: bool = False):
    model = MoDAForCausalLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seqlen + 1), device="cuda")
    inputs, targets, documents = ids[:, :-1], ids[:, 1:], {}
    if packed:  # row b becomes document b of one row
        inputs, targets = inputs.reshape(1, -1), targets.reshape(1, -1)
        documents = dict(cu_seqlens=torch.arange(0, batch * seqlen + 1, seqlen, dtype=torch.int32, device="cuda"),
                         max_seqlen=seqlen)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(inputs, targets, **documents).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def decode_step(cfg: MoDAConfig, batch: int, new_tokens: int = 600):
    model = MoDAForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        ids = torch.randint(0, cfg.vocab_size, (batch, PROMPT), device="cuda")
        cache = MoDAKVCache(cfg.n_layers, batch, PROMPT + new_tokens, cfg.n_kv_heads, cfg.head_dim,
                            torch.device("cuda"))
        model(ids, cache=cache)
        cache.prefill = False
        cache.seqlens.fill_(PROMPT)
        step = DecodeStep(model, cache, cuda_graph=True)
        for _ in range(DecodeStep.WARMUP + 1):  # warm-up steps, then the capture
            step(ids[:, -1])
    return step.graph.replay  # each replay advances the cache by one token


def measure(mode: str, cfg: MoDAConfig, batch: int, packed: bool = False) -> dict:
    torch.manual_seed(0)
    if mode == "train":
        run, warmup, timed = train_step(cfg, batch, cfg.max_seq_len, packed), 8, 20
    else:
        run, warmup, timed = decode_step(cfg, batch), 2, 200
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(timed):
        run()
    torch.cuda.synchronize()
    return {"us_per_step": (time.perf_counter() - start) / timed * 1e6, **kernel_table(run)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("train", "decode"), default="train")
    p.add_argument("--batch", type=int, help="sequences per step (train: 16, decode: 1)")
    p.add_argument("--packed", action="store_true", help="train: the batch's rows as documents of one row")
    p.add_argument("--out", help="directory for profile_lm_<mode>_B<batch>[_packed].json")
    args = p.parse_args()
    if args.packed and args.mode != "train":
        p.error("--packed profiles a training step (--mode train)")
    batch = args.batch or (16 if args.mode == "train" else 1)
    cfg = MoDAConfig(**LM)
    report = {"mode": args.mode, "batch": batch, "packed": args.packed, "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "config": LM, "models": {}}
    layout = ", packed" if args.packed else ""
    for name, c in (("moda", cfg), ("baseline", cfg.matched_baseline())):
        r = report["models"][name] = measure(args.mode, c, batch, args.packed)
        print(f"== {name} ({args.mode}, B={batch}{layout}): {r['us_per_step']:.1f} us/step wall, "
              f"{r['kernels_per_step']:.0f} kernels and {r['kernel_us_per_step']:.1f} us of kernel time per step")
        for row in r["top"]:
            print(f"  {row['calls']:5.0f}  {row['us']:9.1f} us  {row['kernel']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"profile_lm_{args.mode}_B{batch}{'_packed' if args.packed else ''}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
