"""Byte-level language model on the Python standard library's own sources: MoDA vs baseline.

No downloads: the text is the ``.py`` files of the running interpreter's standard library.
Both models share every hyper-parameter; the baseline (plain attention, same code path with
the depth stream off) gets a slightly wider MLP so that the parameter counts match. Both see
the same batches in the same order and the same learning-rate schedule.

Writes ``lm_results.json`` (config, parameter counts, curves, tokens/s, final validation
loss), ``lm_loss.png`` and each trained model (``moda/``, ``baseline/``: ``config.json`` and
``model.safetensors``, for ``examples/generate.py``) to ``--out``.

``--pack``: each source file is a document; every step packs ``batch * seqlen`` bytes of
consecutive documents into one row (``cu_seqlens``; a document longer than ``seqlen`` is
cut into pieces of at most ``seqlen``), trained with document masking: no byte attends to, or
is predicted from, another document. Validation is packed the same way.

Several GPUs (torchrun): ``--fsdp`` shards the parameters, gradients and optimizer state over
all ranks (FSDP2, each MoDA block on its own) instead of DDP's replicas; ``--context-parallel
N`` shards every sequence over groups of N ranks (``--cp-layout``; each rank computes its
positions, the attention is ``moda_cuda.distributed.context_parallel_moda_attention``), so
``--seqlen`` can grow with N. ``--batch`` counts sequences per group of N (see ``_parallel.py``).

    python examples/train_lm.py --smoke --out /tmp/lm                # CPU, seconds
    torchrun --nproc_per_node=1 examples/train_lm.py --minutes 4 --out out/lm
    torchrun --nproc_per_node=8 examples/train_lm.py --fsdp --context-parallel 4 --seqlen 16384 --batch 1 --models moda
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sysconfig
from pathlib import Path
from typing import Callable, Dict, List, Optional

import _common as C
import torch
from _parallel import LAYOUTS, Parallelism, model_to_save, parallelize, setup_parallelism

from moda_cuda.__main__ import positive_int  # the CLI's argparse type
from moda_cuda.layers import MoDAConfig, MoDAForCausalLM, count_parameters


def load_stdlib_files(max_bytes: int) -> List[bytes]:
    """The standard library's ``.py`` sources, one entry per file (sorted paths:
    deterministic), up to ``max_bytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: List[bytes] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if n not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                data = (Path(dirpath) / name).read_bytes()
            except OSError:
                continue
            chunks.append(data[:max_bytes - total])
            total += len(chunks[-1])
            if total >= max_bytes:
                return chunks
    if total < 1024:
        raise SystemExit(f"found only {total} bytes of Python sources under {root}")
    return chunks


def document_starts(files: List[bytes]) -> torch.Tensor:
    """Offsets of each file's first byte in their concatenation."""
    return torch.tensor([0] + [len(f) for f in files[:-1]]).cumsum(0)


