"""Sharded training of the LM example: FSDP2 (``--fsdp``) and context parallelism
(``--context-parallel N``).

The ranks form a grid of data-parallel groups of ``N`` consecutive ranks: the ``N`` ranks of
a group share their batch, each holding a shard of every sequence
(:func:`moda_cuda.distributed.context_parallel_moda_attention`, over a process group of its
own), and the groups draw different batches. Gradients are averaged over all ranks (DDP, or
FSDP2's reduce-scatter with ``--fsdp``, which shards the parameters, gradients and optimizer
state over all ranks). That average is the gradient of the mean loss over every token:
each rank back-propagates the mean loss of its shard, and the ring backward hands every
other rank of its group the gradients of its keys and values, so the gradients of a group
sum to the gradient of the sum of its ranks' means, ``N`` times the group's mean loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from _common import Dist, is_fully_sharded
from moda_cuda.layers import MoDAForCausalLM, ModelOutput

LAYOUTS = ("zigzag", "contiguous")


@dataclass
class Parallelism:
    """How the job's ranks share the work."""

    fsdp: bool = False
    context_parallel: int = 1  # N: ranks per sequence
    layout: str = "zigzag"
    group: Optional[dist.ProcessGroup] = None  # this rank's context-parallel group
    data_rank: int = 0  # which data-parallel group this rank is in
    data_ranks: int = 1  # how many there are


def setup_parallelism(d: Dist, fsdp: bool, context_parallel: int, layout: str) -> Parallelism:
    """Create the context-parallel groups (every rank takes part) and say where this rank sits."""
    if context_parallel < 1 or d.world_size % context_parallel:
        raise SystemExit(f"--context-parallel must divide the world size ({d.world_size}), got {context_parallel}")
    if (fsdp or context_parallel > 1) and not d.initialized:
        raise SystemExit("--fsdp and --context-parallel run under torchrun (torch.distributed)")
    group = None
    if context_parallel > 1:
        # Ranks [0, N), [N, 2N), ...: a communicator of its own, apart from the gradient collectives.
        group, _ = dist.new_subgroups(group_size=context_parallel)
    return Parallelism(fsdp, context_parallel, layout, group, d.rank // context_parallel,
                       d.world_size // context_parallel)


class ContextParallelLM(nn.Module):
    """The LM on this rank's shard of each sequence of the batch.

    ``forward`` takes whole sequences (the same on every rank of the group) and returns the
    logits of the rank's positions and a loss whose *value* is the mean over the whole
    sequences (for the logs) and whose *gradient* is that of the shard's mean (module docstring).
    """

    def __init__(self, model: MoDAForCausalLM, parallelism: Parallelism) -> None:
        super().__init__()
        self.model = model
        self.cp = model.enable_context_parallel(parallelism.group, parallelism.layout)

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, **options) -> ModelOutput:
        if options:
            raise ValueError(f"context parallelism takes whole sequences only, not {sorted(options)}")
        out = self.model(self.cp.shard(input_ids), None if targets is None else self.cp.shard(targets))
        if out.loss is None:
            return out
        total = out.loss.detach().clone()
        dist.all_reduce(total, group=self.cp.group)  # shards of equal length: the mean of means
        return ModelOutput(out.logits, out.loss + (total / self.cp.world_size - out.loss).detach())


def parallelize(model: MoDAForCausalLM, d: Dist, p: Parallelism) -> nn.Module:
    """``model`` sharded as ``p`` says (FSDP2 per block and at the root; context parallelism)."""
    if p.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(d.device.type, (d.world_size,))
        for block in model.trunk.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the embedding, the final norm and the (tied) head
    return ContextParallelLM(model, p) if p.context_parallel > 1 else model


def unwrap(model: nn.Module) -> MoDAForCausalLM:
    return model.model if isinstance(model, ContextParallelLM) else model


def model_to_save(model: nn.Module, d: Dist) -> Optional[MoDAForCausalLM]:
    """On rank 0, a plain copy of the trained LM (FSDP: its full weights gathered from every
    rank, which all take part); None on the other ranks."""
    lm = unwrap(model)
    if not is_fully_sharded(lm):
        return lm if d.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return None
    plain = MoDAForCausalLM(lm.config)
    plain.load_state_dict(full)
    return plain
