"""A small ViT on scikit-learn's 8x8 handwritten digits: non-causal MoDA vs baseline.

No downloads: the 1,797 digit images ship inside scikit-learn. ``--data synthetic`` swaps
in procedurally generated 8x8 images (noisy class templates) for machines without it.
Both models share every hyper-parameter; the baseline (plain attention, depth stream off)
gets a slightly wider MLP so that the parameter counts match, and both see the same batches.

Writes ``vit_results.json`` (config, parameter counts, curves, images/s, final validation
loss and accuracy) and ``vit_curves.png`` to ``--out``.

    python examples/train_vit.py --smoke --out /tmp/vit
    torchrun --nproc_per_node=1 examples/train_vit.py --steps 3000 --out out/vit
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import _common as C
import torch

from moda_cuda.__main__ import positive_int  # the CLI's argparse type
from moda_cuda.layers import MoDAConfig, MoDAViT, count_parameters

log = C.log


def load_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """``images [N, 1, 8, 8]`` in [0, 1] and ``labels [N]`` from scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise SystemExit("the digits data set ships with scikit-learn: pip install scikit-learn "
                         "(or run with --data synthetic)") from None
    digits = sk_load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    return images, torch.tensor(digits.target, dtype=torch.long)


def synthetic_digits(n: int = 1800, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ten random smooth 8x8 templates, shifted by up to a pixel and noised."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.nn.functional.avg_pool2d(torch.rand(10, 1, 10, 10, generator=gen), 3, stride=1)  # [10,1,8,8]
    labels = torch.arange(n) % 10
    images = templates[labels]
    shifts = torch.randint(-1, 2, (n, 2), generator=gen)
    images = torch.stack([torch.roll(img, tuple(s.tolist()), dims=(1, 2)) for img, s in zip(images, shifts)])
    images = (images + 0.15 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
    return images, labels


def split(images: torch.Tensor, labels: torch.Tensor, val_fraction: float = 0.2, seed: int = 0):
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])


