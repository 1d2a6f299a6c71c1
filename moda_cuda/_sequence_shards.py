"""Which positions of a sequence each rank holds under context parallelism.

The sequence of length ``T`` is cut into equal *pieces*; each of the ``W`` ranks holds some
of them, concatenated in increasing position order:

* ``"contiguous"``: ``W`` pieces; rank ``r`` holds piece ``r``, positions ``[r*T/W, (r+1)*T/W)``.
* ``"zigzag"``: ``2W`` pieces of ``T/(2W)``; rank ``r`` holds pieces ``r`` and ``2W-1-r``.
  Under causal attention every rank then owns one early and one late piece, so all ranks
  have the same amount of work (with contiguous shards the last rank has ``2W - 1`` times the
  first rank's work).

Because a rank's pieces are concatenated in increasing position order, a query row sees a
key row of the same rank under causal masking exactly when its local index is larger or
equal, as in the whole sequence: the rank's own block is an ordinary causal problem.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")


def pieces_per_rank(layout: str) -> int:
    return 1 if layout == "contiguous" else 2


def piece_ids(rank: int, world_size: int, layout: str) -> Tuple[int, ...]:
    """Indices (in the whole sequence) of the pieces ``rank`` holds, in local order."""
    return (rank,) if layout == "contiguous" else (rank, 2 * world_size - 1 - rank)


def sequence_positions(local_len: int, rank: int, world_size: int, layout: str = "contiguous",
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """The position in the whole sequence of each of ``rank``'s ``local_len`` rows (int64)."""
    check_layout(layout)
    n = pieces_per_rank(layout)
    if local_len % n:
        raise ValueError(f"a {layout} shard holds {n} equal pieces: its length {local_len} must be a multiple of {n}")
    piece = local_len // n
    return torch.cat([torch.arange(p * piece, (p + 1) * piece, device=device)
                      for p in piece_ids(rank, world_size, layout)])


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, layout: str = "contiguous",
                   dim: int = 1) -> torch.Tensor:
    """``rank``'s shard of the whole-sequence tensor ``x`` (sequence along ``dim``)."""
    check_layout(layout)
    pieces = world_size * pieces_per_rank(layout)
    T = x.shape[dim]
    if T % pieces:
        raise ValueError(f"a {layout} layout over {world_size} ranks cuts the sequence into {pieces} equal pieces: "
                         f"its length {T} must be a multiple of {pieces}")
    parts = x.chunk(pieces, dim=dim)
    return torch.cat([parts[p] for p in piece_ids(rank, world_size, layout)], dim=dim)


def visible_blocks(rank: int, source: int, world_size: int, layout: str, causal: bool,
                   local_len: int) -> List[Tuple[slice, slice]]:
    """The rows of ``rank``'s queries and of ``source``'s keys (``source != rank``) that see
    each other, as pairs ``(query rows, key rows)`` of equal length with every key of the pair
    visible to every query of it: the whole block when every piece pair is visible, else one
    pair per visible piece pair. Piece ``a`` sees piece ``b`` entirely when not causal or
    ``b < a``, and not at all otherwise (``b > a``; ``b == a`` only happens on the own rank).
    """
    mine, theirs = piece_ids(rank, world_size, layout), piece_ids(source, world_size, layout)
    pairs = [(i, j) for i, a in enumerate(mine) for j, b in enumerate(theirs) if not causal or b < a]
    if len(pairs) == len(mine) * len(theirs):
        return [(slice(None), slice(None))]
    piece = local_len // len(mine)
    rows = [slice(i * piece, (i + 1) * piece) for i in range(len(mine))]
    return [(rows[i], rows[j]) for i, j in pairs]
