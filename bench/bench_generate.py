"""generate() tokens/s: the MoDA LM against its parameter-matched baseline, in one process.

``examples/generate.py`` times one call of one model per process; such timings of one
machine moved by 10% between rounds (docs/performance.md, "In a model"), as much as the
difference asked about. This script loads both models once, warms each up at the timed
length, then times them alternately, ``--rounds`` calls each, and reports the median
tokens/s of each and their ratio (the target: MoDA at least 0.9x the baseline).

The models are the two ``examples/train_lm.py`` saved (``--models DIR``: ``DIR/moda``,
``DIR/baseline``), or new ones of that example's configuration (the default: tokens/s does
not depend on the weights, every sequence generates ``--tokens`` tokens, there is no end
token). bf16 on a GPU, greedy, the decode step replayed from a CUDA graph as ``generate()``
does by default.

    python bench/bench_generate.py --batches 1,8 --tokens 512 --rounds 5 --out DIR
    python bench/bench_generate.py --smoke --out DIR   # tiny models on the CPU: the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from moda_cuda.layers import MoDAConfig, MoDAForCausalLM
from profile_lm import LM  # examples/train_lm.py's models, as bench/profile_lm.py profiles them

SMOKE = dict(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)
PROMPT = 16  # prompt tokens of every sequence


def load_models(models_dir, device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    if models_dir:
        return {name: MoDAForCausalLM.from_pretrained(os.path.join(models_dir, name), device=device, dtype=dtype)
                for name in ("moda", "baseline")}
    torch.manual_seed(0)
    cfg = MoDAConfig(**(SMOKE if smoke else LM))
    return {name: MoDAForCausalLM(c).to(device, dtype).eval()
            for name, c in (("moda", cfg), ("baseline", cfg.matched_baseline()))}


def timed_generate(model, ids: torch.Tensor, tokens: int) -> float:
    """Seconds of one ``generate`` call, the GPU synchronised before and after."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    model.generate(ids, tokens)
    sync()
    return time.perf_counter() - start


def measure(models: dict, batch: int, tokens: int, rounds: int, device: torch.device) -> dict:
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch)).to(device)
    for model in models.values():  # warm-up at the timed length: kernels compiled, graph captured
        timed_generate(model, ids, tokens)
    rates = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            rates[name].append(batch * tokens / timed_generate(model, ids, tokens))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {"batch": batch, "tokens": tokens, "tokens_per_s": rates, "median_tokens_per_s": medians,
            "ratio": medians["moda"] / medians["baseline"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", help="a folder examples/train_lm.py wrote (default: new models of its configuration)")
    p.add_argument("--batches", default="1,8", help="comma list of sequences per call")
    p.add_argument("--tokens", type=int, default=512, help="new tokens per sequence")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per model and batch, alternating")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, a few tokens")
    p.add_argument("--out", required=True, help="folder for bench_generate.json")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = min(args.tokens, 8) if args.smoke else args.tokens
    models = load_models(args.models, device, dtype, args.smoke)
    rows = [measure(models, int(b), tokens, args.rounds, device) for b in args.batches.split(",")]
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": args.models or "new",
              "config": {name: vars(m.config) for name, m in models.items()}, "prompt": PROMPT,
              "rounds": args.rounds, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_generate.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {path}")
    print("\n| B | new tokens | MoDA tokens/s | baseline tokens/s | MoDA / baseline |\n|---|---|---|---|---|")
    for r in rows:
        m = r["median_tokens_per_s"]
        print(f"| {r['batch']} | {r['tokens']} | {m['moda']:,.0f} | {m['baseline']:,.0f} | {r['ratio']:.3f} |")
    return report


if __name__ == "__main__":
    main()