def batch_sampler(images, labels, batch: int, seed: int, device: torch.device, augment: bool) -> Callable:
    """Random batches (with replacement), optionally shifted by up to one pixel."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = images.to(device), labels.to(device)

    def next_batch():
        idx = torch.randint(0, len(labels), (batch,), generator=gen).to(device)
        x = images[idx]
        if augment:
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, (dx, dy), dims=(2, 3))
        return x, labels[idx]

    return next_batch


def make_evaluator(d: C.Dist, images: torch.Tensor, labels: torch.Tensor, batch: int) -> Callable:
    """Validation loss and accuracy over the held-out images (sharded over ranks)."""
    images, labels = images.to(d.device), labels.to(d.device)
    shards = [(i, min(i + batch, len(labels))) for i in range(0, len(labels), batch)]

    def evaluate(model) -> Dict[str, float]:
        loss_sum, correct, count = 0.0, 0.0, 0.0
        for lo, hi in shards[d.rank :: d.world_size]:
            out = model(images[lo:hi], labels[lo:hi])
            loss_sum += out.loss.item() * (hi - lo)
            correct += (out.logits.argmax(-1) == labels[lo:hi]).sum().item()
            count += hi - lo
        loss_sum, correct, count = C.all_reduce_sum(d, [loss_sum, correct, count])
        return {"loss": loss_sum / count, "accuracy": correct / count}

    return evaluate


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=C.HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/vit"), help="folder for vit_results.json and vit_curves.png")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps, CPU: a sanity check")
    p.add_argument("--data", choices=["digits", "synthetic"], default="digits",
                   help="scikit-learn's digits, or generated images (no scikit-learn needed)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (torchrun: each rank takes its GPU)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, else fp32), fp32, bf16, fp16 (autocast)")
    p.add_argument("--steps", type=positive_int, default=3000, help="training steps per model")
    p.add_argument("--minutes", type=float, default=None,
                   help="train the MoDA model for about this long and the baseline for as many steps "
                        "(instead of --steps)")
    p.add_argument("--models", default="moda,baseline", help="comma list of moda, baseline")
    p.add_argument("--batch", type=int, default=128, help="images per rank and step")
    p.add_argument("--d-model", type=int, help="model width", default=128)
    p.add_argument("--layers", type=int, help="transformer blocks", default=6)
    p.add_argument("--heads", type=int, help="query heads", default=4)
    p.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention)", default=2)
    p.add_argument("--patch", type=int, default=2, help="patch size (8x8 images)")
    p.add_argument("--norm", choices=["pre", "post"], default="pre", help="pre- or post-norm blocks")
    p.add_argument("--no-ffn-kv", action="store_true", help="only attention k/v go to the depth stream")
    p.add_argument("--backend", default="auto", help="moda_attention backend")
    p.add_argument("--no-augment", action="store_true", help="no random one-pixel shifts")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--eval-every", type=int, default=None, help="default: 20 evaluations per run")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = "cpu" if args.device == "auto" else args.device
        args.steps = min(args.steps, 8)
        args.minutes = None
        args.batch, args.d_model, args.layers, args.heads, args.kv_heads = 32, 32, 2, 4, 2
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    d = C.setup(args.device)
    amp = C.resolve_dtype(args.dtype, d.device)
    try:
        images, labels = load_digits() if args.data == "digits" else synthetic_digits(seed=args.seed)
        mean, std = images.mean(), images.std()
        images = (images - mean) / std
        (tr_x, tr_y), (va_x, va_y) = split(images, labels, seed=args.seed)
        log(d, f"data: {args.data}, {len(tr_y)} train / {len(va_y)} validation images; world size "
            f"{d.world_size}, device {C.device_name(d.device)}, autocast {amp}")

        moda_cfg = MoDAConfig(
            d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
            norm=args.norm, ffn_kv=not args.no_ffn_kv, image_size=8, patch_size=args.patch, in_channels=1,
            num_classes=10, rope=False, backend=args.backend,
        )
        configs = {"moda": moda_cfg, "baseline": moda_cfg.matched_baseline()}
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        if not names or any(n not in configs for n in names):
            raise SystemExit(f"--models must list moda and/or baseline, got {args.models!r}")

        def build(name: str) -> MoDAViT:
            torch.manual_seed(args.seed)
            return MoDAViT(configs[name]).to(d.device)

        def sampler():
            return batch_sampler(tr_x, tr_y, args.batch, args.seed * 1000 + d.rank, d.device, not args.no_augment)

        spec = C.TrainSpec(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                           timing_warmup=2 if args.smoke else 10)
        if args.minutes is not None:
            spec.steps = C.steps_for_minutes(d, args.minutes, lambda: build(names[0]), spec, sampler(), amp)
            log(d, f"--minutes {args.minutes}: {spec.steps} steps per model")
        spec.warmup = max(1, spec.steps // 20)
        spec.eval_every = args.eval_every or max(1, spec.steps // 20)
        spec.log_every = max(1, spec.eval_every)
        evaluate = make_evaluator(d, va_x, va_y, 512)

        results: Dict[str, Dict] = {}
        for name in names:
            model = build(name)
            n_params = count_parameters(model)
            log(d, f"[{name}] {n_params / 1e6:.3f}M parameters, {spec.steps} steps of {args.batch * d.world_size} images")
            run = C.train(d, name, model, spec, sampler(), evaluate, amp, args.batch)
            run["images_per_s"] = run.pop("items_per_s")
            results[name] = {"config": dataclasses.asdict(configs[name]), "parameters": n_params, **run}
            del model

        report = {
            "example": f"ViT on 8x8 {args.data} images",
            "device": C.device_name(d.device),
            "world_size": d.world_size,
            "autocast_dtype": str(amp),
            "torch": torch.__version__,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "steps": spec.steps,
            "models": results,
            "summary": {n: {"parameters": r["parameters"], "images_per_s": r["images_per_s"],
                            "final_val_loss": r["final_val"].get("loss"),
                            "final_val_accuracy": r["final_val"].get("accuracy")} for n, r in results.items()},
        }
        if d.is_main:
            written = [args.out / "vit_results.json"]
            C.write_json(written[0], report)
            val = {n: r["val_curve"] for n, r in results.items()}
            panels = [
                ("training loss (EMA)", "cross-entropy",
                 {n: ([s for s, _ in r["train_curve"]], C.smooth([v for _, v in r["train_curve"]]))
                  for n, r in results.items()}),
                ("validation loss", "cross-entropy",
                 {n: ([e["step"] for e in c], [e["loss"] for e in c]) for n, c in val.items()}),
                ("validation accuracy", "accuracy",
                 {n: ([e["step"] for e in c], [e["accuracy"] for e in c]) for n, c in val.items()}),
            ]
            if C.plot_panels(args.out / "vit_curves.png", f"ViT on {args.data}: MoDA vs plain attention", panels):
                written.append(args.out / "vit_curves.png")
            for n, s in report["summary"].items():
                print(f"{n:>9}: {s['parameters'] / 1e6:7.3f}M params  {s['images_per_s']:10,.0f} images/s  "
                      f"final val loss {s['final_val_loss']:.4f}  accuracy {s['final_val_accuracy']:.3f}")
            for path in written:
                print(f"wrote {path}")
        return report
    finally:
        C.teardown(d)


if __name__ == "__main__":
    main()
