"""Text from the byte-level LM that ``examples/train_lm.py`` trained: load it, complete a prompt.

    python examples/train_lm.py --minutes 4 --out out/lm
    python examples/generate.py --model out/lm/moda --prompt "def " --max-new-tokens 300

Prints the completion and the decode speed (new tokens per second over the batch, after a
warm-up generation; on a GPU, bf16).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from moda_cuda.layers import MoDAForCausalLM


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("out/lm/moda"), help="a directory save_pretrained wrote")
    p.add_argument("--prompt", default="def ", help="text to complete (UTF-8 bytes are the tokens)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate")
    p.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together")
    p.add_argument("--sample", action="store_true", help="sample (temperature, top-p) instead of greedy")
    p.add_argument("--temperature", type=float, default=0.8, help="with --sample")
    p.add_argument("--top-p", type=float, default=0.95, help="with --sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = MoDAForCausalLM.from_pretrained(args.model, device=device, dtype=dtype)
    prompt = list(args.prompt.encode("utf-8"))
    cfg = model.config
    if cfg.depth_chunk != 1:
        p.error(f"{args.model} was trained with depth_chunk = {cfg.depth_chunk}; generation with a KV cache "
                "needs depth_chunk = 1 (a new token's depth rows are its own)")
    if len(prompt) + args.max_new_tokens > cfg.max_seq_len:
        p.error(f"{len(prompt)} prompt bytes + --max-new-tokens {args.max_new_tokens} exceed the model's "
                f"max_seq_len {cfg.max_seq_len}")
    ids = torch.tensor([prompt] * args.batch, device=device)
    options = dict(do_sample=args.sample, temperature=args.temperature, top_p=args.top_p if args.sample else None,
                   generator=torch.Generator(device=device).manual_seed(args.seed))
    # Warm-up at the timed length: the KV cache holds prompt + new tokens, and its length picks the
    # decode kernels' split plan and specialisation: a shorter warm-up can leave compiles in the timing.
    model.generate(ids, args.max_new_tokens, **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, args.max_new_tokens, **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    rate = args.batch * args.max_new_tokens / seconds
    print(text)
    print(f"\n{args.batch} x {args.max_new_tokens} new tokens in {seconds:.2f} s: {rate:,.0f} tokens/s "
          f"({device.type}, {dtype})")
    return {"text": text, "tokens_per_s": rate}


if __name__ == "__main__":
    main()
    sys.exit(0)
