"""Parameters as layout-independent pieces: what a resharding checkpoint stores.

A TP-sharded parameter is not one contiguous block of the serial tensor when its weight is
fused (`in_proj` = [q | k | v | fc1] along dim 0, each segment split over TP): rank r holds
chunk r of *every* segment. Cut along the segments, each piece is a contiguous block:

    serial name "blocks.0.in_proj.weight", segments (h, h, h, f) along dim 0, TP = t:
      piece "blocks.0.in_proj.weight/0": serial shape [h, h_in],  this rank's rows
                                          [r*h/t, (r+1)*h/t) — a view of its local tensor
      piece ".../1", ".../2", ".../3":   the same for k, v and fc1

Unfused or replicated parameters are one piece named like the parameter. The pieces depend on
the model only (names and serial shapes), never on the layout, so a checkpoint written at one
TP size reads at any other: each rank asks for the blocks it now owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megavit.parallel.sharding import get_tp_shard


@dataclass
class Piece:
    name: str                     # the serial parameter's name, "/k" for its k-th segment
    global_shape: torch.Size      # the piece's serial shape
    offsets: tuple[int, ...]      # where this rank's block starts in it
    local: torch.Tensor           # this rank's block: a view of the local parameter


def pieces_of(name: str, local: torch.Tensor, shard=None) -> list[Piece]:
    """The pieces of one parameter (or a tensor shaped like it, e.g. an Adam moment) held
    by this rank. `shard`: its `TPShard`, read from `local` when not given."""
    shard = shard if shard is not None else get_tp_shard(local)
    if shard is None:
        return [Piece(name, local.shape, (0,) * local.dim(), local)]
    out = []
    start = 0
    fused = len(shard.segments) > 1
    for k, (full, part) in enumerate(zip(shard.segments, shard.local_segments)):
        shape = list(local.shape)
        shape[shard.dim] = full
        offsets = [0] * local.dim()
        offsets[shard.dim] = shard.rank * part
        out.append(Piece(f"{name}/{k}" if fused else name, torch.Size(shape), tuple(offsets),
                         local.narrow(shard.dim, start, part)))
        start += part
    return out
