"""Shared plumbing of the training examples: DDP setup, the training loop, JSON and plots.

The examples run as ``python examples/x.py`` or ``torchrun --nproc_per_node=N examples/x.py``.
Under torchrun every rank trains on its own random batches (seeded by rank) and DDP averages
the gradients (a model already sharded with FSDP2 averages them itself); evaluation is sharded
over the ranks and all-reduced; rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

try:  # a checkout that is not pip-installed: use the package next to this folder
    import moda_cuda  # noqa: F401  (the examples import from it after this module)
except ImportError:  # pragma: no cover - depends on how the examples are launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- setup


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default; left out for flags, for options whose default is
    None (their help says what happens then) and where the help already names it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


@dataclass
class Dist:
    """Where this process sits in the (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_arg: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by torchrun (any world size, 1 included)."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:  # plain `python examples/x.py`
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return Dist(device=device)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device_arg.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device(device_arg)
        backend = "gloo"
    torch_dist.init_process_group(backend=backend)
    return Dist(rank, world, local, device, True)


def teardown(d: Dist) -> None:
    if d.initialized:
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype, cache_enabled: bool = True):
    """bf16/fp16 autocast around forward passes; a no-op context for fp32. ``cache_enabled``:
    autocast's cache of cast weights (off where the step is captured in a CUDA graph)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=cache_enabled)


def log(d: Dist, msg: str) -> None:
    if d.is_main:
        print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_reduce_sum(d: Dist, values: Sequence[float]) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=d.device)
    if d.initialized:
        torch_dist.all_reduce(t)
    return t.tolist()


def broadcast_int(d: Dist, value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=d.device)
    if d.initialized:
        torch_dist.broadcast(t, src=0)
    return int(t.item())


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------- training


@dataclass
class TrainSpec:
    """Optimiser and loop settings, identical for the MoDA model and its baseline."""

    steps: int
    lr: float = 1e-3
    warmup: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    log_every: int = 50
    timing_warmup: int = 5  # first steps (kernel compilation, autotuning) left out of throughput
    cuda_graph: bool = False  # replay one captured step (GraphedStep) instead of running it eagerly


def is_fully_sharded(model: nn.Module) -> bool:
    """Holds FSDP2 modules (``fully_shard``), which reduce-scatter the gradients themselves."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: nn.Module, spec: TrainSpec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and the [CLS]/position parameters (< 2 dims).
    With ``spec.cuda_graph`` its step can be captured: the learning rate is a device tensor
    (:func:`set_lr` writes it) and the step count stays on the device."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": other, "weight_decay": 0.0}]
    lr = torch.tensor(spec.lr, device=device) if spec.cuda_graph else spec.lr
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda",
                             capturable=spec.cuda_graph)


