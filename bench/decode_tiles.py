"""The decode split kernel's tiles, stages, warps and split count, timed against each other.

``triton_ref/decode.py`` picks them from the shapes (``_key_tiles``, ``_num_warps``,
``_num_splits``); this script forces each alternative in turn, times one decode step as
``bench_decode.py`` does (CUDA-graph replays over enough cache copies to miss L2; Hq=32
Hk=8 D=128 L=32, bf16) and puts cuDNN SDPA without depth beside it, in one process:

    python bench/decode_tiles.py --shapes 8x4096,1x4096 [--splits rule,4,8] --out DIR

A config whose shared memory does not fit is reported as failed. Prints a table per shape
(fastest first) and writes ``decode_tiles.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend

import bench_decode as bd
from moda_cuda import eager
from moda_cuda.triton_ref import decode

BLOCK_N = (32, 64, 128)
STAGES = (2, 3, 4)
WARPS = (4, 8)


def _forget_plans() -> None:
    """Drop the cached plans and prepared layouts, so that the next call plans again."""
    decode.decode_plan.cache_clear()
    eager._decode_impls.clear()


def forced(block_n: int, stages: int, warps: int, splits):
    """Patch the plan's choices; returns a function that restores them."""
    saved = decode._key_tiles, decode._num_warps, decode._num_splits
    decode._key_tiles = lambda D, elem_bytes: (block_n, stages)
    decode._num_warps = lambda block_m, block_d: warps
    if splits is not None:
        decode._num_splits = lambda programs, slots, max_splits: min(splits, max_splits)
    _forget_plans()

    def restore():
        decode._key_tiles, decode._num_warps, decode._num_splits = saved
        _forget_plans()

    return restore


def shipped_config() -> tuple:
    """(block_n, stages, warps, None) as the shipped rules pick them for one decode step."""
    h = bd.HEADS
    block_m = max(16, triton.next_power_of_2(h["Hq"] // h["Hk"]))  # decode_plan's rows of one step
    return (*decode._key_tiles(h["D"], 2), decode._num_warps(block_m, triton.next_power_of_2(h["D"])), None)


def time_config(case, block_n: int, stages: int, warps: int, splits) -> dict:
    restore = forced(block_n, stages, warps, splits)
    try:
        h = bd.HEADS
        plan = decode.decode_plan(case.B, 1, h["Hq"] // h["Hk"], h["Hk"], h["D"], case.T, torch.device("cuda"), 2,
                                  None, True)
        us = bd.gpu_us(case.ours(True))
        return {"block_n": block_n, "stages": stages, "warps": warps, "splits": splits, "parts": plan.splits,
                "pdl": plan.pdl, "us": us}
    except Exception as e:  # shared memory or resources: this config cannot run here
        return {"block_n": block_n, "stages": stages, "warps": warps, "splits": splits, "error": str(e)[:200]}
    finally:
        restore()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8x4096,1x4096", help="BxT, comma-separated")
    parser.add_argument("--splits", default="rule",
                        help="split counts to force, comma-separated ('rule': the shipped one)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    splits = [None if s == "rule" else int(s) for s in args.splits.split(",")]
    report = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "command": "python bench/decode_tiles.py " + " ".join(argv or sys.argv[1:])},
              "shapes": {}}
    for shape in args.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        cache_bytes = 2 * B * T * bd.HEADS["Hk"] * bd.HEADS["D"] * 2
        case = bd.Case(B, T, max(1, math.ceil(3 * l2 / cache_bytes)))
        steps, _ = bd.sdpa_steps(case, SDPBackend.CUDNN_ATTENTION)
        cudnn = bd.gpu_us(steps)
        configs = list(itertools.product(BLOCK_N, STAGES, WARPS, splits))
        rows = [time_config(case, *config) for config in configs]
        ship = shipped_config()
        shipped = rows[configs.index(ship)] if ship in configs else time_config(case, *ship)
        report["shapes"][shape] = {"cudnn_us": cudnn, "shipped": shipped, "configs": rows}
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        print(f"\nB={B} T={T}: cuDNN {cudnn:.1f} us, shipped {shipped.get('us', float('nan')):.1f} us")
        print("| block_n | stages | warps | splits | parts | us | / cuDNN |\n|---|---|---|---|---|---|---|")
        for r in ok[:12]:
            print(f"| {r['block_n']} | {r['stages']} | {r['warps']} | {r['splits'] or 'rule'} | {r['parts']} | "
                  f"{r['us']:.1f} | {r['us'] / cudnn:.3f} |")
        print(f"({len(rows) - len(ok)} configs failed)")
        del case
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decode_tiles.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
