"""Point-to-point ring of a process group: send to the next rank, receive from the previous.

Built on ``torch.distributed.batch_isend_irecv`` (NCCL on GPUs, gloo on CPUs). An exchange
is posted at once and waited for later, so the caller computes while the tensors travel.
Every rank posts its exchanges in the same order, which is what matches a send with its
receive (tensors between one pair of ranks are matched in posting order).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


class InFlight:
    """A posted exchange: :meth:`wait` returns the tensor received from the previous rank."""

    def __init__(self, works: List, sent: torch.Tensor, received: torch.Tensor) -> None:
        # The sent tensor is held until the send completes: its memory must not be reused before.
        self._works, self._sent, self._received = works, sent, received

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], None
        return self._received


class RingExchange:
    """Ranks ``0 .. W-1`` of ``group`` (None: the default group) in a ring."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        # P2POp takes global ranks (its group_peer argument is newer than torch 2.5).
        self._next = dist.get_global_rank(self.group, (self.rank + 1) % self.world_size)
        self._previous = dist.get_global_rank(self.group, (self.rank - 1) % self.world_size)

    def pass_on(self, tensor: torch.Tensor) -> InFlight:
        """Post: send ``tensor`` to the next rank and receive the previous rank's tensor of the
        same shape and dtype. Returns without waiting; ``tensor`` must not change until then."""
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, self._next, self.group),
            dist.P2POp(dist.irecv, received, self._previous, self.group),
        ])
        return InFlight(works, tensor, received)