def optimizer_step(module: nn.Module, opt: torch.optim.Optimizer, grad_clip: float, device: torch.device,
                   amp_dtype: torch.dtype, inputs: torch.Tensor, targets: torch.Tensor, options: Optional[Dict] = None,
                   autocast_cache: bool = True) -> torch.Tensor:
    """One training step on a batch: forward under autocast, backward, gradient clipping, the
    optimizer's step. Returns the loss, detached."""
    opt.zero_grad(set_to_none=True)
    with autocast(device, amp_dtype, autocast_cache):
        loss = module(inputs, targets, **(options or {})).loss
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    opt.step()
    return loss.detach()


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate; a tensor one in place (a captured step reads its address)."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class GraphedStep:
    """A training step (forward, backward, gradient clipping, optimizer step) captured once in
    a CUDA graph and replayed for every later batch.

    Why: a small model's eager step is bound by the host, which launches each of its hundreds
    of kernels from Python (the byte-level LM: about 900 kernels, 20 ms of GPU work in a
    40-50 ms step); a replay launches them all at once. The model's code is unchanged, so it
    must be capturable: fixed shapes, no host reads of device values (no packed documents,
    whose offsets are read on the host), no distributed wrapper.

    The first ``WARMUP`` steps run eagerly on a side stream, as capture requires (kernels
    compiled and autotuned, the optimizer's state allocated); they train on their batches
    like any other step. The graph is then captured on the next batch's static copies and
    replayed; each later step copies its batch into those tensors first. The step
    (:func:`optimizer_step`) sets the gradients to None before its backward, so the captured
    backward writes them afresh on every replay. Autocast runs without its weight cache,
    which would hold casts made outside the graph.
    """

    WARMUP = 3

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, grad_clip: float, amp_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model, self.opt, self.grad_clip, self.amp_dtype, self.device = model, opt, grad_clip, amp_dtype, device
        self.side = torch.cuda.Stream(device)
        self.graph = None
        self.eager_steps = 0
        self.inputs = self.targets = self.loss = None

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return optimizer_step(self.model, self.opt, self.grad_clip, self.device, self.amp_dtype, inputs, targets,
                              autocast_cache=False)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The step on this batch; returns its loss (a tensor of its own)."""
        if self.eager_steps < self.WARMUP:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side), warnings.catch_warnings():
                # A capturable optimizer warns when it steps outside a capture: expected here.
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                loss = self._step(inputs, targets)
            torch.cuda.current_stream().wait_stream(self.side)
            self.eager_steps += 1
            return loss
        if self.graph is None:
            self.inputs, self.targets = inputs.clone(), targets.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records only: the replay below runs this step
                self.loss = self._step(self.inputs, self.targets)
        else:  # same shapes, or copy_ would broadcast a wrong batch into the static tensors
            if inputs.shape != self.inputs.shape or targets.shape != self.targets.shape:
                raise ValueError(f"a captured step takes batches of one shape: {tuple(self.inputs.shape)} and "
                                 f"{tuple(self.targets.shape)}, got {tuple(inputs.shape)} and {tuple(targets.shape)}")
            self.inputs.copy_(inputs)
            self.targets.copy_(targets)
        self.graph.replay()
        return self.loss.clone()


# (inputs, targets), or (inputs, targets, keyword arguments of the model's forward).
Batch = Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, Dict]]


def train(
    d: Dist,
    label: str,
    model: nn.Module,
    spec: TrainSpec,
    next_batch: Callable[[], Batch],
    evaluate: Callable[[nn.Module], Dict[str, float]],
    amp_dtype: torch.dtype,
    items_per_step: int,
) -> Dict:
    """Train ``model`` for ``spec.steps`` steps; returns curves, throughput and final metrics.

    ``items_per_step`` counts what one rank consumes per step (tokens or images); throughput
    is reported for the whole job, over the steps after ``timing_warmup``, without evaluation.
    """
    device = d.device
    if spec.cuda_graph and (d.initialized or device.type != "cuda"):
        raise ValueError("a captured training step runs on one CUDA device without torch.distributed")
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if d.initialized and not is_fully_sharded(model) else model
    opt = make_optimizer(model, spec, device)
    graphed = GraphedStep(model, opt, spec.grad_clip, amp_dtype, device) if spec.cuda_graph else None
    train_curve: List[Tuple[int, float]] = []
    val_curve: List[Dict[str, float]] = []
    pending: List[torch.Tensor] = []  # losses not yet copied to the host (avoids a sync per step)
    timed_seconds, timed_steps = 0.0, 0
    segment_start, segment_steps = None, 0

    def flush_losses(done: int) -> None:  # `done` steps finished; curves count steps from 1
        if pending:
            values = torch.stack(pending).float().tolist()
            train_curve.extend(zip(range(done - len(values) + 1, done + 1), values))
            pending.clear()

    def run_eval(step: int) -> None:
        model.eval()
        with torch.no_grad(), autocast(device, amp_dtype):
            metrics = evaluate(model)
        model.train()
        val_curve.append({"step": step, **metrics})
        log(d, f"[{label}] step {step:5d}  " + "  ".join(f"val_{k} {v:.4f}" for k, v in metrics.items()))

    # Short runs still time their second half.
    timing_warmup = min(spec.timing_warmup, spec.steps // 2)
    if graphed is not None:  # the capture (a synchronisation, the pool's setup) is not a step's time
        timing_warmup = min(max(timing_warmup, GraphedStep.WARMUP + 1), spec.steps - 1)
    model.train()
    wall_start = time.perf_counter()
    for step in range(spec.steps):
        if step == timing_warmup or (segment_start is None and step > timing_warmup):
            sync(device)
            segment_start, segment_steps = time.perf_counter(), 0
        set_lr(opt, lr_at(step, spec))
        inputs, targets, *options = next_batch()
        if graphed is not None:
            pending.append(graphed(inputs, targets))
        else:
            pending.append(optimizer_step(ddp, opt, spec.grad_clip, device, amp_dtype, inputs, targets,
                                          options[0] if options else None))
        if segment_start is not None:
            segment_steps += 1
        last = step == spec.steps - 1
        if (step + 1) % spec.eval_every == 0 or last or (step + 1) % spec.log_every == 0:
            if segment_start is not None:  # close the timed segment before any host work
                sync(device)
                timed_seconds += time.perf_counter() - segment_start
                timed_steps += segment_steps
                segment_start = None
            flush_losses(step + 1)
            if (step + 1) % spec.log_every == 0 and not last:
                log(d, f"[{label}] step {step + 1:5d}  loss {train_curve[-1][1]:.4f}  lr {lr_at(step, spec):.2e}")
            if (step + 1) % spec.eval_every == 0 or last:
                run_eval(step + 1)
    wall = time.perf_counter() - wall_start
    per_s = items_per_step * d.world_size * timed_steps / timed_seconds if timed_seconds > 0 else float("nan")
    return {
        "steps": spec.steps,
        "train_curve": train_curve,
        "val_curve": val_curve,
        "final_val": val_curve[-1] if val_curve else {},
        "items_per_s": per_s,
        "timed_steps": timed_steps,
        "wall_seconds": wall,
    }


def steps_for_minutes(d: Dist, minutes: float, build: Callable[[], nn.Module], spec: TrainSpec,
                      next_batch: Callable[[], Batch], amp_dtype: torch.dtype, probe_steps: int = 10) -> int:
    """How many steps of the model ``build()`` makes fit in ``minutes`` (timed on a throwaway copy).

    Both models of a comparison then train for that many steps: same tokens, same schedule.
    """
    model = build()
    probe = TrainSpec(steps=spec.timing_warmup + probe_steps, lr=spec.lr, eval_every=10**9, log_every=10**9,
                      timing_warmup=spec.timing_warmup, cuda_graph=spec.cuda_graph)
    result = train(d, "probe", model, probe, next_batch, lambda m: {}, amp_dtype, items_per_step=1)
    per_step = 1.0 / (result["items_per_s"] / d.world_size)
    del model
    return broadcast_int(d, max(1, int(minutes * 60 / per_step)))


# ----------------------------------------------------------------------------- reporting


def write_json(path: Path, obj: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def smooth(values: Sequence[float], alpha: float = 0.9) -> List[float]:
    """Exponential moving average with bias correction (readable curves from noisy steps)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha ** (i + 1)))
    return out


def plot_panels(path: Path, title: str, panels: Sequence[Tuple[str, str, Dict[str, Tuple[list, list]]]]) -> bool:
    """One PNG with a subplot per ``(title, ylabel, {series: (steps, values)})``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {path.name} (pip install matplotlib)", flush=True)
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (sub, ylabel, series) in zip(axes[0], panels):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(sub)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