def batch_sampler(data: torch.Tensor, batch: int, seqlen: int, seed: int, device: torch.device) -> Callable:
    """Random windows of ``seqlen + 1`` bytes; inputs and next-byte targets."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seqlen + 1)

    def next_batch():
        starts = torch.randint(0, len(data) - seqlen - 1, (batch,), generator=gen)
        window = data[starts[:, None] + offsets].to(device, non_blocking=True)
        return window[:, :-1], window[:, 1:]

    return next_batch


def packed_window(data: torch.Tensor, starts: torch.Tensor, start: int, n: int, seqlen: int, device: torch.device):
    """``n`` bytes from ``start`` as one packed row: the pieces of documents it holds (cut at
    ``seqlen`` bytes), each predicting only its own next bytes (-100 at a piece's last byte)."""
    window = data[start:start + n + 1]
    pos = torch.arange(start, start + n + 1)  # the window's bytes and the one its last byte predicts
    doc_start = starts[torch.searchsorted(starts, pos, right=True) - 1]
    piece = (pos - doc_start) // seqlen  # pieces of at most seqlen bytes per document
    new = torch.ones(n + 1, dtype=torch.bool)
    new[1:] = (doc_start[1:] != doc_start[:-1]) | (piece[1:] != piece[:-1])
    cu = torch.cat([new[:n].nonzero().flatten(), torch.tensor([n])]).to(torch.int32)
    targets = window[1:].clone()
    targets[new[1:]] = -100  # the next byte starts another piece
    options = {"cu_seqlens": cu.to(device, non_blocking=True), "max_seqlen": int(cu.diff().max())}
    return window[None, :-1].to(device, non_blocking=True), targets[None].to(device, non_blocking=True), options


def packed_sampler(data: torch.Tensor, starts: torch.Tensor, batch: int, seqlen: int, seed: int,
                   device: torch.device) -> Callable:
    """Random windows of ``batch * seqlen`` bytes packed into one row (see packed_window)."""
    gen = torch.Generator().manual_seed(seed)
    n = batch * seqlen

    def next_batch():
        start = int(torch.randint(0, len(data) - n - 1, (1,), generator=gen))
        return packed_window(data, starts, start, n, seqlen, device)

    return next_batch


def make_evaluator(d: C.Dist, val: torch.Tensor, batch: int, seqlen: int, n_batches: int,
                   starts: Optional[torch.Tensor] = None, p: Optional[Parallelism] = None) -> Callable:
    """Mean next-byte loss over fixed validation windows (sharded over the data-parallel
    groups of ``p``, by default one per rank); with the documents' ``starts``, over packed
    windows of ``batch * seqlen`` bytes."""
    p = p if p is not None else Parallelism(data_rank=d.rank, data_ranks=d.world_size)
    gen = torch.Generator().manual_seed(1234)
    n = batch * seqlen if starts is not None else seqlen
    window_starts = torch.randint(0, len(val) - n - 1, (n_batches, batch), generator=gen)
    offsets = torch.arange(seqlen + 1)

    def evaluate(model) -> Dict[str, float]:
        total, count = 0.0, 0
        for i in range(p.data_rank, n_batches, p.data_ranks):
            if starts is not None:
                ids, targets, options = packed_window(val, starts, int(window_starts[i, 0]), n, seqlen, d.device)
                total += model(ids, targets, **options).loss.item()
            else:
                window = val[window_starts[i][:, None] + offsets].to(d.device)
                total += model(window[:, :-1], window[:, 1:]).loss.item()
            count += 1
        # The ranks of a context-parallel group add the same window's loss: the mean is unchanged.
        total, count = C.all_reduce_sum(d, [total, count])
        loss = total / max(count, 1)
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}

    return evaluate


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=C.HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/lm"), help="folder for lm_results.json and lm_loss.png")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps, CPU: a sanity check")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (torchrun: each rank takes its GPU)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, else fp32), fp32, bf16, fp16 (autocast)")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps per model")
    p.add_argument("--minutes", type=float, default=None,
                   help="train the MoDA model for about this long and the baseline for as many steps "
                        "(instead of --steps)")
    p.add_argument("--models", default="moda,baseline", help="comma list of moda, baseline")
    p.add_argument("--batch", type=int, default=16,
                   help="sequences per step and rank (with --context-parallel N: per group of N ranks)")
    p.add_argument("--seqlen", type=int, default=1024, help="tokens (bytes) per sequence")
    p.add_argument("--d-model", type=int, help="model width", default=512)
    p.add_argument("--layers", type=int, help="transformer blocks", default=8)
    p.add_argument("--heads", type=int, help="query heads", default=8)
    p.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention)", default=2)
    p.add_argument("--depth-chunk", type=int, default=1, help="moda_attention's depth_chunk")
    p.add_argument("--norm", choices=["pre", "post"], default="pre", help="pre- or post-norm blocks")
    p.add_argument("--no-ffn-kv", action="store_true", help="only attention k/v go to the depth stream")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--backend", default="auto", help="moda_attention backend")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--eval-every", type=int, default=None, help="default: 10 evaluations per run")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches per evaluation")
    p.add_argument("--data-mb", type=float, default=24.0, help="bytes of stdlib source to use (MB)")
    p.add_argument("--pack", action="store_true",
                   help="each source file a document, packed into one row per step, trained with document masking")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2)")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="shard every sequence over N ranks (torchrun; N divides the world size)")
    p.add_argument("--cp-layout", choices=LAYOUTS, default="zigzag",
                   help="which positions each rank of a context-parallel group holds")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture one training step in a CUDA graph and replay it (one GPU, fixed shapes)")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = "cpu" if args.device == "auto" else args.device
        args.steps = min(args.steps, 6)  # a few steps, whatever --minutes says
        args.minutes = None
        args.batch, args.seqlen, args.d_model, args.layers = 4, 32, 32, 2
        args.heads, args.kv_heads, args.eval_batches, args.data_mb = 4, 2, 2, 0.25
    if args.cuda_graph:
        others = [flag for flag, on in (("--pack", args.pack), ("--fsdp", args.fsdp),
                                        ("--checkpointing", args.checkpointing),
                                        ("--context-parallel", args.context_parallel > 1), ("--smoke", args.smoke))
                  if on]
        if others:  # packed offsets are read on the host every step; the others are not captured
            p.error(f"--cuda-graph captures a one-GPU step of fixed shapes: not with {', '.join(others)}")
    if args.context_parallel > 1:
        pieces = args.context_parallel * (2 if args.cp_layout == "zigzag" else 1)
        if args.pack:
            p.error("--context-parallel shards whole sequences: it does not take --pack")
        if args.seqlen % pieces:
            p.error(f"--seqlen must be a multiple of {pieces} "
                    f"({args.cp_layout} layout over {args.context_parallel} ranks)")
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    d = C.setup(args.device)
    amp = C.resolve_dtype(args.dtype, d.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        par = setup_parallelism(d, args.fsdp, args.context_parallel, args.cp_layout)
        files = load_stdlib_files(int(args.data_mb * 2**20))
        data = torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8).long()
        n_val = max(len(data) // 20, args.seqlen * 4, args.batch * args.seqlen * 2 if args.pack else 0)
        train_data, val_data = data[:-n_val], data[-n_val:]
        starts = document_starts(files)
        # Document starts within each split (the split point starts a document of its own).
        train_starts = starts[starts < len(train_data)]
        val_starts = torch.cat([torch.tensor([0]), starts[starts > len(train_data)] - len(train_data)])
        sharding = (", FSDP2" if par.fsdp else "") + \
            (f", context parallel over {par.context_parallel} ranks ({par.layout})" if par.context_parallel > 1 else "")
        log(d, f"data: {len(train_data) / 2**20:.2f} MB train, {len(val_data) / 2**20:.2f} MB validation "
            f"(stdlib .py sources); world size {d.world_size}, device {C.device_name(d.device)}, autocast {amp}"
            + sharding)

        moda_cfg = MoDAConfig(
            d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
            depth_chunk=args.depth_chunk, norm=args.norm, ffn_kv=not args.no_ffn_kv, vocab_size=256,
            max_seq_len=args.seqlen, gradient_checkpointing=args.checkpointing, backend=args.backend,
        )
        configs = {"moda": moda_cfg, "baseline": moda_cfg.matched_baseline()}
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        if not names or any(n not in configs for n in names):
            raise SystemExit(f"--models must list moda and/or baseline, got {args.models!r}")

        def build(name: str) -> torch.nn.Module:
            torch.manual_seed(args.seed)  # same initialisation stream for both models
            return parallelize(MoDAForCausalLM(configs[name]).to(d.device), d, par)

        def sampler():
            seed = args.seed * 1000 + par.data_rank  # the ranks of a context-parallel group share batches
            if args.pack:
                return packed_sampler(train_data, train_starts, args.batch, args.seqlen, seed, d.device)
            return batch_sampler(train_data, args.batch, args.seqlen, seed, d.device)

        spec = C.TrainSpec(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                           timing_warmup=2 if args.smoke else 10, cuda_graph=args.cuda_graph)
        if args.minutes is not None:
            spec.steps = C.steps_for_minutes(d, args.minutes, lambda: build(names[0]), spec, sampler(), amp)
            log(d, f"--minutes {args.minutes}: {spec.steps} steps per model")
        spec.warmup = args.warmup if args.warmup is not None else max(1, spec.steps // 20)
        spec.eval_every = args.eval_every or max(1, spec.steps // 10)
        spec.log_every = max(1, spec.eval_every // 2)
        evaluate = make_evaluator(d, val_data, args.batch, args.seqlen, args.eval_batches,
                                  val_starts if args.pack else None, par)
        tokens_per_rank = args.batch * args.seqlen // par.context_parallel
        per = "GPU" if d.device.type == "cuda" else "process"

        results: Dict[str, Dict] = {}
        saved: List[Path] = []  # model directories
        for name in names:
            model = build(name)
            n_params = count_parameters(model)
            log(d, f"[{name}] {n_params / 1e6:.3f}M parameters, {spec.steps} steps of "
                f"{args.batch * par.data_ranks} x {args.seqlen} tokens")
            run = C.train(d, name, model, spec, sampler(), evaluate, amp, tokens_per_rank)
            run["tokens_per_s"] = run.pop("items_per_s")
            run["tokens_per_s_per_rank"] = run["tokens_per_s"] / d.world_size
            results[name] = {"config": dataclasses.asdict(configs[name]), "parameters": n_params, **run}
            log(d, f"[{name}] {run['tokens_per_s']:,.0f} tokens/s ({run['tokens_per_s_per_rank']:,.0f} per {per}), "
                f"final val loss {run['final_val'].get('loss', float('nan')):.4f}")
            plain = model_to_save(model, d)  # every rank takes part under FSDP
            if d.is_main:
                plain.save_pretrained(args.out / name)
                saved.append(args.out / name)
            del model
            if d.device.type == "cuda":
                torch.cuda.empty_cache()

        report = {
            "example": "byte-level LM on Python stdlib sources",
            "device": C.device_name(d.device),
            "world_size": d.world_size,
            "autocast_dtype": str(amp),
            "torch": torch.__version__,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "fsdp": par.fsdp,
            "context_parallel": par.context_parallel,
            "cp_layout": par.layout if par.context_parallel > 1 else None,
            "tokens_per_step": args.batch * args.seqlen * par.data_ranks,
            "steps": spec.steps,
            "models": results,
            "summary": {n: {"parameters": r["parameters"], "tokens_per_s": r["tokens_per_s"],
                            "tokens_per_s_per_rank": r["tokens_per_s_per_rank"],
                            "final_val_loss": r["final_val"].get("loss")} for n, r in results.items()},
        }
        if d.is_main:
            written = [args.out / "lm_results.json"]
            C.write_json(written[0], report)
            panels = [
                ("training loss (EMA)", "loss (nats/byte)",
                 {n: ([s for s, _ in r["train_curve"]], C.smooth([v for _, v in r["train_curve"]]))
                  for n, r in results.items()}),
                ("validation loss", "loss (nats/byte)",
                 {n: ([e["step"] for e in r["val_curve"]], [e["loss"] for e in r["val_curve"]])
                  for n, r in results.items()}),
            ]
            if C.plot_panels(args.out / "lm_loss.png", "byte-level LM: MoDA vs plain attention", panels):
                written.append(args.out / "lm_loss.png")
            for n, s in report["summary"].items():
                print(f"{n:>9}: {s['parameters'] / 1e6:7.3f}M params  {s['tokens_per_s']:12,.0f} tokens/s  "
                      f"{s['tokens_per_s_per_rank']:10,.0f} tokens/s per {per}  "
                      f"final val loss {s['final_val_loss']:.4f}")
            for path in written + saved:
                print(f"wrote {path}")
        return report
    finally:
        C.teardown(d)


log = C.log

if __name__ == "__main__":
    main()
